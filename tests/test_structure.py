"""The code's shape: a minimal reference (what a user runs at the top level, the loop in
train.py, a self-contained model.py), imports without circles, no private torch API, and docs
that match the code."""

import ast
import glob
import os
import re
import subprocess
import sys

import evaluate
import generate
from conftest import ROOT
from lib import cli
from tools import fit_mixture, train_classifier

FOLDERS = ("", "lib", "tools", "benchmarks")
SOURCES = [os.path.join(d, f) for d in FOLDERS for f in sorted(os.listdir(os.path.join(ROOT, d))) if f.endswith(".py")]
SCRIPTS = {"train", "generate", "evaluate", "tools.fit_mixture", "tools.train_classifier", "benchmarks.epoch_speed",
           "benchmarks.time_to_quality"}
PARSERS = (generate.build_parser, evaluate.build_parser, fit_mixture.build_parser, train_classifier.build_parser)
README = open(os.path.join(ROOT, "README.md")).read()


def module_name(path: str) -> str:
    return os.path.splitext(path)[0].replace(os.sep, ".").removesuffix(".__init__")


def project_imports(path: str) -> set[str]:
    """The project's modules that a file imports, at any depth of its code."""
    names = set()
    for node in ast.walk(ast.parse(open(os.path.join(ROOT, path)).read())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.update([node.module] + [f"{node.module}.{a.name}" for a in node.names])
    return names & {module_name(f) for f in SOURCES}


def lines(path: str) -> int:
    with open(os.path.join(ROOT, path)) as f:
        return sum(1 for _ in f)


def test_modules_import_without_circles():
    graph = {module_name(f): project_imports(f) for f in SOURCES}
    done, path = set(), []

    def visit(m):
        assert m not in path, "import circle: " + " -> ".join(path[path.index(m):] + [m])
        if m in done:
            return
        path.append(m)
        for n in sorted(graph.get(m, ())):
            visit(n)
        path.pop()
        done.add(m)

    for m in sorted(graph):
        visit(m)


def test_scripts_import_no_script():
    for f in SOURCES:
        assert not project_imports(f) & SCRIPTS, f"{f} imports a script: {project_imports(f) & SCRIPTS}"


def test_the_top_level_is_what_a_user_runs_and_the_code_stays_small():
    top = sorted(f for f in SOURCES if os.sep not in f)
    assert top == ["evaluate.py", "generate.py", "model.py", "train.py"], top
    size = sum(lines(f) for f in SOURCES if not f.startswith("benchmarks"))
    assert size <= 3000, f"{size} lines: the project's budget against growth (room for a small extension; a fork " \
        "that adds more raises it)"
    assert lines("model.py") + lines("train.py") <= 600


def test_model_py_is_self_contained():
    """model.py imports torch, the standard library and one project module, the boundary that
    reads checkpoints and checks the API's arguments; the VAE class has at most 12 methods."""
    assert project_imports("model.py") <= {"lib.checks"}
    tree = ast.parse(open(os.path.join(ROOT, "model.py")).read())
    vae = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "VAE")
    assert len([n for n in vae.body if isinstance(n, ast.FunctionDef)]) <= 12


def test_train_py_shows_the_loop():
    text = open(os.path.join(ROOT, "train.py")).read()
    assert "loss_fn = torch.compile(training.objective) if args.compile else training.objective" in text
    steps = [text.index(s) for s in ("zero_grad(", "loss_fn(", ".backward(", "opt.step()", "training.save(")]
    assert steps == sorted(steps), steps


def test_comments_say_why_not_when():
    # Spelt in pieces, so that this file does not match it itself.
    pattern = re.compile("|".join([r"\bform" + r"er\b", "today" + "'s", r"\biss" + r"ue \d+", r"\w#" + r"\d{3,}",
                                   r"\bro" + r"und \d+", r"\d+(\.\d+)?x (fas" + "ter|slo" + "wer)"]), re.I)
    for f in SOURCES + [os.path.join("tests", t) for t in os.listdir(os.path.join(ROOT, "tests")) if t.endswith(".py")]:
        text = open(os.path.join(ROOT, f)).read()
        assert not pattern.search(text), f"{f}: {pattern.search(text).group()}"


