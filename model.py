"""A variational autoencoder for 28x28 grey-level images (MNIST): the probabilistic model.

    p(z) = N(0, I), or a flow learned with the model       prior (StandardNormal, FlowPrior)
    q(z|x) = N(mu(x), diag sigma^2(x))                     Gaussian encoder
    p(x|z) = prod_i Bernoulli(x_i; sigmoid(f(z)_i))        decoder logits f(z)
    L_K(x) = E[log 1/K sum_k p(x|z_k) p(z_k) / q(z_k|x)], z_k ~ q(z|x)   Burda et al. (2015), eq. 8

L_1 is the ELBO (Kingma & Welling 2014, eq. 3); L_K tightens towards log p(x) as K grows. `VAE.loss` is
the training objective -L_K, `VAE.log_likelihood` the importance-sampled log p(x) under any prior. Samples
come from the prior or from a `GaussianMixture` fitted to the posterior means after training (Ghosh et al.
2020, sec. 4). Every size lives in `VAEConfig`; no argparse, no file I/O (lib/checks.py reads checkpoints
and checks the API's arguments). `python model.py` prints the shapes. Papers: Kingma & Welling,
arXiv:1312.6114; Burda, Grosse & Salakhutdinov, arXiv:1509.00519; He et al. (ResBlock), arXiv:1512.03385;
Ghosh et al., arXiv:1903.12436; Dinh et al. (RealNVP), arXiv:1605.08803; Xu et al., arXiv:1903.01240.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from lib.checks import check_config, check_group, check_input, check_latent, is_int, load_model

LOG_2PI = math.log(2 * math.pi)
ACTIVATIONS = {"silu": nn.SiLU, "relu": nn.ReLU, "elu": nn.ELU}
ARCHS = ("conv", "mlp")


@dataclass
class VAEConfig:
    """Every size of the model. A value it cannot take raises UserError (a ValueError) naming the field."""

    image_channels: int = 1
    image_size: int = 28  # square images; the conv arch needs a multiple of 4
    latent_dim: int = 32
    arch: str = "conv"  # "conv" or "mlp" (the pytorch/examples shape)
    hidden_dim: int = 256  # width of the fully connected layer(s), and of the flow prior's coupling nets
    channels: tuple[int, int] = (16, 64)  # conv widths at 1/2 and 1/4 resolution
    # residual blocks in the order the data meets them: (encoder at 1/2, encoder at 1/4, decoder at 1/4, decoder at
    # 1/2 resolution); two ints: (encoder, decoder) at both; one int: all four; None: (0, 0, 0, 1) conv, 0 mlp.
    # Samples are the decoder's: its blocks sharpen them, an encoder's cost as much and add little; at 1/4
    # resolution (c2 channels) a block costs more time than it returns in quality (docs/results.md).
    res_blocks: tuple[int, int, int, int] | tuple[int, int] | int | None = None
    num_classes: int = 0  # > 0: conditional VAE, the label enters encoder and decoder
    activation: str = "silu"  # "silu", "relu" or "elu"
    flow_prior: int = 0  # > 0: p(z) is N(0, I) through this many affine coupling layers trained with the model

    def __post_init__(self) -> None:
        if self.res_blocks is None:
            self.res_blocks = (0, 0, 0, 1) if self.arch == "conv" else 0
        check_config(self, {"arch": ARCHS, "activation": tuple(ACTIVATIONS)})  # ValueError
        rb = (self.res_blocks,) if is_int(self.res_blocks) else tuple(self.res_blocks)
        self.res_blocks = rb * 4 if len(rb) == 1 else (rb[0], rb[0], rb[1], rb[1]) if len(rb) == 2 else rb
        self.channels = tuple(self.channels)

    @property
    def num_pixels(self) -> int:
        return self.image_channels * self.image_size * self.image_size

    def to_dict(self) -> dict:
        return {**asdict(self), "channels": list(self.channels), "res_blocks": list(self.res_blocks)}  # plain types


class LossParts(NamedTuple):
    """The objective and its two terms in nats per image: [B] each, or reduced to scalars."""

    total: torch.Tensor  # what training minimises: -L_K, or recon + beta * KL at K = 1
    recon: torch.Tensor  # -log p(x|z) of the first posterior sample, Bernoulli, summed over pixels
    kl: torch.Tensor  # KL(q(z|x) || p(z)): analytic for N(0, I), else estimated from the K samples


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor, per_dim: bool = False) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) in nats, summed over the last dim (or per dim: per_dim):
    -KL = 1/2 * sum_j (1 + log sigma_j^2 - mu_j^2 - sigma_j^2), Kingma & Welling (2014), App. B."""
    terms = 1 + logvar - mu.pow(2) - logvar.exp()
    return -0.5 * (terms if per_dim else torch.sum(terms, dim=-1))


