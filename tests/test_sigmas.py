"""Sigma grids: formulas, shape contract (n + 1 values, decreasing, final 0), discrete spacings
as diffusers spaces its timesteps."""

import math

import pytest
import torch

from sfumato import sigmas as S
from sfumato.process import EDM, RectifiedFlow, VPDiscrete


@pytest.mark.parametrize("fn", [S.karras, S.loglinear, S.polyexponential])
@pytest.mark.parametrize("n", [1, 2, 7, 50])
def test_contract(fn, n):
    s = fn(n, 0.002, 80.0)
    assert s.shape == (n + 1,) and s.dtype == torch.float64
    assert float(s[-1]) == 0.0 and abs(float(s[0]) - 80.0) < 1e-9
    assert (s[1:] < s[:-1]).all()
    if n > 1:
        assert abs(float(s[-2]) - 0.002) < 1e-12
    assert fn(n, 0.002, 80.0, final_zero=False).shape == (n,)


def test_karras_formula():
    s = S.karras(4, 0.1, 10.0, rho=3.0)
    expect = [(10 ** (1 / 3) + i / 3 * (0.1 ** (1 / 3) - 10 ** (1 / 3))) ** 3 for i in range(4)]
    torch.testing.assert_close(s[:-1], torch.tensor(expect, dtype=torch.float64))


def test_loglinear_is_uniform_in_logsnr():
    s = S.loglinear(9, 0.01, 100.0, final_zero=False)
    r = s[1:] / s[:-1]
    torch.testing.assert_close(r, torch.full_like(r, math.exp(math.log(1e-4) / 8)))


def test_uniform_t():
    p = RectifiedFlow()
    s = S.uniform_t(p, 5, final_zero=False)
    t = p.t_from_sigma(s)
    torch.testing.assert_close(t, torch.linspace(p.t_max, p.t_min, 5, dtype=torch.float64))
    e = S.uniform_t(EDM(), 3)
    torch.testing.assert_close(e, torch.tensor([80.0, 40.001, 0.002, 0.0], dtype=torch.float64))


def test_discrete_spacings_match_diffusers_timesteps():
    p = VPDiscrete("scaled_linear")
    idx = lambda s: [int((p.sigmas - v).abs().argmin()) for v in s[:-1]]  # noqa: E731
    assert idx(S.discrete(p, 10, "leading")) == [901, 801, 701, 601, 501, 401, 301, 201, 101, 1]
    assert idx(S.discrete(p, 10, "trailing")) == [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]
    assert idx(S.discrete(p, 10, "linspace")) == [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]
    with pytest.raises(ValueError, match="spacing"):
        S.discrete(p, 10, "middle")


def test_errors_and_get_sigmas():
    with pytest.raises(ValueError, match="positive integer"):
        S.karras(0, 0.1, 1.0)
    with pytest.raises(ValueError, match="sigma_min < sigma_max"):
        S.loglinear(5, 2.0, 1.0)
    with pytest.raises(ValueError, match="unknown sigma grid"):
        S.get_sigmas("kara", 5, sigma_min=0.1, sigma_max=1)
    p = VPDiscrete()
    g = S.get_sigmas("karras", 5, process=p)
    assert abs(float(g[0]) - p.sigma_max) < 1e-9 and abs(float(g[-2]) - p.sigma_min) < 1e-9


@pytest.mark.parametrize("n", [1, 2, 5, 10, 50])
def test_gaussian_lte_contract(n):
    s = S.gaussian_lte(n, 0.03, 15.0)
    assert s.shape == (n + 1,) and s.dtype == torch.float64
    assert float(s[-1]) == 0.0 and abs(float(s[0]) - 15.0) < 1e-9
    assert (s[1:] < s[:-1]).all() and float(s[-2]) >= 0.03 - 1e-12
    assert S.gaussian_lte(n, 0.03, 15.0, final_zero=False).shape == (n,)
    p = VPDiscrete()
    g = S.get_sigmas("gaussian_lte", n, process=p)
    torch.testing.assert_close(g, S.gaussian_lte(n, p.sigma_min, p.sigma_max))


