"""Likelihood evaluation, binarized MNIST, conditional generation, beta and KL warm-up (issue 4)."""

import json
import math

import pytest
import torch
from PIL import Image

import evaluate
import generate
import mixture
import train
import training
from checkpoint import load_checkpoint
from conftest import TINY, cli_error
from model import VAE, VAEConfig


def fit(x, latent_dim: int, steps: int) -> VAE:
    """A tiny MLP VAE fitted to the images x with full-batch Adam, returned in eval mode."""
    torch.manual_seed(0)
    m = VAE(VAEConfig(arch="mlp", hidden_dim=64, latent_dim=latent_dim))
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    for _ in range(steps):
        loss = m.loss(x).total
        opt.zero_grad()
        loss.backward()
        opt.step()
    return m.eval()


@pytest.fixture(scope="module")
def fitted(mnist_subset):
    """A 1-D latent model fitted for a few hundred steps on real digits."""
    x, _ = mnist_subset
    return fit(x, latent_dim=1, steps=300), x


def test_importance_sampling_bounds_and_tightens(mnist_subset):
    """A briefly trained model with 8 latents: q(z|x) is still far from p(z|x), so K matters."""
    x = mnist_subset[0][:64]
    m = fit(x, latent_dim=8, steps=100)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # the ELBO itself, averaged over many posterior draws
        elbo = torch.stack([-m.loss(x, generator=g).total for _ in range(200)]).mean().item()
    lls = {k: m.log_likelihood(x, k=k, chunk=100, generator=g).mean().item() for k in (1, 10, 100, 1000)}
    assert abs(lls[1] - elbo) < 1.0            # K = 1 is a one-sample ELBO
    assert lls[1000] > elbo                    # the IS estimate bounds the ELBO from above
    assert lls[1] < lls[10] < lls[100] < lls[1000]  # ... and tightens as K grows


