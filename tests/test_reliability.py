"""Interruptions, crashes, hostile files and concurrent runs (issue 5)."""

import os
import pickle
import signal
import subprocess
import sys
import time

import pytest
import torch

import train
from checkpoint import CheckpointLock, load_checkpoint
import generate
from conftest import ROOT, TINY, cli_error, one_line_error, run_script
from test_cli import read_csv, same_metrics

# More steps per epoch than TINY, so a signal lands mid-epoch.
SLOW = [*TINY, "--limit", "2048", "--batch-size", "16"]  # 128 steps per epoch

# Runs train.main in a subprocess with os.replace slowed down for the Nth checkpoint write, so the
# test can SIGKILL it while the new checkpoint exists only as a complete temp file.
SLOW_SAVE = """
import os, sys, time
sys.path.insert(0, {root!r})
import train
real, count = os.replace, [0]
def replace(src, dst):
    if str(dst).endswith(".pt"):
        count[0] += 1
        if count[0] == {nth}:
            print("SAVING", flush=True)
            time.sleep(60)
    return real(src, dst)
os.replace = replace
sys.exit(train.main(sys.argv[1:]))
"""


# Runs train.main in a subprocess that sends itself a real signal right after step N.
SIGNAL_AT = """
import os, sys
sys.path.insert(0, {root!r})
import train
real, count = train.train_step, [0]
def step(*a, **kw):
    out = real(*a, **kw)
    count[0] += 1
    if count[0] == {n}:
        os.kill(os.getpid(), {sig})
    return out
train.train_step = step
sys.exit(train.main(sys.argv[1:]))
"""