def test_no_private_torch_api():
    # The pattern, spelt in pieces so that this file does not match it itself.
    pattern = re.compile("|".join([r"torch\._[a-z]", r"\._" + "optimizer_step", "_global_" + "optimizer"]))
    for f in SOURCES + [os.path.join("tests", t) for t in os.listdir(os.path.join(ROOT, "tests")) if t.endswith(".py")]:
        text = open(os.path.join(ROOT, f)).read()
        assert not pattern.search(text), f"{f}: {pattern.search(text).group()}"


def test_python_model_py_prints_the_shapes():
    out = subprocess.run([sys.executable, "model.py"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    for name, shape in (("x", "(8, 1, 28, 28)"), ("mu", "(8, 32)"), ("logvar", "(8, 32)"),
                        ("z", "(8, 32)"), ("logits", "(8, 1, 28, 28)")):
        assert re.search(rf"^{name}\s+{re.escape(shape)}$", out.stdout, re.M), out.stdout
    assert re.search(r"^parameters: [\d,]+$", out.stdout, re.M), out.stdout


def parsers():
    return [cli.Parser("", cli.TRAIN_FLAGS)] + [build() for build in PARSERS]


def test_every_flag_the_readme_names_exists():
    """The README lists the most used flags (--help lists all): each must be a real one."""
    known = {flag for p in parsers() for action in p._actions for flag in action.option_strings}
    named = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", README))
    assert named, "the README names no flag"
    assert named <= known, f"the README names flags no script has: {sorted(named - known)}"


def test_every_name_the_extension_guide_gives_is_in_the_code():
    """docs/extending.md tells where a change goes, by name: each name must still be defined, a dotted one
    (`training.setup`, `VAE.loss`) in that module or in the file of that class."""
    guide = open(os.path.join(ROOT, "docs", "extending.md")).read()
    modules = {os.path.basename(p)[:-3]: open(p).read() for folder in ("", "lib", "tools")
               for p in glob.glob(os.path.join(ROOT, folder, "*.py"))}
    tests = "\n".join(open(p).read() for p in glob.glob(os.path.join(ROOT, "tests", "*.py")))

    def defined(name, text):
        return re.search(rf"(def|class) {name}\b|^\s*(\w+, )*{name}(, \w+)*(: [^=]+)? = ", text, re.M)

    names = {t.removeprefix("lib.") for t in re.findall(r"`([A-Za-z_][\w.]*)(?:\(.*?\))?`", guide)
             if not t.startswith(("nn.", "torch.")) and not t.endswith(".py")}
    assert len(names) > 20, names
    undefined = []
    for name in sorted(names):
        *owner, last = name.split(".")
        if not owner:
            where = [*modules.values(), tests]
        elif owner[-1] in modules:
            where = [modules[owner[-1]]]
        else:  # a class's attribute: in the file that defines the class, else (a variable's) anywhere
            where = [t for t in modules.values() if re.search(rf"class {owner[-1]}\b", t)] or list(modules.values())
        if not any(defined(last, text) for text in where):
            undefined.append(name)
    assert not undefined, f"docs/extending.md names what the code no longer defines: {undefined}"


def test_readme_default_row_is_the_default_run():
    """The results row of `python train.py` names the epochs and the prior train.py runs by default."""
    row = next(line for line in README.splitlines() if line.startswith("| default ") and "`python train.py` |" in line)
    assert f", {cli.EPOCHS} epochs |" in row and ("flow prior" in row) == (cli.FLOW_PRIOR > 0), row


def test_readme_is_short():
    assert len(README.encode()) <= 8_000, "the README is a reference page; details go to docs/"


def test_every_flag_help_states_its_default():
    for p in parsers():
        for action in p._actions:
            if action.option_strings and action.default is not None and action.dest != "help":
                assert action.help and "%(default)" not in action.help
                stated = re.search(r"\(default: ([^)]*)", action.help)  # worded by hand: it must be the real one
                if stated and action.default is not False:
                    d = action.default  # a list as the flag takes it (nargs), a path by its last part
                    shown = " ".join(map(str, d)) if isinstance(d, list) else os.path.basename(str(d).rstrip("/"))
                    assert shown in stated.group(1), (action.dest, stated)
        assert p.format_help().count("(default:") >= 3


def test_ci_runs_the_readme_test_command():
    commands = re.findall(r"```bash\n(.+?)\n```", README)
    test_cmd = next(c for c in commands if "pytest" in c)
    main_cmd = next(c for c in commands if "train.py" in c)
    assert "requirements-dev.txt" in test_cmd and "requirements.txt" in main_cmd
    assert "generate.py" in main_cmd
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        assert test_cmd in f.read()