def test_importance_sampling_matches_numerical_integration(fitted):
    """With a 1-D latent, log p(x) = log of the integral of p(x|z) p(z) dz, done on a fine grid."""
    m, x = fitted
    x = x[:6]
    z = torch.linspace(-8, 8, 40001).unsqueeze(1)  # [G, 1]
    dz = (z[1] - z[0]).item()
    with torch.no_grad():
        logits = m.decode(z)  # [G, 1, 28, 28]
        log_pz = -0.5 * (z.squeeze(1) ** 2 + math.log(2 * math.pi))
        exact = []
        for xi in x:
            log_px_z = -torch.nn.functional.binary_cross_entropy_with_logits(
                logits, xi.expand_as(logits), reduction="none").flatten(1).sum(1)
            exact.append(torch.logsumexp(log_px_z + log_pz, 0).item() + math.log(dz))
    est = m.log_likelihood(x, k=20000, chunk=2000, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(est, torch.tensor(exact), atol=0.05), (est, exact)


@pytest.fixture(scope="module")
def binarized_run(tmp_path_factory):
    ckpt = tmp_path_factory.mktemp("bin") / "vae.pt"
    assert train.main([*TINY, "--epochs", "1", "--binarize", "--checkpoint", str(ckpt)]) == 0
    return ckpt


def test_evaluate_cli_writes_json(binarized_run, tmp_path, capsys):
    out = tmp_path / "nll.json"
    assert evaluate.main(["--checkpoint", str(binarized_run), "--k", "20", "--limit", "50",
                          "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "binarized protocol" in printed and "bits/dim" in printed
    r = json.loads(out.read_text())
    assert r["k"] == 20 and r["images"] == 50 and r["protocol"] == "binarized"
    assert r["nll"] <= r["neg_elbo"] + 1.0  # the IS bound is tighter than one-sample ELBO
    assert abs(r["bits_per_dim"] - r["nll"] / (784 * math.log(2))) < 1e-9
    assert abs(r["neg_elbo"] - r["recon"] - r["kl"]) < 1e-6
    line = cli_error(evaluate.main, ["--checkpoint", tmp_path / "missing.pt"], capsys)
    assert "no such checkpoint" in line


def test_a_standard_normal_mixture_prior_is_the_standard_prior(mnist_subset):
    """A one-component mixture with mean 0 and identity covariance is N(0, I): the same NLL; a
    prior fitted to the posterior samples of the training images gives a valid, different one."""
    x = mnist_subset[0][:32]
    m = fit(x, latent_dim=3, steps=50)
    standard = {"weights": torch.ones(1), "means": torch.zeros(1, 3), "scale_tril": torch.eye(3)[None]}
    same = [m.log_likelihood(x, k=50, generator=torch.Generator().manual_seed(0), prior=p)
            for p in (None, standard)]
    assert torch.allclose(same[0], same[1], atol=1e-4)
    fitted = mixture.fit_to_model(m, mnist_subset[0], mnist_subset[1], 4, posterior_samples=True)
    prior = {name: t[0] for name, t in fitted.items()}
    ll = m.log_likelihood(x, k=50, generator=torch.Generator().manual_seed(0), prior=prior)
    assert ll.isfinite().all() and not torch.allclose(ll, same[0])
    # both priors scored from one set of samples: each row is that prior's own log_likelihood
    both = m.log_likelihoods(x, k=50, chunk=7, generator=torch.Generator().manual_seed(0), priors=(None, prior))
    assert both.shape == (2, 32)
    assert torch.allclose(both[0], same[0], atol=1e-4) and torch.allclose(both[1], ll, atol=1e-4)


def test_evaluate_with_a_fitted_prior(binarized_run, tmp_path, capsys):
    out = tmp_path / "nll.json"
    assert evaluate.main(["--checkpoint", str(binarized_run), "--k", "5", "--limit", "20",
                          "--prior-components", "3", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["prior_components"] == 3 and math.isfinite(r["nll_mixture_prior"]) and r["nll_mixture_prior"] > 0
    assert "mixture prior" in capsys.readouterr().out
    # the N(0, I) figure does not depend on whether a fitted prior is scored beside it
    assert evaluate.main(["--checkpoint", str(binarized_run), "--k", "5", "--limit", "20",
                          "--json", str(out)]) == 0
    assert json.loads(out.read_text())["nll"] == pytest.approx(r["nll"], abs=1e-9)
    line = cli_error(evaluate.main, ["--checkpoint", binarized_run, "--prior-components", "3",
                                     "--sample-quality"], capsys)
    assert "--prior-components" in line


def test_binarized_test_set_is_fixed_and_binary():
    from data import TensorDataset, load_test_set

    test = TensorDataset.load("test", limit=100)
    a, b = load_test_set(limit=100, binarize=True), load_test_set(limit=100, binarize=True)
    assert torch.equal(a.images, b.images)
    assert set(a.images.unique().tolist()) <= {0, 255}
    # Pixel means match grey levels on average (Bernoulli(grey) draws).
    assert abs(a.images.float().mean() - test.images.float().mean()) < 2.0


def test_binarized_training_sees_binary_pixels(binarized_run, monkeypatch):
    seen = []
    real = VAE.loss

    def spy(self, x, *a, **kw):
        seen.append(x.unique())
        return real(self, x, *a, **kw)

    monkeypatch.setattr(VAE, "loss", spy)
    assert train.main(["--epochs", "2", "--checkpoint", str(binarized_run), "--resume"]) == 0
    assert all(set(u.tolist()) <= {0.0, 1.0} for u in seen)


def test_conditional_training_and_generation(tmp_path, capsys):
    ckpt = tmp_path / "cvae.pt"
    assert train.main([*TINY, "--epochs", "1", "--conditional", "--checkpoint", str(ckpt)]) == 0
    model = VAE.from_checkpoint(ckpt)
    assert model.config.num_classes == 10
    assert model.sample(3, labels=7).shape == (3, 1, 28, 28)
    out = tmp_path / "img"
    assert generate.main(["--checkpoint", str(ckpt), "--out", str(out), "--n", "5"]) == 0
    with Image.open(out / "samples.png") as im:  # 10 rows (one per digit) of 5
        assert im.size == (5 * 30 + 2, 10 * 30 + 2)
    assert generate.main(["--checkpoint", str(ckpt), "--out", str(out), "--digit", "7", "--n", "4"]) == 0
    with Image.open(out / "samples_digit7.png") as im:
        assert im.size == (4 * 30 + 2, 30 + 2)
    capsys.readouterr()
    r = evaluate.main(["--checkpoint", str(ckpt), "--k", "3", "--limit", "20"])
    assert r == 0 and "NLL" in capsys.readouterr().out


def test_two_d_latent_writes_manifold(tmp_path):
    ckpt = tmp_path / "vae2d.pt"
    assert train.main([*TINY, "--epochs", "1", "--latent-dim", "2", "--checkpoint", str(ckpt)]) == 0
    assert generate.main(["--checkpoint", str(ckpt), "--out", str(tmp_path)]) == 0
    with Image.open(tmp_path / "manifold.png") as im:
        assert im.size == (20 * 30 + 2, 20 * 30 + 2)
    with Image.open(tmp_path / "traversal.png") as im:  # one row per latent dimension
        assert im.size == (11 * 30 + 2, 2 * 30 + 2)


def test_kl_weight_schedule():
    assert training.kl_weight(1.0, 0, 0.0) == 1.0
    assert training.kl_weight(2.0, 4, 1.0) == 0.5
    assert training.kl_weight(2.0, 4, 10.0) == 2.0


def test_beta_and_warmup_report_true_elbo(tmp_path):
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    assert train.main([*TINY, "--epochs", "2", "--checkpoint", str(a)]) == 0
    assert train.main([*TINY, "--epochs", "2", "--beta", "4", "--kl-warmup", "2", "--checkpoint", str(b)]) == 0
    ma, mb = load_checkpoint(a)["metrics"], load_checkpoint(b)["metrics"]
    assert [r["kl_weight"] for r in mb] == [2.0, 4.0] and ma[0]["kl_weight"] == 1.0
    for r in mb:  # reported losses are recon + KL, whatever weight the training used
        assert abs(r["test_loss"] - r["recon"] - r["kl"]) < 1e-6
        assert abs(r["train_loss"] - r["train_recon"] - r["train_kl"]) < 1e-6
    assert mb[-1]["kl"] < ma[-1]["kl"]  # a heavier KL weight pushes the KL down
