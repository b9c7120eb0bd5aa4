"""What train.py's loop calls: set-up (new or resumed), the schedule, saving, signals, the latent
mixture. Everything that decides a run's numbers is a pure function of the seed and the progress
(epoch + step / steps) or is stored in the checkpoint, so a resumed run replays an unbroken one."""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import io
import math
import os
import shlex
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field

import torch

from lib import checks, cli, files
from lib.checks import FORMAT, IW_FIELDS, METRIC_FIELDS, UserError, check_resumable, with_checksums
from lib.data import TensorDataset, fitting_set, load_test_set
from lib.mixture import components, describe, fit_to_model
from model import VAE, GaussianMixture


@dataclass
class Run:
    """A training run: set up by `setup`, saved whole by `save`, advanced by train.py's loop."""

    args: argparse.Namespace
    model: VAE  # the weights being trained
    ema: VAE | None  # their exponential moving average (--ema), which is evaluated, sampled and loaded
    opt: torch.optim.Adam
    noise: torch.Generator  # the reparameterisation noise and dynamic binarization
    bf16: bool  # the objective runs under bf16 autocast
    train_set: TensorDataset
    test_set: TensorDataset
    steps: int  # batches per epoch, the last one short
    metrics: list = field(default_factory=list)  # one dict per completed epoch
    epoch: int = 0  # completed epochs
    step: int = 0  # > 0: resumed mid-epoch after this many steps, whose sums are `partial` [step, 3]
    partial: torch.Tensor | None = None
    partial_seconds: float = 0.0
    on_disk: str = "no checkpoint was written"  # what a failure leaves on disk, for its message

    @property
    def evaluated(self) -> VAE:
        """What the test loss, the latent mixture, samples and a loaded model use: `ema` where kept, else `model`."""
        return self.ema if self.ema is not None else self.model


