"""The model's API: shapes, the loss, labels, the config, the latent mixture, checkpoints."""

import numpy as np
import pytest
import torch

from conftest import SMALL, SMALL3
from lib.data import TensorDataset
from model import LOG_2PI, VAE, GaussianMixture, ResBlock, StandardNormal, VAEConfig, reparameterize


@pytest.mark.parametrize("cfg", [VAEConfig(**SMALL), VAEConfig(arch="mlp", hidden_dim=40, latent_dim=3),
                                 VAEConfig(**SMALL, num_classes=10), VAEConfig(**SMALL, res_blocks=0),
                                 VAEConfig(**SMALL, res_blocks=2), VAEConfig()])
def test_shapes(cfg):
    torch.manual_seed(0)
    m = VAE(cfg)
    x = torch.rand(5, 1, 28, 28)
    y = torch.arange(5) if cfg.num_classes else None
    mu, logvar = m.encode(x, y)
    assert mu.shape == logvar.shape == (5, cfg.latent_dim)
    z = reparameterize(mu, logvar, torch.randn(5, cfg.latent_dim))
    assert z.shape == (5, cfg.latent_dim)
    logits = m.decode(z, y)
    assert logits.shape == (5, 1, 28, 28)
    parts = m.loss(x, y, reduction="none")
    assert all(t.shape == (5,) for t in parts)
    assert torch.allclose(parts.total, parts.recon + parts.kl)
    s = m.sample(7, labels=None if y is None else 3)
    r = m.reconstruct(x, y)
    assert s.shape == (7, 1, 28, 28) and r.shape == (5, 1, 28, 28)
    assert 0 <= s.min() and s.max() <= 1 and 0 <= r.min() and r.max() <= 1


def test_beta_weighs_kl():
    torch.manual_seed(0)
    m, x = VAE(VAEConfig(**SMALL)), torch.rand(4, 1, 28, 28)
    eps = torch.randn(1, 4, SMALL["latent_dim"])  # the same noise both times
    a, b = m.loss(x, eps=eps), m.loss(x, beta=0.25, eps=eps)
    assert torch.allclose(b.total, a.recon + 0.25 * a.kl)


def test_loss_finite_and_falls_on_real_digits(mnist_subset):
    x, _ = mnist_subset
    torch.manual_seed(0)
    m = VAE(VAEConfig(**SMALL))
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = m.loss(x[:128]).total
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]  # ~500 nats -> ~330 in 30 steps


def test_labels_are_checked():
    m = VAE(VAEConfig(**SMALL, num_classes=10))
    x = torch.rand(2, 1, 28, 28)
    with pytest.raises(ValueError, match="conditional"):
        m.encode(x)
    with pytest.raises(ValueError, match=r"\[0, 9\]"):
        m.encode(x, torch.tensor([1, 10]))
    with pytest.raises(ValueError, match="unconditional"):
        VAE(VAEConfig(**SMALL)).encode(x, torch.tensor([1, 2]))


def test_config_round_trip_and_validation():
    c = VAEConfig(**SMALL, num_classes=10, activation="silu")
    assert VAEConfig(**c.to_dict()) == c
    for bad in (dict(latent_dim=0), dict(arch="rnn"), dict(image_size=30), dict(activation="tanh"),
                dict(res_blocks=-1), dict(res_blocks=1.0), dict(res_blocks=(1, 2, 3)), dict(res_blocks=(1, -1)),
                dict(arch="mlp", res_blocks=1), dict(arch="mlp", res_blocks=(0, 1)), dict(flow_prior=-1),
                dict(latent_dim=1, flow_prior=2)):
        with pytest.raises(ValueError):
            VAEConfig(**bad)
    for bad, shown in ((65, "65"), ((1, 2, 3), r"\(1, 2, 3\)")):  # the value as given, one int allowed
        with pytest.raises(ValueError, match=r"res_blocks must be 1, 2 or 4 ints in \[0, 64\] \(all; encoder, "
                                             r"decoder; or encoder at 1/2, 1/4, decoder at 1/4, 1/2\), got "
                                             + shown + "$"):
            VAEConfig(res_blocks=bad)
    with pytest.raises(TypeError, match="extra"):
        VAEConfig(**{**c.to_dict(), "extra": 1})


@pytest.mark.parametrize("bf16", [False, True])
def test_default_noise_is_one_randn_draw_of_k_samples(bf16):
    """loss without eps draws torch.randn(K, B, d) (fp32, also under bf16 autocast): passing that draw in (as
    training does, so that a compiled loss is one graph) changes no result, in fp32 and bf16."""
    m, x = VAE(VAEConfig(**SMALL)), torch.rand(4, 1, 28, 28)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        torch.manual_seed(3)
        own = m.loss(x, k=2, reduction="none")
        torch.manual_seed(3)
        given = m.loss(x, k=2, reduction="none", eps=torch.randn(2, 4, SMALL["latent_dim"]))
    assert torch.equal(own.total, given.total)


