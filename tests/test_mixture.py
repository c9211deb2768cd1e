"""The closed-form Gaussian mixture: its denoiser is Tweedie's posterior mean of its own
log-density (checked with autograd), its density integrates to one, its samples have its
moments."""

import math

import pytest
import torch

from sfumato.mixture import GaussianMixture, random_mixture


@pytest.mark.parametrize("full_cov", [True, False])
def test_denoiser_is_tweedie(full_cov):
    gm = random_mixture(3, 4, full_cov=full_cov, generator=torch.Generator().manual_seed(0))
    x = torch.randn(7, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 2
    for sigma in [0.05, 0.7, 5.0]:
        xr = x.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(gm.log_prob(xr, sigma).sum(), xr)
        torch.testing.assert_close(gm.denoise(x, sigma), x + sigma**2 * grad)
        torch.testing.assert_close(gm.score(x, sigma), grad)


def test_density_integrates_to_one_and_matches_the_formula():
    f64 = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    gm = GaussianMixture(f64([[-1.0, 0.0], [1.5, 0.5]]), f64([0.3, 0.6]), f64([0.3, 0.7]))
    lin = torch.linspace(-6, 6, 401, dtype=torch.float64)
    xx, yy = torch.meshgrid(lin, lin, indexing="ij")
    pts = torch.stack([xx.reshape(-1), yy.reshape(-1)], 1)
    mass = gm.log_prob(pts).exp().sum() * (lin[1] - lin[0]) ** 2
    assert abs(float(mass) - 1) < 1e-6
    # single isotropic component at sigma: N(mu, (v + s^2) I)
    p = gm.log_prob(torch.tensor([[1.5, 0.5]], dtype=torch.float64), sigma=0.5)
    v = 0.6 + 0.25
    direct = math.log(0.3 * math.exp(-0.5 * (2.5**2 + 0.25) / (0.3 + 0.25)) / (2 * math.pi * 0.55)
                      + 0.7 / (2 * math.pi * v))
    assert abs(float(p) - direct) < 1e-12


def test_samples_have_the_mixture_moments():
    gm = random_mixture(2, 3, generator=torch.Generator().manual_seed(3))
    x = gm.sample(200000, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(x.mean(0), gm.mean(), atol=0.02, rtol=0)
    torch.testing.assert_close(torch.cov(x.T), gm.covariance(), atol=0.05, rtol=0.01)


def test_event_shape_and_errors():
    gm = random_mixture(8, 2, event_shape=(2, 2, 2), generator=torch.Generator().manual_seed(0))
    x = gm.sample(3, generator=torch.Generator().manual_seed(0))
    assert x.shape == (3, 2, 2, 2) and gm(x, 1.0).shape == x.shape
    with pytest.raises(ValueError, match="expected x of shape"):
        gm(x.reshape(3, 8), 1.0)
    with pytest.raises(ValueError, match="positive definite"):
        GaussianMixture(torch.zeros(1, 2), torch.tensor([0.0]))
