"""Train the VAE on MNIST and save one checkpoint (plus a metrics CSV beside it).

    python train.py                      # defaults: the README's results
    python train.py --resume             # finish the run in checkpoints/vae.pt after an interruption

Each step minimises model.VAE.loss: the negative ELBO with its KL weighted by --beta, or with --iw-k K (after
--iw-start ELBO epochs) the negative K-sample importance-weighted bound. Reported losses are the true negative ELBO
(beta = 1, no warm-up) in nats per image: the Bernoulli reconstruction NLL plus the KL (Kingma & Welling 2014),
sampled with --flow-prior. The train loss is the mean over the epoch's steps of the weights being trained; the test
loss is the end of the epoch's weights, or their moving average (--ema, on by default), which evaluation, sampling
and the checkpoint's model use.
"""

from __future__ import annotations

import os
import sys
import time

import torch
from tqdm import tqdm

from lib import cli, files, training
from lib.data import to_unit
from lib.evaluation import importance_nll, negative_elbo

LOG_EVERY = 50  # steps between host syncs (progress bar, non-finite check)
SAMPLES_PER_PASS = 4096  # decoded samples per forward pass: a batch runs in passes of (this // K) images, K = --iw-k


def main(argv=None) -> int:
    args = cli.Parser("Train a VAE on MNIST.", cli.TRAIN_FLAGS).parse_args(argv)
    cli.keep_freed_memory()
    run = None
    try:
        with training.Signals() as signals, training.setup(args) as run:
            if run is None:  # nothing left to do
                return 0
            with signals.deferred():  # a signal now stops the loop between two steps, saved
                stopped = train(run, signals)
            if stopped:
                return stopped
            training.fit_latent_mixture(run)
    except training.Interrupted as e:
        if run is None:
            kept = f"{args.checkpoint} is as it was" if os.path.exists(args.checkpoint) else "no checkpoint was written"
            return training.report(e.args[0], "before training started", kept)
        return training.report(e.args[0], "while fitting the latent mixture",
                               f"{args.checkpoint} holds the trained model without it; "
                               + training.resume_hint(args) + " (fits it)")
    print(f"done: test loss {run.metrics[-1]['test_loss']:.2f} nats/image (negative ELBO, beta = 1); "
          f"checkpoint {args.checkpoint}, metrics {files.metrics_path(args.checkpoint)}")
    return 0


def train(run: training.Run, signals: training.Signals) -> int:
    """The epoch loop; returns 0, or after a signal the exit code (the run saved where it stopped)."""
    args, model, opt, device = run.args, run.model, run.opt, run.model.device
    n, bs, steps = len(run.train_set), args.batch_size, run.steps
    # --compile: the objective as one graph (the noise is drawn outside it: a Generator cannot be traced)
    loss_fn = torch.compile(training.objective) if args.compile else training.objective
    for epoch in range(run.epoch, args.epochs):
        k = args.iw_k if epoch >= args.iw_start else 1  # importance samples: the ELBO (K = 1) before --iw-start
        per_pass = max(1, SAMPLES_PER_PASS // k)  # images per forward pass: bounds the memory
        perm = training.epoch_permutation(args.seed, epoch, n).to(device)
        stats = torch.zeros(steps, 3, device=device)  # per step: sums of recon, KL, objective
        first = run.step if epoch == run.epoch else 0  # resumed mid-epoch: the sums so far
        if first:
            stats[:first] = run.partial.to(device)
        started = time.perf_counter() - (run.partial_seconds if first else 0.0)
        bar = tqdm(range(first, steps), total=steps, initial=first, leave=False, disable=None,
                   desc=f"epoch {epoch + 1}/{args.epochs}", unit="step")
        for step in bar:
            progress = epoch + step / steps  # lr and KL weight depend on it alone: resumes replay them
            x, y = run.train_set.gather(perm[step * bs:(step + 1) * bs], labels=args.conditional)
            x = to_unit(x)
            if args.binarize:  # dynamic binarization: a fresh Bernoulli draw of every pixel, every batch
                x = torch.bernoulli(x, generator=run.noise)
            eps = torch.randn(k, len(x), model.config.latent_dim, generator=run.noise, device=device)
            beta = training.kl_weight(args, progress)
            for param_group in opt.param_groups:
                param_group["lr"] = training.learning_rate(args, progress)
            opt.zero_grad(set_to_none=True)
            for i in range(0, len(x), per_pass):  # the gradients of the passes add up to the batch's
                rows = slice(i, i + per_pass)
                parts = loss_fn(model, x[rows], None if y is None else y[rows], eps[:, rows], beta, run.bf16)
                (parts.total.sum() / len(x)).backward()  # the batch mean
                stats[step] += torch.stack([parts.recon.sum(), parts.kl.sum(), parts.total.sum()]).detach()
            opt.step()
            if run.ema is not None:  # the average that evaluation and sampling use
                training.update_ema(run.ema, model, args.ema, epoch * steps + step + 1)
            if signals.received is not None or (step + 1) % LOG_EVERY == 0:
                training.check_finite(stats, max(0, step + 1 - LOG_EVERY), step + 1, run, epoch)
                bar.set_postfix(loss=f"{stats[:step + 1, :2].sum().item() / min(n, (step + 1) * bs):.2f}")
            if signals.received is not None and step + 1 < steps:
                bar.close()
                training.save(run, epoch, step + 1, stats, time.perf_counter() - started)
                return training.report(signals.received, f"at epoch {epoch + 1}, step {step + 1}/{steps}",
                                       f"saved {args.checkpoint}; " + training.resume_hint(args))
        bar.close()
        training.check_finite(stats, 0, steps, run, epoch)

        train_recon, train_kl, train_objective = (stats.sum(0) / n).tolist()
        test = negative_elbo(run.evaluated, run.test_set, args.eval_batch_size, args.seed, run.bf16)
        row = {"epoch": epoch + 1, "train_loss": train_recon + train_kl, "train_recon": train_recon,
               "train_kl": train_kl, "test_loss": test["loss"], "recon": test["recon"], "kl": test["kl"],
               "kl_weight": training.kl_weight(args, epoch + 1)}
        if k > 1:  # the bound the run optimises, on the test set too (fp32, seeded)
            chunk = max(1, min(k, SAMPLES_PER_PASS // args.eval_batch_size))  # as training's passes: bounds the memory
            test_iw = importance_nll(run.evaluated, run.test_set, k, chunk, args.eval_batch_size, args.seed)[0]
            row.update(train_iw=train_objective, test_iw=test_iw)
        row["seconds"] = time.perf_counter() - started  # the epoch's training and evaluation
        run.metrics.append(row)
        run.epoch, run.step = epoch + 1, 0
        training.save(run, epoch + 1)
        print(f"epoch {epoch + 1:3d}/{args.epochs}  train {row['train_loss']:8.2f}  test {row['test_loss']:8.2f} "
              f"(recon {row['recon']:.2f} + KL {row['kl']:.2f}{', sampled' if model.config.flow_prior else ''})  "
              f"{row['seconds']:6.1f} s"
              + (f"  KL weight {row['kl_weight']:.3g}" if row["kl_weight"] != 1.0 else "")
              + (f"  IW-{k} bound: train {train_objective:.2f} test {test_iw:.2f}" if k > 1 else ""),
              flush=True)
        if signals.received is not None:
            last = epoch + 1 == args.epochs
            return training.report(signals.received, f"at the end of epoch {epoch + 1}",
                                   f"saved {args.checkpoint}" + (" without its latent mixture" if last else "")
                                   + "; " + training.resume_hint(args) + (" (fits it)" if last else ""))
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