def test_res_blocks_add_two_convolutions_where_they_are_placed():
    """The conv default is one block in the decoder at 1/2 resolution, mlp has none. Four numbers place blocks
    (encoder at 1/2, 1/4, decoder at 1/4, 1/2), two are (encoder, decoder) at both resolutions, one is all four.
    Each block is two 3x3 convolutions with c1 channels at 1/2 resolution, c2 at 1/4."""
    assert VAEConfig(**SMALL).res_blocks == (0, 0, 0, 1) and VAEConfig(arch="mlp").res_blocks == (0, 0, 0, 0)
    assert VAEConfig(**SMALL, res_blocks=2).res_blocks == (2, 2, 2, 2)
    assert VAEConfig(**SMALL, res_blocks=[1, 0]).res_blocks == (1, 1, 0, 0)
    assert VAEConfig(**SMALL, res_blocks=[1, 2, 3, 4]).res_blocks == (1, 2, 3, 4)
    c1, c2 = SMALL["channels"]
    block = {1: 2 * (c1 * c1 * 9 + c1), 2: 2 * (c2 * c2 * 9 + c2)}  # a block's parameters at 1/2 and 1/4 resolution
    size = {blocks: sum(p.numel() for p in VAE(VAEConfig(**SMALL, res_blocks=blocks)).parameters())
            for blocks in (0, (2, 0), (0, 1), (2, 2), (0, 0, 0, 1), (1, 0, 2, 0))}
    assert size[(2, 0)] - size[0] == 2 * (block[1] + block[2]) and size[(0, 1)] - size[0] == block[1] + block[2]
    assert size[(2, 2)] - size[0] == 4 * (block[1] + block[2])
    assert size[(0, 0, 0, 1)] - size[0] == block[1] and size[(1, 0, 2, 0)] - size[0] == block[1] + 2 * block[2]
    enc_only = VAE(VAEConfig(**SMALL, res_blocks=(1, 0)))
    assert sum(isinstance(m, ResBlock) for m in enc_only.enc_body) == 2 and not any(
        isinstance(m, ResBlock) for m in enc_only.dec_body)
    assert enc_only.loss(torch.rand(3, 1, 28, 28)).total.isfinite()
    # the block sits where it is asked: (0, 0, 0, 1) and (0, 0, 1, 0) differ in the width the block convolves
    late, early = (VAE(VAEConfig(**SMALL, res_blocks=rb)).dec_body for rb in ((0, 0, 0, 1), (0, 0, 1, 0)))
    assert [m.body[0].in_channels for m in late if isinstance(m, ResBlock)] == [c1]
    assert [m.body[0].in_channels for m in early if isinstance(m, ResBlock)] == [c2]


def hand_made_mixture(groups, d, offset=10.0):
    """One narrow component per group, group g centred at g * offset on the first axis."""
    means = torch.zeros(groups, 1, d)
    means[:, 0, 0] = torch.arange(groups) * offset
    return {"weights": torch.ones(groups, 1), "means": means,
            "scale_tril": 0.01 * torch.eye(d).expand(groups, 1, d, d).clone()}


def capture_z(model):
    seen = []
    real = model._decode  # what sample() decodes through

    def decode(z, labels=None):
        seen.append(z.clone())
        return real(z, labels)

    model._decode = decode
    return seen


