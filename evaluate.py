"""Score a checkpoint: its test-set log-likelihood by importance sampling, or its samples.

    python evaluate.py --checkpoint checkpoints/vae.pt            # K = 1000
    python evaluate.py --checkpoint PATH --k 5000 --json nll.json  # the IWAE paper's protocol
    python evaluate.py --checkpoint PATH --sample-quality         # Fréchet distance and more
    python evaluate.py --checkpoint PATH --prior-components 50    # also with a fitted prior

The NLL is VAE.log_likelihood's bound (Burda et al. 2015, eq. 8) on the test set, binarized when the
checkpoint was trained with --binarize. --prior-components M also scores the same decoder, from the same
samples, under an M-component mixture fitted to one posterior sample of each training image (of one binarized
draw of them for a binarized model, lib.data.fitting_set): the gap to the model's own prior is the NLL cost of
that prior's mismatch with the aggregate posterior (Hoffman & Johnson 2016; Dai & Wipf 2019). --sample-quality
scores samples instead (lib/evaluation.py says what each figure means).
"""

from __future__ import annotations

import json
import math
import sys
import time

from lib import cli
from lib.checks import UserError
from lib.data import TensorDataset, fitting_set, load_test_set
from lib.evaluation import DEFAULT_WEIGHTS, importance_nll, load_classifier, negative_elbo, sample_scores
from lib.files import check_output_path, lock_path, metrics_path, write_atomic
from lib.mixture import MAX_COMPONENTS, fit_to_model
from model import VAE, GaussianMixture


