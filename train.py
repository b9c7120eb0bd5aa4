"""Train the VAE on MNIST and save one checkpoint (plus a metrics CSV beside it).

    python train.py                      # defaults: the README's results
    python train.py --epochs 4 --resume  # continue checkpoints/vae.pt up to 4 epochs

Reported losses are always the true negative ELBO (beta = 1, no warm-up), in nats per image:
Bernoulli reconstruction NLL summed over pixels plus the analytic KL (Kingma & Welling 2014).
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import os
import re
import signal
import sys
import time
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

import cli
import mixture
from checkpoint import (DEFAULT_CHECKPOINT, FORMAT, MAX_EPOCHS, CheckpointError, CheckpointLock,
                        first_line, load_checkpoint,
                        remove_stale_temp_files, save_atomic, seal, write_atomic)
from data import NUM_CLASSES, TensorDataset, load_test_set
from likelihood import evaluate_elbo, importance_nll
from model import MAX_SIZE, VAE, VAEConfig
from training import (check_adam_state, compile_objective, epoch_permutation, kl_weight, learning_rate,
                      make_optimizer, objective, train_step)

LOG_EVERY = 50  # steps between host syncs (progress bar update and non-finite check)
# Flags that define a run: on --resume they are taken from the checkpoint, not the command line.
RUN_FLAGS = ("batch_size", "lr", "lr_decay", "seed", "limit", "binarize", "conditional", "beta",
             "kl_warmup", "eval_batch_size", "precision", "iw_k")
MODEL_FLAGS = ("latent_dim", "arch", "hidden_dim", "channels", "activation", "res_blocks")
METRIC_FIELDS = ("epoch", "train_loss", "train_recon", "train_kl", "test_loss", "recon", "kl",
                 "kl_weight", "seconds")
IW_FIELDS = ("train_iw", "test_iw")  # with --iw-k > 1: the negative K-sample bound, train and test
MAX_IW_K = 5000
BEFORE_FLAG = {"iw_k": 1, "res_blocks": 0}  # what runs did before these flags existed


class TrainingError(cli.UserError):
    pass


def build_parser() -> argparse.ArgumentParser:
    d = VAEConfig()
    p = cli.Parser(description="Train a VAE on MNIST.")
    p.add_argument("--epochs", type=cli.number(int, 1, high=MAX_EPOCHS), default=20, help="total epochs to train")
    p.add_argument("--batch-size", type=cli.number(int, 1, high=cli.MAX_BATCH), default=128, help="images per step")
    p.add_argument("--lr", type=cli.positive_float, default=3e-3, help="Adam learning rate")
    p.add_argument("--latent-dim", type=cli.number(int, 1, high=MAX_SIZE["latent_dim"]), default=d.latent_dim,
                   help="size of z")
    p.add_argument("--arch", choices=("conv", "mlp"), default=d.arch,
                   help="conv: small conv encoder/decoder; mlp: the pytorch/examples shape")
    p.add_argument("--hidden-dim", type=cli.number(int, 1, high=MAX_SIZE["hidden_dim"]), default=d.hidden_dim,
                   help="width of the fully connected hidden layer")
    p.add_argument("--channels", type=cli.number(int, 1, high=MAX_SIZE["channels"]), nargs=2, default=list(d.channels),
                   metavar=("C1", "C2"), help="conv channels at 14x14 and 7x7 (conv arch)")
    p.add_argument("--res-blocks", type=cli.number(int, 0, high=MAX_SIZE["res_blocks"]), default=None,
                   help="residual blocks at each conv resolution, encoder and decoder (default: 1 with "
                        "the conv arch, 0 with mlp)")
    p.add_argument("--activation", choices=("silu", "relu", "elu"), default=d.activation,
                   help="nonlinearity between layers")
    p.add_argument("--lr-decay", type=cli.number(float, 0.0, low_open=True, high=1.0), default=0.8,
                   help="multiply the learning rate by this every epoch (smoothly, per step)")
    p.add_argument("--seed", type=cli.seed, default=0, help="seeds init, shuffling and noise")
    cli.add_device_flag(p)
    cli.add_data_dir_flag(p)
    p.add_argument("--limit", type=cli.positive_int, default=None,
                   help="use only the first N training and N test images (quick runs)")
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help="checkpoint file to write")
    p.add_argument("--resume", action="store_true", help="continue the run stored in --checkpoint")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh even if --checkpoint exists (its run is lost)")
    p.add_argument("--eval-batch-size", type=cli.number(int, 1, high=cli.MAX_BATCH), default=256,
                   help="images per step when evaluating the test set")
    p.add_argument("--binarize", action="store_true",
                   help="dynamically binarized MNIST: pixels ~ Bernoulli(grey level) every batch")
    p.add_argument("--conditional", action="store_true",
                   help="conditional VAE: the digit label enters encoder and decoder")
    p.add_argument("--beta", type=cli.positive_float, default=1.0, help="weight of the KL term (beta-VAE)")
    p.add_argument("--kl-warmup", type=cli.number(int, 0, high=MAX_EPOCHS), default=0,
                   help="epochs over which the KL weight ramps linearly from 0 to beta")
    cli.add_precision_flag(p, help="arithmetic of training and its per-epoch test loss; auto = bf16 "
                                   "autocast where the CPU or GPU has native bf16, else fp32 "
                                   "(evaluate.py is always fp32)")
    p.add_argument("--iw-k", type=cli.number(int, 1, high=MAX_IW_K), default=1,
                   help="importance samples per image: K > 1 trains on the importance-weighted bound "
                        "(IWAE, Burda et al. 2015) instead of the ELBO; K = 1 is the ELBO")
    p.add_argument("--mixture-components", type=cli.number(int, 0, high=mixture.MAX_COMPONENTS), default=None,
                   help="when training ends, fit a Gaussian mixture with this many components to the "
                        "training images' posterior means (per digit for --conditional), which "
                        f"samples then come from; 0: none (default: {mixture.DEFAULT_COMPONENTS}, "
                        f"{mixture.DEFAULT_COMPONENTS_PER_CLASS} per digit with --conditional)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the training step's forward and loss (about 30 s of start-up on a "
                        "2-core CPU; evaluation stays eager)")
    return p


class StopFlag:
    """Records SIGINT/SIGTERM so the loop can stop between steps and save first."""

    def __init__(self):
        self.signum = None
        self._old = {}

    def _handle(self, signum, frame):
        self.signum = signum

    def __enter__(self):
        for s in (signal.SIGINT, signal.SIGTERM):
            self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


def metrics_path(checkpoint: str) -> str:
    return os.path.splitext(checkpoint)[0] + ".metrics.csv"


def write_metrics(path: str, rows: list[dict]) -> None:
    """Rewrite the CSV from the checkpoint's rows (atomically): it never disagrees with it."""
    buf = io.StringIO()
    fields = METRIC_FIELDS + (IW_FIELDS if rows and IW_FIELDS[0] in rows[0] else ())
    w = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in r.items()})
    write_atomic(path, lambda f: f.write(buf.getvalue().encode()))


