"""The training step and its schedule, shared by train.py and benchmarks/epoch_speed.py.

One step: draw the reparameterisation noise, compute the objective (the mean over the batch of
recon + beta * KL, Kingma & Welling 2014, eq. 10; or the importance-weighted bound of Burda et
al. 2015 with K samples), backpropagate, take an Adam step. Everything
that decides a run's numbers is a pure function of the seed and the progress (epoch + step /
steps), so a resumed run replays the run that was never stopped.
"""

from __future__ import annotations

import math

import torch

from data import to_unit
from model import VAE, gaussian_kl


def epoch_permutation(seed: int, epoch: int, n: int) -> torch.Tensor:
    """The shuffling order of one epoch, a pure function of (seed, epoch): resumes replay it."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % 2**63)
    return torch.randperm(n, generator=g)


def make_optimizer(model: VAE, lr: float, device: torch.device) -> torch.optim.Adam:
    """Adam; the fused kernel where the device has one (1.4x the MLP's steps per second on CPU)."""
    return torch.optim.Adam(model.parameters(), lr=lr, fused=device.type in ("cpu", "cuda"))


def learning_rate(lr: float, decay: float, progress: float) -> float:
    """lr * decay ** progress, `progress` in epochs (fractional within an epoch): a smooth decay."""
    return lr * decay ** progress


def kl_weight(beta: float, warmup: int, progress: float) -> float:
    """Linear KL warm-up from 0 to beta over `warmup` epochs; `progress` counts epochs done."""
    return beta if warmup == 0 else beta * min(1.0, progress / warmup)


def objective(model: VAE, x, labels, beta: float, eps, bf16: bool):
    """The loss a step minimises (the mean over the batch of recon + beta * KL) and, for the log,
    [sum of recon, sum of KL] over the batch, detached. x: float images in [0, 1], or the stored
    uint8 ones (converted here, so that a compiled step fuses the conversion).

    bf16: the forward pass runs under bf16 autocast (matmuls and convolutions in bf16, the loss
    in fp32; backward follows the forward's dtypes). Weights and optimiser stay fp32.
    One function, so that `compile_objective` makes forward, loss and sums one graph.
    """
    x = to_unit(x)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        parts = model.loss(x, labels, beta=beta, reduction="none", eps=eps)
    return parts.total.mean(), torch.stack([parts.recon.detach().sum(), parts.kl.detach().sum()])


def compile_objective():
    """`objective` under torch.compile, so the elementwise work (reparameterisation, BCE, KL, bf16
    casts, the batch sums) is fused. The noise is drawn outside it (torch.compile cannot trace a
    torch.Generator; inside, the loss split into six graphs). The first batches of each shape pay
    a compile (~30 s on a 2-core CPU). Evaluation stays eager."""
    return torch.compile(objective)


def iw_objective(model: VAE, x, labels, eps, bf16: bool):
    """The negative importance-weighted bound of Burda et al. (2015), eq. 8, per image, [B]:

        -L_K = -[logsumexp_k (a_k + c_k - mean_j c_j) - log K - KL],
        a_k = log p(x|z_k),  c_k = log p(z_k) - log q(z_k|x) + KL,  z_k = mu + sigma * eps_k

    c_k has mean 0 under q for any parameters, so subtracting its mean over the K samples changes
    neither the bound's expectation nor its expected gradient: it is a control variate, and with
    it K = 1 is exactly today's objective with the analytic KL (a test checks losses and gradients).
    Also returns, for the log, -a_1 (the one-sample reconstruction term) and the KL, each [B].
    x: images in [0, 1] or uint8; eps: [K, B, d]; bf16: as for `objective`.
    """
    x = to_unit(x)
    k = eps.shape[0]
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        mu, logvar = model.encode(x, labels)
        log_px_z, log_ratio = model.importance_terms(x, labels, mu, logvar, eps)
    kl = gaussian_kl(mu.float(), logvar.float())
    c = log_ratio + kl
    bound = torch.logsumexp(log_px_z + (c - c.mean(0)), dim=0) - math.log(k) - kl
    return -bound, -log_px_z[0], kl


# Decoded samples per forward pass of the importance-weighted step: a batch is split into groups
# of images so that K samples of each fit, and the gradients of the groups are added up.
IW_SAMPLES_PER_PASS = 4096


def train_step(model: VAE, opt, x, labels, beta: float, noise: torch.Generator,
               binarize: bool = False, bf16: bool = False, objective_fn=objective,
               iw_k: int = 1) -> torch.Tensor:
    """One Adam step on a batch; returns [sum of recon, sum of KL] as a device tensor (no sync),
    and with iw_k > 1 a third entry, the sum of the negative K-sample bound the step minimises.

    x: as for `objective` (train.py passes the stored uint8 images); bf16: see `objective`;
    objective_fn: `objective` itself or `compile_objective()`; iw_k: importance samples per
    image (1: the ELBO; more: `iw_objective`, eager, memory bounded by IW_SAMPLES_PER_PASS).
    """
    if binarize:  # dynamic binarization: a fresh Bernoulli draw of every pixel, every batch
        x = torch.bernoulli(to_unit(x), generator=noise)
    dtype = torch.bfloat16 if bf16 else torch.float32
    opt.zero_grad(set_to_none=True)
    if iw_k == 1:
        loss, stats = objective_fn(model, x, labels, beta, model.draw_eps(len(x), noise, dtype), bf16)
        loss.backward()
    else:
        b = len(x)
        eps = model.draw_eps(iw_k * b, noise, dtype).view(iw_k, b, -1)
        group = max(1, IW_SAMPLES_PER_PASS // iw_k)
        stats = torch.zeros(3, device=x.device)
        for i in range(0, b, group):
            y = None if labels is None else labels[i:i + group]
            neg_bound, recon, kl = iw_objective(model, x[i:i + group], y, eps[:, i:i + group], bf16)
            (neg_bound.sum() / b).backward()  # the batch mean, added up group by group
            stats += torch.stack([recon.detach().sum(), kl.detach().sum(), neg_bound.detach().sum()])
    opt.step()
    return stats


def check_adam_state(state: dict, params: list, source: str) -> None:
    """Raise ValueError unless `state` is an Adam state dict for exactly these parameters: one group,
    sane hyper-parameters, per-parameter step, exp_avg and exp_avg_sq of the right shapes, finite.
    (Optimizer.load_state_dict checks the group sizes only; anything else would fail, or silently
    mislead, at the first step.)"""
    def number(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    groups = state.get("param_groups") if isinstance(state, dict) else None
    if not isinstance(groups, list) or len(groups) != 1 or not isinstance(groups[0], dict):
        raise ValueError(f"{source}: expected one parameter group")
    g = groups[0]
    if g.get("params") != list(range(len(params))):
        raise ValueError(f"{source}: its parameter group does not list this model's {len(params)} parameters")
    betas = g.get("betas")
    if not (isinstance(betas, (list, tuple)) and len(betas) == 2 and all(number(b) and 0 <= b < 1 for b in betas)):
        raise ValueError(f"{source}: betas must be two numbers in [0, 1), got {betas!r}")
    for name in ("lr", "eps", "weight_decay"):
        if not number(g.get(name)) or g[name] < 0:
            raise ValueError(f"{source}: {name} must be a finite number >= 0, got {g.get(name)!r}")
    per_param = state.get("state")
    if not isinstance(per_param, dict) or not set(per_param) <= set(range(len(params))):
        raise ValueError(f"{source}: its state is not keyed by this model's parameters")
    for i, s in per_param.items():
        if not isinstance(s, dict) or set(s) != {"step", "exp_avg", "exp_avg_sq"}:
            raise ValueError(f"{source}: parameter {i}: expected step, exp_avg and exp_avg_sq")
        step = s["step"]
        if not (isinstance(step, torch.Tensor) and step.numel() == 1 and step.is_floating_point()
                and torch.isfinite(step).all() and step.item() >= 0):
            raise ValueError(f"{source}: parameter {i}: step must be a finite float tensor >= 0")
        for name in ("exp_avg", "exp_avg_sq"):
            t = s[name]
            if not (isinstance(t, torch.Tensor) and t.dtype == params[i].dtype and t.shape == params[i].shape):
                raise ValueError(f"{source}: parameter {i}: {name} must be a {params[i].dtype} tensor "
                                 f"of shape {list(params[i].shape)}")
            if not torch.isfinite(t).all() or (name == "exp_avg_sq" and (t < 0).any()):
                raise ValueError(f"{source}: parameter {i}: {name} holds non-finite or negative values")
