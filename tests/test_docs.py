"""The README matches the code: every flag it names exists, CI runs the README's test command."""

import os
import re

import evaluate
import fit_mixture
import generate
import train
import train_classifier
from conftest import ROOT

SCRIPTS = (train, generate, evaluate, fit_mixture, train_classifier)

README = open(os.path.join(ROOT, "README.md")).read()


def test_every_flag_the_readme_names_exists():
    """The README lists the most used flags (--help lists all): each must be a real one."""
    known = {flag for module in SCRIPTS
             for action in module.build_parser()._actions for flag in action.option_strings}
    named = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", README))
    assert named, "the README names no flag"
    assert named <= known, f"the README names flags no script has: {sorted(named - known)}"


def test_readme_is_short():
    assert len(README.encode()) <= 10_000, "the README is for users; history goes in git"


def test_every_flag_help_states_its_default():
    for module in SCRIPTS:
        text = module.build_parser().format_help()
        for action in module.build_parser()._actions:
            if action.option_strings and action.default is not None and action.dest != "help":
                assert action.help and "%(default)" not in action.help
        assert text.count("(default:") >= 5


def test_ci_runs_the_readme_test_command():
    commands = re.findall(r"```bash\n(.+?)\n```", README)
    test_cmd = next(c for c in commands if "pytest" in c)
    main_cmd = next(c for c in commands if "train.py" in c)
    assert "requirements-dev.txt" in test_cmd and "requirements.txt" in main_cmd
    assert "generate.py" in main_cmd
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        assert test_cmd in f.read()
