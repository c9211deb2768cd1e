"""Euler, Heun, DDIM/DDPM, EDM stochastic: convergence order on exact mixture scores, the
identities between them, and distribution match for the stochastic ones."""

import pytest
import torch

from sfumato import sigmas as S
from sfumato.accuracy import CountingDenoiser, measure_order, reference_ode, sliced_wasserstein
from sfumato.mixture import random_mixture
from sfumato.samplers import SAMPLERS

MIXTURES = {
    "2d": random_mixture(2, 4, generator=torch.Generator().manual_seed(0)),
    "8d": random_mixture(8, 5, min_std=0.2, max_std=0.8,
                         generator=torch.Generator().manual_seed(1)),
}
THEORY = {"euler": 1, "ddim": 1, "heun": 2}


@pytest.fixture(scope="module", params=sorted(MIXTURES))
def problem(request):
    gm = MIXTURES[request.param]
    xT = torch.randn(300, gm.D, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    xT = xT * 20
    return gm, xT, reference_ode(gm, xT, 20.0, 0.05, 800)


@pytest.mark.parametrize("name", sorted(THEORY))
def test_convergence_order(problem, name):
    gm, xT, ref = problem
    errs, orders = measure_order(SAMPLERS[name], gm, xT, (16, 32, 64), reference=ref)
    assert abs(orders[-1] - THEORY[name]) <= 0.3, (name, errs, orders)


def test_identities():
    gm = MIXTURES["2d"]
    x = torch.randn(50, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * 80
    sig = S.karras(12, 0.002, 80.0)
    torch.testing.assert_close(SAMPLERS["ddim"](gm, x, sig), SAMPLERS["euler"](gm, x, sig))
    torch.testing.assert_close(SAMPLERS["edm"](gm, x, sig), SAMPLERS["heun"](gm, x, sig))
    g = lambda: torch.Generator().manual_seed(7)  # noqa: E731
    torch.testing.assert_close(SAMPLERS["ddpm"](gm, x, sig, generator=g()),
                               SAMPLERS["ddim"](gm, x, sig, eta=1.0, generator=g()))
    torch.testing.assert_close(SAMPLERS["euler_ancestral"](gm, x, sig, generator=g()),
                               SAMPLERS["ddpm"](gm, x, sig, generator=g()))
    counted = CountingDenoiser(gm)
    SAMPLERS["heun"](counted, x, sig)
    assert counted.nfe == 2 * 12 - 1  # the step into sigma = 0 is Euler


@pytest.mark.parametrize("name,kwargs,steps", [
    ("ddpm", {}, 200),
    ("ddim", {"eta": 0.5}, 100),
    ("edm", {"s_churn": 40.0, "s_tmin": 0.05, "s_tmax": 50.0, "s_noise": 1.0}, 64),
])
def test_stochastic_samplers_match_the_mixture(name, kwargs, steps):
    gm = random_mixture(2, 3, generator=torch.Generator().manual_seed(5))
    n = 4000
    x = torch.randn(n, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(6)) * 80
    out = SAMPLERS[name](gm, x, S.karras(steps, 0.002, 80.0),
                         generator=torch.Generator().manual_seed(8), **kwargs)
    real = gm.sample(n, generator=torch.Generator().manual_seed(9))
    floor = sliced_wasserstein(real, gm.sample(n, generator=torch.Generator().manual_seed(10)))
    sw = sliced_wasserstein(out, real)
    assert sw <= 1.5 * floor + 0.01, (sw, floor)
    torch.testing.assert_close(out.mean(0), gm.mean(), atol=0.1, rtol=0)
    torch.testing.assert_close(torch.cov(out.T), gm.covariance(), atol=0.3, rtol=0.1)


def test_one_call_sample_api():
    from sfumato.samplers import sample

    gm = MIXTURES["2d"]
    g = lambda: torch.Generator().manual_seed(11)  # noqa: E731
    a = sample(gm, (400, 2), sampler="heun", steps=18, generator=g(), dtype=torch.float64)
    b = sample(gm, (400, 2), sampler="heun", steps=18, generator=g(), dtype=torch.float64)
    assert torch.equal(a, b) and a.shape == (400, 2)
    real = gm.sample(400, generator=torch.Generator().manual_seed(12))
    floor = sliced_wasserstein(real, gm.sample(400, generator=torch.Generator().manual_seed(13)))
    assert sliced_wasserstein(a, real) < 2 * floor + 0.05
    with pytest.raises(ValueError, match="generator"):
        sample(gm, (4, 2), sampler="heun", steps=4)