def build_parser() -> cli.Parser:
    p = cli.Parser("Importance-sampled test NLL of a trained VAE (Burda et al. 2015), or the quality "
                   "of its samples (--sample-quality).")
    cli.add_common(p, seed_help="seeds the samples")
    p.add_argument("--k", type=cli.Number(int, 1, 1_000_000), default=1000,
                   help="importance samples per image (5000 is the IWAE paper's protocol)")
    # 10 x 100 images keep each decoder activation under glibc's 32 MiB mmap threshold (cli.keep_freed_memory).
    p.add_argument("--chunk", type=cli.POSITIVE_INT, default=10,
                   help="samples decoded at once per image (bounds memory; chunk x batch size decodes per pass)")
    p.add_argument("--batch-size", type=cli.Number(int, 1, cli.MAX_BATCH), default=100, help="test images at once")
    p.add_argument("--limit", type=cli.POSITIVE_INT, default=None,
                   help="only the first N images of each split it reads (default: all)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file (default: none)")
    p.add_argument("--prior-components", type=cli.Number(int, 0, MAX_COMPONENTS), default=0,
                   help="also the NLL with a mixture of this many components fitted to the training "
                        "set's posterior samples as the prior (unconditional models; 0: only the model's own prior)")
    p.add_argument("--sample-quality", action="store_true",
                   help="score samples instead of the likelihood: Fréchet distance in the shipped "
                        "classifier's features, class entropy, digit accuracy, nearest-neighbour distances")
    p.add_argument("--samples", type=cli.Number(int, 2, 100_000), default=10_000, help="samples --sample-quality draws")
    p.add_argument("--classifier", default=DEFAULT_WEIGHTS,
                   help="classifier weights for --sample-quality (default: the shipped weights/mnist_classifier.pt)")
    p.add_argument("--no-sha256-check", action="store_true",
                   help="accept a --classifier other than the shipped one (scores are then not comparable)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    cli.keep_freed_memory()
    if args.json is not None:
        check_output_path(args.json, "JSON results", devices_ok=True,  # before the work, not after it
                          keep={args.checkpoint: "the checkpoint it scores", metrics_path(args.checkpoint):
                                "that checkpoint's metrics CSV", lock_path(args.checkpoint): "that checkpoint's lock "
                                "file", args.classifier: "the classifier it reads"})
    device = cli.pick_device(args.device)
    model, ckpt = cli.load_vae(args.checkpoint, map_location=device)
    binarize, conditional = ckpt["args"]["binarize"], model.config.num_classes > 0
    if args.sample_quality:
        if args.prior_components:
            raise UserError("--prior-components applies to the likelihood, not to --sample-quality")
        if args.limit == 1:
            raise UserError("--sample-quality needs --limit 2 or more: a Fréchet distance fits covariances")
        return sample_quality(args, model, ckpt, device)
    if args.prior_components and conditional:
        raise UserError("--prior-components needs an unconditional model; this one is conditional")
    need = decode_bytes(model) * args.chunk * args.batch_size
    free = cli.free_memory(device)
    if free is not None and need > free:
        raise UserError(f"--chunk {args.chunk} x --batch-size {args.batch_size}: decoding that many samples "
                        f"at once needs about {need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB is free; lower them")
    test = load_test_set(args.data_dir, device, args.limit, binarize)
    print(f"{cli.device_note(device, args.device)}; {scored(args, ckpt)}, {cli.count(len(test), 'test image')}, "
          f"{'binarized' if binarize else 'grey-level'} protocol, K = {args.k}")

    t0 = time.perf_counter()
    priors, fit_seconds, fit_images = [None], None, 0
    if args.prior_components:
        train = fitting_set(TensorDataset.load("train", args.data_dir, device, args.limit), binarize)
        d = model.config.latent_dim
        if len(train) < args.prior_components * (d + 1):  # fewer points than a full covariance's parameters need
            print(f"note: {cli.count(len(train), 'training image')} for {cli.count(args.prior_components, 'component')}"
                  f" of dimension {d}: under {d + 1} per component, the mixture fits them too closely and its NLL is "
                  "no fair score")
        fitted = fit_to_model(model, train.images, train.labels, args.prior_components, args.seed,
                              posterior_samples=True)
        priors.append(GaussianMixture(**fitted).to(device))
        fit_seconds, fit_images = time.perf_counter() - t0, len(train)
        del train
    elbo = negative_elbo(model, test, args.batch_size, args.seed)
    # One decoder pass scores all priors from the same samples: the model's own NLL is unchanged by --prior-components.
    nll, *nll_prior = importance_nll(model, test, args.k, args.chunk, args.batch_size, args.seed, priors)
    result = {
        "checkpoint": args.checkpoint, "epoch": ckpt["epoch"], "step": ckpt["step"], "k": args.k, "images": len(test),
        "protocol": "binarized" if binarize else "grey-level", "conditional": conditional,
        "nll": nll, "bits_per_dim": nll / (model.config.num_pixels * math.log(2)),
        "neg_elbo": elbo["loss"], "recon": elbo["recon"], "kl": elbo["kl"], "seconds": time.perf_counter() - t0,
    }
    own = f"a learned flow (L = {model.config.flow_prior} coupling layers)" if model.config.flow_prior else "N(0, I)"
    lines = [f"NLL {nll:.2f} nats/image ({result['bits_per_dim']:.4f} bits/dim), importance-sampled, K = {args.k}, "
             f"prior {own} (the model's own)",
             f"negative ELBO {elbo['loss']:.2f} = recon {elbo['recon']:.2f} + KL {elbo['kl']:.2f} (one posterior "
             "sample)"]
    if args.prior_components:
        result.update(prior_components=args.prior_components, nll_mixture_prior=nll_prior[0],
                      prior_fit_seconds=fit_seconds, prior_fit_images=fit_images)
        lines.append(f"NLL {nll_prior[0]:.2f} nats/image with a {args.prior_components}-component mixture prior fitted "
                     f"to {fit_images:,} training images' posterior samples ({fit_seconds:.0f} s to fit), K = {args.k}")
    return finish(args.json, result, lines)


def scored(args, ckpt: dict) -> str:
    """What is scored, for the headers: the checkpoint, its epochs (and steps), and which of its weights."""
    if ckpt["optimizer"] is None:  # train.py always stores one
        return f"{args.checkpoint} (a model of one's own training loop, saved by lib.training.save_model)"
    steps = f" and {cli.count(ckpt['step'], 'step')} of the next" if ckpt["step"] else ""
    ema = ", the weights' moving average (--ema)" if ckpt["ema"] is not None else ""
    return f"{args.checkpoint} (epoch {ckpt['epoch']}{steps}{ema})"


def finish(path: str | None, result: dict, lines: list[str]) -> int:
    """Write the results to --json, if given (its path was checked before the work), then print them: the file
    comes first, so an output pipe closed early (`| head -1`) cannot lose the work; if the file cannot be written
    (a full disk), the results are printed before its error."""
    try:
        if path is not None:
            write_atomic(path, lambda f: f.write(json.dumps(result, indent=2).encode()))
    finally:
        print("\n".join(lines))
    if path is not None:
        print(f"wrote {path}")
    return 0


def decode_bytes(model: VAE) -> int:
    """A generous estimate of the memory one decoded sample takes in log_likelihood (fp32): every
    layer's activations, the logits, the target and the BCE terms, with a factor of 2 to spare."""
    c = model.config
    per = c.latent_dim * 4 + c.hidden_dim + 4 * c.num_pixels
    if c.arch == "conv":
        s = c.image_size // 4
        per += 2 * (c.channels[1] * s * s + c.channels[0] * 4 * s * s)
    return 2 * 4 * per


def sample_quality(args, model: VAE, ckpt: dict, device) -> int:
    """--sample-quality: the scores of lib.evaluation.sample_scores, printed and written to --json."""
    classifier = load_classifier(args.classifier, device, check_sha256=not args.no_sha256_check)
    train_set = TensorDataset.load("train", args.data_dir, device, args.limit)
    test_set = load_test_set(args.data_dir, device, args.limit)
    source = "a latent mixture" if model.latent_mixture is not None else "the prior (no latent mixture)"
    print(f"{cli.device_note(device, args.device)}; {scored(args, ckpt)}: {cli.count(args.samples, 'sample')} from "
          f"{source} against {cli.count(len(test_set), 'test image')}")
    t0 = time.perf_counter()
    r = sample_scores(model, classifier, train_set, test_set, args.samples, args.seed)
    r = {"checkpoint": args.checkpoint, "epoch": ckpt["epoch"], "step": ckpt["step"],
         "mixture": model.latent_mixture is not None, **r, "seconds": time.perf_counter() - t0}
    lines = [f"fd {r['fd']:.2f}  (Fréchet distance to the test images; prior samples: fd_prior "
             f"{r['fd_prior']:.2f}; test images against training images: {r['fd_floor']:.2f})",
             f"class_entropy {r['class_entropy']:.3f}  (ln 10 = {r['max_class_entropy']:.3f} if all digits are as "
             "common)"]
    if r["digit_accuracy"] is not None:
        per_digit = r["digit_accuracy_per_digit"]
        worst = min((d for d in range(len(per_digit)) if per_digit[d] is not None), key=per_digit.__getitem__)
        lines.append(f"digit_accuracy {r['digit_accuracy']:.4f}  (samples classified as the digit asked for; lowest: "
                     f"digit {worst}, {r['digit_accuracy_per_digit'][worst]:.4f})")
    lines.append(f"nn_samples {r['nn_samples']:.3f}  nn_test_recon {r['nn_test_recon']:.3f}  (median L2 distance "
                 f"to the nearest training image; test images: {r['nn_test']:.3f})")
    return finish(args.json, r, lines)


if __name__ == "__main__":
    sys.exit(cli.run(main))
