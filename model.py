"""A variational autoencoder for 28x28 grey-level images (MNIST).

One module, no argparse and no file I/O (`from_checkpoint` hands reading to checkpoint.py).
Every size lives in `VAEConfig`. `python model.py` runs the default model on a random batch and
prints the shapes.

References
- Kingma & Welling (2014), "Auto-Encoding Variational Bayes", arXiv:1312.6114.
  The ELBO (eq. 3/10), the reparameterisation trick (sec. 2.4) and the analytic
  Gaussian KL (App. B).
- Burda, Grosse & Salakhutdinov (2015), "Importance Weighted Autoencoders",
  arXiv:1509.00519, for the importance-sampled log-likelihood in `log_likelihood`.
- He, Zhang, Ren & Sun (2016), "Deep Residual Learning for Image Recognition", arXiv:1512.03385,
  for the residual blocks (`res_blocks`) of the conv encoder and decoder.
- Ghosh et al. (2020), "From Variational to Deterministic Autoencoders", sec. 4: sampling z from
  a mixture fitted to the posterior means ("ex-post density estimation", mixture.py).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

import mixture
from checkpoint import CheckpointError, first_line, load_checkpoint

LOG_2PI = math.log(2 * math.pi)
ACTIVATIONS = {"silu": nn.SiLU, "relu": nn.ReLU, "elu": nn.ELU}
# Upper bounds on the sizes, far above any useful MNIST model: a config from a flag or a
# checkpoint that asks for more is refused before torch tries to allocate it.
MAX_SIZE = {"image_channels": 64, "image_size": 1024, "latent_dim": 4096, "hidden_dim": 65536,
            "num_classes": 1000, "channels": 4096, "res_blocks": 64}


@dataclass
class VAEConfig:
    image_channels: int = 1
    image_size: int = 28  # square images; the conv arch needs a multiple of 4
    latent_dim: int = 32
    arch: str = "conv"  # "conv" (default) or "mlp" (the pytorch/examples shape)
    hidden_dim: int = 256  # width of the fully connected layer(s)
    channels: tuple[int, int] = (32, 64)  # conv widths at 1/2 and 1/4 resolution
    # Residual blocks at each of the two resolutions, encoder and decoder (conv only). None: 1 with
    # the conv arch (it reaches the plain conv's test loss sooner, and samples better), 0 with mlp.
    res_blocks: int | None = None
    num_classes: int = 0  # > 0: conditional VAE, the label enters encoder and decoder
    activation: str = "silu"  # "silu", "relu" or "elu"; SiLU trained best here

    def __post_init__(self) -> None:
        def is_int(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        if not isinstance(self.channels, (list, tuple)) or not all(is_int(c) for c in self.channels):
            raise ValueError(f"channels must be a list of ints, got {self.channels!r}")
        self.channels = tuple(self.channels)
        for name in ("arch", "activation"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"{name} must be a string, got {getattr(self, name)!r}")
        if self.arch not in ("conv", "mlp"):
            raise ValueError(f"arch must be 'conv' or 'mlp', got {self.arch!r}")
        if self.res_blocks is None:
            self.res_blocks = 1 if self.arch == "conv" else 0
        for name in ("image_channels", "image_size", "latent_dim", "hidden_dim", "num_classes", "res_blocks"):
            v, low = getattr(self, name), 0 if name in ("num_classes", "res_blocks") else 1
            if not is_int(v) or not low <= v <= MAX_SIZE[name]:
                raise ValueError(f"{name} must be an int in [{low}, {MAX_SIZE[name]}], got {v!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {self.activation!r}")
        if self.arch == "mlp" and self.res_blocks:
            raise ValueError(f"res_blocks needs the conv arch, got {self.res_blocks} with arch 'mlp'")
        if self.arch == "conv":
            if self.image_size % 4:
                raise ValueError(f"the conv arch needs image_size % 4 == 0, got {self.image_size}")
            if len(self.channels) != 2 or not all(1 <= c <= MAX_SIZE["channels"] for c in self.channels):
                raise ValueError(f"channels must be two ints in [1, {MAX_SIZE['channels']}], got {list(self.channels)}")

    @property
    def num_pixels(self) -> int:
        return self.image_channels * self.image_size * self.image_size

    def to_dict(self) -> dict:
        d = asdict(self)
        d["channels"] = list(self.channels)  # plain types only: weights_only=True can load it
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "VAEConfig":
        if not isinstance(d, dict) or not all(isinstance(k, str) for k in d):
            raise ValueError("model config must be a dict with string keys")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown model config keys: {', '.join(unknown)}")
        # A config saved before res_blocks existed describes a model without residual blocks; a
        # saved config holds the number itself, never None (the default a new config resolves).
        d = {"res_blocks": 0, **d}
        if d["res_blocks"] is None:
            raise ValueError("res_blocks must be an int, got None")
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


class ResBlock(nn.Module):
    """act(x + conv(act(conv(x)))): a residual block of two 3x3 convolutions that keeps the shape
    [B, C, H, W] (He et al. 2016, fig. 2). Each adds two convolutions of the resolution's width: at
    the default widths, one block per resolution (the default) costs 2.4x the training time per
    epoch of none, and reaches the same test loss sooner (docs/results.md)."""

    def __init__(self, channels: int, act: type[nn.Module]):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), act(),
                                  nn.Conv2d(channels, channels, 3, padding=1))
        self.act = act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x + self.body(x))


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

            def blocks(ch):  # c.res_blocks residual blocks at one resolution
                return [ResBlock(ch, act) for _ in range(c.res_blocks)]

            # Stride-2 4x4 convolutions halve the resolution exactly: 28 -> 14 -> 7.
            self.enc_body = nn.Sequential(
                nn.Conv2d(c.image_channels, c1, 4, stride=2, padding=1), act(), *blocks(c1),
                nn.Conv2d(c1, c2, 4, stride=2, padding=1), act(), *blocks(c2),
                nn.Flatten(),
            )  # [B, C, H, W] -> [B, feat]
            self.enc_head = nn.Sequential(nn.Linear(feat + k, c.hidden_dim), act())
            self.dec_head = nn.Sequential(
                nn.Linear(c.latent_dim + k, c.hidden_dim), act(),
                nn.Linear(c.hidden_dim, feat), act(),
            )  # [B, latent] -> [B, feat]
            self.dec_body = nn.Sequential(
                *blocks(c2),
                nn.ConvTranspose2d(c2, c1, 4, stride=2, padding=1), act(), *blocks(c1),
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
    def _as_labels(self, labels) -> torch.Tensor:
        """Labels (an int, a list or a tensor of ints) as a 1-d long tensor on the model's device."""
        labels = torch.as_tensor(labels, device=self.device)
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise ValueError(f"labels must be integer class numbers, got dtype {labels.dtype}")
        return labels.long().reshape(-1)

    def _with_labels(self, h: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        k = self.config.num_classes
        if k == 0:
            if labels is not None:
                raise ValueError("this VAE is unconditional: it takes no labels")
            return h
        if labels is None:
            raise ValueError("this VAE is conditional: pass labels (digit classes)")
        labels = self._as_labels(labels)
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
        """x: [B, C, H, W] in [0, 1] -> (mu, logvar), each [B, latent_dim].

        Pixels outside [0, 1] (0-255 grey levels, say) are refused with a ValueError on the CPU;
        on a GPU the check would stall every step on a host sync, so there it is the caller's.
        """
        c = self.config
        if tuple(x.shape[1:]) != (c.image_channels, c.image_size, c.image_size):
            raise ValueError(f"x must be [B, {c.image_channels}, {c.image_size}, {c.image_size}], "
                             f"got {list(x.shape)}")
        if x.device.type == "cpu" and x.numel() and not torch.compiler.is_compiling():
            low, high = torch.aminmax(x)
            if not (low >= 0 and high <= 1):  # also catches NaN
                raise ValueError(f"x must hold pixel values in [0, 1], got values in [{low.item():g}, "
                                 f"{high.item():g}] (divide 0-255 grey levels by 255)")
        h = self.enc_head(self._with_labels(self.enc_body(x), labels))
        mu, logvar = self.to_stats(h).chunk(2, dim=1)
        return mu, logvar

    def draw_eps(self, n: int, generator: torch.Generator | None = None,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The N(0, I) noise of `reparameterize` for n images, [n, latent_dim], drawn as it draws it.

        Training draws it outside the loss so that a compiled loss is one graph. Under bf16 autocast
        mu is bf16, and so is the model's own draw: pass dtype=torch.bfloat16 to match it.
        """
        return torch.randn(n, self.config.latent_dim, generator=generator, device=self.device, dtype=dtype)

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

    # -- the latent mixture (mixture.py) -----------------------------------------------------
    def set_latent_mixture(self, fitted: dict | None) -> None:
        """Sample z from this Gaussian mixture instead of N(0, I) (None: back to the prior).

        fitted: {"weights" [G, K], "means" [G, K, d], "scale_tril" [G, K, d, d]}, G = 1, or one
        mixture per class for a conditional model (mixture.fit_to_model makes it). Kept as
        non-persistent buffers: they follow .to(device) but stay out of state_dict, so every
        checkpoint's weights load the same way; the checkpoint stores the mixture on its own.
        """
        names = ("weights", "means", "scale_tril")
        if fitted is None:
            for name in names:
                self._buffers.pop("mixture_" + name, None)
            return
        mixture.check(fitted, self.config.latent_dim, max(1, self.config.num_classes))
        for name in names:
            self.register_buffer("mixture_" + name, fitted[name].float().to(self.device), persistent=False)

    @property
    def latent_mixture(self) -> dict | None:
        """The fitted mixture as plain tensors (what a checkpoint stores), or None."""
        if getattr(self, "mixture_weights", None) is None:
            return None
        return {name: getattr(self, "mixture_" + name).cpu() for name in ("weights", "means", "scale_tril")}

    # -- convenience for notebooks and scripts -----------------------------------------------
    @torch.no_grad()
    def sample(self, n: int, labels=None, generator: torch.Generator | None = None,
               prior: bool = False) -> torch.Tensor:
        """n images as Bernoulli means in [0, 1]: [n, C, H, W].

        z comes from the fitted latent mixture when the model has one (for a conditional model,
        the mixture of each image's label), else, or with prior=True, from N(0, I).
        labels: one label for all n, or n of them (conditional models only).
        """
        c = self.config
        if labels is not None:
            labels = self._as_labels(labels)
            if labels.numel() == 1:
                labels = labels.expand(n)
        if prior or getattr(self, "mixture_weights", None) is None:
            z = torch.randn(n, c.latent_dim, generator=generator, device=self.device)
        elif c.num_classes == 0:
            z = mixture.sample(self.mixture_weights[0], self.mixture_means[0], self.mixture_scale_tril[0],
                               n, generator)
        else:
            self._with_labels(torch.empty(n, 0, device=self.device), labels)  # checks the labels
            z = torch.empty(n, c.latent_dim, device=self.device)
            for g in range(c.num_classes):  # each class from its own mixture, in a fixed order
                idx = (labels == g).nonzero().squeeze(1)
                if len(idx):
                    z[idx] = mixture.sample(self.mixture_weights[g], self.mixture_means[g],
                                            self.mixture_scale_tril[g], len(idx), generator)
        return torch.sigmoid(self.decode(z, labels))

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, labels=None) -> torch.Tensor:
        """Decoder means at the posterior means: [B, C, H, W] -> [B, C, H, W] in [0, 1]."""
        mu, _ = self.encode(x.to(self.device), labels)
        return torch.sigmoid(self.decode(mu, labels))

    def importance_terms(self, x, labels, mu, logvar, eps, prior: dict | None = None):
        """The two parts of the log importance weights of K posterior samples per image:
        (log p(x|z_k), log p(z_k) - log q(z_k|x)), each [K, B], for z_k = mu + sigma * eps_k.

        x: [B, C, H, W]; mu, logvar: the encoder's [B, d]; eps: [K, B, d]. Their sum is the log
        weight of Burda et al. (2015), eq. 8; computed in fp32 whatever the decoder's precision.
        prior: None for N(0, I), or one mixture {"weights" [M], "means" [M, d], "scale_tril"
        [M, d, d]} (mixture.py) as p(z).
        """
        log_px_z, log_ratios = self._importance_terms(x, labels, mu, logvar, eps, (prior,))
        return log_px_z, log_ratios[0]

    def _importance_terms(self, x, labels, mu, logvar, eps, priors):
        """importance_terms for several priors at once: the decoder (the costly part) runs once.
        Returns log p(x|z) [K, B] and log p(z) - log q(z|x) [P, K, B], one row per prior."""
        k, b, d = eps.shape
        z = self.reparameterize(mu, logvar, eps=eps)  # [K, B, d]
        # z.reshape is sample-major, so labels repeat whole: [l_1..l_B, l_1..l_B, ...]
        logits = self.decode(z.reshape(k * b, d), None if labels is None else labels.repeat(k))
        target = x.expand(k, *x.shape).reshape(k * b, *x.shape[1:])
        log_px_z = -bernoulli_nll(logits.float(), target.float()).view(k, b)
        log_q = (-0.5 * (eps.float().pow(2) + logvar.float() + LOG_2PI)).sum(-1)
        log_p_z = []
        for prior in priors:
            if prior is None:
                log_p_z.append((-0.5 * (z.float().pow(2) + LOG_2PI)).sum(-1))
            else:
                log_p_z.append(mixture.log_density(z.reshape(k * b, d).double(), *(
                    prior[name].double() for name in ("weights", "means", "scale_tril"))).float().view(k, b))
        return log_px_z, torch.stack(log_p_z) - log_q

    @torch.no_grad()
    def log_likelihood(self, x, labels=None, k: int = 1000, chunk: int = 10,
                       generator: torch.Generator | None = None, prior: dict | None = None) -> torch.Tensor:
        """Importance-sampled log p(x) per image, [B] (Burda et al. 2015, eq. 8):

        log p(x) ~ logsumexp_k [log p(x|z_k) + log p(z_k) - log q(z_k|x)] - log K, z_k ~ q(z|x).
        Samples are drawn `chunk` at a time so memory stays bounded whatever K is. prior: p(z) as
        in `importance_terms` (default N(0, I), the prior the model was trained with).
        """
        return self.log_likelihoods(x, labels, k, chunk, generator, priors=(prior,))[0]

    @torch.no_grad()
    def log_likelihoods(self, x, labels=None, k: int = 1000, chunk: int = 10,
                        generator: torch.Generator | None = None, priors=(None,)) -> torch.Tensor:
        """log_likelihood under each of several priors p(z), [P, B], from the same K samples (so the
        decoder runs once, and row p equals log_likelihood(..., prior=priors[p]) for the same noise)."""
        for name, v in (("k", k), ("chunk", chunk)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        if labels is not None:
            labels = self._as_labels(labels)
        mu, logvar = self.encode(x, labels)
        mu, logvar = mu.float(), logvar.float()
        b, d = mu.shape
        total = torch.full((len(priors), b), -math.inf, device=mu.device)
        done = 0
        while done < k:
            m = min(chunk, k - done)
            eps = torch.randn(m, b, d, generator=generator, device=mu.device)
            log_px_z, log_ratios = self._importance_terms(x, labels, mu, logvar, eps, priors)
            total = torch.logaddexp(total, torch.logsumexp(log_px_z + log_ratios, dim=1))
            done += m
        return total - math.log(k)

    # -- checkpoints -------------------------------------------------------------------------
    @classmethod
    def from_checkpoint(cls, path, map_location=None) -> "VAE":
        """Rebuild the model from a checkpoint written by train.py (config + weights), in eval mode.

        The file is read by checkpoint.load_checkpoint (weights_only=True, so a crafted pickle
        cannot run code); anything unusable raises CheckpointError, a ValueError whose one-line
        message names the file.
        """
        return cls.from_saved(load_checkpoint(path, map_location), path)

    @classmethod
    def from_saved(cls, ckpt: dict, source: str = "checkpoint") -> "VAE":
        """The model (eval mode, on the device of the stored weights) from a loaded checkpoint dict:
        its `model_config` and `model` (state dict). Errors name `source`."""
        try:
            model = cls(VAEConfig.from_dict(ckpt["model_config"]))
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{source}: bad model config ({first_line(e)})") from None
        try:
            model.load_state_dict(ckpt["model"])
        except RuntimeError as e:
            raise CheckpointError(f"{source}: weights do not fit the stored model config ({first_line(e)})") from None
        weights = next(iter(ckpt["model"].values()), None)
        if isinstance(weights, torch.Tensor):
            model.to(weights.device)
        if ckpt.get("latent_mixture") is not None:
            try:
                model.set_latent_mixture(ckpt["latent_mixture"])
            except ValueError as e:
                raise CheckpointError(f"{source}: {first_line(e)}") from None
        return model.eval()


if __name__ == "__main__":
    # A forward pass of the default model on a random batch, to see the shapes.
    torch.manual_seed(0)
    vae = VAE()
    c = vae.config
    x = torch.rand(8, c.image_channels, c.image_size, c.image_size)  # stands in for [0, 1] images
    mu, logvar = vae.encode(x)
    z = vae.reparameterize(mu, logvar)
    logits = vae.decode(z)
    parts = vae.loss(x)
    print(f"x       {tuple(x.shape)}")
    print(f"mu      {tuple(mu.shape)}")
    print(f"logvar  {tuple(logvar.shape)}")
    print(f"z       {tuple(z.shape)}")
    print(f"logits  {tuple(logits.shape)}")
    print(f"loss    {parts.total.item():.2f} nats/image (recon {parts.recon.item():.2f} + KL {parts.kl.item():.2f}), "
          "untrained, random input")
    print(f"parameters: {sum(p.numel() for p in vae.parameters()):,}")
