"""The command line: train.py's flag table, argument types, device choice, one-line errors.

TRAIN_FLAGS, the one declaration of train.py's flags, builds the argparse parser and re-checks the flags a
checkpoint stores with the same types and ranges: a flag marked RUN shapes the run's result, so --resume restores it.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import re
import sys
from dataclasses import fields

import torch

from lib.checks import MAX_EPOCHS, MAX_SIZE, UserError, defaulted_fields, is_int, is_number, load_model, unavailable
from lib.data import DEFAULT_DATA_DIR, NUM_CLASSES, mnist_mismatch
from lib.mixture import DEFAULT_COMPONENTS, DEFAULT_COMPONENTS_PER_CLASS, MAX_COMPONENTS
from model import ACTIVATIONS, ARCHS, VAE, GaussianMixture, VAEConfig

MAX_BATCH = 1 << 20  # images in one step: far above any useful batch, below an allocation error
EPOCHS = 16  # docs/results.md, "Time to quality"
BETA = 0.6  # the ELBO's default KL weight: sharper samples for little test ELBO (docs/results.md, "Time to quality")
FLOW_PRIOR = 4  # the default p(z): a flow learns what N(0, I) would force (docs/results.md, "Time to quality")
DEFAULT_CHECKPOINT = os.path.join("checkpoints", "vae.pt")


class Number:
    """An argparse type: an int or float in [low, high], or (low, high] with low_open; `check` checks a stored value."""

    def __init__(self, kind, low, high=None, low_open=False):
        self.kind, self.low, self.high, self.low_open = kind, low, high, low_open

    def __call__(self, text: str):
        try:
            value = self.kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if self.kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        return self.check(value)

    def check(self, value):
        if not (is_int(value) if self.kind is int else is_number(value)):
            raise argparse.ArgumentTypeError(f"expected a finite {self.kind.__name__}, got {value!r}")
        if value < self.low or (self.low_open and value == self.low):
            raise argparse.ArgumentTypeError(f"must be {'>' if self.low_open else '>='} {self.low}, got {value}")
        if self.high is not None and value > self.high:
            raise argparse.ArgumentTypeError(f"must be <= {self.high}, got {value}")
        return value


POSITIVE_INT, POSITIVE_FLOAT = Number(int, 1), Number(float, 0.0, low_open=True)
SEED = Number(int, 0, 2**63 - 1)  # what torch.Generator.manual_seed takes
RUN, GIVEN = True, False  # RUN: stored in the checkpoint and restored by --resume
D = VAEConfig()
TRAIN_FLAGS = (
    ("--epochs", GIVEN, dict(type=Number(int, 1, MAX_EPOCHS), default=None,
                             help=f"total epochs to train (default: {EPOCHS}; with --resume, the stored run's)")),
    ("--batch-size", RUN, dict(type=Number(int, 1, MAX_BATCH), default=128, help="images per step")),
    ("--lr", RUN, dict(type=POSITIVE_FLOAT, default=5e-3, help="Adam learning rate")),
    ("--lr-decay", RUN, dict(type=Number(float, 0.0, 1.0, low_open=True), default=None,
                             help="multiply the learning rate by this every epoch, smoothly per step (default: "
                                  "none: a cosine decay from --lr to 0 at the last epoch)")),
    ("--seed", RUN, dict(type=SEED, default=0, help="seeds init, shuffling and noise")),
    ("--latent-dim", RUN, dict(type=Number(int, 1, MAX_SIZE["latent_dim"]), default=D.latent_dim, help="size of z")),
    ("--arch", RUN, dict(choices=ARCHS, default=D.arch,
                         help="conv: small conv encoder/decoder; mlp: the pytorch/examples shape")),
    ("--hidden-dim", RUN, dict(type=Number(int, 1, MAX_SIZE["hidden_dim"]), default=D.hidden_dim,
                               help="width of the fully connected hidden layers (and of --flow-prior's nets)")),
    ("--channels", RUN, dict(type=Number(int, 1, MAX_SIZE["channels"]), nargs=2, default=list(D.channels),
                             metavar=("C1", "C2"), help="conv channels at 14x14 and 7x7, conv arch only (default: "
                                                                  f"{D.channels[0]} {D.channels[1]})")),
    ("--res-blocks", RUN, dict(type=Number(int, 0, MAX_SIZE["res_blocks"]), nargs="+", default=None,
                               metavar="N", help="residual blocks, conv arch only: four numbers, the encoder's "
                                                 "at 14x14 and 7x7 and the decoder's at 7x7 and 14x14; two, the "
                                                 "encoder's and the decoder's at both; or one for all (default: "
                                                 "0 0 0 1 with the conv arch, 0 with mlp)")),
    ("--activation", RUN, dict(choices=tuple(ACTIVATIONS), default=D.activation, help="nonlinearity between layers")),
    ("--output-bias", RUN, dict(choices=("mean", "torch"), default="mean",
                                help="the decoder's output bias at the start: mean, the log-odds of the training "
                                     "images' mean pixel; torch, PyTorch's init")),
    ("--flow-prior", RUN, dict(type=Number(int, 0, MAX_SIZE["flow_prior"]), default=FLOW_PRIOR,
                               help="p(z): N(0, I) through this many affine coupling layers (RealNVP) trained "
                                    f"with the model (its KL then sampled); 0: N(0, I) (default: {FLOW_PRIOR})")),
    ("--conditional", RUN, dict(action="store_true", help="conditional VAE: the digit label enters encoder and decoder")),
    ("--binarize", RUN, dict(action="store_true",
                             help="dynamically binarized MNIST: pixels ~ Bernoulli(grey level) every batch")),
    ("--beta", RUN, dict(type=POSITIVE_FLOAT, default=None,
                         help="weight of the KL term in the ELBO (beta-VAE); test losses are the true negative ELBO, "
                              f"weight 1 (default: {BETA}, or 1 with --iw-k above 1)")),
    ("--kl-warmup", RUN, dict(type=Number(int, 0, MAX_EPOCHS), default=0,
                              help="epochs over which the KL weight ramps linearly from 0 to beta")),
    ("--iw-k", RUN, dict(type=Number(int, 1, 5000), default=1,
                         help="importance samples K per image: K > 1 trains on the importance-weighted "
                              "bound (IWAE, Burda et al. 2015); K = 1 is the ELBO, its KL weighted by --beta")),
    ("--iw-start", RUN, dict(type=Number(int, 0, MAX_EPOCHS), default=0,
                             help="epochs trained on the ELBO before the --iw-k bound takes over (an IWAE phase)")),
    ("--ema", RUN, dict(type=Number(float, 0.0, 0.99999), default=0.999,
                        help="decay of an exponential moving average of the weights (Polyak averaging) that "
                             "evaluation, sampling and the saved model use; 0: off")),
    ("--mixture-components", RUN, dict(type=Number(int, 0, MAX_COMPONENTS), default=None,
                                       help="when training ends, fit a Gaussian mixture with this many components "
                                            "to the training images' posterior means (of one binarized draw "
                                            "with --binarize; per digit with --conditional), which samples then "
                                            "come from; 0: none (default: "
                                            f"{DEFAULT_COMPONENTS}, {DEFAULT_COMPONENTS_PER_CLASS} per digit)")),
    ("--limit", RUN, dict(type=POSITIVE_INT, default=None,
                          help="use only the first N training and N test images (default: all)")),
    ("--eval-batch-size", RUN, dict(type=Number(int, 1, MAX_BATCH), default=256, help="images per test-loss step")),
    ("--precision", RUN, dict(choices=("auto", "fp32", "bf16"), default="auto",
                              help="arithmetic of training and its test loss; auto = bf16 autocast where faster "
                                   "(Linux with AMX or AMD's AVX-512 BF16; CUDA from Ampere), else fp32")),
    ("--checkpoint", GIVEN, dict(default=DEFAULT_CHECKPOINT, help="checkpoint file to write")),
    ("--resume", GIVEN, dict(action="store_true", help="continue the run stored in --checkpoint, with its flags")),
    ("--overwrite", GIVEN, dict(action="store_true", help="start afresh even if --checkpoint exists (its run is lost)")),
    ("--device", GIVEN, dict(default="auto", choices=("auto", "cpu", "cuda", "mps"),
                             help="auto picks cuda, then mps, then cpu")),
    ("--data-dir", GIVEN, dict(default=DEFAULT_DATA_DIR, help="folder holding MNIST/raw/: MNIST's four files (.gz "
                               "ones decompressed beside them, missing ones downloaded, all SHA-256 checked; MNIST "
                               "only) (default: dataset/)")),
    ("--compile", GIVEN, dict(action="store_true", help="torch.compile the objective (compiling adds start-up time)")),
)
RUN_FLAGS = tuple(flag[2:].replace("-", "_") for flag, run, _ in TRAIN_FLAGS if run)
# each flag's value when not given (argparse's: False for a switch, else `default`)
DEFAULTS = {flag[2:].replace("-", "_"): kw.get("default", False if kw.get("action") == "store_true" else None)
            for flag, _, kw in TRAIN_FLAGS}
MODEL_FLAGS = ("latent_dim", "arch", "hidden_dim", "channels", "res_blocks", "activation", "flow_prior")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends '(default: X)' to every flag's help, unless the help words its default or the flag is required."""

    def _get_help_string(self, action):
        worded = "(default:" in (action.help or "") or action.required
        return action.help if worded else super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage block), exit 2, and every flag's default shown."""

    def __init__(self, description: str, flags=()):
        super().__init__(description=description, formatter_class=_HelpFormatter)
        for flag, _, keywords in flags:
            self.add_argument(flag, **keywords)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def add_common(p: Parser, seed_help: str | None = None, checkpoint: bool = True) -> None:
    """The other scripts' shared flags: --device and --data-dir as in TRAIN_FLAGS, the --checkpoint read, --seed."""
    for flag, _, keywords in TRAIN_FLAGS:
        if flag in ("--device", "--data-dir"):
            p.add_argument(flag, **keywords)
    if checkpoint:
        p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help="checkpoint written by train.py")
    if seed_help:
        p.add_argument("--seed", type=SEED, default=0, help=seed_help)


