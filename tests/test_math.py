"""The math, checked against independent computations: the KL against Monte Carlo, the BCE
against its formula, the importance-sampled log-likelihood against numerical integration, the
K = 1 bound against the ELBO, EM against a known mixture, the Fréchet distance of known Gaussians."""

import copy
import math

import pytest
import torch

from conftest import SMALL3
from lib import mixture
from lib.checks import check_mixture
from lib.evaluation import frechet_distance, nearest_distance
from model import VAE, FlowPrior, GaussianMixture, StandardNormal, VAEConfig, bernoulli_nll, gaussian_kl


def noise(k, b, d, seed=0):
    """The N(0, I) noise of K posterior samples for b images: [K, b, d]."""
    return torch.randn(k, b, d, generator=torch.Generator().manual_seed(seed))


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
        elbo = torch.stack([-m.loss(x, eps=noise(1, 64, 8, s)).total for s in range(200)]).mean().item()
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


def grads(model):
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("bf16", [False, True])
def test_the_k1_bound_is_the_elbo_to_the_bit(mnist_subset, bf16):
    """With the same noise, the objective at K = 1 (the importance-weighted form, with its control
    variate) equals recon + beta * KL computed directly, and so do its gradients, bit for bit."""
    x = mnist_subset[0][:32]
    torch.manual_seed(0)
    a = VAE(VAEConfig(**SMALL3))
    b = copy.deepcopy(a)
    eps = noise(1, 32, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        mu, logvar = a.encode(x)
        logits = a.decode(mu.float() + torch.exp(0.5 * logvar.float()) * eps[0])  # z in fp32, whatever mu's precision
    recon, kl = bernoulli_nll(logits.float(), x), gaussian_kl(mu.float(), logvar.float())
    elbo = (recon + 0.5 * kl).mean()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        parts = b.loss(x, beta=0.5, eps=eps)
    assert torch.equal(parts.total, elbo) and torch.equal(parts.recon, recon.mean()) and torch.equal(parts.kl, kl.mean())
    elbo.backward()
    parts.total.backward()
    assert all(torch.equal(ga, gb) for ga, gb in zip(grads(a), grads(b)))


def test_under_bf16_the_log_weights_are_of_the_z_the_prior_sees():
    """Under bf16 autocast the encoder's output is bf16, but z = mu + sigma * eps is formed in fp32: log q(z|x)
    and log p(z) are of one z. The sampled KL (a flow prior, K = 1) against both densities at that z."""
    torch.manual_seed(0)
    m = VAE(VAEConfig(**SMALL3, flow_prior=2))
    for p in m.prior.parameters():  # off the flow's identity start
        p.data.normal_(0, 0.3)
    x, eps = torch.rand(16, 1, 28, 28), noise(1, 16, 3)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        mu, logvar = m.encode(x)
        kl = m.loss(x, eps=eps, reduction="none").kl
    mu, sigma = mu.float(), torch.exp(0.5 * logvar.float())
    z = mu + sigma * eps[0]
    with torch.no_grad():
        log_q = torch.distributions.Normal(mu, sigma).log_prob(z).sum(-1)
        assert torch.allclose(kl, log_q - m.prior.log_prob(z), atol=1e-4)


def test_bound_tightens_with_k(mnist_subset):
    x = mnist_subset[0][:128]
    torch.manual_seed(0)
    m = VAE(VAEConfig(**SMALL3))
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    for _ in range(60):  # a few steps, so that q is not the prior
        opt.zero_grad()
        m.loss(x).total.backward()
        opt.step()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        means = [m.loss(x, k=k, eps=torch.randn(k, 128, 3, generator=g)).total.item() for k in (1, 5, 50)]
    assert means[0] > means[1] > means[2], means  # -L_1 > -L_5 > -L_50


def test_k_equal_samples_give_the_one_sample_bound(mnist_subset):
    """With all K samples the same, the K importance weights are equal: -L_K's estimate is the ELBO's (the
    1/K inside the logarithm cancels the K equal terms)."""
    x = mnist_subset[0][:32]
    torch.manual_seed(0)
    m = VAE(VAEConfig(**SMALL3))
    eps = noise(1, 32, 3)
    with torch.no_grad():
        one = m.loss(x, k=1, eps=eps, reduction="none")
        for k in (2, 5):
            same = m.loss(x, k=k, eps=eps.expand(k, -1, -1), reduction="none")
            assert torch.allclose(same.total, one.total, atol=1e-4) and torch.equal(same.kl, one.kl)


def test_mixture_samples_and_density_have_the_full_covariance():
    """A 3-d component with correlated dimensions: its samples have the mean and the covariance L L^T, and its
    log-density is torch.distributions' MultivariateNormal's."""
    mean = torch.tensor([1.0, -2.0, 0.5])
    tril = torch.tensor([[1.0, 0.0, 0.0], [0.8, 0.5, 0.0], [-0.6, 0.3, 0.4]])
    gm = GaussianMixture(torch.ones(1, 1), mean[None, None], tril[None, None])
    draws = gm.sample(200_000, torch.Generator().manual_seed(0))
    assert torch.allclose(draws.mean(0), mean, atol=0.01)
    assert torch.allclose(torch.cov(draws.T), tril @ tril.T, atol=0.01)
    z = torch.randn(20, 3, generator=torch.Generator().manual_seed(1)) * 2
    reference = torch.distributions.MultivariateNormal(mean, scale_tril=tril).log_prob(z)
    assert torch.allclose(gm.log_prob(z), reference, atol=1e-5)


def test_a_standard_normal_mixture_prior_is_the_standard_prior(mnist_subset):
    """A one-component mixture with mean 0 and identity covariance is N(0, I): the same NLL; a
    prior fitted to the posterior samples of the training images gives a valid, different one."""
    x = mnist_subset[0][:32]
    m = fit(x, latent_dim=3, steps=50)
    standard = GaussianMixture(torch.ones(1, 1), torch.zeros(1, 1, 3), torch.eye(3)[None, None])
    same = [m.log_likelihood(x, k=50, generator=torch.Generator().manual_seed(0), prior=p)
            for p in (None, standard)]
    assert torch.allclose(same[0], same[1], atol=1e-4)
    prior = GaussianMixture(**mixture.fit_to_model(m, mnist_subset[0], mnist_subset[1], 4, posterior_samples=True))
    ll = m.log_likelihood(x, k=50, generator=torch.Generator().manual_seed(0), prior=prior)
    assert ll.isfinite().all() and not torch.allclose(ll, same[0])
    # both priors scored from one set of samples: each row is that prior's own log_likelihood
    both = m.log_likelihood(x, k=50, chunk=7, generator=torch.Generator().manual_seed(0), prior=[m.prior, prior])
    assert both.shape == (2, 32)
    assert torch.allclose(both[0], same[0], atol=1e-4) and torch.allclose(both[1], ll, atol=1e-4)


@pytest.mark.parametrize("prior", [
    StandardNormal(1),
    GaussianMixture(torch.tensor([[0.3, 0.7]]), torch.tensor([[[-2.0], [1.5]]]), torch.tensor([[[[0.5]], [[1.2]]]])),
])
def test_prior_density_normalises_and_matches_its_samples(prior):
    """log_prob integrates to 1 (a fine grid on a 1-d latent), and a histogram of `sample` matches it."""
    z, dz = torch.linspace(-12, 12, 24001, dtype=torch.float64).unsqueeze(1), 24 / 24000
    density = prior.log_prob(z).double().exp()
    assert abs(density.sum().item() * dz - 1) < 1e-4
    draws = prior.sample(200_000, torch.Generator().manual_seed(0)).squeeze(1)
    edges = torch.linspace(-5, 5, 21)
    hist = torch.histogram(draws, edges).hist / len(draws)
    expected = torch.stack([density[(z.squeeze(1) >= a) & (z.squeeze(1) < b)].sum() * dz
                            for a, b in zip(edges[:-1], edges[1:])])
    assert torch.allclose(hist.double(), expected, atol=3e-3)


def grid_2d(side: torch.Tensor) -> torch.Tensor:
    """Every point (a, b) with a and b in `side`: [len(side) ** 2, 2], b varying fastest."""
    return torch.stack(torch.meshgrid(side, side, indexing="ij"), dim=-1).view(-1, 2)


def flow_prior(seed=0, layers=3, latent_dim=2):
    """A FlowPrior with its coupling nets away from their initial zeros (the identity map)."""
    torch.manual_seed(seed)
    prior = FlowPrior(layers, latent_dim, 16, torch.nn.SiLU)
    with torch.no_grad():
        for net in prior.nets:
            net[-1].weight.normal_(0, 0.5)
            net[-1].bias.normal_(0, 0.5)
    return prior


def test_flow_prior_log_det_matches_the_numerical_jacobian():
    """log p(z) = log N(f^-1(z)) + log |det d f^-1 / dz|: the log-determinant the layers add up
    equals that of the Jacobian of f^-1 computed by autograd, and f and f^-1 are inverses."""
    prior = flow_prior(latent_dim=5)
    z = prior.sample(4, torch.Generator().manual_seed(0)).detach()
    u, log_det = prior.inverse(z)
    for zi, ui, ld in zip(z, u, log_det):
        jac = torch.autograd.functional.jacobian(lambda v: prior.inverse(v.unsqueeze(0))[0][0], zi)
        assert torch.allclose(ld, torch.linalg.slogdet(jac)[1], atol=1e-5)
    assert torch.allclose(prior.log_prob(z), (-0.5 * (u.pow(2) + math.log(2 * math.pi))).sum(1) + log_det)
    assert torch.allclose(prior(u), z, atol=1e-5)


def test_flow_prior_density_normalises_and_matches_its_samples():
    """On a 2-d latent: log_prob integrates to 1 over a fine grid, and a 2-d histogram of
    `sample` matches the density's mass in each cell."""
    prior = flow_prior()
    step = 0.025
    centres = torch.arange(-10 + step / 2, 10, step)  # of the grid's cells, on each axis
    grid = grid_2d(centres)
    with torch.no_grad():
        mass = prior.log_prob(grid).double().exp().view(len(centres), len(centres)) * step ** 2
        draws = prior.sample(200_000, torch.Generator().manual_seed(0))
    assert abs(mass.sum().item() - 1) < 2e-3
    edges = torch.linspace(-4, 4, 9)
    hist = torch.histogramdd(draws, bins=[edges, edges]).hist / len(draws)
    bin_of = torch.bucketize(centres, edges) - 1  # the histogram bin of each cell, per axis
    expected = torch.tensor([[mass[bin_of == i][:, bin_of == j].sum() for j in range(8)] for i in range(8)])
    assert torch.allclose(hist.double(), expected, atol=3e-3)


def test_importance_sampling_with_a_flow_prior_matches_numerical_integration(mnist_subset):
    """The importance-sampled log p(x) of a model trained with a flow prior against the integral
    of p(x|z) p(z) dz over a grid of its 2-d latent, wide enough for where the flow moved p(z): never
    above it (a lower bound, up to Monte Carlo noise), and within 0.3 nats (the encoder's Gaussian
    is a looser proposal for a posterior shaped by the flow than by N(0, I))."""
    x = mnist_subset[0][:64]
    torch.manual_seed(0)
    m = VAE(VAEConfig(arch="mlp", hidden_dim=32, latent_dim=2, flow_prior=2))
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    for _ in range(100):
        opt.zero_grad()
        m.loss(x).total.backward()
        opt.step()
    m.eval()
    step = 0.2  # the integrand is smooth at this scale: a grid of 0.1 gives the same integrals to 1e-4 nats
    side = torch.arange(-30 + step / 2, 30, step)  # the flow moves some images' posterior mass beyond +-15
    z = grid_2d(side)
    log_px_z, log_pz = [], []  # at every grid point: [points, 4] (an image per column) and [points]
    with torch.no_grad():
        for zc in z.split(40_000):
            logits = m.decode(zc)
            log_px_z.append(torch.stack([-bernoulli_nll(logits, xi.expand_as(logits)) for xi in x[:4]], 1))
            log_pz.append(m.prior.log_prob(zc))
    log_px_z = torch.cat(log_px_z)

    def integral(log_prior):  # log of the sum of p(x|z) p(z) dz over the grid: [4]
        return torch.logsumexp(log_px_z + log_prior.unsqueeze(1), 0) + 2 * math.log(step)

    exact = integral(torch.cat(log_pz))
    est = m.log_likelihood(x[:4], k=20000, chunk=2000, generator=torch.Generator().manual_seed(1))
    assert (est <= exact + 0.01).all() and torch.allclose(est, exact, atol=0.3), (est, exact)
    # the trained flow matters: N(0, I) in its place would be off by more than the tolerance
    assert ((integral(StandardNormal(2).log_prob(z)) - exact).abs() > 0.3).any()


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
    check_mixture({"weights": a[0][None], "means": a[1][None], "scale_tril": a[2][None]}, 4, 1)


def degenerate(case: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return {
        "one point": torch.randn(1, 4, generator=g),
        "repeated points": torch.randn(1, 4, generator=g).repeat(30, 1),
        "two distinct points, repeated": torch.randn(2, 4, generator=g).repeat(10, 1),
        "fewer points than dimensions": torch.randn(3, 8, generator=g),
        "a dimension without variance": torch.cat([torch.randn(40, 3, generator=g), torch.zeros(40, 1)], 1),
        "all zero": torch.zeros(5, 4),
        "huge and tiny scales": torch.randn(50, 4, generator=g) * torch.tensor([1e6, 1e-6, 1.0, 0.0]),
    }[case]


@pytest.mark.parametrize("case", ["one point", "repeated points", "two distinct points, repeated",
                                  "fewer points than dimensions", "a dimension without variance", "all zero",
                                  "huge and tiny scales"])
def test_em_fits_a_valid_mixture_to_degenerate_points(case):
    """Any N >= 1 points give a valid mixture (at most one component per distinct point), never a
    failed Cholesky factorisation, and its density is finite at the points."""
    x = degenerate(case)
    w, m, L = mixture.fit(x, 5, seed=0)
    assert 1 <= len(w) <= min(5, len(torch.unique(x, dim=0)))
    check_mixture({"weights": w[None], "means": m[None], "scale_tril": L[None]}, x.shape[1], 1)
    assert GaussianMixture(w[None], m[None], L[None]).log_prob(x).isfinite().all()


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