def check_finite(stats: torch.Tensor, start: int, stop: int, epoch: int, where: str) -> None:
    """Raise TrainingError at the first step in [start, stop) whose loss terms are not finite."""
    rows = stats[start:stop].cpu()
    bad = ~torch.isfinite(rows)
    if bad.any():
        j = int(bad.any(dim=1).nonzero()[0])
        names = ("recon", "KL", "IW bound")
        terms = [f"{names[c]} = {rows[j, c].item()}" for c in range(rows.shape[1]) if bad[j, c]]
        raise TrainingError(f"non-finite loss at epoch {epoch + 1}, step {start + j + 1} "
                            f"({', '.join(terms)}); stopped, {where}")


def check_outputs(path: str) -> None:
    """The checkpoint's and the metrics CSV's paths, checked before any work and without creating
    anything: a file path (not a folder, not a device), in a folder that exists or can be made."""
    if not path:
        raise cli.UserError("--checkpoint: empty path")
    cli.check_creatable_folder(os.path.dirname(os.path.abspath(path)), "checkpoint folder")
    for p, what in ((path, "checkpoint"), (metrics_path(path), "metrics CSV")):
        if os.path.isdir(p):
            raise cli.UserError(f"{p}: is a folder, expected a path for the {what}")
        if os.path.exists(p) and not os.path.isfile(p):
            raise cli.UserError(f"{p}: not a regular file; the {what} must be one")
        if os.path.exists(p) and not os.access(p, os.W_OK):
            raise cli.UserError(f"{p}: not writable")


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    cli.keep_freed_memory()
    # Everything that can fail on what the user gave runs before anything is written: a bad
    # checkpoint, bad output paths, a missing data folder or device leave no folder and no lock file.
    if args.resume:
        ckpt = load_checkpoint(args.checkpoint, map_location="cpu")
        check_resumable(ckpt, args.checkpoint, parser)
        restore_run_flags(args, parser, ckpt["args"])  # --limit and --binarize pick the data
        if ckpt["epoch"] >= args.epochs:
            print(f"{args.checkpoint} already has {ckpt['epoch']} epochs; pass --epochs above "
                  f"{ckpt['epoch']} to train on")
            return 0
    elif os.path.exists(args.checkpoint) and not args.overwrite:
        raise cli.UserError(f"{args.checkpoint} exists: pass --resume to continue it, --overwrite to "
                            "start again, or --checkpoint for a new file")
    if args.iw_k > 1 and (args.beta != 1.0 or args.kl_warmup):
        raise cli.UserError("--iw-k above 1 trains on the importance-weighted bound, which has no KL weight: "
                            "leave --beta at 1 and --kl-warmup at 0")
    if not args.resume:
        try:  # flags the model config refuses together (--res-blocks with --arch mlp), up front
            model_config(args)
        except ValueError as e:  # the config names its fields; the user typed flags
            message = re.sub(r"\b(" + "|".join(MODEL_FLAGS) + r")\b",
                             lambda m: "--" + m.group(1).replace("_", "-"), str(e))
            raise cli.UserError(message) from None
    check_outputs(args.checkpoint)
    device = cli.pick_device(args.device)
    data = (TensorDataset.load("train", args.data_dir, device, args.limit),
            load_test_set(args.data_dir, device, args.limit, args.binarize))
    if args.resume:
        check_position(ckpt, args.checkpoint, args, len(data[0]))
    cli.ensure_folder(os.path.dirname(os.path.abspath(args.checkpoint)), "checkpoint folder")
    with CheckpointLock(args.checkpoint):
        remove_stale_temp_files(args.checkpoint)  # only its own, of processes no longer alive
        run = start_or_resume(args, parser, device, *data)
        return 0 if run is None else train(run)


