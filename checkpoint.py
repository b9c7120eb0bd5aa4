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

import hashlib
import math
import os
import pickle
import re
import secrets
import stat
import warnings
import zipfile

import torch

FORMAT = 1
MAX_EPOCHS = 1_000_000
DEFAULT_CHECKPOINT = os.path.join("checkpoints", "vae.pt")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; str() is one line naming the file."""


class OutputError(Exception):
    """An output file that cannot be written; str() is one line naming it."""


class CheckpointBusy(Exception):
    """Another process holds the checkpoint's lock."""


REQUIRED_KEYS = ("format", "model_config", "model", "epoch")


TMP_SUFFIX = ".tmp"


def _tmp_pattern(path: str) -> re.Pattern:
    """The names of write_atomic's temp files for `path`: <name>.<pid>.<16 hex digits>.tmp."""
    return re.compile(re.escape(os.path.basename(path)) + r"\.(\d+)\.[0-9a-f]{16}" + re.escape(TMP_SUFFIX))


def check_output_path(path, what: str = "output file") -> str:
    """Refuse, in one line, an output path that write_atomic could not or should not write, before
    any work is done: an empty path, a folder, a special file other than a character device or
    a pipe (those are written to directly, never replaced), a missing or unwritable folder."""
    path = os.fspath(path)
    if not path:
        raise OutputError(f"empty path given for the {what}")
    if os.path.isdir(path):
        raise OutputError(f"{path}: is a folder, expected a path for the {what}")
    target = os.path.realpath(path)
    if os.path.exists(target):
        mode = os.stat(target).st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISCHR(mode) or stat.S_ISFIFO(mode)):
            raise OutputError(f"{path}: not a regular file; refused to replace it with the {what}")
        if not os.access(target, os.W_OK):
            raise OutputError(f"{path}: not writable")
    folder = os.path.dirname(target)
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        raise OutputError(f"{path}: its folder does not exist or is not writable")
    return path


def write_atomic(path, write) -> None:
    """Call write(f) on a binary temp file beside `path`, fsync it, then rename it over `path`
    (atomic on POSIX and Windows): readers see the old file or the new one, never part of one.

    A symbolic link is followed (the file it points to is replaced, not the link). A character
    device or a pipe (`--json /dev/null`) is written to directly, never renamed over; other
    special files and folders are refused. A failed write (a full disk, say) raises OutputError,
    one line, and leaves the previous file as it was and no temp file behind.
    """
    path = check_output_path(path)
    target = os.path.realpath(path)
    if os.path.exists(target) and not stat.S_ISREG(os.stat(target).st_mode):
        try:
            with open(target, "wb") as f:
                write(f)
        except OSError as e:
            raise OutputError(f"{path}: cannot write ({e.strerror or e})") from None
        return
    existed = os.path.exists(target)
    folder = os.path.dirname(target)
    # Same folder, so os.replace is a rename, never a copy. The name says whose it is: pid and a
    # random token, so remove_stale_temp_files can never mistake someone else's file for it.
    tmp = f"{target}.{os.getpid()}.{secrets.token_hex(8)}{TMP_SUFFIX}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            with os.fdopen(fd, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
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
    except OSError as e:
        kept = "the previous file is untouched" if existed else "nothing was written"
        raise OutputError(f"{path}: cannot write ({e.strerror or e}); {kept}") from None


def remove_stale_temp_files(path) -> list[str]:
    """Delete the temp files that an earlier write_atomic of `path` left when its process was
    killed: only names it makes (<name>.<pid>.<16 hex>.tmp), only of processes no longer alive.
    Call it under the checkpoint's lock. Returns what it removed."""
    target = os.path.realpath(os.fspath(path))
    folder, pattern, removed = os.path.dirname(target), _tmp_pattern(target), []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        m = pattern.fullmatch(name)
        if m is None or _alive(int(m.group(1))):
            continue
        full = os.path.join(folder, name)
        if os.path.isfile(full) and not os.path.islink(full):
            os.unlink(full)
            removed.append(full)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True  # exists but is not ours, or cannot tell: leave its files alone
    return True


