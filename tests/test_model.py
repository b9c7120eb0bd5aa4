import pytest
import torch

from model import VAE, VAEConfig, bernoulli_nll, gaussian_kl

SMALL = dict(channels=(4, 8), hidden_dim=32, latent_dim=4)


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
    z = m.reparameterize(mu, logvar)
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


def test_analytic_kl_matches_monte_carlo():
    torch.manual_seed(0)
    mu, logvar = torch.randn(3, 5), torch.randn(3, 5) * 0.5
    q = torch.distributions.Normal(mu, (0.5 * logvar).exp())
    p = torch.distributions.Normal(0.0, 1.0)
    z = q.sample((200_000,))
    mc = (q.log_prob(z) - p.log_prob(z)).sum(-1).mean(0)
    assert torch.allclose(gaussian_kl(mu, logvar), mc, atol=0.03)
    assert torch.allclose(gaussian_kl(torch.zeros(2, 3), torch.zeros(2, 3)), torch.zeros(2))


def test_bernoulli_nll_is_summed_bce():
    logits, x = torch.randn(2, 1, 28, 28), torch.rand(2, 1, 28, 28)
    p = torch.sigmoid(logits)
    ref = -(x * p.log() + (1 - x) * (1 - p).log()).flatten(1).sum(1)
    assert torch.allclose(bernoulli_nll(logits, x), ref, rtol=1e-4)


def test_beta_weighs_kl():
    torch.manual_seed(0)
    m, x = VAE(VAEConfig(**SMALL)), torch.rand(4, 1, 28, 28)
    g = lambda: torch.Generator().manual_seed(1)  # noqa: E731 - same noise both times
    a, b = m.loss(x, generator=g()), m.loss(x, beta=0.25, generator=g())
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
    assert VAEConfig.from_dict(c.to_dict()) == c
    for bad in (dict(latent_dim=0), dict(arch="rnn"), dict(image_size=30), dict(activation="tanh"),
                dict(res_blocks=-1), dict(res_blocks=1.0), dict(arch="mlp", res_blocks=1)):
        with pytest.raises(ValueError):
            VAEConfig(**bad)
    with pytest.raises(ValueError, match="unknown"):
        VAEConfig.from_dict({**c.to_dict(), "extra": 1})


@pytest.mark.parametrize("bf16", [False, True])
def test_given_eps_is_the_models_own_draw(bf16):
    """VAE.draw_eps draws exactly what the model would, so passing eps in (as the training step
    does, for torch.compile) changes no result, in fp32 and under bf16 autocast."""
    torch.manual_seed(0)
    m, x = VAE(VAEConfig(**SMALL)), torch.rand(4, 1, 28, 28)
    dtype = torch.bfloat16 if bf16 else torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        own = m.loss(x, generator=torch.Generator().manual_seed(3), reduction="none")
        given = m.loss(x, reduction="none", eps=m.draw_eps(4, torch.Generator().manual_seed(3), dtype))
    assert torch.equal(own.total, given.total)


@pytest.mark.parametrize("bf16", [False, True])
def test_training_objective_takes_the_stored_uint8_images(bf16):
    """train.py passes uint8 batches, converted inside the objective: the same loss to the bit."""
    from training import objective

    torch.manual_seed(0)
    m, raw = VAE(VAEConfig(**SMALL)), torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8)
    eps = torch.randn(4, SMALL["latent_dim"]).to(torch.bfloat16 if bf16 else torch.float32)
    from_uint8 = objective(m, raw, None, 1.0, eps, bf16)
    from_float = objective(m, raw.float() / 255, None, 1.0, eps, bf16)
    assert all(torch.equal(a, b) for a, b in zip(from_uint8, from_float))


@pytest.mark.parametrize("bf16", [False, True])
def test_training_objective_traces_as_one_graph(bf16):
    """torch.compile cannot trace a Generator; with eps given, forward, loss and the logged sums
    are one graph (each graph break would add a compiled-graph call to every training step)."""
    from training import objective

    torch.manual_seed(0)
    m = VAE(VAEConfig(**SMALL))
    x = torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8)  # as train.py passes them
    eps = torch.randn(4, SMALL["latent_dim"])
    graphs = []

    def count_graphs(gm, example_inputs):  # a torch.compile backend that runs the graph as traced
        graphs.append(gm)
        return gm.forward

    # fullgraph=True raises at any graph break
    torch.compile(objective, backend=count_graphs, fullgraph=True)(m, x, None, 1.0, eps, bf16)
    assert len(graphs) == 1


def test_res_blocks_add_layers_and_leave_the_default_weights_alone():
    """res_blocks = 0 is the model every earlier checkpoint holds, and what a saved config without
    the key builds. The conv default is one block, mlp has none. Each block adds two 3x3
    convolutions at each resolution, in encoder and decoder."""
    plain = VAE(VAEConfig(**SMALL, res_blocks=0))
    assert VAEConfig(**SMALL).res_blocks == 1 and VAEConfig(arch="mlp").res_blocks == 0
    old = {k: v for k, v in VAEConfig(**SMALL, res_blocks=0).to_dict().items() if k != "res_blocks"}
    assert VAE(VAEConfig.from_dict(old)).state_dict().keys() == plain.state_dict().keys()
    with pytest.raises(ValueError, match="res_blocks"):
        VAEConfig.from_dict({**old, "res_blocks": None})  # a saved config holds the number
    deep = VAE(VAEConfig(**SMALL, res_blocks=2))
    c1, c2 = SMALL["channels"]
    per_block = {c: 2 * (c * c * 9 + c) for c in (c1, c2)}  # two 3x3 convs with biases
    extra = sum(p.numel() for p in deep.parameters()) - sum(p.numel() for p in plain.parameters())
    assert extra == 2 * 2 * (per_block[c1] + per_block[c2])  # 2 blocks, encoder + decoder
    x = torch.rand(3, 1, 28, 28)
    assert deep.loss(x).total.isfinite()