@dataclass
class Run:
    """What a training carries from step to step: set up by `start_or_resume`, saved whole by
    `snapshot` (every key of the checkpoint), advanced by `train_epoch` and `end_epoch`."""

    args: argparse.Namespace
    config: VAEConfig
    model: VAE
    opt: torch.optim.Adam
    noise: torch.Generator  # reparameterisation noise and dynamic binarization
    bf16: bool
    objective_fn: object  # training.objective, or its compiled version
    train_set: TensorDataset
    test_set: TensorDataset
    metrics: list = field(default_factory=list)  # one dict per completed epoch
    start_epoch: int = 0
    start_step: int = 0  # > 0: resumed mid-epoch, `partial` holds that epoch's per-step sums
    partial: torch.Tensor | None = None
    partial_seconds: float = 0.0
    saved: str = "no checkpoint was written"  # what a failure leaves on disk, for its message

    @property
    def steps(self) -> int:
        return math.ceil(len(self.train_set) / self.args.batch_size)


def model_config(args) -> VAEConfig:
    """The model a new run builds from its flags; ValueError for a combination the config refuses."""
    return VAEConfig(latent_dim=args.latent_dim, arch=args.arch, hidden_dim=args.hidden_dim,
                     channels=tuple(args.channels), activation=args.activation,
                     res_blocks=args.res_blocks, num_classes=NUM_CLASSES if args.conditional else 0)


def start_or_resume(args, parser, device: torch.device, train_set: TensorDataset,
                    test_set: TensorDataset) -> Run | None:
    """A new run from the flags, or the run stored in --checkpoint (--resume) with its own flags,
    read again now that this process holds the lock. None if it has nothing left to do."""
    ckpt = model = None
    if args.resume:
        ckpt = load_checkpoint(args.checkpoint, map_location="cpu")
        check_resumable(ckpt, args.checkpoint, parser)
        model, _ = cli.load_vae_from(ckpt, args.checkpoint)
        model.set_latent_mixture(None)  # fitted to the old weights: fitted again when training ends
        restore_run_flags(args, parser, ckpt["args"])
        config = model.config
        if ckpt["epoch"] >= args.epochs:
            print(f"{args.checkpoint} already has {ckpt['epoch']} epochs; pass --epochs above "
                  f"{ckpt['epoch']} to train on")
            return None
    else:
        config = model_config(args)
    args.res_blocks = config.res_blocks  # the number the model has (the flag's default is None)

    bf16 = cli.pick_precision(args.precision, device)
    print(f"device: {device}" + (" (picked by --device auto)" if args.device == "auto" else "")
          + f", precision: {'bf16 autocast' if bf16 else 'fp32'}")
    torch.manual_seed(args.seed)  # the initial weights
    model = (model or VAE(config)).to(device).train()
    run = Run(args, config, model, make_optimizer(model, args.lr, device),
              torch.Generator(device=device).manual_seed(args.seed), bf16,
              compile_objective() if args.compile else objective, train_set, test_set)
    if ckpt is not None:
        restore_state(run, ckpt)
    n = len(run.train_set)
    print(f"training {sum(p.numel() for p in model.parameters()):,} parameters on {n:,} images, "
          f"{args.epochs} epochs of {run.steps} steps" + (", dynamically binarized" if args.binarize else ""))
    if args.iw_k > 1:
        print(f"objective: the importance-weighted bound with K = {args.iw_k} (IWAE)"
              + ("; --compile applies to the ELBO only, this step runs eagerly" if args.compile else "")
              + "; train and test loss are the negative ELBO, the IW bound is logged beside them")
    if args.beta != 1.0 or args.kl_warmup:
        print(f"note: the objective weighs the KL by {args.beta:g}"
              + (f", ramped from 0 over {args.kl_warmup} epochs" if args.kl_warmup else "")
              + "; every loss reported is the true negative ELBO (weight 1)")
    return run


