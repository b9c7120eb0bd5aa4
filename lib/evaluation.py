"""Scores of a trained model on the test set: its likelihood, and the quality of its samples.

`negative_elbo` (the test loss train.py prints), `importance_nll` (-log p(x), Burda et al. 2015,
eq. 8), `active_dimensions` (mean KL above ACTIVE_KL), and `sample_scores`, in the features of
the project's MNIST classifier (`DigitClassifier`):
- fd: Fréchet distance between Gaussians fitted to the classifier's penultimate features of the samples and of
  the test images (the FID of Heusel et al. 2017 with an MNIST network; Dowson & Landau 1982); fd_prior the same
  for samples of the prior; fd_floor for the test images against the training images.
- class_entropy: entropy of the predicted classes' histogram, ln 10 = 2.303 when all digits are
  equally common; digit_accuracy (conditional): samples classified as the digit asked for.
- nn_samples, nn_test_recon, nn_test: median L2 distance (pixels in [0, 1]) to the nearest
  training image from each sample, test reconstruction, test image: samples much nearer the
  training set than reconstructions of unseen digits are copies.
"""

from __future__ import annotations

import hashlib
import math
import os

import torch
from torch import nn
from tqdm import tqdm

from lib.checks import UserError, first_line, read_archive
from lib.data import TensorDataset, to_unit
from model import VAE, gaussian_kl

# nats: a latent dimension whose mean KL over the test set is below this is inactive (Burda et al. 2015 put the
# same threshold on the variance of the posterior mean over the data)
ACTIVE_KL = 0.01


@torch.inference_mode()
def negative_elbo(model: VAE, data: TensorDataset, batch_size: int, seed: int, bf16: bool = False) -> dict:
    """Test negative ELBO (beta = 1) in nats per image: {"loss", "recon", "kl"}. bf16: under bf16
    autocast, as training runs (evaluate.py always uses fp32)."""
    was_training = model.training
    model.eval()
    device = data.images.device
    gen = torch.Generator(device=device).manual_seed(seed)
    sums = torch.zeros(2, device=device)
    for x, y in data.batches(batch_size):
        eps = torch.randn(1, len(x), model.config.latent_dim, generator=gen, device=device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            p = model.loss(x, y if model.config.num_classes else None, eps=eps, reduction="sum")
        sums += torch.stack([p.recon, p.kl])
    model.train(was_training)
    recon, kl = (sums / len(data)).tolist()
    return {"loss": recon + kl, "recon": recon, "kl": kl}


@torch.inference_mode()
def importance_nll(model: VAE, data: TensorDataset, k: int, chunk: int, batch_size: int, seed: int,
                   priors=(None,)) -> list[float]:
    """Mean of -log p(x) over `data` in nats per image, K importance samples per image, under each
    of `priors` (None: the model's own), all from one set of samples (one decoder pass)."""
    gen = torch.Generator(device=data.images.device).manual_seed(seed)
    total = torch.zeros(len(priors), dtype=torch.float64, device=data.images.device)
    with tqdm(total=len(data), desc=f"log p(x), K={k}", unit="img", disable=None, leave=False) as bar:
        for x, y in data.batches(batch_size):
            ll = model.log_likelihood(x, y if model.config.num_classes else None, k=k, chunk=chunk,
                                      generator=gen, prior=priors)
            total += ll.double().sum(1)
            bar.update(len(x))
    return (-total / len(data)).tolist()


@torch.inference_mode()
def active_dimensions(model: VAE, data: TensorDataset, batch_size: int = 1000) -> tuple[torch.Tensor, int]:
    """The latent dimensions ordered by their mean KL(q(z_j|x) || N(0, 1)) over `data`, most active
    first (on the model's device), and how many are active: mean KL above ACTIVE_KL nats."""
    kl = torch.zeros(model.config.latent_dim, dtype=torch.float64)
    for x, y in data.batches(batch_size):
        mu, logvar = model.encode(x.to(model.device), y.to(model.device) if model.config.num_classes else None)
        kl += gaussian_kl(mu.float(), logvar.float(), per_dim=True).sum(0).double().cpu()
    kl /= len(data)
    return torch.argsort(kl, descending=True).to(model.device), int((kl > ACTIVE_KL).sum())


# -- the scoring classifier, shipped as weights/mnist_classifier.pt (tools/train_classifier.py) and
# checked by SHA-256 like the data, so every user scores with the same network: its penultimate
# features score generated digits as Inception's pool layer does in the FID (Heusel et al. 2017).

DEFAULT_WEIGHTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "weights",
                               "mnist_classifier.pt")
