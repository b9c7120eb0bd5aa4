"""The latent mixture (EM, sampling, checkpoints) and the sample-quality score (issue 10)."""

import json
import math

import pytest
import torch

import evaluate
import fit_mixture
import generate
import mixture
import train
from checkpoint import load_checkpoint
from classifier import load_classifier
from conftest import TINY, cli_error
from data import TensorDataset
from model import VAE, VAEConfig
from sample_quality import classify, frechet_distance, nearest_distance

SMALL = dict(channels=(4, 8), hidden_dim=32, latent_dim=3)


def synthetic(n=3000, seed=0):
    """Points from a known 3-component 2-d mixture: (x, weights, means, covariances)."""
    g = torch.Generator().manual_seed(seed)
    weights = torch.tensor([0.5, 0.3, 0.2])
    means = torch.tensor([[0.0, 0.0], [6.0, 1.0], [-2.0, 7.0]])
    covs = torch.stack([torch.tensor([[1.0, 0.5], [0.5, 1.0]]), torch.tensor([[0.5, 0.0], [0.0, 2.0]]),
                        torch.tensor([[1.5, -0.7], [-0.7, 0.8]])])
    comp = torch.multinomial(weights, n, replacement=True, generator=g)
    eps = torch.randn(n, 2, generator=g)
    x = means[comp] + (torch.linalg.cholesky(covs)[comp] @ eps.unsqueeze(-1)).squeeze(-1)
    return x, weights, means, covs


def test_em_never_lowers_the_likelihood():
    x, *_ = synthetic()
    history = []
    mixture.fit(x, 5, iterations=60, seed=1, history=history, tol=-1.0)  # tol < 0: all iterations
    assert len(history) == 60
    assert all(b >= a - 1e-9 for a, b in zip(history, history[1:])), history


def test_em_recovers_a_known_mixture():
    x, weights, means, covs = synthetic()
    w, m, L = mixture.fit(x, 3, seed=0)
    order = [int(torch.cdist(mu[None], m).argmin()) for mu in means]  # match components
    assert sorted(order) == [0, 1, 2]
    assert torch.allclose(w[order], weights, atol=0.03)
    assert torch.allclose(m[order], means, atol=0.15)
    assert torch.allclose((L @ L.transpose(1, 2))[order], covs, atol=0.2)


def test_fit_is_deterministic_and_keeps_covariances_positive_definite():
    x = torch.randn(200, 4)
    x[:, 3] = x[:, 0]  # a degenerate direction: without the ridge a covariance would be singular
    a, b = mixture.fit(x, 4, seed=3), mixture.fit(x, 4, seed=3)
    assert all(torch.equal(s, t) for s, t in zip(a, b))
    assert (torch.diagonal(a[2], dim1=-2, dim2=-1) > 0).all()
    mixture.check({"weights": a[0][None], "means": a[1][None], "scale_tril": a[2][None]}, 4, 1)


def hand_made_mixture(groups, d, offset=10.0):
    """One narrow component per group, group g centred at g * offset on the first axis."""
    means = torch.zeros(groups, 1, d)
    means[:, 0, 0] = torch.arange(groups) * offset
    return {"weights": torch.ones(groups, 1), "means": means,
            "scale_tril": 0.01 * torch.eye(d).expand(groups, 1, d, d).clone()}


def capture_z(model):
    seen = []
    real = model.decode

    def decode(z, labels=None):
        seen.append(z.clone())
        return real(z, labels)

    model.decode = decode
    return seen


