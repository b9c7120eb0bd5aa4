"""The README matches the code: every flag documented, CI runs the README's test command."""

import os
import re

import pytest

import evaluate
import generate
import train
from conftest import ROOT

README = open(os.path.join(ROOT, "README.md")).read()


@pytest.mark.parametrize("module", [train, generate, evaluate])
def test_every_flag_is_in_the_readme(module):
    for action in module.build_parser()._actions:
        for flag in action.option_strings:
            if flag.startswith("--") and flag != "--help":
                assert flag in README, f"{module.__name__}.py {flag} is not documented"


def test_every_flag_help_states_its_default():
    for module in (train, generate, evaluate):
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
