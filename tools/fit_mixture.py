"""Fit (or refit, or with --components 0 remove) the latent mixture of a checkpoint, without
training again: `python tools/fit_mixture.py --checkpoint checkpoints/vae.pt [--components M]`.
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lib import cli  # noqa: E402
from lib.checks import UserError, with_checksums  # noqa: E402
from lib.data import TensorDataset, fitting_set  # noqa: E402
from lib.files import Lock, modified, save_atomic  # noqa: E402
from lib.mixture import (DEFAULT_COMPONENTS, DEFAULT_COMPONENTS_PER_CLASS, MAX_COMPONENTS,  # noqa: E402
                         components, describe, fit_to_model)


def build_parser() -> cli.Parser:
    p = cli.Parser("Fit the latent mixture of a trained checkpoint.")
    cli.add_common(p, seed_help="seeds the fit")
    p.add_argument("--components", type=cli.Number(int, 0, MAX_COMPONENTS), default=None,
                   help=f"mixture components, per digit for a conditional model; 0 removes the mixture "
                        f"(default: {DEFAULT_COMPONENTS}, {DEFAULT_COMPONENTS_PER_CLASS} per digit for a "
                        "conditional model)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    cli.keep_freed_memory()
    device = cli.pick_device(args.device)
    stamp = modified(args.checkpoint)
    model, ckpt = cli.load_vae(args.checkpoint, map_location="cpu")  # a bad file: refused before the lock
    with Lock(args.checkpoint, read_at=stamp):
        print(cli.device_note(device, args.device))
        model.to(device)
        asked = components(args.components, model.config.num_classes)
        ckpt["args"]["mixture_components"] = asked  # the run's own choice, which a --resume keeps
        if asked == 0:
            ckpt["latent_mixture"] = None
            print(f"{args.checkpoint}: latent mixture removed; samples come from the prior")
        else:
            data = fitting_set(TensorDataset.load("train", args.data_dir, device, ckpt["args"]["limit"]),
                               ckpt["args"]["binarize"])  # as trained
            t0 = time.perf_counter()
            ckpt["latent_mixture"] = fit_to_model(model, data.images, data.labels, asked, args.seed)
            if ckpt["latent_mixture"] is None:
                raise UserError(f"{args.checkpoint}: cannot fit a latent mixture: a digit has no training image")
            print(f"{args.checkpoint}: " + describe(ckpt["latent_mixture"], model.config.num_classes, asked,
                                                     len(data), time.perf_counter() - t0))
        save_atomic(with_checksums(ckpt), args.checkpoint)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