def state_digest(obj) -> str:
    """SHA-256 over a nested structure of dicts, lists and tensors (keys sorted; each tensor's
    dtype, shape and bytes): stored with the weights and optimiser state, checked on load, so a
    flipped bit in a stored tensor is reported instead of silently used."""
    h = hashlib.sha256()

    def walk(o):
        if isinstance(o, torch.Tensor):
            t = o.detach().cpu().contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            if t.numel():
                h.update(t.reshape(-1).view(torch.uint8).numpy())
        elif isinstance(o, dict):
            h.update(b"{")
            for k in sorted(o, key=str):
                h.update(repr(k).encode())
                walk(o[k])
            h.update(b"}")
        elif isinstance(o, (list, tuple)):
            h.update(b"[")
            for v in o:
                walk(v)
            h.update(b"]")
        else:
            h.update(repr(o).encode())

    walk(obj)
    return h.hexdigest()


def save_atomic(obj, path) -> None:
    """torch.save `obj` to `path` through write_atomic."""
    write_atomic(path, lambda f: torch.save(obj, f))


def first_line(e: BaseException) -> str:
    """The informative part of an exception's message, on one line."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    if not lines:
        return type(e).__name__
    if lines[0].endswith(":") and len(lines) > 1:  # "Error(s) in loading state_dict for VAE:"
        return f"{lines[0]} {lines[1]}"
    return lines[0]


def read_archive(path, map_location=None, what: str = "checkpoint") -> dict:
    """The dict in a torch.save file, read safely: a file that is not a torch.save archive is never
    unpickled, and torch.load(weights_only=True) admits tensors and plain data only.

    Raises CheckpointError (a ValueError) with a one-line message naming the file for anything
    unusable: a missing file, a foreign or truncated file, a crafted pickle (its payload never
    runs), anything but a dict.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such {what}")
    if map_location is not None and not callable(map_location) and not isinstance(map_location, dict):
        try:
            device = torch.device(map_location)
        except (RuntimeError, TypeError, ValueError):
            raise CheckpointError(f"{path}: cannot load onto {map_location!r}: not a device") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise CheckpointError(f"{path}: cannot load onto {device}: no CUDA device is available")
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise CheckpointError(f"{path}: cannot load onto {device}: MPS is not available")
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
        raise CheckpointError(f"{path}: not a readable checkpoint, truncated or corrupt ({first_line(e)})") from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path}: not a {what} written by this project (holds a {type(ckpt).__name__})")
    return ckpt


SEALED = ("model", "optimizer", "latent_mixture")  # the tensors whose SHA-256 the checkpoint stores


def seal(ckpt: dict) -> dict:
    """Store the SHA-256 (state_digest) of the checkpoint's tensors in it, under "sha256"."""
    ckpt["sha256"] = {k: state_digest(ckpt[k]) for k in SEALED if ckpt.get(k) is not None}
    return ckpt


def verify(ckpt: dict, path: str) -> None:
    """Check the stored SHA-256 of each sealed part; checkpoints from before seals load with a note."""
    sums = ckpt.get("sha256")
    if sums is None:
        print(f"note: {path} has no checksums (written by an older version): loaded without verifying them")
        return
    if not isinstance(sums, dict) or not all(isinstance(v, str) for v in sums.values()):
        raise CheckpointError(f"{path}: corrupt: its checksums are not a dict of strings")
    for k in SEALED:
        if ckpt.get(k) is not None and k not in sums:
            raise CheckpointError(f"{path}: corrupt: {k} has no stored checksum")
        if k in sums and (ckpt.get(k) is None or state_digest(ckpt[k]) != sums[k]):
            raise CheckpointError(f"{path}: corrupt: the {k} state does not match its stored SHA-256 "
                                  "(a damaged or edited file)")