def check_flags(args) -> VAEConfig:
    """The rules between train.py's flags, for the command line and for stored flags alike.
    Returns the model config the flags describe; UserError names the flags."""
    if args.iw_k > 1 and (args.beta not in (None, 1.0) or args.kl_warmup > args.iw_start):
        raise UserError("--iw-k above 1 trains on the importance-weighted bound, which has no KL weight: "
                        "leave --beta at 1 (its default with --iw-k) and end --kl-warmup by --iw-start")
    if args.iw_start and args.iw_k == 1:
        raise UserError("--iw-start: the epoch the --iw-k bound takes over, but --iw-k is 1 (the ELBO)")
    if args.arch == "mlp" and list(args.channels) != DEFAULTS["channels"]:
        raise UserError("--channels sets the conv arch's widths, but --arch is mlp (its width: --hidden-dim)")
    try:
        return VAEConfig(latent_dim=args.latent_dim, arch=args.arch, hidden_dim=args.hidden_dim,
                         channels=tuple(args.channels), activation=args.activation,
                         res_blocks=args.res_blocks,
                         num_classes=NUM_CLASSES if args.conditional else 0, flow_prior=args.flow_prior)
    except ValueError as e:  # the config names its fields; the user typed flags
        raise UserError(re.sub(r"\b(" + "|".join(MODEL_FLAGS) + r")\b",
                               lambda m: "--" + m.group(1).replace("_", "-"), str(e))) from None


