"""Write image grids from a trained checkpoint to generated_images/ (or --out).

    python generate.py                         # after python train.py
    python generate.py --digit 7               # a conditional checkpoint: a grid of 7s

The model is rebuilt from the checkpoint alone; same seed, same images. GRIDS: test digits above their
reconstructions; samples from the latent mixture (else the prior) and from the prior, a row per digit if
conditional; interpolations between posterior means; a traversal of each active latent dimension (up to 16; if
none is active, the one of highest KL) over [-3, 3]; for a 2-d latent the manifold, decoder means on a normal
inverse-CDF grid of z (Kingma & Welling 2014, fig. 4).
"""

from __future__ import annotations

import os
import sys

import torch
from torchvision.utils import save_image

from lib import cli
from lib.checks import UserError
from lib.data import NUM_CLASSES, load_test_set
from lib.evaluation import active_dimensions
from lib.files import check_output_path, write_atomic
from model import bernoulli_mean

GRIDS = ("reconstructions", "samples", "samples_prior", "interpolation", "traversal", "manifold")
ROW = 8  # images per row in the reconstruction and sample grids
INTERP_STEPS, INTERP_PAIRS = 10, 8
TRAVERSE = torch.linspace(-3, 3, 11)  # values of z: prior standard deviations under N(0, I) (not a flow prior's)
MAX_TRAVERSED = 16  # rows of traversal.png at most
MANIFOLD_SIDE = 20
MAX_SAMPLES = 256  # --n: a grid is a picture, not a dataset (VAE.sample draws more); all are decoded at once


def build_parser() -> cli.Parser:
    p = cli.Parser("Write reconstruction, sample and latent grids.")
    cli.add_common(p, seed_help="same seed, same images")
    p.add_argument("--out", default="generated_images", help="folder for the PNG files")
    p.add_argument("--n", type=cli.Number(int, 1, MAX_SAMPLES), default=64,
                   help=f"samples (per digit if conditional), decoded at once: at most {MAX_SAMPLES}")
    p.add_argument("--digit", type=cli.Number(int, 0, NUM_CLASSES - 1), default=None,
                   help="conditional: only this digit (default: a row per digit)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if not args.out:
        raise UserError("empty path given for --out (the folder for the images)")
    device = cli.pick_device(args.device)
    model, ckpt = cli.load_vae(args.checkpoint, map_location=device)
    print(cli.device_note(device, args.device))
    classes = model.config.num_classes
    if args.digit is not None and not classes:
        raise UserError(f"{args.checkpoint}: --digit needs a conditional checkpoint (train with --conditional)")
    # The test digits as the model was trained and evaluated on them (binarized or not).
    test = load_test_set(args.data_dir, "cpu", binarize=ckpt["args"]["binarize"])
    suffix = "" if args.digit is None else f"_digit{args.digit}"
    paths = {name: os.path.join(args.out, name + (suffix if name.startswith(("samples", "manifold")) else "") + ".png")
             for name in GRIDS}
    for path in paths.values():
        check_output_path(path, "image")  # all before any work, not half-way
    gen = torch.Generator(device=device).manual_seed(args.seed)
    x, y = test.batch(torch.randperm(len(test), generator=torch.Generator().manual_seed(args.seed))[:4 * ROW])
    x, y = x.to(device), (y.to(device) if classes else None)
    grids, notes = {}, {}  # name -> (images, images per row)

    with torch.inference_mode():
        rec = model.reconstruct(x, y)  # four rows of test digits, each followed by its reconstructions
        pairs = torch.stack([x.view(4, ROW, *x.shape[1:]), rec.view(4, ROW, *x.shape[1:])], dim=1)
        grids["reconstructions"] = pairs.reshape(-1, *x.shape[1:]), ROW

        notes["samples"] = ("from the latent mixture" if model.latent_mixture is not None else
                            "from the prior: the checkpoint has no latent mixture")
        notes["samples_prior"] = "from the prior"
        for name, prior in (("samples", False), ("samples_prior", True)):
            if classes and args.digit is None:  # one row per digit
                labels = torch.arange(classes, device=device).repeat_interleave(args.n)
                grids[name] = model.sample(classes * args.n, labels, generator=gen, prior=prior), args.n
            else:
                labels = None if args.digit is None else torch.full((args.n,), args.digit, device=device)
                grids[name] = model.sample(args.n, labels, generator=gen, prior=prior), min(ROW, args.n)

        mu, _ = model.encode(x, y)
        a, b = mu[:INTERP_PAIRS], mu[INTERP_PAIRS:2 * INTERP_PAIRS]
        t = torch.linspace(0, 1, INTERP_STEPS, device=device).view(1, -1, 1)
        z = (a.unsqueeze(1) * (1 - t) + b.unsqueeze(1) * t).reshape(-1, mu.shape[1])
        zl = None if y is None else y[:INTERP_PAIRS].repeat_interleave(INTERP_STEPS)
        grids["interpolation"] = bernoulli_mean(model.decode(z, zl)), INTERP_STEPS

        # Traversal, by mean test-set KL: inactive dimensions (KL ~ 0) decode one digit all along, so are left out.
        order, active = active_dimensions(model, test)
        rows, steps = order[:max(1, min(active, MAX_TRAVERSED))], TRAVERSE.to(device)
        z = mu[:1].repeat(len(rows) * len(steps), 1).view(len(rows), len(steps), -1)
        z[torch.arange(len(rows), device=device), :, rows] = steps  # row r sweeps dimension rows[r]
        zl = None if y is None else y[:1].repeat(z.shape[0] * len(steps))
        grids["traversal"] = bernoulli_mean(model.decode(z.view(-1, mu.shape[1]), zl)), len(steps)
        notes["traversal"] = (f"{len(rows)} of the {active} active latent dimensions (of {mu.shape[1]}; "
                              f"{mu.shape[1] - active} inactive), most active first" if active else
                              f"no active latent dimension (of {mu.shape[1]}): the one of highest KL")

        if mu.shape[1] == 2 and (not classes or args.digit is not None):
            u = torch.linspace(0.05, 0.95, MANIFOLD_SIDE, device=device)
            g = torch.distributions.Normal(0.0, 1.0).icdf(u)
            z = torch.stack(torch.meshgrid(g.flip(0), g, indexing="ij"), dim=-1).view(-1, 2)[:, [1, 0]]
            z = model.prior(z)  # the noise grid mapped to z: equal prior mass per cell
            zl = None if not classes else torch.full((len(z),), args.digit, device=device)
            grids["manifold"] = bernoulli_mean(model.decode(z, zl)), MANIFOLD_SIDE
        elif mu.shape[1] == 2:
            print("note: no manifold.png: a conditional model's manifold is one digit's (pass --digit D)")

    for name, (images, nrow) in grids.items():
        write_atomic(paths[name], lambda f: save_image(images.cpu(), f, format="png", nrow=nrow, padding=2,
                                                       pad_value=0.5))
        print(paths[name] + (f"  ({notes[name]})" if name in notes else ""))
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
