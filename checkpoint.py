"""Checkpoint files: one file per run holding everything needed to resume or to rebuild the model.

Contents (plain types and tensors only, so `torch.load(weights_only=True)` reads them):
  format, model_config (dict), model (state dict), optimizer (state dict), epoch (completed
  epochs), step (steps done in the unfinished epoch, 0 at an epoch boundary), partial (that
  epoch's running sums), rng (generator states), metrics (one dict per completed epoch),
  args (the training flags).

Writes are atomic: a temp file in the same folder, fsync, then os.replace. A crash or SIGKILL at
any moment leaves either the previous complete checkpoint or the new one, never a partial file.
"""

from __future__ import annotations

import os
import pickle
import warnings
import zipfile

import torch

from model import VAE, VAEConfig

FORMAT = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; str() is one line naming the file."""


class CheckpointBusy(Exception):
    """Another process holds the checkpoint's lock."""


REQUIRED_KEYS = ("format", "model_config", "model", "epoch")


def write_atomic(path, write) -> None:
    """Call write(f) on a binary temp file beside `path`, fsync it, then rename it over `path`
    (atomic on POSIX and Windows): readers see the old file or the new one, never part of one."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    tmp = f"{path}.{os.getpid()}.tmp"  # same folder, so os.replace is a rename, never a copy
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable
        dfd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def save_atomic(obj, path) -> None:
    """torch.save `obj` to `path` through write_atomic."""
    write_atomic(path, lambda f: torch.save(obj, f))


def _first_line(e: BaseException) -> str:
    """The informative part of an exception's message, on one line."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    if not lines:
        return type(e).__name__
    if lines[0].endswith(":") and len(lines) > 1:  # "Error(s) in loading state_dict for VAE:"
        return f"{lines[0]} {lines[1]}"
    return lines[0]


def load_checkpoint(path, map_location=None) -> dict:
    """Load and validate a checkpoint; adds `config`, the parsed VAEConfig.

    Raises CheckpointError (a ValueError) with a one-line message naming the file for anything
    unusable: a missing file, a file that is not a torch.save archive (never unpickled), a crafted
    pickle (refused by weights_only=True, its payload never runs), missing keys, a bad config.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint")
    if not zipfile.is_zipfile(path):
        # torch.save always writes a zip archive; anything else (truncated, random bytes, a raw
        # or legacy pickle) is never handed to the unpickler at all.
        raise CheckpointError(f"{path}: refused to load: not a torch.save archive (truncated, corrupt "
                              "or a foreign file); nothing in it was run")
    try:
        with warnings.catch_warnings():  # torch warns about odd pickle protocols: our error says it all
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        # weights_only=True allows tensors and plain containers only; anything else (a crafted
        # payload, a pickled object) stops here, before any of it runs.
        raise CheckpointError(f"{path}: refused to load: it holds objects other than tensors and "
                              "plain data (not a checkpoint written by train.py); nothing in it was run") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, KeyError, IndexError,
            TypeError, AttributeError, UnicodeDecodeError, MemoryError, OverflowError) as e:
        raise CheckpointError(f"{path}: not a readable checkpoint, truncated or corrupt ({_first_line(e)})") from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path}: not a checkpoint written by train.py (holds a {type(ckpt).__name__})")
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path}: not a checkpoint written by train.py (missing {', '.join(missing)})")
    if ckpt["format"] != FORMAT:
        raise CheckpointError(f"{path}: checkpoint format {ckpt['format']!r}, this code reads {FORMAT}")
    if not isinstance(ckpt["model_config"], dict) or not isinstance(ckpt["model"], dict):
        raise CheckpointError(f"{path}: model_config and model must be dicts")
    try:
        ckpt["config"] = VAEConfig.from_dict(ckpt["model_config"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: bad model config ({_first_line(e)})") from None
    return ckpt


def load_model(path, map_location=None) -> tuple[VAE, dict]:
    """(model in eval mode, checkpoint dict), the model rebuilt from the checkpoint alone."""
    ckpt = load_checkpoint(path, map_location)
    model = VAE(ckpt["config"])
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not fit the stored model config ({_first_line(e)})") from None
    if map_location is not None:
        model.to(map_location)
    return model.eval(), ckpt


class CheckpointLock:
    """An exclusive lock on `<checkpoint>.lock`, so two trainings cannot write one checkpoint.

    Uses flock, which the OS releases when the process dies (SIGKILL included), so a stale lock
    file left behind never blocks the next run. Where flock does not exist (Windows), no lock.
    """

    def __init__(self, checkpoint_path):
        self.path = os.fspath(checkpoint_path) + ".lock"
        self._fd = None

    def acquire(self) -> None:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise CheckpointBusy(
                f"{self.path}: another training is writing this checkpoint; "
                "wait for it or pass a different --checkpoint") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock; the file may stay, harmlessly
            self._fd = None

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()
