"""A variational autoencoder for 28x28 grey-level images (MNIST).

One module, no I/O besides `from_checkpoint`, no argparse. Every size lives in `VAEConfig`.

References
- Kingma & Welling (2014), "Auto-Encoding Variational Bayes", arXiv:1312.6114.
  The ELBO (eq. 3/10), the reparameterisation trick (sec. 2.4) and the analytic
  Gaussian KL (App. B).
- Burda, Grosse & Salakhutdinov (2015), "Importance Weighted Autoencoders",
  arXiv:1509.00519, for the importance-sampled log-likelihood in `log_likelihood`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

LOG_2PI = math.log(2 * math.pi)
ACTIVATIONS = {"silu": nn.SiLU, "relu": nn.ReLU, "elu": nn.ELU}


@dataclass
class VAEConfig:
    image_channels: int = 1
    image_size: int = 28  # square images; the conv arch needs a multiple of 4
    latent_dim: int = 32
    arch: str = "conv"  # "conv" (default) or "mlp" (the pytorch/examples shape)
    hidden_dim: int = 256  # width of the fully connected layer(s)
    channels: tuple[int, int] = (32, 64)  # conv widths at 1/2 and 1/4 resolution
    num_classes: int = 0  # > 0: conditional VAE, the label enters encoder and decoder
    activation: str = "silu"  # "silu", "relu" or "elu"; SiLU trained best here

    def __post_init__(self) -> None:
        self.channels = tuple(int(c) for c in self.channels)
        if self.arch not in ("conv", "mlp"):
            raise ValueError(f"arch must be 'conv' or 'mlp', got {self.arch!r}")
        for name in ("image_channels", "image_size", "latent_dim", "hidden_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {self.activation!r}")
        if self.num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {self.num_classes}")
        if self.arch == "conv":
            if self.image_size % 4:
                raise ValueError(f"the conv arch needs image_size % 4 == 0, got {self.image_size}")
            if len(self.channels) != 2 or min(self.channels) < 1:
                raise ValueError(f"channels must be two positive ints, got {self.channels}")

    @property
    def num_pixels(self) -> int:
        return self.image_channels * self.image_size * self.image_size

    def to_dict(self) -> dict:
        d = asdict(self)
        d["channels"] = list(self.channels)  # plain types only: weights_only=True can load it
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "VAEConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown model config keys: {', '.join(unknown)}")
        return cls(**d)


class LossParts(NamedTuple):
    """Per-image negative ELBO and its two terms, in nats (shape [B], or scalars when reduced)."""

    total: torch.Tensor  # recon + beta * kl
    recon: torch.Tensor  # -log p(x|z), Bernoulli, summed over pixels
    kl: torch.Tensor  # KL(q(z|x) || N(0, I)), analytic


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor, per_dim: bool = False) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) summed over the last dim, or per dimension (per_dim).

    Kingma & Welling (2014), App. B: -KL = 1/2 * sum_j (1 + log sigma_j^2 - mu_j^2 - sigma_j^2).
    """
    terms = 1 + logvar - mu.pow(2) - logvar.exp()
    return -0.5 * (terms if per_dim else torch.sum(terms, dim=-1))