@contextlib.contextmanager
def setup(args):
    """A new run from the flags, or with --resume the run stored in --checkpoint, continued with its
    own flags; None if it has nothing left to do. Everything that can fail on the input (flags,
    every checkpoint field, paths, data, device) is checked before anything is written, and the
    checkpoint is read once; then the checkpoint's lock is held until the block ends."""
    path, ckpt, model, stamp = args.checkpoint, None, None, None
    if args.resume and args.overwrite:
        raise UserError("--resume continues the run in --checkpoint, --overwrite starts it afresh: pass one of them")
    files.check_output_path(path, "checkpoint")
    if args.resume:
        stamp = files.modified(path)  # the file read: another process may replace it before the lock is held
        model, ckpt = cli.load_vae(path, map_location="cpu")
        check_resumable(ckpt, path, list(model.parameters()))
        restore_flags(args, ckpt["args"])
        args.epochs, stored_epochs = args.epochs or ckpt["args"]["epochs"] or cli.EPOCHS, ckpt["args"]["epochs"]
        config = model.config
        if ckpt["epoch"] > args.epochs or ckpt["epoch"] == args.epochs and ckpt["step"]:  # steps done count too
            done = cli.count(ckpt["epoch"], "epoch") + (f" and {ckpt['step']} steps" if ckpt["step"] else "")
            raise UserError(f"{path} already has {done}: --epochs {args.epochs} cannot undo them; pass --epochs above "
                            f"{ckpt['epoch']} to train on")
        mixture_missing = (ckpt["latent_mixture"] is None
                           and components(args.mixture_components, config.num_classes) > 0)
        if ckpt["epoch"] == args.epochs and not mixture_missing:
            print(f"{path} already has {cli.count(ckpt['epoch'], 'epoch')}; pass --epochs above {ckpt['epoch']} "
                  "to train on")
            yield None
            return
        cosine_moved = args.lr_decay is None and stored_epochs and args.epochs != stored_epochs  # its end moved
        if cosine_moved and ckpt["epoch"] < args.epochs:
            print(f"note: the cosine learning rate now reaches 0 at epoch {args.epochs}, not {stored_epochs}, so the "
                  f"run differs from a straight {args.epochs}-epoch one (a run started with --lr-decay extends exactly)")
    elif os.path.exists(path) and not args.overwrite:
        raise UserError(f"{path} exists: pass --resume to continue it, --overwrite to start again, "
                        "or --checkpoint for a new file")
    else:
        config = cli.check_flags(args)
        args.epochs = args.epochs or cli.EPOCHS
    args.res_blocks = list(config.res_blocks)  # the numbers the model has (the flag's default is None)
    # the number of components the run fits, stored: a later change of the default leaves the run as it was
    args.mixture_components = components(args.mixture_components, config.num_classes)
    if args.beta is None:  # the IW bound has no KL weight, so its ELBO epochs keep the ELBO's
        args.beta = 1.0 if args.iw_k > 1 else cli.BETA
    files.check_output_path(files.metrics_path(path), "metrics CSV")
    device = cli.pick_device(args.device)
    train_set = TensorDataset.load("train", args.data_dir, device, args.limit)
    test_set = load_test_set(args.data_dir, device, args.limit, args.binarize)
    steps = math.ceil(len(train_set) / args.batch_size)
    if ckpt is not None and ckpt["step"] >= steps:
        raise UserError(f"{path}: bad checkpoint field step: {ckpt['step']}, but an epoch has {steps} steps")
    bf16 = cli.pick_precision(args.precision, device)
    with files.Lock(path, read_at=stamp):
        files.remove_stale_temp_files(path)  # only its own, of processes no longer alive
        print(cli.device_note(device, args.device)
              + f", precision: {'bf16 autocast' if bf16 else 'fp32'}")
        torch.manual_seed(args.seed)  # the initial weights
        # channels_last: the layout the CPU's and GPU's convolution kernels prefer (benchmarks/README.md)
        model = (model or VAE(config)).to(device, memory_format=torch.channels_last).train()
        if ckpt is None and args.output_bias == "mean":  # the untrained decoder predicts the mean grey level: no
            # slow first steps to learn it, which some seeds never make up (docs/results.md)
            counts = torch.bincount(train_set.images.flatten().cpu(), minlength=256)  # exact, and no wide copy
            p = sum(i * c for i, c in enumerate(counts.tolist())) / (255 * counts.sum().item())
            out = model.dec_body[-1] if config.arch == "conv" else model.dec_head[-1]
            torch.nn.init.constant_(out.bias, math.log(max(p, 1e-6) / max(1 - p, 1e-6)))
        model.latent_mixture = None  # fitted to these weights when training ends
        opt = torch.optim.Adam(model.parameters(), lr=args.lr, fused=device.type in ("cpu", "cuda"))
        ema = copy.deepcopy(model).requires_grad_(False) if args.ema else None
        noise = torch.Generator(device=device).manual_seed(args.seed)
        run = Run(args, model, ema, opt, noise, bf16, train_set, test_set, steps)
        if ckpt is not None:
            model.load_state_dict(ckpt["model"])  # the trained weights (load_vae gave their average)
            if ema is not None:
                ema.load_state_dict(ckpt["ema"])
            opt.load_state_dict(ckpt["optimizer"])
            torch.set_rng_state(ckpt["rng"]["torch"])
            try:
                run.noise.set_state(ckpt["rng"]["noise"])
            except (RuntimeError, TypeError):
                print("note: the checkpoint was written on another kind of device; noise RNG reseeded")
            run.metrics, run.epoch, run.step = list(ckpt["metrics"]), ckpt["epoch"], ckpt["step"]
            run.partial, run.partial_seconds = ckpt["partial"], ckpt["partial_seconds"]
            run.on_disk = f"the last good checkpoint {path} is untouched"
            print(f"resuming {path} after " + (f"step {run.step} of {steps} in epoch {run.epoch + 1}" if run.step
                                               else f"epoch {run.epoch}"))
        print(f"training {sum(p.numel() for p in model.parameters()):,} parameters on "
              f"{cli.count(len(train_set), 'image')}, {cli.count(args.epochs, 'epoch')} of {cli.count(steps, 'step')}"
              + (", dynamically binarized" if args.binarize else "")
              + (f"; test losses of the weights' moving average (--ema {args.ema})" if args.ema else ""))
        if args.iw_k > 1 and args.iw_start >= args.epochs:
            print(f"note: --iw-start {args.iw_start} is not before --epochs {args.epochs}: the run ends before the "
                  "importance-weighted bound takes over")
        elif args.iw_k > 1:
            print(f"objective: from epoch {args.iw_start + 1}, the importance-weighted bound with K = {args.iw_k} "
                  "(IWAE); train and test loss are the negative ELBO, the IW bound is logged beside them")
        if args.beta != 1.0 or args.kl_warmup:
            print(f"note: the objective weighs the KL by {args.beta:g} (--beta; 1: the plain ELBO)"
                  + (f", ramped from 0 over {cli.count(args.kl_warmup, 'epoch')}" if args.kl_warmup else "")
                  + (f" (the run ends at {kl_weight(args, args.epochs):g})" if args.kl_warmup > args.epochs else "")
                  + "; every loss reported is the true negative ELBO (weight 1)")
        yield run