def start(args, code=None):
    cmd = [sys.executable, "-c", code] if code else [sys.executable, os.path.join(ROOT, "train.py")]
    return subprocess.Popen([*cmd, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"), cwd=ROOT)


def wait_for(proc, text, timeout=120):
    deadline = time.time() + timeout
    lines = []
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if text in line:
            return lines
    proc.kill()
    raise AssertionError(f"never printed {text!r}: {''.join(lines)}{proc.stderr.read()}")


def assert_same_run(a, b):
    ca, cb = load_checkpoint(a), load_checkpoint(b)
    assert ca["epoch"] == cb["epoch"] and cb["step"] == 0
    for k, v in ca["model"].items():
        assert torch.equal(v, cb["model"][k]), k
    assert same_metrics(read_csv(a.with_suffix(".metrics.csv")), read_csv(b.with_suffix(".metrics.csv")))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 3-epoch SLOW run to compare interrupted ones with."""
    ckpt = tmp_path_factory.mktemp("ref") / "ref.pt"
    assert train.main([*SLOW, "--epochs", "3", "--checkpoint", str(ckpt)]) == 0
    return ckpt


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_saves_mid_epoch_and_resume_is_exact(reference, tmp_path, sig, code):
    ckpt = tmp_path / "run.pt"
    at = 128 + 37  # epoch 2, step 37
    proc = start([*SLOW, "--epochs", "3", "--checkpoint", ckpt], SIGNAL_AT.format(root=ROOT, n=at, sig=int(sig)))
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and f"saved {ckpt}" in lines[0] and "--resume" in lines[0], err
    assert "epoch 2, step 37/128" in lines[0]
    c = load_checkpoint(ckpt)
    assert (c["epoch"], c["step"]) == (1, 37)  # stopped mid-epoch, state saved there
    assert len(read_csv(tmp_path / "run.metrics.csv")) == 1
    assert train.main(["--epochs", "3", "--checkpoint", str(ckpt), "--resume"]) == 0
    assert_same_run(reference, ckpt)


def test_sigkill_anywhere_keeps_last_complete_checkpoint(reference, tmp_path):
    ckpt = tmp_path / "run.pt"
    # 1) killed inside the second checkpoint write (temp file complete, rename not yet done)
    proc = start([*SLOW, "--epochs", "3", "--checkpoint", ckpt], SLOW_SAVE.format(root=ROOT, nth=2))
    wait_for(proc, "SAVING")
    assert any(p.name.endswith(".tmp") for p in tmp_path.iterdir())
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert load_checkpoint(ckpt)["epoch"] == 1  # the previous complete one, not a partial file
    # 2) killed at a few moments of a resumed run, each time leaving a loadable checkpoint
    for delay in (1.0, 3.0, 4.5):  # start-up, data loading, training
        proc = start(["--epochs", "3", "--checkpoint", ckpt, "--resume"])
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        assert load_checkpoint(ckpt)["epoch"] >= 1
    # 3) resuming finishes the run exactly as if nothing had happened, and clears the temp file
    assert train.main(["--epochs", "3", "--checkpoint", str(ckpt), "--resume"]) == 0
    assert_same_run(reference, ckpt)
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    import cli
    from model import VAE

    ckpt = tmp_path / "run.pt"
    assert train.main([*TINY, "--epochs", "1", "--checkpoint", str(ckpt)]) == 0
    before = ckpt.read_bytes()
    real, calls = VAE.loss, [0]

    def poisoned(self, *a, **kw):
        parts = real(self, *a, **kw)
        calls[0] += 1
        if calls[0] == 3 and self.training:
            parts = parts._replace(kl=parts.kl * float("nan"))
            parts = parts._replace(total=parts.recon + parts.kl)
        return parts

    monkeypatch.setattr(VAE, "loss", poisoned)
    code = cli.run(train.main, ["--epochs", "2", "--checkpoint", str(ckpt), "--resume"])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1
    assert "non-finite loss at epoch 2, step 3 (KL = nan)" in err and "untouched" in err
    assert ckpt.read_bytes() == before


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # unpickling would create the marker file


@pytest.mark.parametrize("form", ["torch.save", "raw pickle"])
def test_crafted_checkpoint_is_refused_and_never_runs(tmp_path, form, capsys):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    if form == "torch.save":
        torch.save({"format": 1, "model": Payload(str(marker))}, evil)
    else:
        evil.write_bytes(pickle.dumps(Payload(str(marker))))
    line = one_line_error(run_script("generate.py", "--checkpoint", evil))
    assert str(evil) in line and "refused" in line
    line = cli_error(train.main, ["--checkpoint", evil, "--resume"], capsys)
    assert str(evil) in line and "refused" in line
    assert not marker.exists()


def test_broken_checkpoints_give_one_line(tmp_path, capsys):
    cases = {
        "random.pt": os.urandom(4096),
        "empty.pt": b"",
    }
    for name, blob in cases.items():
        (tmp_path / name).write_bytes(blob)
    torch.save({"hello": 1}, tmp_path / "keys.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    good = tmp_path / "good.pt"
    assert train.main([*TINY, "--epochs", "1", "--checkpoint", str(good)]) == 0
    c = torch.load(good, weights_only=True)
    c["model_config"]["latent_dim"] = 7  # an incompatible config: weights no longer fit
    torch.save(c, tmp_path / "config.pt")
    expected = {"random.pt": "corrupt", "empty.pt": "corrupt", "keys.pt": "missing",
                "list.pt": "not a checkpoint", "config.pt": "do not fit"}
    for name, what in expected.items():
        for main, extra in ((generate.main, []), (train.main, ["--resume", "--epochs", 5])):
            line = cli_error(main, ["--checkpoint", tmp_path / name, *extra], capsys)
            assert str(tmp_path / name) in line and what in line, line


def test_second_training_on_same_checkpoint_refuses(tmp_path, capsys):
    import cli

    ckpt = tmp_path / "run.pt"
    with CheckpointLock(ckpt):  # as if another training held it
        assert cli.run(train.main, [*TINY, "--epochs", "1", "--checkpoint", str(ckpt)]) == 1
    assert "another training" in capsys.readouterr().err and not ckpt.exists()
    assert train.main([*TINY, "--epochs", "1", "--checkpoint", str(ckpt)]) == 0  # lock released


def test_output_folders_created_or_clear_error(tmp_path, capsys):
    deep = tmp_path / "a" / "b" / "vae.pt"
    assert train.main([*TINY, "--epochs", "1", "--checkpoint", str(deep)]) == 0 and deep.exists()
    blocker = tmp_path / "file"
    blocker.write_text("")
    line = one_line_error(run_script("train.py", *TINY, "--checkpoint", blocker / "vae.pt"))
    assert str(blocker) in line and "cannot create" in line
    line = cli_error(generate.main, ["--checkpoint", deep, "--out", blocker / "img"], capsys)
    assert str(blocker / "img") in line
