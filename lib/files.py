"""Output files that are never half-written, and a lock so two trainings cannot share a checkpoint. A write goes to a
temp file in the same folder, fsync, then os.replace: a crash or SIGKILL at any moment leaves the previous complete
file or the new one, never a partial file."""

from __future__ import annotations

import errno
import os
import re
import secrets
import stat

import torch

from lib.checks import UserError, as_path

TMP_SUFFIX = ".tmp"


def metrics_path(checkpoint: str) -> str:
    """The CSV beside a checkpoint (the file a link points to), named from the whole file name: no two checkpoints
    share one."""
    return os.path.realpath(checkpoint) + ".metrics.csv"


def lock_path(checkpoint) -> str:
    """The file `Lock` locks, beside the file write_atomic replaces."""
    return os.path.realpath(checkpoint) + ".lock"


def check_output_path(path, what: str = "output file", devices_ok: bool = False, keep: dict | None = None) -> str:
    """The one check of an output path, before any work: refuse, in one line, an empty path, a folder (or a name that
    ends like one: "out/"), a special file (with devices_ok, a character device or a pipe passes: write_atomic writes
    to it directly), one of the files in `keep` ({path: what it is}: what the command reads, which the output would
    destroy), an unwritable file, a folder that cannot be made or written, a name too long for the temp file, or a
    ".." after a folder that does not exist ("nodir/../run.pt": the OS finds no file there, realpath finds run.pt)."""
    path = as_path(path, what)
    if not path:
        raise UserError(f"empty path given for the {what}")
    if os.path.basename(path) in ("", ".", ".."):  # realpath would drop the "/" and write a file "out"
        raise UserError(f"{path}: names a folder, expected a file path for the {what}")
    try:  # stat follows links, /dev/stdout's to a pipe too (its realpath is no path)
        mode = os.stat(path).st_mode
    except OSError as e:  # a missing file is fine; a loop of links in its path is no path at all
        if e.errno == errno.ELOOP:
            raise UserError(f"{path}: a loop of symbolic links") from None
        mode = None
    if mode is not None and stat.S_ISDIR(mode):
        raise UserError(f"{path}: is a folder, expected a path for the {what}")
    target = os.path.realpath(path)
    parts = path.split(os.sep)
    for i in (i for i, part in enumerate(parts) if part == ".."):
        folder = os.sep.join(parts[:i]) or (os.sep if path.startswith(os.sep) else os.curdir)
        if not os.path.isdir(folder):
            raise UserError(f"{path}: '..' after {folder}, which is not a folder; name the file without it")
    for kept, name in (keep or {}).items():
        if os.path.realpath(as_path(kept)) == target:
            raise UserError(f"{path}: is {name}; refused to replace it with the {what}")
    if mode is not None:
        if not (stat.S_ISREG(mode) or devices_ok and (stat.S_ISCHR(mode) or stat.S_ISFIFO(mode))):
            raise UserError(f"{path}: not a regular file; refused to replace it with the {what}")
        if not os.access(path, os.W_OK):
            raise UserError(f"{path}: not writable")
        if not stat.S_ISREG(mode):
            return path  # write_atomic writes to it directly
    probe = os.path.dirname(target)
    while not os.path.exists(probe):  # the folder is made when the file is written
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe) or not os.access(probe, os.W_OK | os.X_OK):
        why = "not a folder" if not os.path.isdir(probe) else "not writable"
        raise UserError(f"{path}: cannot create the {what} there ({probe} is {why})")
    longest = len(os.fsencode(os.path.basename(target))) + len(f".{2**22}.{'0' * 16}{TMP_SUFFIX}")  # bytes, as NAME_MAX
    if longest > (os.pathconf(probe, "PC_NAME_MAX") if hasattr(os, "pathconf") else 255):
        raise UserError(f"{path}: file name too long (with its temp file's suffix) for the {what}")
    return path


def make_folder(path) -> None:
    """Create the folder of the file `path` if it is missing (one-line UserError if impossible)."""
    folder = os.path.dirname(os.path.realpath(os.fspath(path)))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise UserError(f"{folder}: cannot create the folder ({e.strerror or e})") from None


