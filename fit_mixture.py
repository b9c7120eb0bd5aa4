"""Fit (or refit) the latent mixture of an existing checkpoint, without training again.

    python fit_mixture.py --checkpoint checkpoints/vae.pt                 # the default size
    python fit_mixture.py --checkpoint checkpoints/vae.pt --components 0  # remove it

train.py fits the mixture when training ends; this does the same for a checkpoint written
before it did, or with another number of components (mixture.py says what the mixture is).
"""

from __future__ import annotations

import argparse
import sys
import time

import cli
import mixture
from checkpoint import DEFAULT_CHECKPOINT, CheckpointLock, save_atomic, seal
from data import TensorDataset


def build_parser() -> argparse.ArgumentParser:
    p = cli.Parser(description="Fit the latent mixture of a trained checkpoint.")
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help="checkpoint written by train.py")
    p.add_argument("--components", type=cli.number(int, 0, high=mixture.MAX_COMPONENTS), default=None,
                   help=f"mixture components, per digit for a conditional model; 0 removes the mixture "
                        f"(default: {mixture.DEFAULT_COMPONENTS}, {mixture.DEFAULT_COMPONENTS_PER_CLASS} "
                        "per digit for a conditional model)")
    p.add_argument("--seed", type=cli.seed, default=0, help="seeds the fit")
    cli.add_device_flag(p)
    cli.add_data_dir_flag(p)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    cli.keep_freed_memory()
    device = cli.pick_device(args.device)
    cli.load_vae(args.checkpoint, map_location="cpu")  # a bad file is refused before the lock file is made
    with CheckpointLock(args.checkpoint):
        model, ckpt = cli.load_vae(args.checkpoint, map_location="cpu")
        model.to(device)
        k = mixture.default_components(model.config.num_classes) if args.components is None else args.components
        if k == 0:
            ckpt["latent_mixture"] = None
            print(f"{args.checkpoint}: latent mixture removed; samples come from the prior")
        else:
            limit = ckpt.get("args", {}).get("limit")  # the images the model was trained on
            data = TensorDataset.load("train", args.data_dir, device, limit)
            t0 = time.perf_counter()
            try:
                ckpt["latent_mixture"] = mixture.fit_to_model(model, data.images, data.labels, k, args.seed)
            except ValueError as e:
                raise cli.UserError(f"{args.checkpoint}: cannot fit a latent mixture ({e})") from None
            print(f"{args.checkpoint}: {k}-component latent mixture fitted to {len(data):,} posterior "
                  f"means in {time.perf_counter() - t0:.1f} s")
        save_atomic(seal(ckpt), args.checkpoint)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