def check_resumable(ckpt: dict, path: str, parser: argparse.ArgumentParser) -> None:
    """What --resume reads beyond the model (checked by VAE.from_saved and load_checkpoint): the
    stored flags, each through the same checks as on the command line, and the optimiser state."""
    model, _ = cli.load_vae_from(ckpt, path)
    stored = ckpt.get("args")
    if not stored or ckpt.get("optimizer") is None or ckpt.get("rng") is None:
        raise CheckpointError(f"{path}: cannot resume: no stored flags, optimizer state or RNG state")
    strict = build_parser()

    def refuse(message):
        raise ValueError(message)

    strict.error = refuse  # an ArgumentParser reports through error(); here it must raise, not exit
    for k in RUN_FLAGS + MODEL_FLAGS:
        if k not in stored or stored[k] is None:
            continue
        v, flag = stored[k], "--" + k.replace("_", "-")
        if isinstance(v, bool):
            argv = [flag] if v else []
        elif isinstance(v, (list, tuple)):
            argv = [flag, *map(str, v)]
        else:
            argv = [flag, str(v)]
        try:
            parsed = getattr(strict.parse_args(argv), k)
        except ValueError as e:
            raise CheckpointError(f"{path}: bad checkpoint field args[{k!r}]: {v!r} ({first_line(e)})") from None
        if parsed != v or type(parsed) is not type(v) and not isinstance(v, (list, tuple)):
            raise CheckpointError(f"{path}: bad checkpoint field args[{k!r}]: {v!r} is not a valid {flag}")
    if bool(stored.get("conditional")) != (model.config.num_classes > 0):
        raise CheckpointError(f"{path}: bad checkpoint field args['conditional']: disagrees with the model")
    try:
        torch.Generator().set_state(ckpt["rng"]["torch"])  # the state torch.set_rng_state will take
    except (RuntimeError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: bad checkpoint field rng['torch']: not a CPU generator state "
                              f"({first_line(e)})") from None
    try:
        check_adam_state(ckpt["optimizer"], list(model.parameters()), "optimizer")
    except ValueError as e:
        raise CheckpointError(f"{path}: bad checkpoint field {first_line(e)}") from None


def check_position(ckpt: dict, path: str, args, n: int) -> None:
    """A mid-epoch checkpoint's step and running sums must fit this run: fewer steps than an epoch
    of n images has, one column per logged term."""
    steps = math.ceil(n / args.batch_size)
    columns = 2 if args.iw_k == 1 else 3
    partial = ckpt.get("partial")
    if partial is not None and partial.shape[1] != columns:
        raise CheckpointError(f"{path}: bad checkpoint field partial: {partial.shape[1]} columns, "
                              f"this run logs {columns}")
    if ckpt.get("step", 0) >= steps:
        raise CheckpointError(f"{path}: bad checkpoint field step: {ckpt['step']}, but an epoch has "
                              f"{steps} steps")


def restore_run_flags(args, parser, stored: dict) -> None:
    """--resume continues the run as it started: its flags replace the command line's."""
    for k in RUN_FLAGS + MODEL_FLAGS:
        # A flag newer than the checkpoint takes what runs did before it: K = 1, no residual blocks.
        value = stored.get(k, BEFORE_FLAG.get(k, parser.get_default(k)))
        given = getattr(args, k)
        if given != parser.get_default(k) and given != value:
            flag = "--" + k.replace("_", "-")
            print(f"note: {flag} {given} ignored: --resume continues the stored run ({value})")
        setattr(args, k, value)