def restore_flags(args, stored: dict) -> None:
    """--resume continues the run as it started: its RUN flags replace the command line's."""
    for name in cli.RUN_FLAGS:
        given = getattr(args, name)
        if given != cli.DEFAULTS[name] and given != stored[name]:
            print(f"note: --{name.replace('_', '-')} {given} ignored: --resume continues the stored run "
                  f"({'its default' if stored[name] is None else stored[name]})")
        setattr(args, name, stored[name])


def learning_rate(args, progress: float) -> float:
    """The rate after `progress` epochs (fractional within an epoch): lr * lr_decay ** progress, or without
    --lr-decay a cosine from lr to 0 at the last epoch (Loshchilov & Hutter 2017, eq. 5, one cycle)."""
    if args.lr_decay is not None:
        return args.lr * args.lr_decay ** progress
    return args.lr * 0.5 * (1.0 + math.cos(math.pi * progress / args.epochs))


def kl_weight(args, progress: float) -> float:
    """Linear KL warm-up from 0 to beta over kl_warmup epochs; `progress` counts epochs done."""
    return args.beta if args.kl_warmup == 0 else args.beta * min(1.0, progress / args.kl_warmup)


def objective(model, x, labels, eps, beta: float, bf16: bool):
    """The step's VAE.loss per image (LossParts of [B] tensors), K = eps.shape[0], under bf16 autocast if bf16, entered
    inside what --compile compiles: around a compiled call its backward would run under autocast too, giving what
    VAE.loss keeps in fp32 (the flow's density) bf16 gradients, unlike eager."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        return model.loss(x, labels, k=eps.shape[0], beta=beta, eps=eps, reduction="none")


@torch.no_grad()
def update_ema(ema: VAE, model: VAE, decay: float, t: int) -> None:
    """ema <- d * ema + (1 - d) * model after the t-th step (t >= 1), d = min(decay, (1 + t) / (10 + t)):
    the average forgets the initial weights quickly early on (as TensorFlow's ExponentialMovingAverage
    with num_updates), and is a pure function of t, so resumes replay it."""
    d = min(decay, (1 + t) / (10 + t))
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1 - d)


def epoch_permutation(seed: int, epoch: int, n: int) -> torch.Tensor:
    """The shuffling order of one epoch, a pure function of (seed, epoch): resumes replay it."""
    return torch.randperm(n, generator=torch.Generator().manual_seed((seed * 1_000_003 + epoch) % 2**63))


def check_finite(stats: torch.Tensor, start: int, stop: int, run: Run, epoch: int) -> None:
    """UserError at the first step in [start, stop) whose logged sums (recon, KL, objective) are
    not finite. Reads the device's numbers, so train.py calls it every LOG_EVERY steps only."""
    rows = stats[start:stop].cpu()
    bad = ~torch.isfinite(rows)
    if bad.any():
        j = int(bad.any(dim=1).nonzero()[0])
        terms = [f"{name} = {rows[j, c].item()}" for c, name in enumerate(("recon", "KL")) if bad[j, c]]
        raise UserError(f"non-finite loss at epoch {epoch + 1}, step {start + j + 1} "
                        f"({', '.join(terms or [f'objective = {rows[j, 2].item()}'])}); stopped, {run.on_disk}")


