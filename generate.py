"""Write image grids from a trained checkpoint to generated_images/ (or --out).

    python generate.py                         # after python train.py
    python generate.py --digit 7               # a conditional checkpoint: a grid of 7s

Always: reconstructions.png (rows of test digits, each above its reconstruction), samples.png
(--n draws from the checkpoint's latent mixture, or the prior if it has none), samples_prior.png
(--n draws from the N(0, I) prior), interpolation.png (rows from one test digit to another, linear in
the posterior means), traversal.png (one row per latent dimension, the most active by KL first,
swept over [-3, 3]). With a 2-D latent also manifold.png: decoder means over a grid of z taken
through the Gaussian inverse CDF (Kingma & Welling 2014, Fig. 4). The model is rebuilt from the
checkpoint alone.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from torchvision.utils import save_image

import cli
from checkpoint import DEFAULT_CHECKPOINT, check_output_path, write_atomic
from data import NUM_CLASSES, load_test_set
from model import gaussian_kl

ROW = 8  # images per row in the reconstruction and sample grids
INTERP_STEPS = 10
INTERP_PAIRS = 8
TRAVERSE = torch.linspace(-3, 3, 11)  # prior standard deviations
MANIFOLD_SIDE = 20


def build_parser() -> argparse.ArgumentParser:
    p = cli.Parser(description="Write reconstruction, sample and latent grids.")
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help="checkpoint written by train.py")
    p.add_argument("--out", default="generated_images", help="folder for the PNG files")
    p.add_argument("--n", type=cli.number(int, 1, high=10000), default=64,
                   help="number of samples (per digit for a conditional model)")
    p.add_argument("--digit", type=cli.number(int, 0, high=NUM_CLASSES - 1), default=None,
                   help="conditional checkpoints: sample only this digit")
    p.add_argument("--seed", type=cli.seed, default=0, help="same seed, same images")
    cli.add_device_flag(p)
    cli.add_data_dir_flag(p)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if not os.path.isfile(args.checkpoint):
        raise cli.UserError(f"{args.checkpoint}: no checkpoint; run `python train.py` first "
                            "(or pass --checkpoint)")
    device = cli.pick_device(args.device)
    model, ckpt = cli.load_vae(args.checkpoint, map_location=device)
    cond = model.config.num_classes > 0
    if args.digit is not None and not cond:
        raise cli.UserError(f"{args.checkpoint}: --digit needs a conditional checkpoint "
                            "(train with --conditional)")
    # The test digits as the model was trained and evaluated on them (binarized or not).
    test = load_test_set(args.data_dir, "cpu", binarize=bool(ckpt.get("args", {}).get("binarize")))
    cli.ensure_folder(args.out, "output folder")
    suffix = "" if args.digit is None else f"_digit{args.digit}"
    for name in ("reconstructions.png", f"samples{suffix}.png", f"samples_prior{suffix}.png",
                 "interpolation.png", "traversal.png", "manifold.png"):
        check_output_path(os.path.join(args.out, name), "image")  # before any work, not half-way
    gen = torch.Generator(device=device).manual_seed(args.seed)
    pick = torch.randperm(len(test), generator=torch.Generator().manual_seed(args.seed))
    x, y = test.batch(pick[:4 * ROW])
    x, y = x.to(device), (y.to(device) if cond else None)
    written = []

    def save(name: str, images: torch.Tensor, nrow: int) -> None:
        path = os.path.join(args.out, name)
        write_atomic(path, lambda f: save_image(images.cpu(), f, format="png", nrow=nrow, padding=2,
                                                pad_value=0.5))
        written.append(path)

    with torch.inference_mode():
        # Reconstructions: four rows of test digits, each followed by its reconstruction row.
        rec = model.reconstruct(x, y)
        pairs = torch.stack([x.view(4, ROW, *x.shape[1:]), rec.view(4, ROW, *x.shape[1:])], dim=1)
        save("reconstructions.png", pairs.reshape(-1, *x.shape[1:]), ROW)

        # Samples: from the latent mixture if the checkpoint has one (else the prior), and from the
        # N(0, I) prior; one grid, or one row per digit for a conditional model.
        for prior, stem in ((False, "samples"), (True, "samples_prior")):
            if cond and args.digit is None:
                k = model.config.num_classes
                labels = torch.arange(k, device=device).repeat_interleave(args.n)
                save(f"{stem}.png", model.sample(k * args.n, labels, generator=gen, prior=prior), args.n)
            else:
                labels = None if args.digit is None else torch.full((args.n,), args.digit, device=device)
                name = f"{stem}.png" if args.digit is None else f"{stem}_digit{args.digit}.png"
                save(name, model.sample(args.n, labels, generator=gen, prior=prior), min(ROW, args.n))

        # Interpolations between the posterior means of pairs of test digits.
        mu, logvar = model.encode(x, y)
        a, b = mu[:INTERP_PAIRS], mu[INTERP_PAIRS:2 * INTERP_PAIRS]
        t = torch.linspace(0, 1, INTERP_STEPS, device=device).view(1, -1, 1)
        z = (a.unsqueeze(1) * (1 - t) + b.unsqueeze(1) * t).reshape(-1, mu.shape[1])
        zl = None if y is None else y[:INTERP_PAIRS].repeat_interleave(INTERP_STEPS)
        save("interpolation.png", torch.sigmoid(model.decode(z, zl)), INTERP_STEPS)

        # Traversal: from the first digit's posterior mean, sweep one latent at a time. Order the
        # dimensions by their average KL over the picked digits: inactive ones (KL ~ 0) come last.
        kl_per_dim = gaussian_kl(mu, logvar, per_dim=True).mean(0)
        order = torch.argsort(kl_per_dim, descending=True)
        d, steps = mu.shape[1], TRAVERSE.to(device)
        z = mu[:1].repeat(d * len(steps), 1).view(d, len(steps), d)
        z[torch.arange(d, device=device), :, order] = steps  # row r sweeps dimension order[r]
        zl = None if y is None else y[:1].repeat(d * len(steps))
        save("traversal.png", torch.sigmoid(model.decode(z.view(-1, d), zl)), len(steps))

        # The learned manifold of a 2-D latent (Kingma & Welling 2014, Fig. 4).
        if d == 2 and (not cond or args.digit is not None):
            u = torch.linspace(0.05, 0.95, MANIFOLD_SIDE, device=device)
            g = torch.distributions.Normal(0.0, 1.0).icdf(u)
            z = torch.stack(torch.meshgrid(g.flip(0), g, indexing="ij"), dim=-1).view(-1, 2)[:, [1, 0]]
            zl = None if not cond else torch.full((len(z),), args.digit, device=device)
            save("manifold.png", torch.sigmoid(model.decode(z, zl)), MANIFOLD_SIDE)

    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