def restore_state(run: Run, ckpt: dict) -> None:
    """Optimiser, RNG states, metrics and position of a stored run."""
    path = run.args.checkpoint
    try:
        run.opt.load_state_dict(ckpt["optimizer"])
        rng = ckpt["rng"]
        torch.set_rng_state(rng["torch"])
    except (RuntimeError, ValueError, KeyError, TypeError) as e:
        raise cli.UserError(f"{path}: cannot resume from it (optimizer or RNG state: "
                            f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__})") from None
    try:
        run.noise.set_state(rng["noise"])
    except (RuntimeError, TypeError):
        print("note: the checkpoint was written on another kind of device; noise RNG reseeded")
    run.metrics, run.start_epoch = list(ckpt["metrics"]), ckpt["epoch"]
    run.start_step, run.partial = ckpt.get("step", 0), ckpt.get("partial")
    check_position(ckpt, path, run.args, len(run.train_set))
    run.partial_seconds = ckpt.get("partial_seconds", 0.0)
    run.saved = f"the last good checkpoint {path} is untouched"
    where = (f"epoch {run.start_epoch + 1}, step {run.start_step}" if run.start_step
             else f"epoch {run.start_epoch}")
    print(f"resuming {path} after {where}")


def snapshot(run: Run, epoch: int, step: int = 0, stats=None, seconds: float = 0.0) -> dict:
    """The checkpoint: after `epoch` complete epochs and `step` steps of the next one."""
    return seal({
        "format": FORMAT, "model_config": run.config.to_dict(), "model": run.model.state_dict(),
        "optimizer": run.opt.state_dict(), "epoch": epoch, "step": step,
        "partial": None if stats is None else stats[:step].cpu(), "partial_seconds": seconds,
        "rng": {"torch": torch.get_rng_state(), "noise": run.noise.get_state()},
        "metrics": run.metrics, "args": vars(run.args), "latent_mixture": run.model.latent_mixture,
    })


def train(run: Run) -> int:
    """The epoch loop. Ctrl-C or SIGTERM: the current step finishes, the run is saved, exit 128 + signal."""
    args, start = run.args, time.perf_counter()
    with StopFlag() as stop:
        for epoch in range(run.start_epoch, args.epochs):
            stats, done, started = train_epoch(run, epoch, stop)
            if done < run.steps:  # stopped mid-epoch
                save_atomic(snapshot(run, epoch, done, stats, time.perf_counter() - started), args.checkpoint)
                return interrupted(args, stop.signum, f"epoch {epoch + 1}, step {done}/{run.steps}")
            end_epoch(run, epoch, stats, started)
            if stop.signum is not None and epoch + 1 < args.epochs:
                return interrupted(args, stop.signum, f"the end of epoch {epoch + 1}")
    fit_latent_mixture(run)
    print(f"done in {time.perf_counter() - start:.1f} s: test loss {run.metrics[-1]['test_loss']:.2f} "
          f"nats/image (negative ELBO, beta = 1); checkpoint {args.checkpoint}, metrics "
          f"{metrics_path(args.checkpoint)}")
    return 0


def fit_latent_mixture(run: Run) -> None:
    """Fit the latent mixture (mixture.py) that samples come from, and save it in the checkpoint."""
    args = run.args
    k = mixture.default_components(run.config.num_classes) if args.mixture_components is None \
        else args.mixture_components
    if k == 0:
        return
    t0 = time.perf_counter()
    data = run.train_set
    try:
        run.model.set_latent_mixture(mixture.fit_to_model(run.model, data.images, data.labels, k, args.seed))
    except ValueError as e:  # e.g. --limit left a digit without images
        print(f"note: no latent mixture fitted ({e}); samples come from the prior")
        return
    save_atomic(snapshot(run, args.epochs), args.checkpoint)
    groups = f"{run.config.num_classes} mixtures (one per digit) of {k}" if run.config.num_classes else str(k)
    print(f"latent mixture: {groups} components fitted to {len(data):,} posterior means in "
          f"{time.perf_counter() - t0:.1f} s")