def test_sampling_uses_the_mixture_seeded_and_prior_on_request():
    torch.manual_seed(0)
    m = VAE(VAEConfig(**SMALL3)).eval()
    m.latent_mixture = GaussianMixture(**hand_made_mixture(1, 3, offset=0.0) | {"means": torch.full((1, 1, 3), 5.0)})
    seen = capture_z(m)
    a = m.sample(6, generator=torch.Generator().manual_seed(1))
    b = m.sample(6, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.shape == (6, 1, 28, 28)
    assert (seen[0] - 5.0).abs().max() < 0.1  # from the mixture
    m.sample(6, generator=torch.Generator().manual_seed(1), prior=True)
    assert (seen[-1] - 5.0).abs().max() > 1.0  # from N(0, I)
    m.latent_mixture = None
    assert m.latent_mixture is None and m.state_dict().keys() == VAE(VAEConfig(**SMALL3)).state_dict().keys()


def test_conditional_model_samples_each_digit_from_its_own_mixture():
    torch.manual_seed(0)
    m = VAE(VAEConfig(**SMALL3, num_classes=10)).eval()
    m.latent_mixture = GaussianMixture(**hand_made_mixture(10, 3))
    seen = capture_z(m)
    m.sample(4, labels=7, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(seen[-1][:, 0], torch.full((4,), 70.0), atol=0.1)
    labels = torch.tensor([3, 0, 9, 3])
    m.sample(4, labels=labels, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(seen[-1][:, 0], labels.float() * 10, atol=0.1)
    m.latent_mixture = GaussianMixture(**hand_made_mixture(1, 3))  # one mixture for a model with 10 classes
    with pytest.raises(ValueError, match=r"latent_mixture: 1 group of 3-d components; this model samples from 10 \("):
        m.sample(4, labels=labels)
    assert m.sample(4, labels=labels, prior=True).shape == (4, 1, 28, 28)  # the prior needs no mixture


def test_checkpoint_with_mixture_round_trips_through_weights_only(mixture_run):
    raw = torch.load(mixture_run, weights_only=True)
    stored = raw["latent_mixture"]
    assert stored["weights"].shape == (1, 2) and stored["means"].shape == (1, 2, 4)
    model = VAE.from_checkpoint(mixture_run)
    assert all(torch.equal(model.latent_mixture.state()[k], stored[k]) for k in stored)
    # The mixture sits where the posterior means do: its mean is near theirs.
    data = TensorDataset.load("train", limit=512)
    mu = model.encode(data.batch(slice(0, 512))[0])[0]
    centre = (stored["weights"][0, :, None] * stored["means"][0]).sum(0)
    assert torch.allclose(centre, mu.mean(0), atol=1e-3)


def test_a_prior_of_the_callers_gets_codes_as_n_by_d_and_one_put_in_place_of_the_prior_is_learned():
    """log_prob receives [N, latent_dim], as documented, however many samples; a prior assigned to vae.prior is
    used by the loss with the sampled KL (the closed form belongs to N(0, I) alone)."""
    torch.manual_seed(0)
    m, x = VAE(VAEConfig(**SMALL)).eval(), torch.rand(3, 1, 28, 28)
    d = SMALL["latent_dim"]

    class Shifted(torch.nn.Module):  # N(shift, I), asserting the documented shape
        def __init__(self, shift):
            super().__init__()
            self.shift = torch.nn.Parameter(torch.tensor(shift))

        def log_prob(self, z):
            assert z.dim() == 2 and z.shape[1] == d, z.shape
            return StandardNormal(d).log_prob(z - self.shift)

    g = torch.Generator().manual_seed(1)
    own = m.log_likelihood(x, k=20, chunk=7, generator=g)
    g.manual_seed(1)
    assert torch.allclose(m.log_likelihood(x, k=20, chunk=7, generator=g, prior=Shifted(0.0)), own)
    eps = torch.randn(1, 3, d)
    m.prior = Shifted(3.0)
    parts = m.loss(x, eps=eps, reduction="none")
    mu, logvar = m.encode(x)
    z = reparameterize(mu, logvar, eps[0])
    log_q = (-0.5 * (eps[0].pow(2) + logvar + LOG_2PI)).sum(1)
    assert torch.allclose(parts.kl, log_q - m.prior.log_prob(z), atol=1e-4)
    parts.total.sum().backward()
    assert m.prior.shift.grad != 0  # the prior is trained with the model


def test_a_mixture_per_class_is_no_prior_without_its_class():
    m = VAE(VAEConfig(**SMALL, num_classes=10)).eval()
    m.latent_mixture = GaussianMixture(**hand_made_mixture(10, SMALL["latent_dim"]))
    x = torch.rand(2, 1, 28, 28)
    with pytest.raises(ValueError, match=r"p\(z\|y\)"):
        m.log_likelihood(x, [1, 2], k=2, prior=m.latent_mixture)
    with pytest.raises(ValueError, match="pass group="):  # called directly, and under python -O too
        m.latent_mixture.log_prob(torch.zeros(3, SMALL["latent_dim"]))
    for group in (-1, 10, 1.0, True, torch.tensor([1, 2])):  # -1 would be the last class, silently
        with pytest.raises(ValueError, match=r"group must be an int in \[0, 9\]"):
            m.latent_mixture.sample(2, group=group)
    for group in (np.int64(3), torch.tensor(3)):  # a label taken from an array or a tensor
        assert m.latent_mixture.sample(2, group=group).shape == (2, SMALL["latent_dim"])
    assert m.sample(4, [0, 1, 2, 3]).shape == (4, 1, 28, 28)  # sampling names each class


def test_weights_in_another_dtype_are_one_line():
    m = VAE(VAEConfig(**SMALL)).double()
    with pytest.raises(ValueError, match="keep them float32"):
        m.loss(torch.rand(2, 1, 28, 28))
    with pytest.raises(ValueError, match="keep them float32"):
        m.sample(2)
