"""Estimate the test-set negative log-likelihood of a checkpoint by importance sampling.

    python evaluate.py --checkpoint checkpoints/vae.pt            # K = 1000
    python evaluate.py --checkpoint PATH --k 5000 --json nll.json  # the IWAE paper's protocol

log p(x) ~ logsumexp_k [log p(x|z_k) + log p(z_k) - log q(z_k|x)] - log K, z_k ~ q(z|x)
(Burda, Grosse & Salakhutdinov 2015, eq. 8). It is a lower bound on log p(x) that tightens as K
grows (K = 1 is the ELBO) and converges to log p(x). Samples are drawn --chunk at a time, so
memory stays bounded for any K. The test set is binarized exactly as in training when the
checkpoint was trained with --binarize.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

import torch
from tqdm import tqdm

import cli
from checkpoint import load_model, write_atomic
from data import TensorDataset, load_test_set
from train import DEFAULT_CHECKPOINT, evaluate_elbo


def build_parser():
    p = cli.Parser(description="Importance-sampled test NLL of a trained VAE (Burda et al. 2015).")
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help="checkpoint written by train.py")
    p.add_argument("--k", type=cli.number(int, 1, high=1_000_000), default=1000,
                   help="importance samples per image (5000 is the IWAE paper's protocol)")
    p.add_argument("--chunk", type=cli.positive_int, default=100,
                   help="samples decoded at once per image (bounds memory)")
    p.add_argument("--batch-size", type=cli.positive_int, default=100, help="test images at once")
    p.add_argument("--limit", type=cli.positive_int, default=None, help="only the first N test images")
    p.add_argument("--seed", type=cli.non_negative_int, default=0, help="seeds the samples")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    cli.add_device_flag(p)
    cli.add_data_dir_flag(p)
    return p


@torch.inference_mode()
def importance_nll(model, data: TensorDataset, k: int, chunk: int, batch_size: int, seed: int,
                   conditional: bool) -> float:
    """Mean of -log p(x) over `data`, in nats per image."""
    gen = torch.Generator(device=data.images.device).manual_seed(seed)
    total = torch.zeros((), dtype=torch.float64, device=data.images.device)
    bar = tqdm(total=len(data), desc=f"log p(x), K={k}", unit="img", disable=None, leave=False)
    for x, y in data.batches(batch_size):
        ll = model.log_likelihood(x, y if conditional else None, k=k, chunk=chunk, generator=gen)
        total += ll.double().sum()
        bar.update(len(x))
    bar.close()
    return -total.item() / len(data)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    cli.keep_freed_memory()
    if args.json:
        folder = os.path.dirname(os.path.abspath(args.json))
        if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
            raise cli.UserError(f"{args.json}: its folder does not exist or is not writable")
    device = cli.pick_device(args.device)
    model, ckpt = load_model(args.checkpoint, map_location=device)
    binarize = bool(ckpt.get("args", {}).get("binarize"))
    conditional = model.config.num_classes > 0
    test = load_test_set(args.data_dir, device, args.limit, binarize)
    print(f"device: {device}; {args.checkpoint} (epoch {ckpt['epoch']}), {len(test):,} test images, "
          f"{'binarized' if binarize else 'grey-level'} protocol, K = {args.k}")

    t0 = time.perf_counter()
    elbo = evaluate_elbo(model, test, args.batch_size, args.seed, conditional)
    nll = importance_nll(model, test, args.k, args.chunk, args.batch_size, args.seed, conditional)
    result = {
        "checkpoint": args.checkpoint, "epoch": ckpt["epoch"], "k": args.k, "images": len(test),
        "protocol": "binarized" if binarize else "grey-level", "conditional": conditional,
        "nll": nll, "bits_per_dim": nll / (model.config.num_pixels * math.log(2)),
        "neg_elbo": elbo["loss"], "recon": elbo["recon"], "kl": elbo["kl"],
        "seconds": time.perf_counter() - t0,
    }
    print(f"NLL {nll:.2f} nats/image ({result['bits_per_dim']:.4f} bits/dim), importance-sampled, K = {args.k}")
    print(f"negative ELBO {elbo['loss']:.2f} = recon {elbo['recon']:.2f} + KL {elbo['kl']:.2f} "
          f"(one posterior sample per image)")
    if args.json:
        write_atomic(args.json, lambda f: f.write(json.dumps(result, indent=2).encode()))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
