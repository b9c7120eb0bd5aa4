"""Train the VAE on MNIST and save one checkpoint (plus a metrics CSV beside it).

    python train.py                      # defaults: the README's results
    python train.py --epochs 4 --resume  # continue checkpoints/vae.pt up to 4 epochs

Reported losses are always the true negative ELBO (beta = 1, no warm-up), in nats per image:
Bernoulli reconstruction NLL summed over pixels plus the analytic KL (Kingma & Welling 2014).
"""

from __future__ import annotations

import argparse
import csv
import glob
import io
import math
import os
import signal
import sys
import time

import torch
import torch.optim.optimizer as optim_base
from tqdm import tqdm

import cli
from checkpoint import FORMAT, CheckpointLock, load_model, save_atomic, write_atomic
from data import TensorDataset, load_test_set, to_unit
from model import VAE, VAEConfig

DEFAULT_CHECKPOINT = os.path.join("checkpoints", "vae.pt")
LOG_EVERY = 50  # steps between host syncs (progress bar update and non-finite check)
# Flags that define a run: on --resume they are taken from the checkpoint, not the command line.
RUN_FLAGS = ("batch_size", "lr", "lr_decay", "seed", "limit", "binarize", "conditional", "beta",
             "kl_warmup", "eval_batch_size", "precision")
MODEL_FLAGS = ("latent_dim", "arch", "hidden_dim", "channels", "activation")
METRIC_FIELDS = ("epoch", "train_loss", "train_recon", "train_kl", "test_loss", "recon", "kl",
                 "kl_weight", "seconds")


class TrainingError(cli.UserError):
    pass


def build_parser() -> argparse.ArgumentParser:
    d = VAEConfig()
    p = cli.Parser(description="Train a VAE on MNIST.")
    p.add_argument("--epochs", type=cli.positive_int, default=20, help="total epochs to train")
    p.add_argument("--batch-size", type=cli.positive_int, default=128, help="images per step")
    p.add_argument("--lr", type=cli.positive_float, default=3e-3, help="Adam learning rate")
    p.add_argument("--latent-dim", type=cli.positive_int, default=d.latent_dim, help="size of z")
    p.add_argument("--arch", choices=("conv", "mlp"), default=d.arch,
                   help="conv: small conv encoder/decoder; mlp: the pytorch/examples shape")
    p.add_argument("--hidden-dim", type=cli.positive_int, default=d.hidden_dim,
                   help="width of the fully connected hidden layer")
    p.add_argument("--channels", type=cli.positive_int, nargs=2, default=list(d.channels),
                   metavar=("C1", "C2"), help="conv channels at 14x14 and 7x7 (conv arch)")
    p.add_argument("--activation", choices=("silu", "relu", "elu"), default=d.activation,
                   help="nonlinearity between layers")
    p.add_argument("--lr-decay", type=cli.number(float, 0.0, low_open=True, high=1.0), default=0.9,
                   help="multiply the learning rate by this every epoch (smoothly, per step)")
    p.add_argument("--seed", type=cli.non_negative_int, default=0, help="seeds init, shuffling and noise")
    cli.add_device_flag(p)
    cli.add_data_dir_flag(p)
    p.add_argument("--limit", type=cli.positive_int, default=None,
                   help="use only the first N training and N test images (quick runs)")
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help="checkpoint file to write")
    p.add_argument("--resume", action="store_true", help="continue the run stored in --checkpoint")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh even if --checkpoint exists (its run is lost)")
    p.add_argument("--eval-batch-size", type=cli.positive_int, default=256,
                   help="images per step when evaluating the test set")
    p.add_argument("--binarize", action="store_true",
                   help="dynamically binarized MNIST: pixels ~ Bernoulli(grey level) every batch")
    p.add_argument("--conditional", action="store_true",
                   help="conditional VAE: the digit label enters encoder and decoder")
    p.add_argument("--beta", type=cli.positive_float, default=1.0, help="weight of the KL term (beta-VAE)")
    p.add_argument("--kl-warmup", type=cli.non_negative_int, default=0,
                   help="epochs over which the KL weight ramps linearly from 0 to beta")
    cli.add_precision_flag(p, help="arithmetic of training and its per-epoch test loss; auto = bf16 "
                                   "autocast where the CPU or GPU has native bf16, else fp32 "
                                   "(evaluate.py is always fp32)")
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