def flags_of(config: VAEConfig) -> dict:
    """The train.py flags (by RUN_FLAGS name) that describe a model config: check_flags' inverse."""
    return {**{name: getattr(config, name) for name in MODEL_FLAGS}, "channels": list(config.channels),
            "res_blocks": list(config.res_blocks), "conditional": config.num_classes > 0}


def check_stored_flags(stored: dict, path, config: VAEConfig, defaulted=()) -> None:
    """The RUN flags a checkpoint stores (and --epochs), each through its TRAIN_FLAGS type and range
    and the rules between them, and in agreement with the stored model (whose fields in `defaulted` the file lacked).
    A flag the checkpoint does not have (added to the table after it was written) takes its default, in `stored`: a
    new flag's default keeps the old behaviour."""
    for flag, run, keywords in TRAIN_FLAGS:
        name = flag[2:].replace("-", "_")
        if not run and name != "epochs":
            continue
        v = stored.setdefault(name, DEFAULTS[name])
        try:
            if keywords.get("action") == "store_true":
                ok = isinstance(v, bool)
            elif v is None:
                ok = keywords.get("default") is None
            elif "choices" in keywords:
                ok = isinstance(v, str) and v in keywords["choices"]
            elif "nargs" in keywords:
                n = keywords["nargs"]  # "+": how many, the model config checks; a stored int is one value
                v = [v] if n == "+" and is_int(v) else v
                ok = (isinstance(v, list) and (len(v) == n or n == "+" and len(v) >= 1)
                      and all(keywords["type"].check(c) is not None for c in v))  # raises if out of range
            else:
                ok = keywords["type"].check(v) is not None
        except argparse.ArgumentTypeError:
            ok = False
        if not ok:
            raise UserError(f"{path}: bad checkpoint field args[{name!r}]: {v!r} is not a valid {flag}")
    try:
        described = check_flags(argparse.Namespace(**{name: stored[name] for name in RUN_FLAGS}))
        for f in fields(config):
            if getattr(described, f.name) != getattr(config, f.name):
                raise UserError(f"they give {f.name} {getattr(described, f.name)!r}, the stored model has "
                                f"{getattr(config, f.name)!r}" + (" (the default: its model config lacks the field)"
                                                                  if f.name in defaulted else ""))
    except UserError as e:
        raise UserError(f"{path}: bad checkpoint field args: {e}") from None


