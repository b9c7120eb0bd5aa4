"""A full-covariance Gaussian mixture fitted by EM, to sample the latent space where data lie.

Samples from the N(0, I) prior often land where no training image encodes to (the holes of the
aggregate posterior) and decode to blurred or ambiguous digits. Fitting a mixture to the
posterior means of the training images and sampling z from it instead is "ex-post density
estimation" (Ghosh et al. 2020, "From Variational to Deterministic Autoencoders", sec. 4; Dai &
Wipf 2019, "Diagnosing and Enhancing VAE Models"). For a conditional model there is one mixture
per digit.

Stored as plain tensors (`to_dict`), so a checkpoint holding one loads with weights_only=True:
  weights [G, K], means [G, K, d], scale_tril [G, K, d, d]  (G groups: 1, or one per digit)
The model samples through it; train.py (when training ends) and fit_mixture.py fit it.

Fitted instead to one posterior sample z ~ q(z|x) per training image, a mixture also serves as a
learned prior p(z) for the likelihood (`evaluate.py --prior-components`): the decoder with a
prior fitted to its aggregate posterior, a two-stage model as in Dai & Wipf 2019.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from data import to_unit

# Chosen by measurement (README): the sample score improves with more components up to about 50
# to 75 on the default model, and samples drift towards copies of training digits with more.
DEFAULT_COMPONENTS = 50
DEFAULT_COMPONENTS_PER_CLASS = 6  # conditional models: one mixture per digit, ~6,000 points each
MAX_COMPONENTS = 1000
RIDGE = 1e-4  # times the data's mean variance, added to every covariance's diagonal
# EM iterations after the k-means start. On the default model's latents the sample score was the
# same after 20 iterations as after 143 (converged to 1e-4 nats per point), at a seventh of the time.
ITERATIONS = 20
CHUNK = 8192  # points per block in fit: bounds its memory at a few [CHUNK, d * d] tensors


def _log_normal(x: torch.Tensor, means: torch.Tensor, scale_tril: torch.Tensor) -> torch.Tensor:
    """log N(x; means[k], L_k L_k^T) for every point and component: x [N, d] -> [N, K]."""
    d = x.shape[1]
    precision = torch.cholesky_inverse(scale_tril)  # [K, d, d], (L L^T)^-1 from the factor
    outer = (x.unsqueeze(2) * x.unsqueeze(1)).flatten(1)  # x x^T per point: [N, d * d]
    # (x - mu)^T P (x - mu) = vec(x x^T) . vec(P) - 2 x . P mu + mu^T P mu: two matrix products
    p_mu = (precision @ means.unsqueeze(-1)).squeeze(-1)  # [K, d]
    maha = outer @ precision.flatten(1).T - 2 * x @ p_mu.T + (means * p_mu).sum(1)
    half_logdet = torch.log(torch.diagonal(scale_tril, dim1=-2, dim2=-1)).sum(-1)  # [K]
    return -0.5 * maha - half_logdet - 0.5 * d * math.log(2 * math.pi)


def log_density(x: torch.Tensor, weights, means, scale_tril) -> torch.Tensor:
    """Log-density of each point x [N, d] under one mixture (weights [K], means [K, d], ...): [N]."""
    return torch.logsumexp(_log_normal(x, means, scale_tril) + weights.log(), dim=1)


def log_likelihood(x: torch.Tensor, weights, means, scale_tril) -> torch.Tensor:
    """Mean log-density of the points x [N, d] under one mixture."""
    return log_density(x, weights, means, scale_tril).mean()


def _m_step(counts, sum_x, sum_xx, floor):
    """Weights, means and Cholesky factors of the covariances from the weighted sums
    (counts [K], sum_x [K, d], sum_xx [K, d, d]) of an E-step."""
    n = counts.sum()
    counts = counts + 1e-10  # an empty component keeps a finite mean, its covariance the ridge
    means = sum_x / counts.unsqueeze(1)
    cov = sum_xx / counts.view(-1, 1, 1) - means.unsqueeze(2) * means.unsqueeze(1) + floor
    return counts / n, means, torch.linalg.cholesky(cov)


def fit(x: torch.Tensor, k: int, iterations: int = ITERATIONS, seed: int = 0, ridge: float = RIDGE,
        tol: float = 1e-4, history: list | None = None):
    """EM for a k-component full-covariance mixture on points x [N, d] (Bishop 2006, sec. 9.2.2).

    Deterministic for a given seed on the CPU: the means start at k points chosen by greedy
    k-means++ seeding (Arthur & Vassilvitskii 2007), refined by 10 k-means steps, whose clusters give the
    first weights and covariances. Computed in float64, on data centred at their mean, in blocks
    of CHUNK points: each iteration is two matrix products per block. `ridge` times the data's
    mean variance is added to each covariance's diagonal, so it stays positive definite even for
    a component that holds few points. Stops after `iterations` EM steps, or sooner when the mean
    log-likelihood per point gains less than `tol` nats. `history`, if given, receives the mean
    log-likelihood of every E-step (it never decreases: a test checks).
    Returns (weights [k], means [k, d], scale_tril [k, d, d]) as float32 on x's device.
    """
    x = x.double()
    n, d = x.shape
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= components <= points, got {k} components for {n} points")
    centre = x.mean(0)
    x = x - centre  # second moments about the data's mean keep the M-step's subtraction accurate
    g = torch.Generator(device=x.device).manual_seed(seed)
    floor = ridge * x.var(0).mean() * torch.eye(d, dtype=x.dtype, device=x.device)
    sq = x.pow(2).sum(1)
    # Greedy k-means++ seeding: each next mean is, of a few points drawn with probability ~ squared
    # distance to the means so far, the one that leaves the smallest total squared distance.
    trials = 2 + int(math.log(k))
    means = x[torch.randint(n, (1,), generator=g, device=x.device)]
    dist = (x - means[0]).pow(2).sum(1)
    for _ in range(1, k):
        cand = torch.multinomial(dist / dist.sum(), trials, replacement=True, generator=g)
        d_cand = torch.minimum(dist, sq.unsqueeze(0) - 2 * x[cand] @ x.T + sq[cand].unsqueeze(1))  # [trials, N]
        best = int(d_cand.sum(1).argmin())
        means = torch.cat([means, x[cand[best]].unsqueeze(0)])
        dist = d_cand[best].clamp(min=0)
    for _ in range(10):  # k-means (Lloyd) steps; an emptied cluster keeps its mean
        nearest = (sq.unsqueeze(1) - 2 * x @ means.T + means.pow(2).sum(1)).argmin(1)
        counts = torch.bincount(nearest, minlength=k).double()
        sums = torch.zeros_like(means).index_add_(0, nearest, x)
        means = torch.where(counts.unsqueeze(1) > 0, sums / counts.clamp(min=1).unsqueeze(1), means)
    # The k-means clusters as hard responsibilities give the first weights and covariances.
    sums, _ = _weighted_sums(x, k, lambda i, xb: (F.one_hot(nearest[i:i + CHUNK], k).to(x.dtype), 0.0))
    weights, means, scale_tril = _m_step(*sums, floor)
    previous = -math.inf
    for _ in range(iterations):
        def e_step(i, xb):  # responsibilities r[n, k] = p(component k | x_n), and sum of log p(x_n)
            joint = _log_normal(xb, means, scale_tril) + weights.log()
            ll = torch.logsumexp(joint, dim=1, keepdim=True)
            return torch.exp(joint - ll), ll.sum().item()

        sums, total = _weighted_sums(x, k, e_step)
        mean_ll = total / n
        if history is not None:
            history.append(mean_ll)
        if mean_ll - previous < tol:
            break
        previous = mean_ll
        weights, means, scale_tril = _m_step(*sums, floor)
    return weights.float(), (means + centre).float(), scale_tril.float()


def _weighted_sums(x: torch.Tensor, k: int, responsibilities):
    """Block by block, r = responsibilities(start, block) [B, k] (and a number to add up), then
    the M-step's sums: counts [k], sum of r x [k, d], sum of r x x^T [k, d, d]."""
    n, d = x.shape
    counts = torch.zeros(k, dtype=x.dtype, device=x.device)
    sum_x = torch.zeros(k, d, dtype=x.dtype, device=x.device)
    sum_xx = torch.zeros(k, d * d, dtype=x.dtype, device=x.device)
    total = 0.0
    for i in range(0, n, CHUNK):
        xb = x[i:i + CHUNK]
        r, extra = responsibilities(i, xb)
        total += extra
        counts += r.sum(0)
        sum_x += r.T @ xb
        sum_xx += r.T @ (xb.unsqueeze(2) * xb.unsqueeze(1)).flatten(1)
    return (counts, sum_x, sum_xx.view(k, d, d)), total