# SHA-256 of the shipped weights file; tools/train_classifier.py prints the value for a new file.
WEIGHTS_SHA256 = "2d5dc18886f00329842316b0d8899fef76a37bdf8ee3c081404c100752dea703"


class DigitClassifier(nn.Module):
    """conv3x3-ReLU-pool twice (28 -> 14 -> 7), a ReLU feature layer, a linear head."""

    def __init__(self, image_channels=1, image_size=28, channels=(32, 64), feature_dim=128, num_classes=10):
        super().__init__()
        self.config = dict(image_channels=image_channels, image_size=image_size, channels=list(channels),
                           feature_dim=feature_dim, num_classes=num_classes)  # stored with the weights
        (c1, c2), s = channels, image_size // 4
        self.body = nn.Sequential(
            nn.Conv2d(image_channels, c1, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(c2 * s * s, feature_dim), nn.ReLU(),
        )  # [B, C, H, W] in [0, 1] -> the penultimate features [B, feature_dim] the scores compare
        self.head = nn.Linear(feature_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, C, H, W] in [0, 1] -> class logits [B, num_classes]."""
        return self.head(self.body(x))


def sha256_of(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def load_classifier(path: str = DEFAULT_WEIGHTS, device="cpu", check_sha256: bool = True) -> DigitClassifier:
    """The shipped classifier in eval mode. The file must match WEIGHTS_SHA256 (unless
    check_sha256 is False, for a classifier trained anew); errors are one line naming the file."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: no classifier weights; run `python tools/train_classifier.py` "
                        "(the project ships them in weights/)")
    if check_sha256:
        digest = sha256_of(path)
        if digest != WEIGHTS_SHA256:
            raise UserError(f"{path}: SHA-256 {digest[:12]}... is not the shipped classifier's "
                            f"({WEIGHTS_SHA256[:12]}...); restore it with git, or pass --no-sha256-check for your own")
    saved = read_archive(path, map_location=device, what="classifier")
    try:
        model = DigitClassifier(**saved["config"])
        model.load_state_dict(saved["model"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise UserError(f"{path}: not a classifier saved by train_classifier.py ({first_line(e)})") from None
    return model.to(device).eval()


@torch.inference_mode()
def classify(classifier: DigitClassifier, images: torch.Tensor, batch_size: int = 1000):
    """(penultimate features [N, F] float64 on the CPU, predicted classes [N]) of images in [0, 1]
    or uint8, [N, C, H, W]."""
    device = next(classifier.parameters()).device
    feats, preds = [], []
    for i in range(0, len(images), batch_size):
        f = classifier.body(to_unit(images[i:i + batch_size].to(device)).float())
        feats.append(f.double().cpu())
        preds.append(classifier.head(f).argmax(1).cpu())
    return torch.cat(feats), torch.cat(preds)


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^1/2) between Gaussians fitted to the rows of
    a [N, F] and b [M, F]. tr (S_a S_b)^1/2 is the sum of the square roots of the eigenvalues of
    S_a^1/2 S_b S_a^1/2, a symmetric matrix, so no non-symmetric matrix root is needed."""
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = torch.cov(a.T), torch.cov(b.T)
    ev, vec = torch.linalg.eigh(s_a)
    root_a = vec @ torch.diag(ev.clamp(min=0).sqrt()) @ vec.T
    cross = torch.linalg.eigvalsh(root_a @ s_b @ root_a).clamp(min=0).sqrt().sum()
    return ((mu_a - mu_b).pow(2).sum() + torch.trace(s_a) + torch.trace(s_b) - 2 * cross).item()


def class_entropy(preds: torch.Tensor, num_classes: int) -> float:
    """Entropy in nats of the histogram of predicted classes."""
    p = torch.bincount(preds, minlength=num_classes).double() / len(preds)
    return -(p[p > 0] * p[p > 0].log()).sum().item() + 0.0  # + 0.0: one class gives 0, not -0


@torch.inference_mode()
def nearest_distance(queries: torch.Tensor, reference: torch.Tensor, chunk: int = 500,
                     desc: str | None = None) -> torch.Tensor:
    """For each row of queries [N, P], the L2 distance to its nearest row of reference [M, P]."""
    ref = reference.float()
    ref_sq = ref.pow(2).sum(1)
    out = []
    for i in tqdm(range(0, len(queries), chunk), desc=desc, unit="chunk", disable=None, leave=False):
        q = queries[i:i + chunk].float()
        # |q - r|^2 = |q|^2 - 2 q.r + |r|^2: one matrix product per chunk
        d2 = q.pow(2).sum(1, keepdim=True) - 2 * q @ ref.T + ref_sq
        out.append(d2.min(1).values.clamp(min=0).sqrt())
    return torch.cat(out)


@torch.inference_mode()
def sample_scores(model: VAE, classifier: DigitClassifier, train_set: TensorDataset, test_set: TensorDataset,
                  n: int = 10_000, seed: int = 0, batch_size: int = 500) -> dict:
    """Every score of the module docstring for a VAE (model.VAE); test and training images are
    the grey-level ones. Samples are drawn with a generator seeded by `seed`."""
    device = model.device
    classes = model.config.num_classes
    gen = torch.Generator(device=device).manual_seed(seed)
    labels = None if classes == 0 else torch.arange(n, device=device) % classes  # every digit equally often

    def draw(prior: bool) -> torch.Tensor:
        out = []
        for i in range(0, n, batch_size):
            y = None if labels is None else labels[i:i + batch_size]
            out.append(model.sample(min(batch_size, n - i), y, generator=gen, prior=prior).cpu())
        return torch.cat(out)

    samples, prior_samples = draw(prior=False), draw(prior=True)
    test_x = to_unit(test_set.images.cpu())
    recon = torch.cat([model.reconstruct(to_unit(x), y if classes else None).cpu()
                       for x, y in test_set.batches(batch_size)])
    train_x = to_unit(train_set.images.cpu()).flatten(1)

    f_test, _ = classify(classifier, test_x)
    f_train, _ = classify(classifier, train_set.images)
    f_s, pred_s = classify(classifier, samples)
    f_p, _ = classify(classifier, prior_samples)
    return {
        "fd": frechet_distance(f_s, f_test),
        "fd_prior": frechet_distance(f_p, f_test),
        "class_entropy": class_entropy(pred_s, classifier.head.out_features),
        "digit_accuracy": None if labels is None else (pred_s == labels.cpu()).double().mean().item(),
        "digit_accuracy_per_digit": None if labels is None else [
            (pred_s[labels.cpu() == d] == d).double().mean().item() if d < n else None for d in range(classes)],
        "nn_samples": nearest_distance(samples.flatten(1), train_x, desc="nearest, samples").median().item(),
        "nn_test_recon": nearest_distance(recon.flatten(1), train_x, desc="nearest, recons").median().item(),
        "fd_floor": frechet_distance(f_test, f_train),
        "nn_test": nearest_distance(test_x.flatten(1), train_x, desc="nearest, test").median().item(),
        "samples": n,
        "max_class_entropy": math.log(classifier.head.out_features),
    }