def test_sampling_uses_the_mixture_seeded_and_prior_on_request():
    torch.manual_seed(0)
    m = VAE(VAEConfig(**SMALL)).eval()
    m.set_latent_mixture(hand_made_mixture(1, 3, offset=0.0) | {"means": torch.full((1, 1, 3), 5.0)})
    seen = capture_z(m)
    a = m.sample(6, generator=torch.Generator().manual_seed(1))
    b = m.sample(6, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.shape == (6, 1, 28, 28)
    assert (seen[0] - 5.0).abs().max() < 0.1  # from the mixture
    m.sample(6, generator=torch.Generator().manual_seed(1), prior=True)
    assert (seen[-1] - 5.0).abs().max() > 1.0  # from N(0, I)
    m.set_latent_mixture(None)
    assert m.latent_mixture is None


def test_conditional_model_samples_each_digit_from_its_own_mixture():
    torch.manual_seed(0)
    m = VAE(VAEConfig(**SMALL, num_classes=10)).eval()
    m.set_latent_mixture(hand_made_mixture(10, 3))
    seen = capture_z(m)
    m.sample(4, labels=7, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(seen[-1][:, 0], torch.full((4,), 70.0), atol=0.1)
    labels = torch.tensor([3, 0, 9, 3])
    m.sample(4, labels=labels, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(seen[-1][:, 0], labels.float() * 10, atol=0.1)
    with pytest.raises(ValueError, match="weights must be"):
        m.set_latent_mixture(hand_made_mixture(1, 3))  # one mixture for a model with 10 classes


@pytest.fixture
def run_with_mixture(mixture_run):
    return mixture_run


def test_checkpoint_with_mixture_round_trips_through_weights_only(run_with_mixture):
    raw = torch.load(run_with_mixture, weights_only=True)
    stored = raw["latent_mixture"]
    assert stored["weights"].shape == (1, 2) and stored["means"].shape == (1, 2, 4)
    model = VAE.from_checkpoint(run_with_mixture)
    assert all(torch.equal(model.latent_mixture[k], stored[k]) for k in stored)
    # The mixture sits where the posterior means do: its mean is near theirs.
    data = TensorDataset.load("train", limit=512)
    mu = model.encode(data.batch(slice(0, 512))[0])[0]
    centre = (stored["weights"][0, :, None] * stored["means"][0]).sum(0)
    assert torch.allclose(centre, mu.mean(0), atol=1e-3)


def test_fit_mixture_script_adds_and_removes_a_mixture(run_with_mixture, tmp_path):
    ckpt = tmp_path / "vae.pt"
    c = load_checkpoint(run_with_mixture)
    c["latent_mixture"] = None  # as every checkpoint written before the mixture existed
    c.pop("sha256", None)
    torch.save(c, ckpt)
    assert VAE.from_checkpoint(ckpt).latent_mixture is None
    assert fit_mixture.main(["--checkpoint", str(ckpt), "--components", "3"]) == 0
    assert VAE.from_checkpoint(ckpt).latent_mixture["weights"].shape == (1, 3)
    assert fit_mixture.main(["--checkpoint", str(ckpt), "--components", "0"]) == 0
    assert VAE.from_checkpoint(ckpt).latent_mixture is None


def test_generate_writes_mixture_and_prior_samples(run_with_mixture, tmp_path):
    assert generate.main(["--checkpoint", str(run_with_mixture), "--out", str(tmp_path)]) == 0
    assert (tmp_path / "samples.png").exists() and (tmp_path / "samples_prior.png").exists()
    assert (tmp_path / "samples.png").read_bytes() != (tmp_path / "samples_prior.png").read_bytes()


def test_shipped_classifier_scores_test_images_near_zero_and_noise_high():
    clf = load_classifier()  # checks the SHA-256
    test = TensorDataset.load("test")
    train_set = TensorDataset.load("train", limit=10000)
    f_test, pred = classify(clf, test.images)
    f_train, _ = classify(clf, train_set.images)
    assert (pred == test.labels).double().mean() > 0.98
    floor = frechet_distance(f_test, f_train)  # 4.8 here; 2.4 against all 60,000 (README)
    noise = torch.rand(10000, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    fd_noise = frechet_distance(classify(clf, noise)[0], f_test)
    assert floor < 6.0 and fd_noise > 200 * floor, (floor, fd_noise)


def test_frechet_distance_of_known_gaussians():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(20000, 3, generator=g)
    b = torch.randn(20000, 3, generator=g) * 2 + torch.tensor([1.0, 0.0, 0.0])
    # |mu|^2 + tr(I + 4I - 2 * 2I) = 1 + 3 * (1 + 4 - 4) = 4
    assert abs(frechet_distance(a, b) - 4.0) < 0.15


def test_nearest_distance_finds_the_nearest_row():
    ref = torch.tensor([[0.0, 0.0], [3.0, 4.0], [10.0, 0.0]])
    q = torch.tensor([[3.0, 4.0], [9.0, 0.0], [0.0, 1.0]])
    assert torch.allclose(nearest_distance(q, ref, chunk=2), torch.tensor([0.0, 1.0, 1.0]), atol=1e-5)


KEYS = {"fd", "fd_prior", "class_entropy", "digit_accuracy", "nn_samples", "nn_test_recon"}


@pytest.mark.parametrize("conditional", [False, True])
def test_evaluate_sample_quality_cli(tmp_path, conditional, capsys):
    ckpt = tmp_path / "vae.pt"
    extra = ["--conditional"] if conditional else []
    assert train.main([*TINY, "--epochs", "1", *extra, "--checkpoint", str(ckpt)]) == 0
    for with_mixture in (True, False):
        if not with_mixture:
            assert fit_mixture.main(["--checkpoint", str(ckpt), "--components", "0"]) == 0
        out = tmp_path / f"q{with_mixture}.json"
        assert evaluate.main(["--checkpoint", str(ckpt), "--sample-quality", "--samples", "300",
                              "--limit", "300", "--json", str(out)]) == 0
        r = json.loads(out.read_text())
        assert KEYS <= set(r) and r["mixture"] == with_mixture
        assert 0 <= r["class_entropy"] <= math.log(10) + 1e-9
        assert r["fd"] > 0 and r["fd_prior"] > 0 and r["nn_samples"] > 0 and r["nn_test_recon"] > 0
        assert (r["digit_accuracy"] is not None) == conditional
        if not with_mixture:
            assert r["fd"] == pytest.approx(r["fd_prior"], rel=0.5)  # both from the prior
    printed = capsys.readouterr().out
    assert "fd " in printed and "nn_samples" in printed


def test_sample_quality_errors_are_one_line(tmp_path, run_with_mixture, capsys):
    line = cli_error(evaluate.main, ["--checkpoint", run_with_mixture, "--sample-quality",
                                     "--classifier", tmp_path / "none.pt"], capsys)
    assert "none.pt" in line and "no classifier" in line
    fake = tmp_path / "clf.pt"
    fake.write_bytes(b"not a classifier")
    line = cli_error(evaluate.main, ["--checkpoint", run_with_mixture, "--sample-quality",
                                     "--classifier", fake], capsys)
    assert "SHA-256" in line