def load_vae(path, map_location=None) -> tuple[VAE, dict]:
    """(model in eval mode, checkpoint dict), every field checked, the stored flags included, and
    the model fit for MNIST; every problem is one UserError naming the file."""
    model, ckpt = load_model(path, VAE, VAEConfig, GaussianMixture, map_location)
    c = model.config
    why = mnist_mismatch(c.image_channels, c.image_size, c.num_classes)
    if why:
        raise UserError(f"{path}: this model cannot be used on MNIST: {why}")
    check_stored_flags(ckpt["args"], path, c, defaulted_fields(ckpt["model_config"], VAEConfig))
    return model, ckpt


def count(n: int, noun: str) -> str:
    """'1 epoch', '2 epochs', '60,000 images': a number and its noun, for messages."""
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def pick_device(name: str) -> torch.device:
    """'auto' takes cuda, then mps, then cpu; an explicit choice must be available."""
    if name == "auto":
        name = next(n for n in ("cuda", "mps", "cpu") if not unavailable(torch.device(n)))
    why = unavailable(torch.device(name))
    if why:
        raise UserError(f"--device {name}: {why} (try --device auto)")
    return torch.device(name)


def device_note(device: torch.device, name: str) -> str:
    """What every script prints first: 'device: cpu', and whether --device auto picked it."""
    return f"device: {device}" + (" (picked by --device auto)" if name == "auto" else "")


def pick_precision(name: str, device: torch.device) -> bool:
    """True to train under bf16 autocast; 'auto' where bf16 is the faster arithmetic."""
    if name == "bf16" and device.type == "mps":
        raise UserError("--precision bf16: not supported on mps (use fp32)")
    if name != "auto":
        return name == "bf16"
    if device.type != "cpu":  # a GPU: bf16 where native (Ampere and later), not emulated; mps: fp32
        return device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)
    try:  # bf16 pays with AMX or AMD's AVX-512 BF16; Intel's without AMX is slower than fp32 (benchmarks/README.md)
        with open("/proc/cpuinfo") as f:
            info = f.read()
    except OSError:  # not Linux: stay with fp32
        return False
    return "amx_bf16" in info or "avx512_bf16" in info and "AuthenticAMD" in info


def keep_freed_memory() -> None:
    """Keep freed tensor memory in the process: glibc serves large blocks with mmap and trims the heap on free, so
    every CPU step would page-fault its activations back in (benchmarks/epoch_speed.py counts the faults). Blocks
    under 32 MiB stay in the heap instead, up to 256 MiB free of it. A no-op where the C library is not glibc."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
    mallopt(m_mmap_threshold, 32 << 20)  # glibc's maximum on 64-bit systems
    mallopt(m_trim_threshold, 256 << 20)


def free_memory(device: torch.device) -> int | None:
    """Bytes of memory available for new tensors on `device`, or None where it cannot be told."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def run(main, argv=None) -> int:
    """Call main(argv); a UserError becomes one line on stderr and exit code 1, Ctrl-C outside
    train.py's own handling exit 130. Anything else is a bug and keeps its traceback."""
    if hasattr(sys.stdout, "reconfigure"):  # a path of non-UTF-8 bytes is printed escaped, not a crash after the work
        sys.stdout.reconfigure(errors="backslashreplace")
    try:
        return main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `| head`: the reader left; what was saved stays saved
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        print("error: the output pipe was closed; stopped", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
