"""The code's shape: modules import each other without circles, scripts import no script, no
private torch API, and `python model.py` shows the model's shapes."""

import ast
import os
import re
import subprocess
import sys

from conftest import ROOT

SCRIPTS = {"train", "generate", "evaluate", "train_classifier"}
SOURCES = [f for f in os.listdir(ROOT) if f.endswith(".py")] + [
    os.path.join("benchmarks", f) for f in os.listdir(os.path.join(ROOT, "benchmarks")) if f.endswith(".py")]
PROJECT = {os.path.splitext(f)[0] for f in os.listdir(ROOT) if f.endswith(".py")}


def project_imports(path: str) -> set[str]:
    """The project's modules that a file imports, at any depth of its code."""
    tree = ast.parse(open(os.path.join(ROOT, path)).read())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names & PROJECT


def test_modules_import_without_circles():
    graph = {os.path.splitext(f)[0]: project_imports(f) for f in SOURCES if os.sep not in f}
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


def test_no_private_torch_api():
    # The grep pattern, spelt in pieces so that this file does not match it itself.
    pattern = re.compile("|".join([r"torch\._[a-z]", r"\._" + "optimizer_step", "_global_" + "optimizer"]))
    for folder in (ROOT, os.path.join(ROOT, "benchmarks"), os.path.join(ROOT, "tests")):
        for f in os.listdir(folder):
            if f.endswith(".py"):
                text = open(os.path.join(folder, f)).read()
                assert not pattern.search(text), f"{f}: {pattern.search(text).group()}"


def test_python_model_py_prints_the_shapes():
    out = subprocess.run([sys.executable, "model.py"], capture_output=True, text=True, cwd=ROOT,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    for name, shape in (("x", "(8, 1, 28, 28)"), ("mu", "(8, 32)"), ("logvar", "(8, 32)"),
                        ("z", "(8, 32)"), ("logits", "(8, 1, 28, 28)")):
        assert re.search(rf"^{name}\s+{re.escape(shape)}$", out.stdout, re.M), out.stdout
    assert re.search(r"^parameters: [\d,]+$", out.stdout, re.M), out.stdout
