"""A full-covariance Gaussian mixture fitted by EM in the latent space, where the data lie.

Samples from N(0, I) often land in holes of the aggregate posterior and decode to blurred digits; sampling z
from a mixture (model.GaussianMixture) fitted to the training images' posterior means instead is "ex-post
density estimation" (Ghosh et al. 2020, sec. 4), one per digit for a conditional model. Fitted to one posterior
sample per image, it is a prior p(z) for the likelihood (`evaluate.py --prior-components`; Dai & Wipf 2019).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lib.data import to_unit
from model import VAE, log_normal, reparameterize

# 100 components score the default model's samples 1.5 fd better than 50, without samples nearer the training
# images (docs/results.md, "Time to quality"); on older models more drew samples towards training digits ("Samples").
DEFAULT_COMPONENTS = 100
DEFAULT_COMPONENTS_PER_CLASS = 6  # conditional models: one mixture per digit, ~6,000 points each
MAX_COMPONENTS = 1000
RIDGE = 1e-4  # times the data's mean variance, added to every covariance's diagonal
MIN_VARIANCE = 1e-6  # the variance the ridge is scaled by when the points have none (one point)
ITERATIONS = 20  # EM iterations after the k-means start; the sample score had converged by then
CHUNK = 2048  # points per block in fit: bounds its memory at a few [CHUNK, d * d] tensors


def _m_step(counts, sum_x, sum_xx, floor):
    """Weights, means and Cholesky factors of the covariances from the weighted sums
    (counts [M], sum_x [M, d], sum_xx [M, d, d]) of an E-step."""
    n = counts.sum()
    counts = counts + 1e-10  # an empty component keeps a finite mean, its covariance the ridge
    means = sum_x / counts.unsqueeze(1)
    cov = sum_xx / counts.view(-1, 1, 1) - means.unsqueeze(2) * means.unsqueeze(1) + floor
    return counts / n, means, torch.linalg.cholesky(cov)


def fit(x: torch.Tensor, components: int, iterations: int = ITERATIONS, seed: int = 0,
        ridge: float = RIDGE, tol: float = 1e-4, history: list | None = None):
    """EM for a full-covariance Gaussian mixture on points x [N, d] (Bishop 2006, sec. 9.2.2).

    Any N >= 1 points fit: there are at most as many components as distinct points (one point, or
    repeated ones, give one), and `ridge` times the points' mean variance (MIN_VARIANCE if they
    have none) is added to each covariance's diagonal, so every covariance is positive definite,
    even with fewer points than dimensions or a dimension of zero variance. Deterministic for a
    seed on the CPU: the means start at points chosen by greedy k-means++ seeding (Arthur &
    Vassilvitskii 2007), refined by 10 k-means steps whose clusters give the first weights and
    covariances. float64, on data centred at their mean, in blocks of CHUNK points. Stops after
    `iterations` EM steps, or sooner when the mean log-likelihood per point gains less than `tol`
    nats; `history` receives that mean at every E-step (EM never lowers it; the ridge makes the M-step
    not quite EM's, and a test checks that it still does not).
    Returns (weights [M], means [M, d], scale_tril [M, d, d]) as float32, M <= components."""
    assert x.dim() == 2 and len(x) >= 1 and components >= 1, (x.shape, components)
    x = x.double()
    n, d = x.shape
    m = min(components, len(torch.unique(x, dim=0)))
    centre = x.mean(0)
    x = x - centre  # second moments about the data's mean keep the M-step's subtraction accurate
    g = torch.Generator(device=x.device).manual_seed(seed)
    variance = x.var(0).mean().item() if n > 1 else 0.0
    floor = ridge * (variance if variance > 0 else MIN_VARIANCE) * torch.eye(d, dtype=x.dtype, device=x.device)
    sq = x.pow(2).sum(1)
    # Greedy k-means++ seeding: each next mean is, of a few points drawn with probability ~ squared
    # distance to the means so far, the one that leaves the smallest total squared distance. With
    # m distinct points at most, some point is always at a positive distance.
    trials = 2 + int(math.log(m))
    means = x[torch.randint(n, (1,), generator=g, device=x.device)]
    dist = (x - means[0]).pow(2).sum(1)
    for _ in range(1, m):
        cand = torch.multinomial(dist / dist.sum(), trials, replacement=True, generator=g)
        d_cand = torch.minimum(dist, sq.unsqueeze(0) - 2 * x[cand] @ x.T + sq[cand].unsqueeze(1))  # [trials, N]
        best = int(d_cand.sum(1).argmin())
        means = torch.cat([means, x[cand[best]].unsqueeze(0)])
        dist = d_cand[best].clamp(min=0)
    for _ in range(10):  # k-means (Lloyd) steps; an emptied cluster keeps its mean
        # |x - mu|^2 without |x|^2, the same for every mean: one [N, M] tensor, no temporaries of that size
        nearest = torch.addmm(means.pow(2).sum(1), x, means.T, alpha=-2).argmin(1)
        counts = torch.bincount(nearest, minlength=m).double()
        sums = torch.zeros_like(means).index_add_(0, nearest, x)
        means = torch.where(counts.unsqueeze(1) > 0, sums / counts.clamp(min=1).unsqueeze(1), means)
    sums, _ = _weighted_sums(x, m, lambda i, xb: (F.one_hot(nearest[i:i + CHUNK], m).to(x.dtype), 0.0))
    weights, means, scale_tril = _m_step(*sums, floor)
    previous = -math.inf
    for _ in range(iterations):
        def e_step(i, xb):  # responsibilities r[n, m] = p(component m | x_n), and sum of log p(x_n)
            joint = log_normal(xb, means, scale_tril) + weights.log()
            ll = torch.logsumexp(joint, dim=1, keepdim=True)
            return torch.exp(joint - ll), ll.sum().item()

        sums, total = _weighted_sums(x, m, e_step)
        mean_ll = total / n
        if history is not None:
            history.append(mean_ll)
        if mean_ll - previous < tol:
            break
        previous = mean_ll
        weights, means, scale_tril = _m_step(*sums, floor)
    return weights.float(), (means + centre).float(), scale_tril.float()


def _weighted_sums(x: torch.Tensor, m: int, responsibilities):
    """Block by block, r = responsibilities(start, block) [B, m] (and a number to add up), then
    the M-step's sums: counts [m], sum of r x [m, d], sum of r x x^T [m, d, d]."""
    n, d = x.shape
    counts, sum_x, sum_xx = x.new_zeros(m), x.new_zeros(m, d), x.new_zeros(m, d * d)
    total = 0.0
    for i in range(0, n, CHUNK):
        xb = x[i:i + CHUNK]
        r, extra = responsibilities(i, xb)
        total += extra
        counts += r.sum(0)
        sum_x += r.T @ xb
        sum_xx += r.T @ (xb.unsqueeze(2) * xb.unsqueeze(1)).flatten(1)
    return (counts, sum_x, sum_xx.view(m, d, d)), total


def describe(fitted: dict, num_classes: int, asked: int, points: int, seconds: float) -> str:
    """The line train.py and tools/fit_mixture.py print after `fit_to_model`."""
    got = fitted["weights"].shape[1]
    return (f"latent mixture: {f'{num_classes} mixtures (one per digit) of ' if num_classes else ''}{got} "
            f"component{'' if got == 1 else 's'}"
            f"{f' (of {asked} asked for: fewer distinct points)' if got < asked else ''} fitted to {points:,} "
            f"posterior means in {seconds:.1f} s")


def components(asked: int | None, num_classes: int) -> int:
    """The components asked for (per class for a conditional model), or, for None, the default."""
    if asked is not None:
        return asked
    return DEFAULT_COMPONENTS_PER_CLASS if num_classes else DEFAULT_COMPONENTS


@torch.inference_mode()
def fit_to_model(model: VAE, images: torch.Tensor, labels: torch.Tensor, components: int, seed: int = 0,
                 batch_size: int = 500, posterior_samples: bool = False) -> dict | None:
    """Fit the latent mixture of a VAE to the posterior means of `images` (uint8 or [0, 1] floats,
    [N, C, H, W]; `labels` [N] for a conditional model: one mixture per class), or with
    posterior_samples to one seeded draw z ~ q(z|x) per image (a prior for the likelihood).
    Returns {"weights" [G, M], "means", "scale_tril"} on the CPU for model.GaussianMixture, with
    one M for every group (the smallest group's fit), or None if a class has no image."""
    was_training = model.training
    model.eval()
    classes = model.config.num_classes
    noise = torch.Generator(device=model.device).manual_seed(seed)
    # filled in place: keeping views of each batch's output would fragment glibc's heap, memory growing per batch
    z = torch.empty(len(images), model.config.latent_dim)
    for i in range(0, len(images), batch_size):
        x = to_unit(images[i:i + batch_size].to(model.device))
        y = labels[i:i + batch_size].to(model.device) if classes else None
        mu, logvar = model.encode(x, y)
        if posterior_samples:
            mu = reparameterize(mu, logvar, torch.randn(mu.shape, generator=noise, device=mu.device))
        z[i:i + batch_size] = mu
    model.train(was_training)
    groups = [z] if classes == 0 else [z[labels.cpu() == g] for g in range(classes)]
    if min(len(points) for points in groups) == 0:
        return None
    fits = [fit(points, components, seed=seed + g) for g, points in enumerate(groups)]
    m = min(len(f[0]) for f in fits)  # stacked, so every group keeps the same number
    if any(len(f[0]) > m for f in fits):
        fits = [fit(points, m, seed=seed + g) for g, points in enumerate(groups)]
    return {name: torch.stack([f[i] for f in fits]) for i, name in enumerate(("weights", "means", "scale_tril"))}
