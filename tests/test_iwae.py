"""Training on the importance-weighted bound (--iw-k, Burda et al. 2015)."""

import copy

import pytest
import torch

import train
import training
from conftest import TINY, cli_error
from model import VAE, VAEConfig
from test_cli import read_csv

SMALL = dict(channels=(4, 8), hidden_dim=32, latent_dim=3)


def grads(model):
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("bf16", [False, True])
def test_k1_is_exactly_the_elbo_objective(mnist_subset, bf16):
    """Same noise: the K = 1 bound's loss and gradients equal today's objective's, to the bit."""
    x = mnist_subset[0][:32]
    torch.manual_seed(0)
    a = VAE(VAEConfig(**SMALL))
    b = copy.deepcopy(a)
    eps = torch.randn(32, 3).to(torch.bfloat16 if bf16 else torch.float32)
    loss_a, stats_a = training.objective(a, x, None, 1.0, eps, bf16)
    neg_bound, recon, kl = training.iw_objective(b, x, None, eps.unsqueeze(0), bf16)
    assert torch.equal(neg_bound.mean(), loss_a)
    assert torch.equal(torch.stack([recon.sum(), kl.sum()]), stats_a)
    loss_a.backward()
    neg_bound.mean().backward()
    assert all(torch.equal(ga, gb) for ga, gb in zip(grads(a), grads(b)))


def test_bound_tightens_with_k(mnist_subset):
    x = mnist_subset[0][:128]
    torch.manual_seed(0)
    m = VAE(VAEConfig(**SMALL))
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    for _ in range(60):  # a few steps, so that q is not the prior
        opt.zero_grad()
        m.loss(x).total.backward()
        opt.step()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        means = [training.iw_objective(m, x, None, torch.randn(k, 128, 3, generator=g), False)[0].mean().item()
                 for k in (1, 5, 50)]
    assert means[0] > means[1] > means[2], means  # -L_1 > -L_5 > -L_50


def test_groups_give_the_same_gradient(mnist_subset, monkeypatch):
    """Memory stays bounded: a batch is split into groups of images whose gradients add up to
    the one-pass gradient."""
    x = mnist_subset[0][:24]
    torch.manual_seed(0)
    a = VAE(VAEConfig(**SMALL))
    b = copy.deepcopy(a)
    out = []
    for model, per_pass in ((a, 10_000), (b, 20)):  # 8 samples per image: 1 group, then 10 groups
        monkeypatch.setattr(training, "IW_SAMPLES_PER_PASS", per_pass)
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        out.append(training.train_step(model, opt, x, None, 1.0, torch.Generator().manual_seed(1), iw_k=8))
    assert torch.allclose(out[0], out[1], rtol=1e-5)
    assert all(torch.allclose(ga, gb, rtol=1e-4, atol=1e-6) for ga, gb in zip(grads(a), grads(b)))


def test_cli_logs_both_bounds(tmp_path, capsys):
    ckpt = tmp_path / "iw.pt"
    assert train.main([*TINY, "--epochs", "2", "--iw-k", "4", "--mixture-components", "0",
                       "--checkpoint", str(ckpt)]) == 0
    out = capsys.readouterr().out
    assert "importance-weighted bound with K = 4" in out and "IW-4 bound: train" in out
    rows = read_csv(tmp_path / "iw.metrics.csv")
    assert {"train_iw", "test_iw"} <= set(rows[0])
    for r in rows:  # the K-sample bound is tighter than the one-sample ELBO
        assert float(r["test_iw"]) < float(r["test_loss"]) and float(r["train_iw"]) < float(r["train_loss"])
    assert train.main(["--epochs", "3", "--checkpoint", str(ckpt), "--resume"]) == 0
    assert len(read_csv(tmp_path / "iw.metrics.csv")) == 3
    line = cli_error(train.main, [*TINY, "--iw-k", "4", "--beta", "2", "--checkpoint", tmp_path / "b.pt"], capsys)
    assert "--iw-k" in line and "--beta" in line