def sample(weights, means, scale_tril, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """n points from one mixture: a component by its weight, then mean + L eps. [n, d]"""
    comp = torch.multinomial(weights, n, replacement=True, generator=generator)
    eps = torch.randn(n, means.shape[1], generator=generator, device=means.device)
    return means[comp] + (scale_tril[comp] @ eps.unsqueeze(-1)).squeeze(-1)


def check(mixture: dict, latent_dim: int, groups: int) -> None:
    """Raise ValueError unless `mixture` holds finite weights [G, K] (positive, summing to 1),
    means [G, K, d] and lower-triangular scale_tril [G, K, d, d] with a positive diagonal."""
    if not isinstance(mixture, dict) or set(mixture) != {"weights", "means", "scale_tril"}:
        raise ValueError("latent mixture: expected the keys weights, means, scale_tril")
    w, m, L = mixture["weights"], mixture["means"], mixture["scale_tril"]
    if not all(isinstance(t, torch.Tensor) and t.is_floating_point() for t in (w, m, L)):
        raise ValueError("latent mixture: weights, means and scale_tril must be float tensors")
    if w.dim() != 2 or w.shape[0] != groups or w.shape[1] < 1:
        raise ValueError(f"latent mixture: weights must be [{groups}, K], got {list(w.shape)}")
    g, k = w.shape
    if tuple(m.shape) != (g, k, latent_dim) or tuple(L.shape) != (g, k, latent_dim, latent_dim):
        raise ValueError(f"latent mixture: means and scale_tril must be [{g}, {k}, {latent_dim}(, {latent_dim})]")
    if not all(torch.isfinite(t).all() for t in (w, m, L)):
        raise ValueError("latent mixture: holds non-finite values")
    if (w <= 0).any() or not torch.allclose(w.sum(1), torch.ones(g, dtype=w.dtype, device=w.device), atol=1e-4):
        raise ValueError("latent mixture: weights must be positive and sum to 1 per group")
    if (torch.diagonal(L, dim1=-2, dim2=-1) <= 0).any() or not torch.equal(L, L.tril()):
        raise ValueError("latent mixture: scale_tril must be lower-triangular with a positive diagonal")


def default_components(num_classes: int) -> int:
    return DEFAULT_COMPONENTS_PER_CLASS if num_classes else DEFAULT_COMPONENTS


@torch.inference_mode()
def fit_to_model(model, images: torch.Tensor, labels: torch.Tensor, components: int, seed: int = 0,
                 batch_size: int = 500, posterior_samples: bool = False) -> dict:
    """Fit the latent mixture of a VAE (model.VAE) to the posterior means of `images` (uint8 or
    [0, 1] floats, [N, C, H, W]; `labels` [N] for a conditional model, one mixture per class), or
    with posterior_samples to one seeded draw z ~ q(z|x) per image (a prior for the likelihood).
    Returns {"weights", "means", "scale_tril"} for model.set_latent_mixture, on the CPU."""
    was_training = model.training
    model.eval()
    k = model.config.num_classes
    noise = torch.Generator(device=model.device).manual_seed(seed)
    mus = []
    for i in range(0, len(images), batch_size):
        x = to_unit(images[i:i + batch_size].to(model.device))
        y = labels[i:i + batch_size].to(model.device) if k else None
        mu, logvar = model.encode(x, y)
        if posterior_samples:
            mu = model.reparameterize(mu, logvar, generator=noise)
        mus.append(mu.float().cpu())
    model.train(was_training)
    mu = torch.cat(mus)
    groups = [mu] if k == 0 else [mu[labels.cpu() == g] for g in range(k)]
    if min(len(z) for z in groups) == 0:
        raise ValueError("a class has no training image to fit its mixture to")
    components = min(components, *(len(z) for z in groups))  # one K for all, so they stack
    fits = [fit(z, components, seed=seed + g) for g, z in enumerate(groups)]
    return {name: torch.stack([f[i] for f in fits]) for i, name in enumerate(("weights", "means", "scale_tril"))}