def load_checkpoint(path, map_location=None) -> dict:
    """Load a training checkpoint (read_archive) and check its structure. The model is rebuilt from
    it by `model.VAE.from_saved`: this module does file I/O only and does not import the model."""
    ckpt = read_archive(path, map_location)
    path = os.fspath(path)
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path}: not a checkpoint written by train.py (missing {', '.join(missing)})")
    if not _is_int(ckpt["format"]) or ckpt["format"] != FORMAT:
        raise CheckpointError(f"{path}: checkpoint format {ckpt['format']!r}, this code reads {FORMAT}")
    verify(ckpt, path)
    check_fields(ckpt, path)
    return ckpt


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_fields(ckpt: dict, path: str) -> None:
    """Types and ranges of every field a checkpoint may hold, so that nothing read from the file
    reaches the code unchecked. The model's config and weights are checked by VAE.from_saved, the
    run's flags and optimiser state by train.py when it resumes."""
    def bad(field: str, why: str):
        raise CheckpointError(f"{path}: bad checkpoint field {field}: {why}")

    if not isinstance(ckpt["model_config"], dict):
        bad("model_config", "not a dict")
    if not isinstance(ckpt["model"], dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in ckpt["model"].items()):
        bad("model", "not a dict of named tensors")
    for name, t in ckpt["model"].items():
        if not t.is_floating_point():
            bad(f"model[{name!r}]", f"dtype {t.dtype}, expected floating point")
        if not torch.isfinite(t).all():
            bad(f"model[{name!r}]", "holds non-finite values")
    if not _is_int(ckpt["epoch"]) or not 0 <= ckpt["epoch"] <= MAX_EPOCHS:
        bad("epoch", f"expected an int in [0, {MAX_EPOCHS}], got {ckpt['epoch']!r}")
    step = ckpt.get("step", 0)
    if not _is_int(step) or step < 0:
        bad("step", f"expected an int >= 0, got {step!r}")
    seconds = ckpt.get("partial_seconds", 0.0)
    if not _is_number(seconds) or seconds < 0:
        bad("partial_seconds", f"expected a number >= 0, got {seconds!r}")
    partial = ckpt.get("partial")
    if step and not (isinstance(partial, torch.Tensor) and partial.is_floating_point()
                     and partial.dim() == 2 and partial.shape[0] == step and partial.shape[1] in (2, 3)):
        bad("partial", f"expected a float tensor [{step}, 2 or 3] (the sums of the {step} steps done)")
    if partial is not None and not step:
        bad("partial", "present at an epoch boundary (step 0)")
    metrics = ckpt.get("metrics", [])
    if not isinstance(metrics, list) or len(metrics) != ckpt["epoch"]:
        bad("metrics", f"expected a list with one entry per completed epoch ({ckpt['epoch']})")
    for i, row in enumerate(metrics):
        if not isinstance(row, dict) or not all(isinstance(k, str) and _is_number(v) for k, v in row.items()):
            bad(f"metrics[{i}]", "expected a dict of finite numbers")
        if row.get("epoch") != i + 1:
            bad(f"metrics[{i}]", f"its epoch is {row.get('epoch')!r}, expected {i + 1}")
    if not isinstance(ckpt.get("args", {}), dict):
        bad("args", "not a dict")
    for key in ("optimizer", "rng", "latent_mixture"):
        if ckpt.get(key) is not None and not isinstance(ckpt[key], dict):
            bad(key, "not a dict")
    rng = ckpt.get("rng")
    if rng is not None:
        for k in ("torch", "noise"):
            if not (isinstance(rng.get(k), torch.Tensor) and rng[k].dtype == torch.uint8 and rng[k].dim() == 1):
                bad(f"rng[{k!r}]", "expected a generator state (a 1-d uint8 tensor)")


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