def bernoulli_nll(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """-log p(x|z) for Bernoulli pixels given decoder logits, summed per image: [B, ...] -> [B].

    Targets may be grey levels in [0, 1] (the usual MNIST protocol, then this is the binary
    cross-entropy) or binarized pixels. `binary_cross_entropy_with_logits` is the stable form.
    """
    nll = F.binary_cross_entropy_with_logits(logits, x, reduction="none")
    return nll.flatten(1).sum(dim=1)


class VAE(nn.Module):
    """Gaussian encoder q(z|x), standard normal prior p(z), Bernoulli decoder p(x|z)."""

    def __init__(self, config: VAEConfig | None = None):
        super().__init__()
        self.config = c = config or VAEConfig()
        k = c.num_classes  # one-hot label width appended to encoder features and to z
        act = ACTIVATIONS[c.activation]
        if c.arch == "conv":
            c1, c2 = c.channels
            s = c.image_size // 4
            self.feat_shape = (c2, s, s)
            feat = c2 * s * s
            # Stride-2 4x4 convolutions halve the resolution exactly: 28 -> 14 -> 7.
            self.enc_body = nn.Sequential(
                nn.Conv2d(c.image_channels, c1, 4, stride=2, padding=1), act(),
                nn.Conv2d(c1, c2, 4, stride=2, padding=1), act(),
                nn.Flatten(),
            )  # [B, C, H, W] -> [B, feat]
            self.enc_head = nn.Sequential(nn.Linear(feat + k, c.hidden_dim), act())
            self.dec_head = nn.Sequential(
                nn.Linear(c.latent_dim + k, c.hidden_dim), act(),
                nn.Linear(c.hidden_dim, feat), act(),
            )  # [B, latent] -> [B, feat]
            self.dec_body = nn.Sequential(
                nn.ConvTranspose2d(c2, c1, 4, stride=2, padding=1), act(),
                nn.ConvTranspose2d(c1, c.image_channels, 4, stride=2, padding=1),
            )  # [B, c2, s, s] -> [B, C, H, W] logits
        else:
            # The pytorch/examples VAE is this with hidden_dim=400, latent_dim=20, ReLU.
            self.enc_body = nn.Flatten()
            self.enc_head = nn.Sequential(nn.Linear(c.num_pixels + k, c.hidden_dim), act())
            self.dec_head = nn.Sequential(
                nn.Linear(c.latent_dim + k, c.hidden_dim), act(),
                nn.Linear(c.hidden_dim, c.num_pixels),
            )
            self.dec_body = nn.Identity()
        self.to_stats = nn.Linear(c.hidden_dim, 2 * c.latent_dim)  # -> (mu, logvar)

    # -- helpers ----------------------------------------------------------------------------
    def _with_labels(self, h: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        k = self.config.num_classes
        if k == 0:
            if labels is not None:
                raise ValueError("this VAE is unconditional: it takes no labels")
            return h
        if labels is None:
            raise ValueError("this VAE is conditional: pass labels (digit classes)")
        labels = torch.as_tensor(labels, device=h.device).long().reshape(-1)
        if labels.shape[0] != h.shape[0]:
            raise ValueError(f"got {labels.shape[0]} labels for a batch of {h.shape[0]}")
        # Checked on the CPU only: on a GPU the comparison would stall the step on a host sync.
        if labels.device.type == "cpu" and labels.numel() and (labels.min() < 0 or labels.max() >= k):
            raise ValueError(f"labels must be in [0, {k - 1}]")
        return torch.cat([h, F.one_hot(labels, k).to(h.dtype)], dim=1)

    @property
    def device(self) -> torch.device:
        return self.to_stats.weight.device

    # -- the model --------------------------------------------------------------------------
    def encode(self, x: torch.Tensor, labels: torch.Tensor | None = None):
        """x: [B, C, H, W] in [0, 1] -> (mu, logvar), each [B, latent_dim]."""
        h = self.enc_head(self._with_labels(self.enc_body(x), labels))
        mu, logvar = self.to_stats(h).chunk(2, dim=1)
        return mu, logvar

    @staticmethod
    def reparameterize(mu, logvar, generator: torch.Generator | None = None,
                       eps: torch.Tensor | None = None):
        """z = mu + sigma * eps, eps ~ N(0, I) (Kingma & Welling 2014, sec. 2.4).

        eps: a given draw, [B, latent_dim], instead of one from `generator`. torch.compile cannot
        trace a Generator, so a compiled training step draws eps outside and passes it in.
        """
        if eps is None:
            eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        return mu + torch.exp(0.5 * logvar) * eps

    def decode(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """z: [B, latent_dim] -> Bernoulli logits [B, C, H, W]."""
        c = self.config
        h = self.dec_head(self._with_labels(z, labels))
        if c.arch == "conv":
            h = self.dec_body(h.view(-1, *self.feat_shape))
        return h.view(-1, c.image_channels, c.image_size, c.image_size)

    def forward(self, x, labels=None, generator=None, eps=None):
        """x -> (logits, mu, logvar) with one posterior sample z (eps: see reparameterize)."""
        mu, logvar = self.encode(x, labels)
        z = self.reparameterize(mu, logvar, generator, eps)
        return self.decode(z, labels), mu, logvar

    def loss(self, x, labels=None, beta: float = 1.0, generator=None,
             reduction: str = "mean", eps=None) -> LossParts:
        """Negative ELBO with one posterior sample (Kingma & Welling 2014, eq. 10).

        `beta` weighs the KL (beta = 1 is the true ELBO). reduction "mean" averages over
        images, "sum" adds them, "none" keeps [B]. eps: see reparameterize.
        """
        logits, mu, logvar = self(x, labels, generator, eps)
        recon = bernoulli_nll(logits.float(), x.float())
        kl = gaussian_kl(mu.float(), logvar.float())
        parts = LossParts(recon + beta * kl, recon, kl)
        if reduction == "none":
            return parts
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
        op = torch.mean if reduction == "mean" else torch.sum
        return LossParts(*(op(t) for t in parts))

    # -- convenience for notebooks and scripts -----------------------------------------------
    @torch.no_grad()
    def sample(self, n: int, labels=None, generator: torch.Generator | None = None):
        """n images from the prior, as Bernoulli means in [0, 1]: [n, C, H, W]."""
        z = torch.randn(n, self.config.latent_dim, generator=generator, device=self.device)
        if labels is not None:
            labels = torch.as_tensor(labels, device=self.device).long().reshape(-1)
            if labels.numel() == 1:
                labels = labels.expand(n)
        return torch.sigmoid(self.decode(z, labels))

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, labels=None) -> torch.Tensor:
        """Decoder means at the posterior means: [B, C, H, W] -> [B, C, H, W] in [0, 1]."""
        mu, _ = self.encode(x.to(self.device), labels)
        return torch.sigmoid(self.decode(mu, labels))

    @torch.no_grad()
    def log_likelihood(self, x, labels=None, k: int = 1000, chunk: int = 100,
                       generator: torch.Generator | None = None) -> torch.Tensor:
        """Importance-sampled log p(x) per image, [B] (Burda et al. 2015, eq. 8):

        log p(x) ~ logsumexp_k [log p(x|z_k) + log p(z_k) - log q(z_k|x)] - log K, z_k ~ q(z|x).
        Samples are drawn `chunk` at a time so memory stays bounded whatever K is.
        """
        if k < 1 or chunk < 1:
            raise ValueError("k and chunk must be >= 1")
        mu, logvar = self.encode(x, labels)
        mu, logvar = mu.float(), logvar.float()
        std = torch.exp(0.5 * logvar)
        b, d = mu.shape
        total = torch.full((b,), -math.inf, device=mu.device)
        done = 0
        while done < k:
            m = min(chunk, k - done)
            eps = torch.randn(m, b, d, generator=generator, device=mu.device)
            z = mu + std * eps  # [m, B, d]
            log_q = (-0.5 * (eps.pow(2) + logvar + LOG_2PI)).sum(-1)
            log_p_z = (-0.5 * (z.pow(2) + LOG_2PI)).sum(-1)
            # z.reshape is sample-major, so labels repeat whole: [l_1..l_B, l_1..l_B, ...]
            logits = self.decode(z.reshape(m * b, d), None if labels is None else labels.repeat(m))
            tgt = x.expand(m, *x.shape).reshape(m * b, *x.shape[1:])
            log_px_z = -bernoulli_nll(logits.float(), tgt.float()).view(m, b)
            w = log_px_z + log_p_z - log_q  # [m, B] log importance weights
            total = torch.logaddexp(total, torch.logsumexp(w, dim=0))
            done += m
        return total - math.log(k)

    # -- checkpoints -------------------------------------------------------------------------
    @classmethod
    def from_checkpoint(cls, path, map_location=None) -> "VAE":
        """Rebuild the model from a checkpoint written by train.py (config + weights), in eval mode.

        The file I/O lives in checkpoint.py (loaded with weights_only=True, so a crafted pickle
        cannot run code); anything unusable raises checkpoint.CheckpointError, a ValueError whose
        one-line message names the file.
        """
        from checkpoint import load_model  # deferred: checkpoint.py imports this module

        return load_model(path, map_location)[0]