def test_gaussian_lte_equidistributes_the_density():
    """Interior levels sit at equal increments of int rho dlambda (rho = E(y)^{1/(q+1)});
    short grids end above sigma_min (the final step gets the tail), long ones at sigma_min."""
    q, sd = 3, 0.5
    s = S.gaussian_lte(12, 0.03, 15.0, sigma_data=sd, order=q, final_zero=False)

    def mass(a, b, m=20001):  # int_a^b rho dlambda
        lam = torch.linspace(a, b, m, dtype=torch.float64)
        y = lam + math.log(sd)
        rho = ((y - torch.nn.functional.softplus(3 * y)) / (q + 1)).exp()
        return float(torch.trapezoid(rho, lam))

    lam = (-s.log()).tolist()
    masses = [mass(lam[i], lam[i + 1]) for i in range(len(lam) - 1)]
    assert max(masses) / min(masses) < 1.001
    assert abs(float(s[-1]) - 0.03) < 1e-12
    short = S.gaussian_lte(5, 0.03, 15.0, final_zero=False)
    assert float(short[-1]) > 0.05  # the tail beyond it is one step's share
    # the top step is long: one step of the grid covers sigma_max down to ~sigma_max / 5
    assert float(short[1]) < 15.0 / 3
    with pytest.raises(ValueError, match="sigma_data"):
        S.gaussian_lte(5, 0.03, 15.0, sigma_data=0.0)
    with pytest.raises(ValueError, match="order"):
        S.gaussian_lte(5, 0.03, 15.0, order=0)


def test_gaussian_lte_covariance_and_propagation():
    """sigma_data as a spectrum: one value is the isotropic grid; equal values are the
    isotropic grid; interior levels equidistribute rho = (RMS_i s_i E(y_i) g(y_i))^{1/(q+1)}
    with propagate=True; a small-scale axis and propagation move steps towards small sigma."""
    q, n = 3, 12
    iso = S.gaussian_lte(n, 0.03, 15.0, sigma_data=0.5, order=q)
    torch.testing.assert_close(S.gaussian_lte(n, 0.03, 15.0, sigma_data=[0.5], order=q), iso)
    torch.testing.assert_close(
        S.gaussian_lte(n, 0.03, 15.0, sigma_data=torch.full((7,), 0.5), order=q), iso)
    stds = torch.tensor([0.15, 0.2, 1.0, 1.4], dtype=torch.float64)
    s = S.gaussian_lte(n, 0.03, 15.0, sigma_data=stds, order=q, propagate=True,
                       final_zero=False)
    assert s.shape == (n,) and (s[1:] < s[:-1]).all() and float(s[-1]) >= 0.03 - 1e-12

    def mass(a, b, m=20001):
        lam = torch.linspace(a, b, m, dtype=torch.float64)
        y = lam[:, None] + stds.log()
        e = stds * (y - torch.nn.functional.softplus(3 * y)).exp()
        e = e * (1 + (-2 * y).exp()) ** -0.5
        rho = e.pow(2).mean(1).sqrt() ** (1 / (q + 1))
        return float(torch.trapezoid(rho, lam))

    lam = (-s.log()).tolist()
    masses = [mass(lam[i], lam[i + 1]) for i in range(len(lam) - 1)]
    assert max(masses) / min(masses) < 1.001
    # propagation shrinks errors at the top: fewer steps there, the first one longer
    plain = S.gaussian_lte(n, 0.03, 15.0, sigma_data=stds, order=q, final_zero=False)
    assert float(s[1]) < float(plain[1])
    # small-scale axes pull the low levels down against the isotropic sigma_data = 0.5 grid
    assert (s[n - 4:n - 1] < iso[n - 4:n - 1]).all()
    for bad in ([], [0.5, 0.0], [0.5, float("nan")]):
        with pytest.raises(ValueError, match="sigma_data"):
            S.gaussian_lte(5, 0.03, 15.0, sigma_data=bad)