def write_atomic(path, write) -> None:
    """Call write(f) on a binary temp file beside `path`, fsync it, then rename it over `path`. A symbolic link is
    followed (its target is replaced); a character device or a pipe (`--json /dev/null`) is written to directly. A
    failed write (a full disk, say) is a one-line UserError, leaving the previous file as it was and no temp file."""
    path = check_output_path(path, devices_ok=True)
    target = os.path.realpath(path)
    if os.path.exists(path) and not stat.S_ISREG(os.stat(path).st_mode):
        try:
            with open(path, "wb") as f:
                write(f)
        except OSError as e:
            raise UserError(f"{path}: cannot write ({e.strerror or e})") from None
        return
    make_folder(target)
    existed, folder = os.path.exists(target), os.path.dirname(target)
    # Same folder: os.replace is a rename. pid and a random token: remove_stale_temp_files knows whose file it is.
    tmp = f"{target}.{os.getpid()}.{secrets.token_hex(8)}{TMP_SUFFIX}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            with os.fdopen(fd, "wb") as f:
                if existed:  # the replaced file's permissions stay (a private checkpoint stays private)
                    try:
                        os.fchmod(f.fileno(), stat.S_IMODE(os.stat(target).st_mode))
                    except OSError:  # a filesystem without modes, or the file gone meanwhile
                        pass
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable, where the filesystem can
            dfd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dfd)
            except OSError:  # some (FUSE, network) refuse it on a folder: the file is written all the same
                pass
            finally:
                os.close(dfd)
    except OSError as e:
        kept = "the previous file is untouched" if existed else "nothing was written"
        raise UserError(f"{path}: cannot write ({e.strerror or e}); {kept}") from None


def save_atomic(obj, path) -> None:
    write_atomic(path, lambda f: torch.save(obj, f))


def remove_stale_temp_files(path) -> list[str]:
    """Delete the temp files an earlier write_atomic of `path` left when its process was killed: only names it makes
    (<name>.<pid>.<16 hex>.tmp) of processes no longer alive, so no lock is needed; returns what it removed."""
    target = os.path.realpath(os.fspath(path))
    folder, removed = os.path.dirname(target), []
    pattern = re.compile(re.escape(os.path.basename(target)) + r"\.(\d+)\.[0-9a-f]{16}" + re.escape(TMP_SUFFIX))
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        m, full = pattern.fullmatch(name), os.path.join(folder, name)
        if m and not _alive(int(m.group(1))) and os.path.isfile(full) and not os.path.islink(full):
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


def modified(path) -> int | None:
    """The modification time of `path` in ns, None if it is not a file: what Lock(read_at=) compares."""
    return os.stat(path).st_mtime_ns if os.path.isfile(path) else None


class Lock:
    """An exclusive lock on `<path>.lock`, so two trainings cannot write one checkpoint. The OS releases a flock when
    its process dies (SIGKILL included), so a stale lock file never blocks the next run. No flock (Windows): no lock.
    read_at: `modified(path)` when the caller read the file before locking it; if another process has replaced it
    since, the lock is refused in one line (what was read is stale)."""

    _fd = None  # the locked file, while held

    def __init__(self, path, read_at: int | None = None):
        self.file, self.read_at = os.fspath(path), read_at
        self.path = lock_path(self.file)

    def __enter__(self):
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            return self
        make_folder(self.path)
        try:  # never through a link: truncating the lock file must not truncate another file
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        except OSError as e:
            raise UserError(f"{self.path}: cannot create the lock file ({e.strerror or e})") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # a pipe or a device
            os.close(fd)
            raise UserError(f"{self.path}: not a regular file; remove it (the lock file of {self.file})")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise UserError(f"{self.path}: another training is writing this checkpoint; "
                            "wait for it or pass a different --checkpoint") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        if self.read_at is not None and modified(self.file) != self.read_at:
            self.__exit__()
            raise UserError(f"{self.file}: changed since it was read, by another process; run this again")
        return self

    def __exit__(self, *exc):
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock; the file may stay, harmlessly
            self._fd = None