def train_epoch(run: Run, epoch: int, stop: StopFlag) -> tuple[torch.Tensor, int, float]:
    """Train one epoch (from the stored step, if resumed mid-epoch) until its end or a signal.

    Returns the per-step [recon sum, KL sum] rows, the steps done and the epoch's start on the
    perf_counter clock (earlier by the time already spent, if resumed mid-epoch). The host
    waits for the device only every LOG_EVERY steps (progress bar, non-finite check).
    """
    args, model, device = run.args, run.model, run.model.device
    n, bs, steps = len(run.train_set), args.batch_size, run.steps
    perm = epoch_permutation(args.seed, epoch, n).to(device)
    # per step: sums of recon and KL (and of the negative K-sample bound, with --iw-k > 1)
    stats = torch.zeros(steps, 2 if args.iw_k == 1 else 3, device=device)
    first = run.start_step if epoch == run.start_epoch else 0
    if first:
        stats[:first] = run.partial.to(device)
    t0 = time.perf_counter() - (run.partial_seconds if first else 0.0)
    checked = 0
    bar = tqdm(range(first, steps), total=steps, initial=first, leave=False, disable=None,
               desc=f"epoch {epoch + 1}/{args.epochs}", unit="step")
    for i in bar:
        x, y = run.train_set.gather(perm[i * bs:(i + 1) * bs], labels=args.conditional)
        progress = epoch + i / steps  # lr and KL weight depend on it alone, so resumes replay them
        for group in run.opt.param_groups:
            group["lr"] = learning_rate(args.lr, args.lr_decay, progress)
        stats[i] = train_step(model, run.opt, x, y, kl_weight(args.beta, args.kl_warmup, progress),
                              run.noise, args.binarize, run.bf16, run.objective_fn, args.iw_k)
        if stop.signum is not None or (i + 1) % LOG_EVERY == 0:
            check_finite(stats, checked, i + 1, epoch, run.saved)  # syncs, so not every step
            checked = i + 1
            bar.set_postfix(loss=f"{stats[:i + 1, :2].sum().item() / min(n, (i + 1) * bs):.2f}")
        if stop.signum is not None and i + 1 < steps:
            bar.close()
            return stats, i + 1, t0
    bar.close()
    check_finite(stats, checked, steps, epoch, run.saved)
    return stats, steps, t0


def end_epoch(run: Run, epoch: int, stats: torch.Tensor, started: float) -> None:
    """Test loss, metrics row, checkpoint and CSV, summary line. The epoch's seconds include its
    evaluation."""
    args = run.args
    train_recon, train_kl, *train_iw = (stats.sum(0) / len(run.train_set)).tolist()
    test = evaluate_elbo(run.model, run.test_set, args.eval_batch_size, args.seed, args.conditional, run.bf16)
    if args.iw_k > 1:  # the bound the run optimises, on the test set (fp32, seeded)
        test["iw"] = importance_nll(run.model, run.test_set, args.iw_k, min(args.iw_k, 100),
                                    args.eval_batch_size, args.seed, args.conditional)
    seconds = time.perf_counter() - started
    weight = kl_weight(args.beta, args.kl_warmup, epoch + 1)
    run.metrics.append({
        "epoch": epoch + 1, "train_loss": train_recon + train_kl, "train_recon": train_recon,
        "train_kl": train_kl, "test_loss": test["loss"], "recon": test["recon"], "kl": test["kl"],
        "kl_weight": weight, "seconds": seconds,
        **({"train_iw": train_iw[0], "test_iw": test["iw"]} if args.iw_k > 1 else {}),
    })
    save_atomic(snapshot(run, epoch + 1), args.checkpoint)
    write_metrics(metrics_path(args.checkpoint), run.metrics)
    run.saved = f"the last good checkpoint {args.checkpoint} (epoch {epoch + 1}) is untouched"
    print(f"epoch {epoch + 1:3d}/{args.epochs}  train {train_recon + train_kl:8.2f}  "
          f"test {test['loss']:8.2f} (recon {test['recon']:.2f} + KL {test['kl']:.2f})  "
          f"{seconds:6.1f} s" + (f"  KL weight {weight:.3g}" if weight != 1.0 else "")
          + (f"  IW-{args.iw_k} bound: train {train_iw[0]:.2f} test {test['iw']:.2f}" if train_iw else ""),
          flush=True)


def interrupted(args, signum: int, where: str) -> int:
    name = signal.Signals(signum).name
    print(f"{name} at {where}: saved {args.checkpoint}; resume with: python train.py --resume "
          f"--checkpoint {args.checkpoint} --epochs {args.epochs}", file=sys.stderr, flush=True)
    return 128 + signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM


if __name__ == "__main__":
    sys.exit(cli.run(main))
