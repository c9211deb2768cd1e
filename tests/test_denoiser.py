"""Prediction targets and preconditioning: exact algebra, and wrapped 'perfect' networks that
reproduce the exact mixture denoiser through every parameterisation."""

import pytest
import torch

from sfumato.denoiser import (
    TARGETS,
    Denoiser,
    EDMDenoiser,
    convert,
    edm_precond,
    target_from_x0,
    x0_from_target,
)
from sfumato.mixture import random_mixture
from sfumato.process import EDM, VE, RectifiedFlow, VPContinuous, VPDiscrete

D = torch.float64
g = torch.Generator().manual_seed(0)
X0 = torch.randn(5, 3, dtype=D, generator=g)
EPS = torch.randn(5, 3, dtype=D, generator=g)
SIG = torch.tensor([0.01, 0.3, 1.0, 7.0, 80.0], dtype=D)
X = X0 + SIG[:, None] * EPS


@pytest.mark.parametrize("target", TARGETS)
def test_round_trip_is_exact(target):
    y = target_from_x0(target, X0, X, SIG)
    torch.testing.assert_close(x0_from_target(target, y, X, SIG), X0, rtol=1e-12, atol=1e-12)


def test_targets_match_their_papers_in_native_coordinates():
    s = SIG[:, None]
    # eps
    torch.testing.assert_close(target_from_x0("eps", X0, X, SIG), EPS)
    # v (Salimans & Ho 2022): in VP coordinates alpha = sqrt(abar), sigma_vp = sqrt(1 - abar)
    abar = 1 / (1 + s**2)
    v = abar.sqrt() * EPS - (1 - abar).sqrt() * X0
    torch.testing.assert_close(target_from_x0("v", X0, X, SIG), v)
    # flow velocity d x_t / dt for x_t = (1-t) x0 + t eps
    torch.testing.assert_close(target_from_x0("flow", X0, X, SIG), EPS - X0)
    # EDM: D = c_skip x + c_out F
    c_skip, c_out, c_in, c_noise = edm_precond(s, 0.5)
    F = target_from_x0("edm", X0, X, SIG)
    torch.testing.assert_close(c_skip * X + c_out * F, X0)
    torch.testing.assert_close(c_in, 1 / (s**2 + 0.25).sqrt())
    torch.testing.assert_close(c_noise, s.log() / 4)


def test_convert_between_targets():
    v = convert(EPS, "eps", "v", X, SIG)
    torch.testing.assert_close(convert(v, "v", "eps", X, SIG), EPS)
    torch.testing.assert_close(convert(EPS, "eps", "x0", X, SIG), X0)
    torch.testing.assert_close(convert(EPS - X0, "flow", "eps", X, SIG), EPS)


def _perfect_net(gm, process, target, t_scale=1.0):
    """A raw network that predicts `target` exactly from its native input, knowing only
    (x_in, c_noise) and the process it was trained on."""

    def net(x_in, c_noise):
        if target == "edm":
            sigma = (4 * c_noise).exp()
            x = x_in * (sigma**2 + 0.25).sqrt()[:, None]
        else:
            t = c_noise / t_scale
            sigma = process.sigma(t)
            x = x_in / process.scale(t)[:, None]
        return target_from_x0(target, gm(x, sigma), x, sigma)

    return net


CASES = [
    ("eps", VPDiscrete("linear"), 1.0),
    ("v", VPDiscrete("cosine"), 1.0),
    ("eps", VPContinuous(), 1000.0),
    ("v", VPContinuous(), 1.0),
    ("x0", VE(), 1.0),
    ("eps", VE(), 1.0),
    ("flow", RectifiedFlow(), 1000.0),
    ("edm", None, 1.0),
    ("x0", EDM(), 1.0),
]


@pytest.mark.parametrize("target,process,t_scale", CASES)
def test_wrapped_perfect_network_is_the_exact_denoiser(target, process, t_scale):
    gm = random_mixture(3, 3, generator=torch.Generator().manual_seed(1))
    den = Denoiser(_perfect_net(gm, process, target, t_scale), target=target, process=process,
                   t_scale=t_scale)
    lo = max(process.sigma_min if process else 0.01, 0.01)
    hi = min(process.sigma_max if process else 80.0, 80.0)
    sig = torch.exp(torch.linspace(torch.tensor(lo).log(), torch.tensor(hi).log(), 5)).to(D)
    x = gm.sample(5, generator=torch.Generator().manual_seed(2)) + sig[:, None] * EPS
    torch.testing.assert_close(den(x, sig), gm(x, sig), rtol=1e-9, atol=1e-9)


def test_raw_target_is_what_the_network_should_predict():
    for target, process, _ in CASES:
        den = Denoiser(lambda x, c: x, target=target, process=process)
        y = den.raw_target(X0, EPS, SIG)
        torch.testing.assert_close(y, target_from_x0(target, X0, X, SIG), rtol=1e-10, atol=1e-10)


def test_denoiser_errors_are_clear():
    with pytest.raises(ValueError, match="unknown prediction target"):
        Denoiser(lambda x, c: x, target="epsilon", process=VPDiscrete())
    with pytest.raises(ValueError, match="needs the process"):
        Denoiser(lambda x, c: x, target="eps")
    den = EDMDenoiser(lambda x, c: x)
    with pytest.raises(ValueError, match=r"sigma must be a scalar or have shape \(batch,\)"):
        den(X, SIG[:3])
    assert den(X, 1.0).shape == X.shape  # scalar sigma broadcasts


def test_low_precision_network_keeps_state_dtype():
    den = EDMDenoiser(lambda x, c: x.to(torch.bfloat16))
    out = den(X.float(), SIG.float())
    assert out.dtype == torch.float32


def test_discrete_timestep_wrapper_nearest_and_interpolated():
    from sfumato.denoiser import discrete_eps_denoiser

    seen = []

    def net(x_t, t):
        seen.append(t.clone())
        return torch.zeros_like(x_t)

    p = VPDiscrete("linear")
    sig = torch.stack([p.sigmas[10], (p.sigmas[10] * p.sigmas[11]).sqrt() * 1.0001]).to(D)
    x = torch.zeros(2, 3, dtype=D)
    discrete_eps_denoiser(net, p)(x, sig)
    torch.testing.assert_close(seen[-1][0], torch.tensor(10.0, dtype=D))
    assert 10.5 < float(seen[-1][1]) < 10.51  # interpolated in log sigma
    discrete_eps_denoiser(net, VPDiscrete("linear", quantize=True))(x, sig)
    assert seen[-1].tolist() == [10.0, 11.0]
