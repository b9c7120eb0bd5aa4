"""Reliability: signals in every phase, crashes, hostile files, bad input and concurrent runs;
what docs/reliability.md promises."""

import copy
import dataclasses
import errno
import io
import os
import pickle
import signal
import stat
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

import evaluate
import generate
import train
from conftest import MIXTURE_RUN, ROOT, TINY, cli_error, one_line_error, read_csv, run_script, same_metrics
from lib import cli, data, files, mixture, training
from lib.checks import FORMAT, ZERO_ALLOWED, load_checkpoint, with_checksums
from lib.files import Lock, write_atomic
from model import VAE, VAEConfig
from tools import fit_mixture

# More steps per epoch than TINY, so a signal lands mid-epoch.
SLOW = [*TINY, "--limit", "1024", "--batch-size", "16", "--ema", "0.9"]  # 64 steps per epoch; the average resumed too

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


# Runs train.main in a subprocess that sends itself a real signal at the Nth call of a function of
# lib/training.py (learning_rate: once per step, at its start; fit_to_model: the mixture fit;
# load_test_set: data loading).
SIGNAL_AT = """
import os, sys
sys.path.insert(0, {root!r})
import train
from lib import training
real, count = training.{name}, [0]
def patched(*a, **kw):
    count[0] += 1
    if count[0] == {n}:
        os.kill(os.getpid(), {sig})
    return real(*a, **kw)
training.{name} = patched
sys.exit(train.main(sys.argv[1:]))
"""