def save(run: Run, epoch: int, step: int = 0, stats: torch.Tensor | None = None, seconds: float = 0.0) -> None:
    """Write the checkpoint (atomically): the run after `epoch` complete epochs and `step` steps of
    the next, whose per-step sums are stats[:step]; then the metrics CSV of the complete epochs beside it."""
    ckpt = checkpoint(run.model, {k: getattr(run.args, k) for k in ("epochs", *cli.RUN_FLAGS)},
                      run.evaluated.latent_mixture, ema=None if run.ema is None else run.ema.state_dict(),
                      optimizer=run.opt.state_dict(), epoch=epoch, step=step,
                      partial=None if stats is None else stats[:step].cpu(), partial_seconds=seconds,
                      rng={"torch": torch.get_rng_state(), "noise": run.noise.get_state()}, metrics=run.metrics)
    files.save_atomic(with_checksums(ckpt), run.args.checkpoint)
    buf = io.StringIO()  # written mid-epoch too: an --overwrite stopped in its first epoch leaves no old rows
    known = METRIC_FIELDS + (IW_FIELDS if run.args.iw_k > 1 else ())
    extra = dict.fromkeys(k for row in run.metrics for k in row if k not in known)  # in order, once each
    w = csv.DictWriter(buf, fieldnames=known + tuple(extra), lineterminator="\n")
    w.writeheader()
    w.writerows({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in r.items()} for r in run.metrics)
    files.write_atomic(files.metrics_path(run.args.checkpoint), lambda f: f.write(buf.getvalue().encode()))
    run.on_disk = f"the last good checkpoint {run.args.checkpoint} (epoch {epoch}) is untouched"


def checkpoint(model: VAE, args: dict, mixture: GaussianMixture | None, **state) -> dict:
    """A checkpoint's fields (lib/checks.py, KEYS), every tensor on the CPU (a file saved on a GPU loads anywhere):
    the model, its flags and latent mixture; `state`, what a resume needs (none by default: a model to use)."""
    def cpu(o):
        if isinstance(o, dict):
            out = copy.copy(o)  # a state dict's own type and metadata, in a new dict: the optimiser's stays on device
            out.update((k, cpu(v)) for k, v in o.items())
            return out
        return [cpu(v) for v in o] if isinstance(o, list) else o.cpu() if isinstance(o, torch.Tensor) else o

    return cpu({"format": FORMAT, "model_config": model.config.to_dict(), "model": model.state_dict(), "ema": None,
                "optimizer": None, "epoch": 0, "step": 0, "partial": None, "partial_seconds": 0.0, "rng": None,
                "metrics": [], "args": args, "latent_mixture": None if mixture is None else mixture.state(), **state})