def bernoulli_nll(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """-log p(x|z) in nats, Bernoulli pixels given decoder logits, summed per image: [B, ...] -> [B].
    Targets: grey levels in [0, 1] (the usual MNIST protocol, the binary cross-entropy) or bits."""
    return F.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(1).sum(dim=1)


def bernoulli_mean(logits: torch.Tensor) -> torch.Tensor:
    """The image a decoder output stands for: the Bernoulli means sigmoid(logits), in [0, 1], same shape."""
    return torch.sigmoid(logits)


def reparameterize(mu: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """z = mu + sigma * eps with eps ~ N(0, I) given (Kingma & Welling 2014, sec. 2.4); eps may
    carry leading sample dims: [K, B, d] with mu [B, d] gives z [K, B, d]."""
    return mu + torch.exp(0.5 * logvar) * eps


def log_normal(x: torch.Tensor, means: torch.Tensor, scale_tril: torch.Tensor) -> torch.Tensor:
    """log N(x; means[m], L_m L_m^T) for every point and component: x [N, d] -> [N, M]. Pass float64: the expansion
    below subtracts terms that grow with |x|^2, which float32 would cancel to noise far from the means."""
    d = x.shape[1]
    precision = torch.cholesky_inverse(scale_tril)  # [M, d, d], (L L^T)^-1 from the factor
    outer = (x.unsqueeze(2) * x.unsqueeze(1)).flatten(1)  # x x^T per point: [N, d * d]
    # (x - mu)^T P (x - mu) = vec(x x^T) . vec(P) - 2 x . P mu + mu^T P mu: two matrix products
    p_mu = (precision @ means.unsqueeze(-1)).squeeze(-1)  # [M, d]
    maha = outer @ precision.flatten(1).T - 2 * x @ p_mu.T + (means * p_mu).sum(1)
    half_logdet = torch.log(torch.diagonal(scale_tril, dim1=-2, dim2=-1)).sum(-1)  # [M]
    return -0.5 * maha - half_logdet - 0.5 * d * LOG_2PI


class StandardNormal(nn.Module):
    """p(z) = N(0, I) on latent_dim dimensions."""

    def __init__(self, latent_dim: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(latent_dim), persistent=False)  # its size and device are used

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        """z = u: noise to z, as FlowPrior.forward (the flow with no layers)."""
        return u

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """[n, d], one torch.randn draw."""
        return torch.randn(n, self.mean.shape[0], generator=generator, device=self.mean.device)

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """log p(z) in nats, fp32: [..., d] -> [...]."""
        return (-0.5 * (z.float().pow(2) + LOG_2PI)).sum(-1)


class FlowPrior(nn.Module):
    """p(z): N(0, I) pushed through L affine coupling layers, z = f(u) = f_L(...f_1(u)), trained with the
    model (RealNVP, Dinh et al. 2017; the prior of a one-stochastic-layer VAE in Xu et al. 2019). Layer i
    keeps the even or the odd dimensions (alternately) and moves the others: y = x * exp(s) + t,
    (s, t) = net_i(kept x), a `hidden_dim`-wide MLP, s bounded by tanh. log p(z) = log N(u; 0, I) +
    log |det df^-1/dz|, u = f^-1(z) (change of variables), the log-det being minus the sum of s over
    layers and dimensions. Each net's last layer starts at zero: training starts at N(0, I)."""

    def __init__(self, layers: int, latent_dim: int, hidden_dim: int, act: type[nn.Module]):
        super().__init__()
        d = latent_dim
        self.base = StandardNormal(d)  # the density of u
        self.register_buffer("masks", torch.stack([(torch.arange(d) + i) % 2 == 0 for i in range(layers)]).float(),
                             persistent=False)  # [L, d], 1: kept
        self.nets = nn.ModuleList(nn.Sequential(nn.Linear(d, hidden_dim), act(), nn.Linear(hidden_dim, hidden_dim),
                                                act(), nn.Linear(hidden_dim, 2 * d)) for _ in range(layers))
        for net in self.nets:
            nn.init.zeros_(net[-1].weight)
            nn.init.zeros_(net[-1].bias)

    def _scale_shift(self, i: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(log scale s, shift t) of layer i from the kept dimensions of x, zero on the kept ones: [N, d] each."""
        m = self.masks[i]
        s, t = self.nets[i](x * m).chunk(2, dim=-1)
        return torch.tanh(s) * (1 - m), t * (1 - m)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        """z = f(u): [N, d] -> [N, d]."""
        for i in range(len(self.nets)):
            s, t = self._scale_shift(i, u)
            u = u * s.exp() + t
        return u

    def inverse(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(u = f^-1(z) [N, d], log |det df^-1/dz| [N]) for z [N, d]."""
        log_det = torch.zeros(z.shape[0], device=z.device, dtype=z.dtype)
        for i in reversed(range(len(self.nets))):
            s, t = self._scale_shift(i, z)
            z = (z - t) * torch.exp(-s)
            log_det = log_det - s.sum(-1)
        return z, log_det

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """[n, d]: one torch.randn draw u, then z = f(u)."""
        return self(self.base.sample(n, generator))

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """log p(z) in nats, fp32 (autocast off: a density needs full precision): [..., d] -> [...]."""
        with torch.autocast(z.device.type, enabled=False):
            u, log_det = self.inverse(z.float().reshape(-1, z.shape[-1]))
            return (self.base.log_prob(u) + log_det).view(z.shape[:-1])


class GaussianMixture(nn.Module):
    """p(z) = sum_m w_m N(z; mu_m, L_m L_m^T), full covariances, for G groups of M components (one
    per class of a conditional model), fitted by EM (lib/mixture.py): weights [G, M], means [G, M, d],
    scale_tril [G, M, d, d]. Buffers outside the state_dict: a checkpoint stores `state()` apart."""

    def __init__(self, weights: torch.Tensor, means: torch.Tensor, scale_tril: torch.Tensor):
        super().__init__()
        for name, t in (("weights", weights), ("means", means), ("scale_tril", scale_tril)):
            self.register_buffer(name, t.float(), persistent=False)

    def state(self) -> dict:
        """The three tensors on the CPU: what a checkpoint stores and __init__ takes back."""
        return {name: getattr(self, name).cpu() for name in ("weights", "means", "scale_tril")}

    def sample(self, n: int, generator: torch.Generator | None = None, group: int | None = None) -> torch.Tensor:
        """[n, d] from one group (None: the only one): n component draws by weight (torch.multinomial), then n normal
        draws (torch.randn), z = mean + L eps, in that order (what "same seed, same images" rests on). UserError (a
        ValueError) for a group that is not one of the mixture's."""
        g = check_group(group, len(self.weights))
        w, m, L = self.weights[g], self.means[g], self.scale_tril[g]
        comp = torch.multinomial(w, n, replacement=True, generator=generator)
        eps = torch.randn(n, m.shape[1], generator=generator, device=m.device)
        return m[comp] + (L[comp] @ eps.unsqueeze(-1)).squeeze(-1)

    def log_prob(self, z: torch.Tensor, group: int | None = None) -> torch.Tensor:
        """log p(z) in nats under one group (None: the only one), in float64, returned fp32: [..., d] -> [...].
        UserError (a ValueError) for a group that is not one of the mixture's."""
        g = check_group(group, len(self.weights))
        w, m, L = (t[g].double() for t in (self.weights, self.means, self.scale_tril))
        flat = z.reshape(-1, z.shape[-1]).double()
        return torch.logsumexp(log_normal(flat, m, L) + w.log(), dim=1).float().view(z.shape[:-1])


class ResBlock(nn.Module):
    """act(x + conv(act(conv(x)))): two 3x3 convolutions that keep the shape [B, C, H, W] (He et al. 2016, fig. 2)."""

    def __init__(self, channels: int, act: type[nn.Module]):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), act(),
                                  nn.Conv2d(channels, channels, 3, padding=1))
        self.act = act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x + self.body(x))