def epoch_permutation(seed: int, epoch: int, n: int) -> torch.Tensor:
    """The shuffling order of one epoch, a pure function of (seed, epoch): resumes replay it."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % 2**63)
    return torch.randperm(n, generator=g)


def make_optimizer(model: VAE, lr: float, device: torch.device) -> torch.optim.Adam:
    """Adam; the fused kernel where the device has one (1.4x the MLP's steps per second on CPU)."""
    return torch.optim.Adam(model.parameters(), lr=lr, fused=device.type in ("cpu", "cuda"))


def kl_weight(beta: float, warmup: int, progress: float) -> float:
    """Linear KL warm-up from 0 to beta over `warmup` epochs; `progress` counts epochs done."""
    return beta if warmup == 0 else beta * min(1.0, progress / warmup)


def draw_eps(model: VAE, n: int, generator: torch.Generator, bf16: bool) -> torch.Tensor:
    """The reparameterisation noise for n images, drawn outside the model so that a compiled loss
    is one graph (torch.compile cannot trace a Generator; each break costs a graph call per step).
    Same draw as the model's own: under bf16 autocast its mu is bf16, so eps is too."""
    return torch.randn(n, model.config.latent_dim, generator=generator, device=model.device,
                       dtype=torch.bfloat16 if bf16 else torch.float32)


def objective(model: VAE, x, labels, beta: float, eps, bf16: bool):
    """The loss a step minimises (the mean over the batch of recon + beta * KL) and, for the log,
    [sum of recon, sum of KL] over the batch, detached. x: float images in [0, 1], or the stored
    uint8 ones (converted here, so that a compiled step fuses the conversion).

    bf16: the forward pass runs under bf16 autocast (matmuls and convolutions in bf16, the loss
    in fp32; backward follows the forward's dtypes). Weights and optimiser stay fp32.
    One function, so that `compile_objective` makes forward, loss and sums one graph.
    """
    x = to_unit(x)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        parts = model.loss(x, labels, beta=beta, reduction="none", eps=eps)
    return parts.total.mean(), torch.stack([parts.recon.detach().sum(), parts.kl.detach().sum()])


def compile_objective():
    """`objective` under torch.compile, so the elementwise work (reparameterisation, BCE, KL, bf16
    casts, the batch sums) is fused. The first batches of each shape pay a compile (~30 s on a
    2-core CPU). Evaluation stays eager."""
    return torch.compile(objective)


def adam_step(opt: torch.optim.Adam) -> None:
    """opt.step(), calling the fused Adam kernel directly when opt is a plain fused Adam.

    Around the kernel, torch.optim's step() runs ~50 us of Python per call (grouping tensors by
    device, hooks, checks): 5% to 9% of the compiled MLP step on the 2-core CPU. This makes the
    kernel call that step() makes (torch.optim.adam._fused_adam: the step counts, then
    _fused_adam_) with the same state tensors, so the results and the checkpoints are the same
    bit for bit (a test compares them). Anything else (state not created yet, several groups,
    amsgrad, weight decay, hooks, ...) goes through opt.step().
    """
    group = opt.param_groups[0]
    if (len(opt.param_groups) > 1 or not group.get("fused") or group["amsgrad"] or group["maximize"]
            or group["weight_decay"] or group.get("capturable") or group.get("differentiable")
            or group.get("decoupled_weight_decay")
            or any(isinstance(v, torch.Tensor) for v in (group["lr"], *group["betas"]))
            or getattr(opt, "_optimizer_step_pre_hooks", True)
            or getattr(opt, "_optimizer_step_post_hooks", True)
            or getattr(optim_base, "_global_optimizer_pre_hooks", True)
            or getattr(optim_base, "_global_optimizer_post_hooks", True)):
        opt.step()
        return
    params = group["params"]
    states = [opt.state.get(p) for p in params]
    if any(not s or p.grad is None for p, s in zip(params, states)):
        opt.step()  # creates the state on the first step
        return
    steps = [s["step"] for s in states]
    torch._foreach_add_(steps, 1)
    beta1, beta2 = group["betas"]
    torch._fused_adam_(params, [p.grad for p in params], [s["exp_avg"] for s in states],
                       [s["exp_avg_sq"] for s in states], [], steps, amsgrad=False, lr=group["lr"],
                       beta1=beta1, beta2=beta2, weight_decay=0.0, eps=group["eps"],
                       maximize=False, grad_scale=None, found_inf=None)


def train_step(model: VAE, opt, x, labels, beta: float, noise: torch.Generator,
               binarize: bool = False, bf16: bool = False, objective_fn=objective) -> torch.Tensor:
    """One Adam step on a batch; returns [sum of recon, sum of KL] as a device tensor (no sync).

    x: as for `objective` (train.py passes the stored uint8 images); bf16: see `objective`;
    objective_fn: `objective` itself or `compile_objective()`.
    """
    if binarize:  # dynamic binarization: a fresh Bernoulli draw of every pixel, every batch
        x = torch.bernoulli(to_unit(x), generator=noise)
    loss, stats = objective_fn(model, x, labels, beta, draw_eps(model, len(x), noise, bf16), bf16)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    adam_step(opt)
    return stats


@torch.inference_mode()
def evaluate_elbo(model: VAE, data: TensorDataset, batch_size: int, seed: int,
                  conditional: bool, bf16: bool = False) -> dict:
    """Test negative ELBO (beta = 1), one posterior sample per image from a seeded generator.

    bf16: under bf16 autocast, as training runs. On the trained default model this moved the test
    loss by 0.001 nats and took about 6% of an epoch instead of 9% in fp32 (README, Speed);
    evaluate.py always uses fp32.
    """
    was_training = model.training
    model.eval()
    device = data.images.device
    gen = torch.Generator(device=device).manual_seed(seed)
    sums = torch.zeros(2, device=device)
    for x, y in data.batches(batch_size):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            p = model.loss(x, y if conditional else None, reduction="sum",
                           eps=draw_eps(model, len(x), gen, bf16))
        sums += torch.stack([p.recon, p.kl])
    model.train(was_training)
    recon, kl = (sums / len(data)).tolist()
    return {"loss": recon + kl, "recon": recon, "kl": kl}


def metrics_path(checkpoint: str) -> str:
    return os.path.splitext(checkpoint)[0] + ".metrics.csv"


def write_metrics(path: str, rows: list[dict]) -> None:
    """Rewrite the CSV from the checkpoint's rows (atomically): it never disagrees with it."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=METRIC_FIELDS, lineterminator="\n")
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
        terms = [f"{n} = {rows[j, c].item()}" for c, n in ((0, "recon"), (1, "KL")) if bad[j, c]]
        raise TrainingError(f"non-finite loss at epoch {epoch + 1}, step {start + j + 1} "
                            f"({', '.join(terms)}); stopped, {where}")


def prepare_output(path: str) -> None:
    """Create the checkpoint's folder now, so a bad path fails before any training."""
    cli.ensure_folder(os.path.dirname(os.path.abspath(path)), "checkpoint folder")
    if os.path.isdir(path):
        raise cli.UserError(f"{path}: is a folder, expected a checkpoint file path")


def remove_stale_temp_files(checkpoint: str) -> None:
    """Temp files of a save that was killed before its rename. Only called under the lock, so no
    live process is writing them."""
    for tmp in glob.glob(glob.escape(checkpoint) + ".*.tmp"):
        os.unlink(tmp)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    cli.keep_freed_memory()
    prepare_output(args.checkpoint)
    with CheckpointLock(args.checkpoint):
        remove_stale_temp_files(args.checkpoint)
        return train(args, parser)


def train(args, parser) -> int:
    ckpt = model = None
    if args.resume:
        model, ckpt = load_model(args.checkpoint, map_location="cpu")
        stored = ckpt.get("args", {})
        for k in RUN_FLAGS + MODEL_FLAGS:  # the run continues as it started
            if k not in stored:
                continue
            given = getattr(args, k)
            if given != parser.get_default(k) and given != stored[k]:
                flag = "--" + k.replace("_", "-")
                print(f"note: {flag} {given} ignored: --resume continues the stored run ({stored[k]})")
            setattr(args, k, stored[k])
        config = ckpt["config"]
        done = ckpt["epoch"]
        if done >= args.epochs:
            print(f"{args.checkpoint} already has {done} epochs; pass --epochs above {done} to train on")
            return 0
    elif os.path.exists(args.checkpoint) and not args.overwrite:
        raise cli.UserError(f"{args.checkpoint} exists: pass --resume to continue it, --overwrite to "
                            "start again, or --checkpoint for a new file")
    else:
        config = VAEConfig(latent_dim=args.latent_dim, arch=args.arch, hidden_dim=args.hidden_dim,
                           channels=tuple(args.channels), activation=args.activation,
                           num_classes=10 if args.conditional else 0)

    device = cli.pick_device(args.device)
    bf16 = cli.pick_precision(args.precision, device)
    print(f"device: {device}" + (" (picked by --device auto)" if args.device == "auto" else "")
          + f", precision: {'bf16 autocast' if bf16 else 'fp32'}")
    torch.manual_seed(args.seed)
    model = (model or VAE(config)).to(device).train()
    opt = make_optimizer(model, args.lr, device)
    noise = torch.Generator(device=device).manual_seed(args.seed)  # reparameterisation, binarization
    metrics, start_epoch, start_step, partial, partial_seconds = [], 0, 0, None, 0.0
    if ckpt is not None:
        try:
            opt.load_state_dict(ckpt["optimizer"])
            rng = ckpt["rng"]
            torch.set_rng_state(rng["torch"])
        except (RuntimeError, ValueError, KeyError, TypeError) as e:
            raise cli.UserError(f"{args.checkpoint}: cannot resume from it (optimizer or RNG state: "
                                f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__})") from None
        try:
            noise.set_state(rng["noise"])
        except (RuntimeError, TypeError):
            print("note: the checkpoint was written on another kind of device; noise RNG reseeded")
        metrics, start_epoch = list(ckpt["metrics"]), ckpt["epoch"]
        start_step, partial = ckpt.get("step", 0), ckpt.get("partial")
        partial_seconds = ckpt.get("partial_seconds", 0.0)
        where = f"epoch {start_epoch + 1}, step {start_step}" if start_step else f"epoch {start_epoch}"
        print(f"resuming {args.checkpoint} after {where}")
    objective_fn = compile_objective() if args.compile else objective

    train_set = TensorDataset.load("train", args.data_dir, device, args.limit)
    test_set = load_test_set(args.data_dir, device, args.limit, args.binarize)
    n, bs = len(train_set), args.batch_size
    steps = math.ceil(n / bs)
    ckpt_where = (f"the last good checkpoint {args.checkpoint} is untouched"
                  if (ckpt or start_epoch) else "no checkpoint was written")
    print(f"training {sum(p.numel() for p in model.parameters()):,} parameters on {n:,} images, "
          f"{args.epochs} epochs of {steps} steps" + (", dynamically binarized" if args.binarize else ""))
    if args.beta != 1.0 or args.kl_warmup:
        print(f"note: the objective weighs the KL by {args.beta:g}"
              + (f", ramped from 0 over {args.kl_warmup} epochs" if args.kl_warmup else "")
              + "; every loss reported is the true negative ELBO (weight 1)")

    def snapshot(epoch: int, step: int, stats=None, seconds=0.0) -> dict:
        return {
            "format": FORMAT, "model_config": config.to_dict(), "model": model.state_dict(),
            "optimizer": opt.state_dict(), "epoch": epoch, "step": step,
            "partial": None if stats is None else stats[:step].cpu(), "partial_seconds": seconds,
            "rng": {"torch": torch.get_rng_state(), "noise": noise.get_state()},
            "metrics": metrics, "args": vars(args),
        }

    run_start = time.perf_counter()
    with StopFlag() as stop:
        for epoch in range(start_epoch, args.epochs):
            perm = epoch_permutation(args.seed, epoch, n).to(device)
            stats = torch.zeros(steps, 2, device=device)  # per step: sums of recon and KL
            first = start_step if epoch == start_epoch else 0
            if first:
                stats[:first] = partial.to(device)
            t0 = time.perf_counter() - (partial_seconds if first else 0.0)
            checked = 0
            bar = tqdm(range(first, steps), total=steps, initial=first, leave=False, disable=None,
                       desc=f"epoch {epoch + 1}/{args.epochs}", unit="step")
            for i in bar:
                x, y = train_set.gather(perm[i * bs:(i + 1) * bs], labels=args.conditional)
                for group in opt.param_groups:  # a function of progress alone, so resumes replay it
                    group["lr"] = args.lr * args.lr_decay ** (epoch + i / steps)
                stats[i] = train_step(model, opt, x, y,
                                      kl_weight(args.beta, args.kl_warmup, epoch + i / steps),
                                      noise, args.binarize, bf16, objective_fn)
                if stop.signum is not None or (i + 1) % LOG_EVERY == 0:
                    check_finite(stats, checked, i + 1, epoch, ckpt_where)  # syncs, so not every step
                    checked = i + 1
                    bar.set_postfix(loss=f"{stats[:i + 1].sum().item() / min(n, (i + 1) * bs):.2f}")
                if stop.signum is not None:
                    if i + 1 == steps:
                        break  # the epoch is complete: finish it normally, then stop
                    save_atomic(snapshot(epoch, i + 1, stats, time.perf_counter() - t0), args.checkpoint)
                    bar.close()
                    return interrupted(args, stop.signum, f"epoch {epoch + 1}, step {i + 1}/{steps}")
            bar.close()
            check_finite(stats, checked, steps, epoch, ckpt_where)
            train_recon, train_kl = (stats.sum(0) / n).tolist()
            test = evaluate_elbo(model, test_set, args.eval_batch_size, args.seed, args.conditional, bf16)
            seconds = time.perf_counter() - t0
            metrics.append({
                "epoch": epoch + 1, "train_loss": train_recon + train_kl, "train_recon": train_recon,
                "train_kl": train_kl, "test_loss": test["loss"], "recon": test["recon"],
                "kl": test["kl"], "kl_weight": kl_weight(args.beta, args.kl_warmup, epoch + 1),
                "seconds": seconds,
            })
            save_atomic(snapshot(epoch + 1, 0), args.checkpoint)
            write_metrics(metrics_path(args.checkpoint), metrics)
            ckpt_where = f"the last good checkpoint {args.checkpoint} (epoch {epoch + 1}) is untouched"
            weight = metrics[-1]["kl_weight"]
            print(f"epoch {epoch + 1:3d}/{args.epochs}  train {train_recon + train_kl:8.2f}  "
                  f"test {test['loss']:8.2f} (recon {test['recon']:.2f} + KL {test['kl']:.2f})  "
                  f"{seconds:6.1f} s" + (f"  KL weight {weight:.3g}" if weight != 1.0 else ""), flush=True)
            if stop.signum is not None and epoch + 1 < args.epochs:
                return interrupted(args, stop.signum, f"the end of epoch {epoch + 1}")
    print(f"done in {time.perf_counter() - run_start:.1f} s: test loss {metrics[-1]['test_loss']:.2f} "
          f"nats/image (negative ELBO, beta = 1); checkpoint {args.checkpoint}, metrics "
          f"{metrics_path(args.checkpoint)}")
    return 0


def interrupted(args, signum: int, where: str) -> int:
    name = signal.Signals(signum).name
    print(f"{name} at {where}: saved {args.checkpoint}; resume with: python train.py --resume "
          f"--checkpoint {args.checkpoint} --epochs {args.epochs}", file=sys.stderr, flush=True)
    return 128 + signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM


if __name__ == "__main__":
    sys.exit(cli.run(main))