def start(args, code=None):
    cmd = [sys.executable, "-c", code] if code else [sys.executable, os.path.join(ROOT, "train.py")]
    return subprocess.Popen([*cmd, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"), cwd=ROOT)


def wait_for(proc, text, timeout=120):
    watchdog = threading.Timer(timeout, proc.kill)  # a child that hangs silently ends readline() by its death
    watchdog.start()
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if text in line:
                return lines
    finally:
        watchdog.cancel()
    proc.kill()
    raise AssertionError(f"never printed {text!r} within {timeout} s (exit code {proc.wait()}): "
                         f"{''.join(lines)}{proc.stderr.read()}")


def assert_same_run(a, b):
    ca, cb = load_checkpoint(a), load_checkpoint(b)
    assert ca["epoch"] == cb["epoch"] and cb["step"] == 0
    for part in ("model", "ema"):
        for k, v in (ca[part] or {}).items():
            assert torch.equal(v, cb[part][k]), (part, k)
    assert same_metrics(read_csv(f"{a}.metrics.csv"), read_csv(f"{b}.metrics.csv"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 3-epoch SLOW run to compare interrupted ones with."""
    ckpt = tmp_path_factory.mktemp("ref") / "ref.pt"
    assert train.main([*SLOW, "--epochs", "3", "--checkpoint", str(ckpt)]) == 0
    return ckpt


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_saves_mid_epoch_and_resume_is_exact(reference, tmp_path, sig, code, capsys):
    ckpt = tmp_path / "run.pt"
    at = 64 + 37  # epoch 2, step 37
    proc = start([*SLOW, "--epochs", "3", "--checkpoint", ckpt], SIGNAL_AT.format(root=ROOT, name="learning_rate", n=at, sig=int(sig)))
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and f"saved {ckpt}" in lines[0] and "--resume" in lines[0], err
    assert "epoch 2, step 37/64" in lines[0]
    c = load_checkpoint(ckpt)
    assert (c["epoch"], c["step"]) == (1, 37)  # stopped mid-epoch, state saved there
    assert len(read_csv(tmp_path / "run.pt.metrics.csv")) == 1
    line = cli_error(train.main, ["--epochs", "1", "--checkpoint", ckpt, "--resume"], capsys)  # the 37 steps stay
    assert "already has 1 epoch and 37 steps: --epochs 1 cannot undo them" in line
    assert train.main(["--epochs", "3", "--checkpoint", str(ckpt), "--resume"]) == 0
    assert_same_run(reference, ckpt)


def test_an_overwrite_stopped_in_its_first_epoch_keeps_no_rows_of_the_old_run(tmp_path, monkeypatch):
    ckpt = tmp_path / "run.pt"
    assert train.main([*TINY, "--epochs", "1", "--mixture-components", "0", "--checkpoint", str(ckpt)]) == 0
    assert len(read_csv(tmp_path / "run.pt.metrics.csv")) == 1
    real, calls = training.learning_rate, [0]

    def stop_at_step_3(*args):
        calls[0] += 1
        if calls[0] == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return real(*args)

    monkeypatch.setattr(training, "learning_rate", stop_at_step_3)
    assert train.main([*TINY, "--epochs", "1", "--overwrite", "--checkpoint", str(ckpt)]) == 130
    c = load_checkpoint(ckpt)
    assert (c["epoch"], c["step"]) == (0, 3) and read_csv(tmp_path / "run.pt.metrics.csv") == []


def test_sigkill_anywhere_keeps_last_complete_checkpoint(reference, tmp_path):
    ckpt = tmp_path / "run.pt"
    # 1) killed inside the second checkpoint write (temp file complete, rename not yet done)
    proc = start([*SLOW, "--epochs", "3", "--checkpoint", ckpt], SLOW_SAVE.format(root=ROOT, nth=2))
    wait_for(proc, "SAVING")
    assert any(p.name.endswith(".tmp") for p in tmp_path.iterdir())
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert load_checkpoint(ckpt)["epoch"] == 1  # the previous complete one, not a partial file
    # 2) killed at a few moments of a resumed run, each time leaving a loadable checkpoint: start-up, the lock
    #    held (after the data is read), the state restored, training after a save
    for printed in (None, "device:", "resuming", "epoch   2/3"):
        proc = start(["--epochs", "3", "--checkpoint", ckpt, "--resume"])
        if printed:
            wait_for(proc, printed)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        assert load_checkpoint(ckpt)["epoch"] >= 1
    # 3) resuming finishes the run exactly as if nothing had happened, and clears the temp file
    assert train.main(["--epochs", "3", "--checkpoint", str(ckpt), "--resume"]) == 0
    assert_same_run(reference, ckpt)
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())


def test_signal_during_the_mixture_fit_keeps_the_model_and_resume_fits_it(tmp_path):
    """SIGTERM while the latent mixture is fitted after the last epoch: exit 143 and one line
    saying what is missing; --resume then fits the mixture the run stored (it does not say "already done")."""
    ckpt = tmp_path / "run.pt"
    proc = start([*TINY, "--epochs", "1", "--checkpoint", ckpt],
                 SIGNAL_AT.format(root=ROOT, name="fit_to_model", n=1, sig=int(signal.SIGTERM)))
    out, err = proc.communicate(timeout=120)
    lines = [line for line in err.splitlines() if line.strip()]
    assert proc.returncode == 143 and len(lines) == 1, err
    assert "latent mixture" in lines[0] and "--resume" in lines[0], lines[0]
    c = load_checkpoint(ckpt)
    assert c["epoch"] == 1 and c["latent_mixture"] is None
    assert c["args"]["mixture_components"] == mixture.DEFAULT_COMPONENTS  # the default as a number: a later one
    assert train.main(["--epochs", "1", "--checkpoint", str(ckpt), "--resume"]) == 0  # cannot change the run
    assert load_checkpoint(ckpt)["latent_mixture"]["weights"].shape == (1, mixture.DEFAULT_COMPONENTS)


def test_signal_while_loading_the_data_writes_nothing(tmp_path):
    ckpt = tmp_path / "new" / "run.pt"
    proc = start([*TINY, "--epochs", "1", "--checkpoint", ckpt],
                 SIGNAL_AT.format(root=ROOT, name="load_test_set", n=1, sig=int(signal.SIGINT)))
    out, err = proc.communicate(timeout=120)
    lines = [line for line in err.splitlines() if line.strip()]
    assert proc.returncode == 130 and len(lines) == 1 and "no checkpoint was written" in lines[0], err
    assert not (tmp_path / "new").exists()
    ckpt = tmp_path / "done.pt"  # a resume stopped as early: the checkpoint it continues is named, untouched
    assert train.main([*TINY, "--epochs", "1", "--mixture-components", "0", "--checkpoint", str(ckpt)]) == 0
    before = ckpt.read_bytes()
    proc = start(["--resume", "--epochs", "2", "--checkpoint", ckpt],
                 SIGNAL_AT.format(root=ROOT, name="load_test_set", n=1, sig=int(signal.SIGINT)))
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and err.strip() == f"SIGINT before training started: {ckpt} is as it was", err
    assert ckpt.read_bytes() == before


def test_each_checkpoint_has_its_own_metrics_file(tmp_path):
    """Two checkpoints whose names differ only in the extension keep two histories."""
    assert train.main([*TINY, "--epochs", "2", "--mixture-components", "0", "--checkpoint", str(tmp_path / "run.pt")]) == 0
    assert train.main([*TINY, "--epochs", "1", "--mixture-components", "0", "--checkpoint", str(tmp_path / "run.pth")]) == 0
    assert len(read_csv(tmp_path / "run.pt.metrics.csv")) == 2 and len(read_csv(tmp_path / "run.pth.metrics.csv")) == 1


@pytest.mark.parametrize("flags", [["--conditional", "--limit", "20"], ["--limit", "1"], ["--limit", "3", "--batch-size", "2"]])
def test_mixture_groups_of_one_image_fit(tmp_path, flags, capsys):
    """Digits with a single image among the first N, or one training image at all: the mixture
    fits (fewer components), in train.py and in tools/fit_mixture.py."""
    ckpt = tmp_path / "run.pt"
    assert train.main([*TINY[:-6], *flags, "--epochs", "1", "--checkpoint", str(ckpt)]) == 0
    out = capsys.readouterr().out  # counts in the singular where they are 1
    assert ", 1 epoch of " in out and (flags[1] != "1" or " on 1 image, 1 epoch of 1 step;" in out), out
    assert load_checkpoint(ckpt)["latent_mixture"] is not None
    assert fit_mixture.main(["--checkpoint", str(ckpt)]) == 0
    assert generate.main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "img"), "--n", "2"]) == 0


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch, capsys):
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
    line = one_line_error(run_script("generate.py", "--checkpoint", evil, "--out", tmp_path / "images"))
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


def test_a_config_its_weights_do_not_fit_is_refused_before_the_model_is_built(mixture_run, tmp_path, monkeypatch):
    """A crafted model_config far larger than the stored weights would allocate it all (the process killed for
    memory) if the model were built before the weights' shapes are compared: only its shapes are made."""
    c = torch.load(mixture_run, weights_only=True)
    c["model_config"].update(hidden_dim=1024, channels=[64, 128])  # small enough to survive a regression
    torch.save(c, tmp_path / "big.pt")
    built, init = [], VAE.__init__

    def recording(self, *args, **kwargs):
        built.append(torch.empty(0).device.type)  # where this construction allocates
        init(self, *args, **kwargs)

    monkeypatch.setattr(VAE, "__init__", recording)
    with pytest.raises(ValueError, match=r"weights do not fit the stored model config: model\['\w"):
        VAE.from_checkpoint(tmp_path / "big.pt")
    assert built == ["meta"]


def test_second_training_on_same_checkpoint_refuses(tmp_path, capsys):
    ckpt = tmp_path / "run.pt"
    with Lock(ckpt):  # as if another training held it
        assert cli.run(train.main, [*TINY, "--epochs", "1", "--checkpoint", str(ckpt)]) == 1
    assert "another training" in capsys.readouterr().err and not ckpt.exists()
    assert train.main([*TINY, "--epochs", "1", "--checkpoint", str(ckpt)]) == 0  # lock released


def test_a_checkpoint_replaced_after_it_was_read_is_not_written_over(mixture_run, tmp_path, monkeypatch, capsys):
    """tools/fit_mixture.py (as train.py --resume) reads the checkpoint before it takes the lock: if a training
    saved the file in between, what was read is stale, and writing it back would undo that save."""
    ckpt = tmp_path / "run.pt"
    ckpt.write_bytes(mixture_run.read_bytes())
    real = cli.load_vae

    def load_then_replaced(path, **kwargs):
        loaded = real(path, **kwargs)
        later = files.modified(path) + 10**9
        os.utime(path, ns=(later, later))  # another process saved it meanwhile
        return loaded

    monkeypatch.setattr(cli, "load_vae", load_then_replaced)
    before = ckpt.read_bytes()
    for main, args in ((fit_mixture.main, []), (train.main, ["--resume", "--epochs", "2"])):
        line = cli_error(main, ["--checkpoint", ckpt, *args], capsys)
        assert "changed since it was read" in line and ckpt.read_bytes() == before, line
    with Lock(ckpt, read_at=files.modified(ckpt)):  # each refusal released the lock
        pass


def test_the_lock_file_is_never_a_link_or_a_pipe_and_saves_keep_a_files_mode(tmp_path, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    (tmp_path / "a.pt.lock").symlink_to(notes)  # truncating the lock must not truncate this
    os.mkfifo(tmp_path / "b.pt.lock")
    for name in ("a.pt", "b.pt"):
        assert "lock file" in cli_error(train.main, [*TINY, "--epochs", "1", "--checkpoint", tmp_path / name], capsys)
    assert notes.read_text() == "mine"
    (tmp_path / "self.pt").symlink_to(tmp_path / "self.pt")  # links in a loop: no path, not a missing file
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    for bad in (tmp_path / "self.pt", tmp_path / "loop" / "vae.pt"):
        assert "loop of symbolic links" in cli_error(train.main, [*TINY, "--checkpoint", bad], capsys)
    assert (tmp_path / "self.pt").is_symlink()
    ckpt = tmp_path / "c.pt"
    assert train.main([*TINY, "--epochs", "1", "--mixture-components", "0", "--checkpoint", str(ckpt)]) == 0
    ckpt.chmod(0o600)  # a private checkpoint, resumed through a link to it
    (tmp_path / "link.pt").symlink_to(ckpt)
    assert train.main(["--resume", "--epochs", "2", "--checkpoint", str(tmp_path / "link.pt")]) == 0
    assert stat.S_IMODE(ckpt.stat().st_mode) == 0o600 and load_checkpoint(ckpt)["epoch"] == 2
    assert len(read_csv(tmp_path / "c.pt.metrics.csv")) == 2 and not (tmp_path / "link.pt.metrics.csv").exists()


def test_names_too_long_in_bytes_are_refused_and_a_refused_fsync_or_chmod_is_no_failure(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="too long"):  # 83 characters, 243 bytes in UTF-8
        files.check_output_path(tmp_path / ("\u65e5" * 80 + ".pt"))
    real = os.fsync

    def no_folder_fsync(fd):  # as some FUSE and network filesystems do
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "Invalid argument")
        real(fd)

    monkeypatch.setattr(os, "fsync", no_folder_fsync)
    write_atomic(tmp_path / "out.bin", lambda f: f.write(b"new"))
    assert (tmp_path / "out.bin").read_bytes() == b"new"

    def no_modes(fd, mode):  # a filesystem without permissions
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "fchmod", no_modes)
    write_atomic(tmp_path / "out.bin", lambda f: f.write(b"newer"))
    assert (tmp_path / "out.bin").read_bytes() == b"newer" and os.listdir(tmp_path) == ["out.bin"]


def test_output_folders_created_or_clear_error(tmp_path, capsys):
    deep = tmp_path / "a" / "b" / "vae.pt"
    assert train.main([*TINY, "--epochs", "1", "--checkpoint", str(deep)]) == 0 and deep.exists()
    blocker = tmp_path / "file"
    blocker.write_text("")
    line = one_line_error(run_script("train.py", *TINY, "--checkpoint", blocker / "vae.pt"))
    assert str(blocker) in line and "cannot create" in line
    line = cli_error(generate.main, ["--checkpoint", deep, "--out", blocker / "img"], capsys)
    assert str(blocker / "img") in line


def tree(folder):
    """Every file under folder with its bytes and mode: to show nothing on disk changed."""
    out = {}
    for root, _, names in os.walk(folder):
        for f in names:
            p = os.path.join(root, f)
            with open(p, "rb") as fh:
                out[p] = (fh.read(), os.stat(p).st_mode)
    return out


# -- 1. never touch what isn't ours --------------------------------------------------------------

def test_only_own_temp_files_are_removed(mixture_run, tmp_path, capsys):
    ckpt = tmp_path / "notes.pt"
    keep = [tmp_path / "notes.pt.mine.tmp", tmp_path / "notes.pt.123.tmp", tmp_path / ".swp.tmp",
            tmp_path / f"notes.pt.{os.getpid()}.0123456789abcdef.tmp"]  # a live process's own name
    for p in keep:
        p.write_text("keep")
    stale = tmp_path / "notes.pt.999999999.0123456789abcdef.tmp"  # pattern of a killed save
    stale.write_text("partial")
    line = cli_error(train.main, [*TINY, "--checkpoint", mixture_run], capsys)  # refuses: exists
    assert "exists" in line and all(p.read_text() == "keep" for p in keep)
    assert train.main([*TINY, "--epochs", "1", "--mixture-components", "0", "--checkpoint", str(ckpt)]) == 0
    assert all(p.read_text() == "keep" for p in keep) and not stale.exists()


def test_empty_paths_are_refused(mixture_run, tmp_path, capsys, monkeypatch):
    before = tree(tmp_path)
    monkeypatch.chdir(tmp_path)
    for main, args in ((train.main, ["--checkpoint", ""]), (evaluate.main, ["--json", "", "--checkpoint", "x.pt"]),
                       (generate.main, ["--out", "", "--checkpoint", mixture_run])):
        line = cli_error(main, args, capsys)
        assert "empty path" in line
    assert tree(tmp_path) == before


def test_a_checkpoint_path_that_cannot_hold_its_files_is_refused_before_training(tmp_path, capsys):
    """Too long a name for the temp file of an atomic save, a lock file that cannot be made, a path through a folder
    that does not exist and back out (`nodir/..`: no file to the OS, one to realpath): one line, nothing trained."""
    before = tree(tmp_path)
    line = cli_error(train.main, [*TINY, "--checkpoint", tmp_path / ("x" * 240 + ".pt")], capsys)
    assert "too long" in line and tree(tmp_path) == before
    if os.path.isdir("/proc/self"):  # root passes os.access there, but no file can be created in /proc
        line = cli_error(train.main, [*TINY, "--checkpoint", "/proc/self/vae.pt"], capsys)
        assert "lock file" in line or "not writable" in line
    for name in (os.path.join("nodir", "..", "run.pt"), os.path.join("a", "b", "..", "..", "run.pt")):
        line = cli_error(train.main, [*TINY, "--checkpoint", os.path.join(tmp_path, name)], capsys)
        assert "which is not a folder; name the file without it" in line and tree(tmp_path) == before


def test_resume_and_overwrite_together_are_refused(mixture_run, capsys):
    line = cli_error(train.main, ["--resume", "--overwrite", "--checkpoint", mixture_run], capsys)
    assert "--resume" in line and "--overwrite" in line


def test_device_nodes_and_links_are_written_through_never_replaced(mixture_run, tmp_path):
    device = tmp_path / "null"  # a link to the device: a regression replaces the link, never /dev/null itself
    device.symlink_to(os.devnull)
    write_atomic(device, lambda f: f.write(b"discarded"))
    assert device.is_symlink() and stat.S_ISCHR(os.stat(device).st_mode)
    target = tmp_path / "real.json"
    target.write_text("old")
    link = tmp_path / "link.json"
    link.symlink_to(target)
    assert evaluate.main(["--checkpoint", str(mixture_run), "--k", "2", "--limit", "10", "--json", str(link)]) == 0
    assert link.is_symlink() and '"nll"' in target.read_text()
    assert evaluate.main(["--checkpoint", str(mixture_run), "--k", "2", "--limit", "10", "--json", str(device)]) == 0
    assert device.is_symlink() and stat.S_ISCHR(os.stat(device).st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.json", "null", "real.json"]  # no temp file left


def test_a_path_of_non_utf8_bytes_is_printed_escaped(mixture_run, tmp_path, monkeypatch):
    out = os.path.join(tmp_path, "images\udcff")  # what Python makes of the byte 0xff in a command line
    stdout = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict")  # a UTF-8 terminal's
    monkeypatch.setattr(sys, "stdout", stdout)
    assert cli.run(generate.main, ["--checkpoint", str(mixture_run), "--out", out, "--n", "1"]) == 0
    stdout.flush()
    assert b"images\\udcff/samples.png" in stdout.buffer.getvalue()
    assert os.path.exists(os.path.join(out, "samples.png"))


def test_special_files_and_folders_are_refused_before_the_work(mixture_run, tmp_path, capsys):
    fifo_dir = tmp_path / "d"
    fifo_dir.mkdir()
    sock = tmp_path / "sock"
    import socket
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(sock))
    try:
        line = cli_error(evaluate.main, ["--checkpoint", mixture_run, "--json", sock], capsys)
        assert "not a regular file" in line
    finally:
        s.close()
    line = cli_error(evaluate.main, ["--checkpoint", mixture_run, "--json", fifo_dir], capsys)
    assert "is a folder" in line
    for name in ("new/", "new/.", "new/.."):  # a folder not made yet: "new/" was written as a file "new"
        line = cli_error(train.main, [*TINY, "--checkpoint", os.path.join(tmp_path, name)], capsys)
        assert line.endswith(f"{name}: names a folder, expected a file path for the checkpoint")
        json_path = os.path.join(tmp_path, "d", name)
        line = cli_error(evaluate.main, ["--checkpoint", mixture_run, "--json", json_path], capsys)
        assert line.endswith(f"{name}: names a folder, expected a file path for the JSON results")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "sock"]
    (tmp_path / "old.pt").write_bytes(mixture_run.read_bytes())  # reached through a folder that is not there: refused
    line = cli_error(train.main, [*TINY, "--checkpoint", os.path.join(tmp_path, "nodir", "..", "old.pt")], capsys)
    assert "nodir, which is not a folder" in line and (tmp_path / "old.pt").read_bytes() == mixture_run.read_bytes()
    # the metrics CSV's path is checked before any training, too
    ckpt = tmp_path / "run.pt"
    (tmp_path / "run.pt.metrics.csv").mkdir()
    line = cli_error(train.main, [*TINY, "--checkpoint", ckpt], capsys)
    assert "run.pt.metrics.csv" in line and "folder" in line and not ckpt.exists()


def test_full_disk_keeps_the_old_file_and_says_one_line(mixture_run, tmp_path, monkeypatch, capsys):
    ckpt = tmp_path / "vae.pt"
    ckpt.write_bytes(mixture_run.read_bytes())
    before = tree(tmp_path)

    def full(*a, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    line = cli_error(fit_mixture.main, ["--checkpoint", ckpt, "--components", "1"], capsys)
    assert "No space left" in line and "untouched" in line
    after = tree(tmp_path)
    after.pop(str(ckpt) + ".lock", None)
    assert after == before


# -- 3. corrupted weights ----------------------------------------------------------------------

@pytest.mark.parametrize("part, name", [("model", "to_stats.weight"), ("ema", "to_stats.weight"),
                                        ("optimizer", None), ("rng", "noise"), ("latent_mixture", "means")])
def test_a_flipped_bit_is_reported_as_corrupt(mixture_run, tmp_path, capsys, part, name):
    """One bit of any stored state (weights, their average, Adam's moments, a generator state,
    the mixture) changes what a resume or a loaded model does: it is reported, never used."""
    c = torch.load(mixture_run, weights_only=True)
    t = c["optimizer"]["state"][0]["exp_avg"] if part == "optimizer" else c[part][name]
    t.view(torch.uint8).view(-1)[5] ^= 1 << 3
    bad = tmp_path / "flip.pt"
    torch.save(c, bad)
    for main, extra in ((generate.main, ["--out", tmp_path / "o"]), (evaluate.main, []),
                        (train.main, ["--resume", "--epochs", "2"])):
        line = cli_error(main, ["--checkpoint", bad, *extra], capsys)
        assert str(bad) in line and "corrupt" in line
    assert not (tmp_path / "o").exists()


def test_a_checkpoint_without_checksums_or_of_another_format_is_refused(mixture_run, tmp_path, capsys):
    c = torch.load(mixture_run, weights_only=True)
    del c["sha256"]
    torch.save(c, tmp_path / "unsealed.pt")
    c = torch.load(mixture_run, weights_only=True)
    c["format"] = FORMAT - 1
    torch.save(c, tmp_path / "old.pt")
    for name, what in (("unsealed.pt", "no checksums"), ("old.pt", "train it again")):
        for main in (generate.main, evaluate.main):
            line = cli_error(main, ["--checkpoint", tmp_path / name], capsys)
            assert str(tmp_path / name) in line and what in line, line


# -- 4, 8. the Python API validates its arguments -------------------------------------------------

def test_api_arguments_are_validated():
    torch.manual_seed(0)
    m = VAE(VAEConfig(channels=(4, 8), hidden_dim=16, latent_dim=2)).eval()
    x = torch.rand(3, 1, 28, 28)
    for k in (float("inf"), float("nan"), 0, 2.5, True):
        with pytest.raises(ValueError, match="k must be an int"):
            m.log_likelihood(x, k=k)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        m.loss(x * 255)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        m.encode(torch.full((1, 1, 28, 28), float("nan")))
    with pytest.raises(ValueError, match=r"must be \[B, 1, 28, 28\]"):
        m.encode(torch.rand(2, 784))
    c = VAE(VAEConfig(channels=(4, 8), hidden_dim=16, latent_dim=2, num_classes=10)).eval()
    with pytest.raises(ValueError, match="integer"):
        c.sample(2, labels=3.7)
    with pytest.raises(ValueError, match="integer"):
        c.encode(x, torch.tensor([1.0, 2.0, 3.0]))
    assert c.log_likelihood(x, [1, 2, 3], k=2).shape == (3,)  # a list, as encode and sample take
    bad_calls = [  # (call, what the one-line message names)
        (lambda: m.decode(torch.randn(3, 5)), "z must be"), (lambda: m.decode(torch.randn(4)), "z must be"),
        (lambda: c.decode(torch.randn(3, 2)), "conditional"), (lambda: c.decode(torch.randn(3, 2), [1.0] * 3), "integer"),
        (lambda: m.sample(0), "n must be"), (lambda: m.sample(2.5), "n must be"), (lambda: m.sample(-1), "n must be"),
        (lambda: m.sample(4, generator=0), "generator"), (lambda: m.loss(x, reduction="avg"), "reduction"),
        (lambda: m.loss(x, eps=torch.randn(3, 2)), "eps must be"), (lambda: m.encode(x.numpy()), "float32"),
        (lambda: m.encode((x * 255).to(torch.uint8)), "float32"), (lambda: m.encode(x.double()), "float32"),
        (lambda: m.encode(x[:0]), "B >= 1"), (lambda: m.loss(x, eps=torch.randn(1, 3, 2).double()), "eps must be"),
        (lambda: m.loss(x, beta=float("nan")), "beta"), (lambda: m.loss(x, beta=-1.0), "beta"),
        (lambda: m.loss(x, beta="1"), "beta"), (lambda: m.log_likelihood(x, k=2, prior="N(0, I)"), "log_prob"),
        (lambda: m.log_likelihood(x, k=2, prior=[None, 3]), "log_prob"),
        (lambda: m.log_likelihood(x, prior=[]), "log_prob"),
        (lambda: m.decode(torch.zeros(3, 2, dtype=torch.long)), "torch.int64"),
        (lambda: m.reconstruct(x.tolist()), "float32"), (lambda: m.sample(2, prior="yes"), "True or False"),
        (lambda: m.log_likelihood(x, k=2, generator=1), "generator"),
        (lambda: m.log_likelihood(x, k=2, prior=torch.distributions.Normal(0.0, 1.0)), "log_prob"),  # per dimension
        (lambda: m.log_likelihood(x, k=2, prior=torch.distributions.MultivariateNormal(torch.zeros(16), torch.eye(16))),
         "log_prob"),  # another latent size
        (lambda: m.encode(x.to("meta")), "x is on meta"), (lambda: m.decode(torch.randn(3, 2, device="meta")), "z is on"),
        (lambda: m.loss(x, eps=torch.randn(1, 3, 2, device="meta")), "eps is on"),
        (lambda: VAE.from_checkpoint(None), "path must be"), (lambda: VAE.from_checkpoint(3), "path must be"),
        (lambda: c.encode(x, "7"), "integer"), (lambda: c.encode(x, 2**70), "integer"),
        (lambda: c.encode(x, [[1], [2, 3]]), "integer"), (lambda: c.sample(3, []), "got 0 labels for a batch of 3"),
        (lambda: m.loss(x, eps=torch.full((1, 3, 2), float("nan"))), "eps must hold finite"),
        (lambda: m.decode(torch.zeros(0, 2)), "B >= 1"),
        (lambda: m.log_likelihood(x, k=2, prior=type("P", (), {"log_prob": lambda self, z: z.sum(1) * float("nan")})()),
         "not NaN"),
    ]
    for call, what in bad_calls:
        with pytest.raises(ValueError, match=what):
            call()
    assert torch.isfinite(m.loss(x, beta=np.float32(0.5), eps=torch.randn(1, 3, 2).half()).total)  # numpy; fp16
    z = torch.randn(3, 2)
    for dtype in (torch.float16, torch.bfloat16, torch.float64):  # any float z: decoded in the weights' fp32
        assert torch.equal(m.decode(z.to(dtype)), m.decode(z.to(dtype).float()))
    for bad in ({"latent_dim": 10**17}, {"latent_dim": 2.5}, {"hidden_dim": True}, {"arch": 3},
                {"channels": [4, "8"]}, {"num_classes": -1}):
        with pytest.raises(ValueError):
            VAEConfig(**bad)


def test_unavailable_device_is_named_not_called_corrupt(mixture_run, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match="no CUDA device"):
        VAE.from_checkpoint(mixture_run, map_location="cuda")
    with pytest.raises(ValueError, match="not a device this code runs on"):
        VAE.from_checkpoint(mixture_run, map_location="meta")
    bytes_path = os.fsencode(mixture_run)
    assert VAE.from_checkpoint(bytes_path).config == VAE.from_checkpoint(mixture_run).config
    c = torch.load(mixture_run, weights_only=True)
    c["model_config"]["decoder"] = "upsample"  # a field this code's VAEConfig does not have
    torch.save(c, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="bad model config: unknown keys 'decoder'") as e:  # a bytes path: as text
        VAE.from_checkpoint(os.fsencode(tmp_path / "bad.pt"))
    assert str(e.value).startswith(str(tmp_path / "bad.pt"))


def test_a_config_field_missing_from_an_older_checkpoint_takes_its_default(mixture_run, tmp_path, capsys):
    c = load_checkpoint(mixture_run)
    assert c["model_config"]["num_classes"] == VAEConfig.num_classes
    del c["model_config"]["num_classes"]  # as a checkpoint written before the field existed
    torch.save(c, tmp_path / "old.pt")
    assert VAE.from_checkpoint(tmp_path / "old.pt").config == VAE.from_checkpoint(mixture_run).config
    c["args"]["latent_dim"] += 1  # stored flags that describe another model: the field is named
    torch.save(c, tmp_path / "bad.pt")
    line = cli_error(evaluate.main, ["--checkpoint", tmp_path / "bad.pt"], capsys)
    want = c["model_config"]["latent_dim"]
    assert line.endswith(f"bad checkpoint field args: they give latent_dim {want + 1}, the stored model has {want}")
    c["args"]["latent_dim"] -= 1
    del c["model_config"]["activation"]  # a field missing, whose default differs from the run's (relu)
    c["args"]["activation"] = "relu"
    torch.save(c, tmp_path / "relu.pt")
    assert VAE.from_checkpoint(tmp_path / "relu.pt").config.activation == VAEConfig.activation  # the API: the default
    line = cli_error(evaluate.main, ["--checkpoint", tmp_path / "relu.pt"], capsys)  # the scripts: refused, named
    assert line.endswith("they give activation 'relu', the stored model has 'silu' (the default: its model config "
                         "lacks the field)")


def test_residual_blocks_stored_as_one_int_or_two_load_and_resume(tmp_path):
    """A checkpoint whose config and flags give res_blocks as one int (every place alike) or as two (encoder,
    decoder), as older checkpoints do, loads as the four numbers and resumes."""
    ckpt = tmp_path / "vae.pt"
    assert train.main([*TINY, "--epochs", "1", "--res-blocks", "1", "--mixture-components", "0",
                       "--checkpoint", str(ckpt)]) == 0
    c = load_checkpoint(ckpt)
    assert c["model_config"]["res_blocks"] == c["args"]["res_blocks"] == [1, 1, 1, 1]
    for epochs, stored in ((2, 1), (3, [1, 1])):
        c = load_checkpoint(ckpt)
        c["model_config"]["res_blocks"] = c["args"]["res_blocks"] = stored
        torch.save(c, ckpt)
        assert VAE.from_checkpoint(ckpt).config.res_blocks == (1, 1, 1, 1)
        assert train.main(["--checkpoint", str(ckpt), "--resume", "--epochs", str(epochs)]) == 0
        assert load_checkpoint(ckpt)["epoch"] == epochs


def test_device_choice_takes_the_first_available_and_names_what_is_missing(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert cli.pick_device("auto") == torch.device("cpu")
    for name, why in (("cuda", "no CUDA device is available"), ("mps", "MPS is not available")):
        with pytest.raises(ValueError, match=f"^--device {name}: {why}"):
            cli.pick_device(name)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert cli.pick_device("auto") == torch.device("mps")


def test_sample_quality_needs_two_images_for_its_covariances(mixture_run, capsys):
    line = cli_error(evaluate.main, ["--checkpoint", mixture_run, "--sample-quality", "--limit", 1], capsys)
    assert "--limit 2" in line


def test_memory_hungry_chunks_are_refused_up_front(mixture_run, capsys):
    line = cli_error(evaluate.main, ["--checkpoint", mixture_run, "--chunk", 10**9], capsys)
    assert "--chunk" in line and "GiB" in line


@pytest.mark.parametrize("args", [["--seed", str(2**64)], ["--latent-dim", str(10**17)],
                                  ["--hidden-dim", str(10**9)], ["--channels", "4", str(10**9)],
                                  ["--epochs", str(10**12)], ["--batch-size", str(10**12)]])
def test_overflowing_values_exit_2_in_one_line(args, capsys):
    with pytest.raises(SystemExit) as e:  # argparse's exit, as from the command line
        cli.run(train.main, args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err and err.count("\n") == 1, err


# -- 5. the data folder ---------------------------------------------------------------------------

def test_interrupted_decompression_leaves_no_temp_file(tmp_path, monkeypatch):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    name = "t10k-labels-idx1-ubyte"
    with open(os.path.join(data.raw_dir(data.DEFAULT_DATA_DIR), name + ".gz"), "rb") as f:
        (raw / (name + ".gz")).write_bytes(f.read())

    def interrupted(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        data.read_file(str(raw), name)
    assert sorted(p.name for p in raw.iterdir()) == [name + ".gz"]


def test_a_folder_that_cannot_keep_the_decompressed_file_still_serves_the_data(tmp_path, monkeypatch):
    """A read-only data folder with the .gz files, or a dangling link where the decompressed file goes: the checked
    bytes are used all the same, nothing is written through the link, and a killed decompression's temp file goes."""
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    name = "t10k-labels-idx1-ubyte"
    with open(os.path.join(data.raw_dir(data.DEFAULT_DATA_DIR), name + ".gz"), "rb") as f:
        (raw / (name + ".gz")).write_bytes(f.read())
    (raw / name).symlink_to(tmp_path / "unmounted" / name)
    assert len(data.read_file(str(raw), name)) == 10_008
    assert not (tmp_path / "unmounted").exists() and (raw / name).is_symlink()
    (raw / name).unlink()
    stale = raw / f"{name}.999999999.0123456789abcdef.tmp"
    stale.write_bytes(b"half")

    def read_only(path, write):
        raise data.UserError(f"{path}: cannot write (Read-only file system); nothing was written")

    monkeypatch.setattr(files, "write_atomic", read_only)
    assert len(data.read_file(str(raw), name)) == 10_008
    assert sorted(p.name for p in raw.iterdir()) == [name + ".gz"]


def test_missing_data_dir_leaves_no_folders(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    line = cli_error(generate.main, ["--data-dir", missing, "--checkpoint", tmp_path / "none.pt",
                                     "--out", tmp_path / "images"], capsys)
    assert "none.pt" in line  # the checkpoint is checked first
    line = cli_error(train.main, [*TINY, "--data-dir", missing, "--checkpoint", tmp_path / "r.pt"], capsys)
    assert "no such data folder" in line and not missing.exists()
    (tmp_path / "file").write_text("")
    for where, why in ((tmp_path / "file", "not a folder"), ("", "'': no such data folder")):
        assert why in cli_error(train.main, [*TINY, "--data-dir", where, "--checkpoint", tmp_path / "r.pt"], capsys)


# -- 7. every field of a checkpoint is untrusted ---------------------------------------------------

INT_BAD = ["x", -1, 2.5, True, 10**30, None]
FLOAT_BAD = ["x", -1.0, float("nan"), float("inf"), True, [1.0]]
STR_BAD = ["no-such-choice", 3, None, True]
BOOL_BAD = ["x", 1, 2.5, [True]]
DICT_BAD = ["x", 3, [1], None]


ALL, RESUME, NONE = "every script", "train.py --resume", "no script"


def variants(c):
    """(name, mutated checkpoint, which scripts must refuse it): each field of each kind, set to
    values of the wrong type or range, or removed. Where the checksums still cover the changed
    part they are made again (a consistent, crafted file, not a damaged one)."""
    def put(path, value):
        d = copy.deepcopy(c)
        obj = d
        for k in path[:-1]:
            obj = obj[k]
        if value is KeyError:
            del obj[path[-1]]
        else:
            obj[path[-1]] = value
        return d

    for key in ("format", "epoch", "step"):
        for v in INT_BAD:
            yield f"{key}={v!r}", put((key,), v), ALL
    for v in FLOAT_BAD:
        yield f"partial_seconds={v!r}", put(("partial_seconds",), v), ALL
    optional = {"rng": RESUME, "optimizer": RESUME, "args": RESUME, "latent_mixture": NONE}
    for key in ("model_config", "model", "ema", "metrics", "rng", "latent_mixture", "optimizer", "args"):
        for v in DICT_BAD + [KeyError]:
            if v is None and key in ("latent_mixture", "ema"):
                continue  # None is valid: no mixture, no average (--ema 0)
            lenient = key in optional and (v is KeyError or (v is None and key in ("rng", "optimizer")))
            yield f"{key}={v!r}", put((key,), v), optional[key] if lenient else ALL
    # every int and str field of VAEConfig, so that one added later is walked too (another type needs its own here)
    for key in [f.name for f in dataclasses.fields(VAEConfig) if f.type.startswith("int")]:
        for v in INT_BAD + [0 if key not in ZERO_ALLOWED else 7, 10**17]:
            yield f"model_config.{key}={v!r}", put(("model_config", key), v), ALL
    for key in [f.name for f in dataclasses.fields(VAEConfig) if f.type == "str"]:
        for v in STR_BAD:
            yield f"model_config.{key}={v!r}", put(("model_config", key), v), ALL
    for v in [[4], ["4", "8"], "x", [0, 8], None, [10**9, 8]]:
        yield f"model_config.channels={v!r}", put(("model_config", "channels"), v), ALL
    yield "model_config.extra", put(("model_config", "extra"), 1), ALL
    name = next(iter(c["model"]))
    shape = c["model"][name].shape
    for v in (torch.zeros(3), torch.zeros(shape, dtype=torch.int64), torch.full(shape, float("nan")), "x"):
        yield f"model[{name}]={type(v).__name__}", put(("model", name), v), ALL
    for v in (torch.zeros(3), torch.full(shape, float("nan"))):
        yield f"ema[{name}]={v.shape}", put(("ema", name), v), ALL
    yield "ema=None with --ema", put(("ema",), None), RESUME
    for v in (torch.zeros(3, dtype=torch.uint8), torch.zeros(5056)):
        yield f"rng.torch={v.dtype}", put(("rng", "torch"), v), RESUME if v.dtype == torch.uint8 else ALL
    for key, v in (("weights", -c["latent_mixture"]["weights"]), ("means", torch.zeros(1, 2, 3)),
                   ("scale_tril", torch.zeros_like(c["latent_mixture"]["scale_tril"]))):
        yield f"latent_mixture.{key}", put(("latent_mixture", key), v), ALL
    yield "metrics epoch", put(("metrics", 0, "epoch"), 5), ALL
    mid = put(("step",), 10**6)  # well-typed, but more steps than an epoch has
    mid["partial"] = torch.zeros(10**6, 3)
    yield "step beyond the epoch", mid, RESUME
    mid = put(("step",), 1)
    mid["partial"] = torch.zeros(1, 2)  # running sums without the objective's column
    yield "partial columns", mid, ALL
    yield "metrics value", put(("metrics", 0, "test_loss"), "x"), ALL
    yield "metrics field missing", put(("metrics", 0, "test_loss"), KeyError), ALL
    yield "args.epochs below the epochs done", put(("args", "epochs"), 0), ALL
    # The run's flags: train.py --resume reads them all; the other scripts binarize and limit.
    for key, bad in (("batch_size", INT_BAD[:-1]), ("seed", INT_BAD[:-1]), ("lr", FLOAT_BAD),
                     ("lr_decay", FLOAT_BAD + [2.0]), ("beta", FLOAT_BAD), ("kl_warmup", INT_BAD[:-1]),
                     ("eval_batch_size", INT_BAD[:-1]), ("limit", ["x", -1, 2.5, True]),
                     ("precision", STR_BAD[:2]), ("latent_dim", [10**17, "x"]), ("arch", ["x"]),
                     ("channels", [[1], "x"]), ("res_blocks", [-1, "x", [0, 1, 2]]), ("binarize", BOOL_BAD), ("conditional", BOOL_BAD + [True])):
        for v in bad:
            yield f"args.{key}={v!r}", put(("args", key), v), ALL if key in ("binarize", "limit") else RESUME
    state = c["optimizer"]["state"][0]
    for key, v in (("exp_avg", torch.zeros(3)), ("exp_avg_sq", -state["exp_avg_sq"] - 1), ("step", "x")):
        yield f"optimizer.{key}", put(("optimizer", "state", 0, key), v), RESUME
    yield "optimizer.betas", put(("optimizer", "param_groups", 0, "betas"), "x"), RESUME
    yield "optimizer.params", put(("optimizer", "param_groups", 0, "params"), [0]), RESUME


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory):
    """mixture_run's kind of checkpoint without residual blocks: every field the same, fewer tensors,
    so each of the walk's hundreds of loads is quicker."""
    ckpt = tmp_path_factory.mktemp("plain_run") / "vae.pt"
    assert train.main([*MIXTURE_RUN, "--res-blocks", "0", "--checkpoint", str(ckpt)]) == 0
    return ckpt


def test_every_field_of_a_hostile_checkpoint_gives_one_line_and_changes_nothing(plain_run, tmp_path, capsys):
    c = torch.load(plain_run, weights_only=True)
    seen = 0
    for i, (name, mutated, fails) in enumerate(variants(c)):
        folder = tmp_path / f"v{i}"
        folder.mkdir()
        ckpt = folder / "vae.pt"
        try:
            with_checksums(mutated)
        except Exception:  # a value the digest cannot read: keep the old seal (then it is "corrupt")
            pass
        torch.save(mutated, ckpt)
        before = tree(folder)
        # generate.py and evaluate.py read a checkpoint through the same loader: each takes every other variant
        reader = ((generate.main, ["--checkpoint", ckpt, "--out", folder / "out"]) if i % 2 else
                  (evaluate.main, ["--checkpoint", ckpt, "--k", "2", "--limit", "5"]))
        runs = [(train.main, ["--checkpoint", ckpt, "--resume", "--epochs", "2"], fails in (ALL, RESUME)),
                (*reader, fails == ALL)]
        for main, args, must_fail in runs:
            capsys.readouterr()
            code = cli.run(main, [str(a) for a in args])  # an unexpected exception fails the test here
            err = capsys.readouterr().err
            if must_fail:
                assert code == 1, f"{name}: {main.__module__} exited {code}"
                assert err.count("\n") == 1 and "Traceback" not in err, f"{name}: {err}"
                assert str(ckpt) in err, f"{name}: {err}"
                assert tree(folder) == before, f"{name}: {main.__module__} changed files"
            else:
                assert code in (0, 1), f"{name}: {main.__module__} exited {code}"
            seen += 1
    assert seen > 400, seen


def test_a_checkpoint_from_before_a_flag_existed_loads_and_resumes_with_its_default(mixture_run, tmp_path):
    """A RUN flag added to the table after a checkpoint was written is missing from its stored flags:
    the file still loads and resumes, the flag at its default (which must keep the old behaviour)."""
    c = torch.load(mixture_run, weights_only=True)
    del c["args"]["output_bias"]
    ckpt = tmp_path / "vae.pt"
    torch.save(c, ckpt)
    assert generate.main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "img")]) == 0
    assert train.main(["--checkpoint", str(ckpt), "--resume", "--epochs", "2"]) == 0
    assert load_checkpoint(ckpt)["args"]["output_bias"] == cli.DEFAULTS["output_bias"]


def test_a_failed_start_writes_nothing(tmp_path, monkeypatch, capsys):
    """Bad data or a device as checkpoint: refused before any folder or lock file is made."""
    def offline(_):
        raise OSError("offline")

    monkeypatch.setattr(data, "_download", offline)
    empty = tmp_path / "empty_data"
    empty.mkdir()
    ckpt = tmp_path / "new" / "vae.pt"
    line = cli_error(train.main, [*TINY, "--data-dir", empty, "--checkpoint", ckpt], capsys)
    assert "missing" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty_data"] and not any(empty.iterdir())
    line = cli_error(train.main, [*TINY, "--checkpoint", os.devnull, "--overwrite"], capsys)
    assert "not a regular file" in line
    assert not os.path.exists(os.devnull + ".lock") and not os.path.exists(os.devnull + ".metrics.csv")


def test_generate_checks_every_image_path_first(mixture_run, tmp_path, capsys):
    out = tmp_path / "out"
    (out / "traversal.png").mkdir(parents=True)  # the last-but-one image it would write
    line = cli_error(generate.main, ["--checkpoint", mixture_run, "--out", out], capsys)
    assert "traversal.png" in line and "folder" in line
    assert sorted(p.name for p in out.iterdir()) == ["traversal.png"]  # nothing written before it