def with_labels(h: torch.Tensor, labels: torch.Tensor | None, num_classes: int) -> torch.Tensor:
    """[B, F] -> [B, F + num_classes]: one-hot labels appended (conditional models), else h."""
    return h if labels is None else torch.cat([h, F.one_hot(labels, num_classes).to(h.dtype)], dim=1)


class VAE(nn.Module):
    """Gaussian encoder q(z|x), prior p(z) (N(0, I) or a FlowPrior), Bernoulli decoder p(x|z);
    optionally a fitted `latent_mixture` to sample z from."""

    def __init__(self, config: VAEConfig | None = None):
        super().__init__()
        self.config = c = config or VAEConfig()
        classes = c.num_classes  # one-hot label width appended to encoder features and to z
        act = ACTIVATIONS[c.activation]
        if c.arch == "conv":
            c1, c2 = c.channels
            s = c.image_size // 4
            self.feat_shape = (c2, s, s)
            feat = c2 * s * s

            enc1, enc2, dec2, dec1 = c.res_blocks  # residual blocks at 1/2 (c1 channels) and 1/4 (c2) resolution

            def blocks(ch, n):
                return [ResBlock(ch, act) for _ in range(n)]

            # Stride-2 4x4 convolutions halve the resolution exactly: 28 -> 14 -> 7.
            self.enc_body = nn.Sequential(
                nn.Conv2d(c.image_channels, c1, 4, stride=2, padding=1), act(), *blocks(c1, enc1),
                nn.Conv2d(c1, c2, 4, stride=2, padding=1), act(), *blocks(c2, enc2),
                nn.Flatten(),
            )  # [B, C, H, W] -> [B, feat]
            self.enc_head = nn.Sequential(nn.Linear(feat + classes, c.hidden_dim), act())
            self.dec_head = nn.Sequential(
                nn.Linear(c.latent_dim + classes, c.hidden_dim), act(),
                nn.Linear(c.hidden_dim, feat), act(),
            )  # [B, latent] -> [B, feat]
            self.dec_body = nn.Sequential(
                *blocks(c2, dec2),
                nn.ConvTranspose2d(c2, c1, 4, stride=2, padding=1), act(), *blocks(c1, dec1),
                nn.ConvTranspose2d(c1, c.image_channels, 4, stride=2, padding=1),
            )  # [B, c2, s, s] -> [B, C, H, W] logits; the last layer's bias is the one --output-bias sets
        else:
            # The pytorch/examples VAE is this with hidden_dim=400, latent_dim=20, ReLU.
            self.enc_body = nn.Flatten()
            self.enc_head = nn.Sequential(nn.Linear(c.num_pixels + classes, c.hidden_dim), act())
            self.dec_head = nn.Sequential(nn.Linear(c.latent_dim + classes, c.hidden_dim), act(),
                                          nn.Linear(c.hidden_dim, c.num_pixels))  # its bias: --output-bias
            self.dec_body = nn.Identity()
        self.to_stats = nn.Linear(c.hidden_dim, 2 * c.latent_dim)  # -> (mu, logvar)
        self.prior = (FlowPrior(c.flow_prior, c.latent_dim, c.hidden_dim, act) if c.flow_prior
                      else StandardNormal(c.latent_dim))
        self.latent_mixture: GaussianMixture | None = None  # set by lib/mixture.py or a checkpoint

    @property
    def device(self) -> torch.device:
        return self.to_stats.weight.device

    def encode(self, x: torch.Tensor, labels=None) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [B, C, H, W] in [0, 1] -> (mu, logvar), each [B, latent_dim]. labels: [B] class
        numbers (a list or an int too) for a conditional model. UserError (a ValueError) for
        pixels outside [0, 1] (checked on the CPU) or labels the model cannot take."""
        return self._encode(x, check_input(self, x, labels))

    def _encode(self, x: torch.Tensor, labels: torch.Tensor | None):
        """encode's network, for inputs already checked (by the public method that takes them)."""
        h = self.enc_head(with_labels(self.enc_body(x), labels, self.config.num_classes))
        return self.to_stats(h).chunk(2, dim=1)

    def decode(self, z: torch.Tensor, labels=None) -> torch.Tensor:
        """z: [B, latent_dim] -> Bernoulli logits [B, C, H, W]. labels: as for `encode`. UserError
        (a ValueError) for a z or labels the model cannot take."""
        return self._decode(z, check_latent(self, z, labels))

    def _decode(self, z: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """decode's network, for latents made or checked by the method calling it."""
        c = self.config
        h = self.dec_head(with_labels(z.float(), labels, c.num_classes))  # fp32 weights (autocast casts on)
        if c.arch == "conv":
            h = self.dec_body(h.view(-1, *self.feat_shape))
        return h.view(-1, c.image_channels, c.image_size, c.image_size)

    def _log_weights(self, x, labels, mu, logvar, eps, priors):
        """The two parts of the log importance weights of z_k = mu + sigma * eps_k, eps [K, B, d]:
        log p(x|z_k) [K, B] and log p(z_k) - log q(z_k|x) [P, K, B], one row per prior (its log_prob given z as
        [K * B, d]). Their sum is the log weight of Burda et al. (2015), eq. 8. The decoder (the costly part) runs
        once for all priors; z and the densities are fp32 whatever the encoder's precision, so that log q(z|x) and
        log p(z) are of one z (a bf16 z would be rounded after eps was drawn)."""
        k, b, d = eps.shape
        z = reparameterize(mu.float(), logvar.float(), eps.float())  # [K, B, d]
        # z.reshape is sample-major, so labels repeat whole: [l_1..l_B, l_1..l_B, ...]
        logits = self._decode(z.reshape(k * b, d), None if labels is None else labels.repeat(k))
        target = x.expand(k, *x.shape).reshape(k * b, *x.shape[1:])
        log_px_z = -bernoulli_nll(logits.float(), target.float()).view(k, b)
        log_q = (-0.5 * (eps.float().pow(2) + logvar.float() + LOG_2PI)).sum(-1)
        return log_px_z, torch.stack([prior.log_prob(z.reshape(k * b, d)).view(k, b) for prior in priors]) - log_q

    def loss(self, x, labels=None, k: int = 1, beta: float = 1.0, eps: torch.Tensor | None = None,
             reduction: str = "mean") -> LossParts:
        """The training objective: the negative importance-weighted bound -L_K (Burda et al. 2015,
        eq. 8) with K posterior samples per image; at K = 1 the negative ELBO, recon + beta * KL
        (Kingma & Welling 2014, eq. 10), to the bit. In nats per image.

            -L_K ~ -[logsumexp_k (a_k + c_k - mean_j c_j) - log K - beta * KL],
            a_k = log p(x|z_k),  c_k = log p(z_k) - log q(z_k|x) + KL

        c_k has mean 0 under q for any parameters, so subtracting its mean over the K samples changes neither the
        bound's expectation nor its expected gradient (the estimate is -L_K in expectation, not sample by sample): a
        control variate, with which K = 1 is exactly the ELBO with the analytic KL. With a learned prior the KL has no
        closed form: its K-sample estimate -mean_k(log p(z_k) - log q(z_k|x)) stands in, and at beta = 1 the objective
        is the plain bound. beta weighs the KL (beta-VAE, KL warm-up; a true bound only at beta = 1). eps: the N(0, I)
        noise [K, B, latent_dim] (None: torch.randn); reduction: "mean" over images, "sum" or "none" ([B]). UserError
        for bad images or labels (as `encode`), k, beta, eps or reduction."""
        labels = check_input(self, x, labels, k, eps=eps, reduction=reduction, beta=beta)
        mu, logvar = self._encode(x, labels)
        if eps is None:
            eps = torch.randn(k, *mu.shape, device=mu.device)
        log_px_z, log_ratio = self._log_weights(x, labels, mu, logvar, eps, (self.prior,))
        closed_form = type(self.prior) is StandardNormal  # else a learned prior, whatever replaced it
        kl = gaussian_kl(mu.float(), logvar.float()) if closed_form else -log_ratio[0].mean(0)
        c = log_ratio[0] + kl
        total = -(torch.logsumexp(log_px_z + (c - c.mean(0)), dim=0) - math.log(k) - beta * kl)
        parts = LossParts(total, -log_px_z[0], kl)
        if reduction == "none":
            return parts
        return LossParts(*(t.mean() if reduction == "mean" else t.sum() for t in parts))

    @torch.no_grad()
    def log_likelihood(self, x, labels=None, k: int = 1000, chunk: int = 10,
                       generator: torch.Generator | None = None, prior=None) -> torch.Tensor:
        """Importance-sampled log p(x) in nats per image, [B] (Burda et al. 2015, eq. 8):

            log p(x) ~ logsumexp_k [log p(x|z_k) + log p(z_k) - log q(z_k|x)] - log K,  z_k ~ q(z|x)

        a lower bound in expectation that tightens with K (K = 1 is the one-sample ELBO). Samples are drawn
        `chunk` at a time (torch.randn [chunk, B, d] from `generator`), so memory stays bounded for
        any K. prior: p(z), an object with log_prob (None: the model's own), or a list of these:
        then [P, B], all from the same samples and one pass of the decoder. UserError (a ValueError) for k
        or chunk that are not ints >= 1, a prior without log_prob, and bad images or labels."""
        several = isinstance(prior, (list, tuple))
        priors = [self.prior if p is None else p for p in (prior if several else [prior])]
        labels = check_input(self, x, labels, k, chunk, priors=priors, generator=generator)
        mu, logvar = self._encode(x, labels)
        mu, logvar = mu.float(), logvar.float()
        total = torch.full((len(priors), mu.shape[0]), -math.inf, device=mu.device)
        for done in range(0, k, chunk):
            eps = torch.randn(min(chunk, k - done), *mu.shape, generator=generator, device=mu.device)
            log_px_z, log_ratios = self._log_weights(x, labels, mu, logvar, eps, priors)
            total = torch.logaddexp(total, torch.logsumexp(log_px_z + log_ratios, dim=1))
        total = total - math.log(k)
        return total if several else total[0]

    @torch.no_grad()
    def sample(self, n: int, labels=None, generator: torch.Generator | None = None,
               prior: bool = False) -> torch.Tensor:
        """n images as Bernoulli means in [0, 1]: [n, C, H, W].

        z comes from the fitted latent mixture when the model has one (for a conditional model,
        each image's from its label's mixture, class by class in increasing order), else, or with
        prior=True, from the model's prior p(z) (N(0, I), or the learned one); all draws from
        `generator`. labels: one label for all n, or n of them (conditional models only).
        UserError (a ValueError) for n < 1, labels the model cannot take, or a latent mixture of other shapes than
        the model's (a group per class, latent_dim dimensions)."""
        labels = check_latent(self, None, labels, n, generator, prior)
        labels = None if labels is None else labels.to(self.device)
        mixture = None if prior else self.latent_mixture
        if mixture is None:
            z = self.prior.sample(n, generator)
        elif labels is None:
            z = mixture.sample(n, generator)
        else:
            z = torch.empty(n, self.config.latent_dim, device=self.device)
            for g in range(self.config.num_classes):
                idx = (labels == g).nonzero().squeeze(1)
                if len(idx):
                    z[idx] = mixture.sample(len(idx), generator, group=g)
        return bernoulli_mean(self._decode(z, labels))

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, labels=None) -> torch.Tensor:
        """Decoder means at the posterior means: [B, C, H, W] -> [B, C, H, W] in [0, 1]. UserError (a ValueError) for
        bad images or labels (as `encode`)."""
        labels = check_input(self, x, labels)
        mu, _ = self._encode(x, labels)
        return bernoulli_mean(self._decode(mu, labels))

    @classmethod
    def from_checkpoint(cls, path, map_location=None) -> "VAE":
        """The model of a checkpoint written by train.py (config, weights, latent mixture), in eval
        mode, on map_location (as torch.load takes it; default: the CPU, where checkpoints keep their
        tensors). Read with torch.load(weights_only=True), so a crafted file cannot run code; anything
        unusable raises UserError (a ValueError) with a one-line message naming the file."""
        return load_model(path, cls, VAEConfig, GaussianMixture, map_location)[0]


if __name__ == "__main__":
    torch.manual_seed(0)
    vae = VAE()
    c = vae.config
    x = torch.rand(8, c.image_channels, c.image_size, c.image_size)  # stands in for [0, 1] images
    mu, logvar = vae.encode(x)
    z = reparameterize(mu, logvar, torch.randn_like(mu))
    logits = vae.decode(z)
    parts = vae.loss(x)
    for name, t in (("x", x), ("mu", mu), ("logvar", logvar), ("z", z), ("logits", logits)):
        print(f"{name:7s} {tuple(t.shape)}")
    print(f"loss    {parts.total.item():.2f} nats/image (recon {parts.recon.item():.2f} + KL {parts.kl.item():.2f}), "
          "untrained, random input")
    print(f"parameters: {sum(p.numel() for p in vae.parameters()):,}")