def save_model(model: VAE, path, binarize: bool = False, overwrite: bool = False) -> None:
    """Save a VAE trained by a loop of one's own as a checkpoint that generate.py, evaluate.py, tools/fit_mixture.py
    and VAE.from_checkpoint read: its config, weights and latent mixture, and the train.py flags that describe it
    (binarize: it was trained on dynamically binarized images, so evaluation binarizes too); not one to --resume.
    An existing file is replaced only with overwrite (a metrics CSV beside it, of another run, is removed). The file is
    read back as the scripts read it before anything is written there. UserError for a model that is not a model.VAE
    (the scripts rebuild that class from the config: a subclass's code is not saved), a path check_output_path
    refuses, or a model the scripts could not read (its config, weights or mixture)."""
    if type(model) is not VAE or not isinstance(model.latent_mixture, (GaussianMixture, type(None))):
        raise UserError(f"save_model saves a model.VAE (with a GaussianMixture or None as its latent_mixture), got a "
                        f"{type(model).__name__}: the scripts rebuild model.VAE from the config alone")
    if not (isinstance(binarize, bool) and isinstance(overwrite, bool)):
        raise UserError(f"binarize and overwrite must be True or False, got {binarize!r} and {overwrite!r}")
    config = checks.model_of(model)[0]
    path = files.check_output_path(path, "checkpoint")
    csv_path = files.check_output_path(files.metrics_path(path), "metrics CSV")

    def refuse_existing():
        if os.path.exists(path) and not overwrite:
            raise UserError(f"{path} exists: pass overwrite=True to replace it")

    refuse_existing()
    buf = io.BytesIO()  # serialised once: the read-back copy and the file are these bytes
    torch.save(with_checksums(checkpoint(model, {**cli.flags_of(config), "binarize": binarize}, model.latent_mixture)),
               buf)
    try:
        scratch = tempfile.TemporaryDirectory()  # for a copy read back as generate.py and evaluate.py read it
        tmp = os.path.join(scratch.name, "model.pt")
        with open(tmp, "wb") as f:
            f.write(buf.getbuffer())
    except OSError as e:
        raise UserError(f"{path}: not saved: cannot write its read-back copy in {tempfile.gettempdir()} "
                        f"({checks.first_line(e)})") from None
    with scratch:
        try:
            cli.load_vae(tmp)
        except UserError as e:
            raise UserError(f"{path}: not saved: the scripts could not read this model: "
                            + str(e).replace(f"{tmp}: ", "", 1)) from None
    with files.Lock(path):  # not under a train.py that writes it
        refuse_existing()  # nor over a file saved since the check above
        files.write_atomic(path, lambda f: f.write(buf.getbuffer()))
        if overwrite and os.path.exists(csv_path):
            os.unlink(csv_path)


def fit_latent_mixture(run: Run) -> None:
    """Fit the latent mixture (lib/mixture.py) that samples come from, and save it in the checkpoint."""
    m = run.args.mixture_components  # resolved by setup
    if m == 0:
        return
    t0 = time.perf_counter()
    model = run.evaluated
    data = fitting_set(run.train_set, run.args.binarize)
    fitted = fit_to_model(model, data.images, data.labels, m, run.args.seed)
    if fitted is None:
        print("note: no latent mixture fitted (a digit has no training image); samples come from the prior")
        return
    model.latent_mixture = GaussianMixture(**fitted).to(model.device)
    save(run, run.epoch)
    print(describe(fitted, run.model.config.num_classes, m, len(run.train_set), time.perf_counter() - t0))


class Interrupted(BaseException):
    """SIGINT or SIGTERM outside the step loop, its number in args[0] (a BaseException: no `except Exception`
    swallows it)."""


class Signals:
    """SIGINT and SIGTERM, handled the same in every phase of a run. Inside `deferred()` (the step loop, the
    evaluation and the save of an epoch) a signal is recorded in `received` and the loop stops between two steps,
    after saving; elsewhere (set-up, data, the mixture fit) it raises Interrupted; `report` says what is kept."""

    def __init__(self):
        self.received, self._defer, self._old = None, False, {}

    def _handle(self, signum, frame):
        self.received = signum
        if not self._defer:
            raise Interrupted(signum)

    @contextlib.contextmanager
    def deferred(self):
        self._defer = True
        try:
            yield
        finally:
            self._defer = False

    def __enter__(self):
        for s in (signal.SIGINT, signal.SIGTERM):
            self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


def report(signum: int, where: str, kept: str) -> int:
    """The one line a signal leaves on stderr; returns the shell's exit code (130 SIGINT, 143 SIGTERM)."""
    print(f"{signal.Signals(signum).name} {where}: {kept}", file=sys.stderr, flush=True)
    return 128 + signum


def resume_hint(args) -> str:
    return f"resume with: python train.py --resume --checkpoint {shlex.quote(args.checkpoint)} --epochs {args.epochs}"
