"""Small helpers shared by the scripts: argument types, device choice, one-line errors."""

from __future__ import annotations

import argparse
import ctypes
import math
import os
import sys

import torch

from checkpoint import CheckpointBusy, CheckpointError, OutputError, load_checkpoint
from data import DEFAULT_DATA_DIR, DataError, mnist_mismatch
from model import VAE

DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("auto", "fp32", "bf16")


class UserError(Exception):
    """A problem the user can fix; the scripts print it as one line and exit 1."""


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends '(default: X)' to every flag's help, unless the help already words its default."""

    def _get_help_string(self, action):
        if "(default:" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage block) and defaults shown in every flag's help."""

    def __init__(self, **kw):
        kw.setdefault("formatter_class", _HelpFormatter)
        super().__init__(**kw)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def number(kind, low, low_open=False, high=None):
    """An argparse type: `kind` (int or float) in [low, high], or (low, high] with low_open."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be finite, got {text}")
        if value < low or (low_open and value == low):
            raise argparse.ArgumentTypeError(f"must be {'>' if low_open else '>='} {low}, got {text}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"must be <= {high}, got {text}")
        return value

    return parse


positive_int = number(int, 1)
non_negative_int = number(int, 0)
positive_float = number(float, 0.0, low_open=True)
seed = number(int, 0, high=2**63 - 1)  # what torch.Generator.manual_seed takes
MAX_BATCH = 1 << 20  # images in one step: far above any useful batch, below an allocation error


def pick_device(name: str) -> torch.device:
    """'auto' takes cuda, then mps, then cpu; an explicit choice must be available."""
    if name == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            name = "mps"
        else:
            name = "cpu"
    elif name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available (try --device auto)")
    elif name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError("--device mps: MPS is not available (try --device auto)")
    return torch.device(name)


def native_bf16(device: torch.device) -> bool:
    """Does this device compute bf16 natively (so autocast to bf16 is a speed-up, not emulation)?"""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        try:
            with open("/proc/cpuinfo") as f:
                flags = f.read()
        except OSError:  # not Linux: stay with fp32
            return False
        return "avx512_bf16" in flags or "amx_bf16" in flags
    return False


def pick_precision(name: str, device: torch.device) -> bool:
    """True to train under bf16 autocast. 'auto' uses it where the hardware has native bf16."""
    if name == "auto":
        return native_bf16(device)
    if name == "bf16" and device.type == "mps":
        raise UserError("--precision bf16: not supported on mps (use fp32)")
    return name == "bf16"


def keep_freed_memory() -> None:
    """Keep freed tensor memory in the process instead of handing it back to the kernel each step.

    glibc serves blocks above a moving threshold with mmap and trims the heap's top on free, so
    every training step of the default model on CPU page-faulted its activations back in: about
    2,400 minor faults and 4 ms of kernel time per step (benchmarks/epoch_speed.py shows faults per
    step with and without this). Allocations under 32 MiB now stay in the heap, which keeps up to
    256 MiB free for the next step; peak memory is what one step needs, as before. A no-op where
    the C library is not glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
    mallopt(m_mmap_threshold, 32 << 20)  # glibc's maximum on 64-bit systems
    mallopt(m_trim_threshold, 256 << 20)


def load_vae(path, map_location=None) -> tuple[VAE, dict]:
    """(model in eval mode, checkpoint dict) from a checkpoint, checked to fit MNIST; every
    problem is a CheckpointError naming the file."""
    return load_vae_from(load_checkpoint(path, map_location), path)


def load_vae_from(ckpt: dict, path) -> tuple[VAE, dict]:
    """load_vae for a checkpoint dict already loaded from `path`."""
    model = VAE.from_saved(ckpt, path)
    c = model.config
    why = mnist_mismatch(c.image_channels, c.image_size, c.num_classes)
    if why:
        raise CheckpointError(f"{path}: this model cannot be used on MNIST: {why}")
    stored = ckpt.get("args", {})  # the flags other scripts read; train.py --resume checks them all
    if not isinstance(stored.get("binarize", False), bool):
        raise CheckpointError(f"{path}: bad checkpoint field args['binarize']: {stored['binarize']!r}")
    limit = stored.get("limit")
    if limit is not None and not (isinstance(limit, int) and not isinstance(limit, bool) and limit >= 1):
        raise CheckpointError(f"{path}: bad checkpoint field args['limit']: {limit!r}")
    return model, ckpt


def free_memory(device: torch.device) -> int | None:
    """Bytes of memory available for new tensors on `device`, or None where it cannot be told."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_creatable_folder(folder: str, what: str) -> None:
    """A one-line UserError unless `folder` is a writable folder or could be created as one; creates
    nothing (ensure_folder does, once the work that could fail on the input has run)."""
    probe = os.path.abspath(folder)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise UserError(f"{folder}: cannot create the {what} ({probe} is not a folder)")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"{folder}: cannot create the {what} ({probe} is not writable)"
                        if probe != os.path.abspath(folder) else f"{folder}: {what} is not writable")


def ensure_folder(folder: str, what: str) -> None:
    """Create `folder` if needed; a one-line UserError if that fails or it is not writable."""
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise UserError(f"{folder}: cannot create the {what} ({e.strerror or e})") from None
    if not os.access(folder, os.W_OK):
        raise UserError(f"{folder}: {what} is not writable")


def add_data_dir_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", default=DEFAULT_DATA_DIR,
                        help="folder holding MNIST/raw/ (default: dataset/ beside the scripts)")


def add_precision_flag(parser: argparse.ArgumentParser, help: str) -> None:
    """--precision, read by pick_precision."""
    parser.add_argument("--precision", choices=PRECISIONS, default="auto", help=help)


def add_device_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", choices=DEVICES,
                        help="auto picks cuda, then mps, then cpu")


def run(main, argv=None) -> int:
    """Call main(argv); turn user errors into one line on stderr and exit code 1.

    Only the project's own error types are caught: anything else is a bug and keeps its traceback.
    """
    try:
        return main(argv)
    except (UserError, DataError, CheckpointError, CheckpointBusy, OutputError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
