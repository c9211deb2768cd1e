"""Forward processes: exact algebra of s(t), sigma(t), t(sigma), logSNR against each paper's
own parameterisation."""

import math

import pytest
import torch

from sfumato.process import (
    EDM,
    VE,
    RectifiedFlow,
    SubVP,
    VPContinuous,
    VPDiscrete,
    get_process,
    make_betas,
    rescale_zero_terminal_snr,
)

D = torch.float64
ALL = [
    VPDiscrete("linear"),
    VPDiscrete("scaled_linear"),
    VPDiscrete("cosine"),
    VPDiscrete("linear", zero_terminal_snr=True),
    VPContinuous(),
    SubVP(),
    VE(),
    EDM(),
    RectifiedFlow(),
]


@pytest.mark.parametrize("proc", ALL, ids=lambda p: type(p).__name__ + getattr(p, "schedule", ""))
def test_t_sigma_round_trip_and_logsnr(proc):
    t = torch.linspace(proc.t_min, proc.t_max, 57, dtype=D)
    sig = proc.sigma(t)
    assert (sig[1:] > sig[:-1]).all(), "sigma must increase with t"
    torch.testing.assert_close(proc.t_from_sigma(sig), t, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(proc.sigma(proc.t_from_sigma(sig)), sig, rtol=1e-9, atol=0)
    torch.testing.assert_close(proc.logsnr(t), -2 * sig.log())
    torch.testing.assert_close(proc.scale_from_sigma(sig), proc.scale(t), rtol=1e-9, atol=1e-12)


def test_vp_discrete_matches_ddpm_formulas():
    p = VPDiscrete("linear")
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=D)
    ab = torch.cumprod(1 - betas, 0)
    torch.testing.assert_close(p.alphas_cumprod, ab)
    x0 = torch.randn(6, 3, dtype=D, generator=torch.Generator().manual_seed(0))
    eps = torch.randn(6, 3, dtype=D, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0, 1, 10, 500, 998, 999], dtype=D)
    direct = ab[t.long(), None].sqrt() * x0 + (1 - ab[t.long(), None]).sqrt() * eps
    torch.testing.assert_close(p.add_noise(x0, eps, t), direct)
    # variance preserving: s^2 (1 + sigma^2) = 1
    torch.testing.assert_close(p.scale(t) ** 2 * (1 + p.sigma(t) ** 2), torch.ones(6, dtype=D))


def test_vp_discrete_interpolation_and_quantize():
    p = VPDiscrete("linear")
    mid = p.sigma(torch.tensor(10.5, dtype=D))
    torch.testing.assert_close(mid, (p.sigmas[10] * p.sigmas[11]).sqrt())  # log-linear
    q = VPDiscrete("linear", quantize=True)
    t = q.t_from_sigma(torch.tensor([float(mid) * 0.999, float(p.sigmas[10]), 1e-9], dtype=D))
    assert t.tolist() == [10.0, 10.0, 0.0]


def test_beta_schedules():
    cos = make_betas("cosine", 1000)
    s = 0.008
    f = lambda t: math.cos((t / 1000 + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    ab = torch.cumprod(1 - cos, 0)
    assert abs(float(ab[499]) - f(500) / f(0)) < 1e-9
    sl = make_betas("scaled_linear", 1000)
    assert abs(float(sl[0]) - 0.00085) < 1e-12 and abs(float(sl[-1]) - 0.012) < 1e-12
    with pytest.raises(ValueError, match="unknown beta schedule"):
        make_betas("cosinus")


def test_zero_terminal_snr():
    ab = torch.cumprod(1 - make_betas("scaled_linear"), 0)
    r = rescale_zero_terminal_snr(ab)
    assert float(r[-1]) == 0.0
    torch.testing.assert_close(r[0], ab[0])
    p = VPDiscrete("scaled_linear", zero_terminal_snr=True)
    assert math.isfinite(p.sigma_max) and p.sigma_max > 4000


def test_continuous_processes_match_song_et_al():
    vp, sub = VPContinuous(), SubVP()
    t = torch.linspace(1e-3, 1, 11, dtype=D)
    log_mean = -0.25 * t**2 * (20 - 0.1) - 0.5 * t * 0.1  # Song et al. 2021, eq. (33)
    mean, std_vp = log_mean.exp(), (1 - (2 * log_mean).exp()).sqrt()
    torch.testing.assert_close(vp.scale(t), mean)
    torch.testing.assert_close(vp.scale(t) * vp.sigma(t), std_vp)
    torch.testing.assert_close(sub.scale(t), mean)
    torch.testing.assert_close(sub.scale(t) * sub.sigma(t), 1 - (2 * log_mean).exp())
    ve = VE(0.01, 50.0)
    torch.testing.assert_close(ve.sigma(t), 0.01 * (5000.0**t))


def test_edm_and_flow():
    e = EDM()
    t = torch.tensor([0.01, 1.0, 80.0], dtype=D)
    torch.testing.assert_close(e.sigma(t), t)
    logs = e.sample_t(20000, generator=torch.Generator().manual_seed(0)).log()
    assert abs(float(logs.mean()) + 1.2) < 0.03 and abs(float(logs.std()) - 1.2) < 0.03
    f = RectifiedFlow()
    x0, eps = torch.randn(4, 2, dtype=D), torch.randn(4, 2, dtype=D)
    tt = torch.tensor([0.1, 0.3, 0.5, 0.9], dtype=D)
    torch.testing.assert_close(f.add_noise(x0, eps, tt), (1 - tt[:, None]) * x0 + tt[:, None] * eps)
    ln = RectifiedFlow(t_sampling="logit_normal").sample_t(
        20000, generator=torch.Generator().manual_seed(0))
    logit = (ln / (1 - ln)).log()
    assert abs(float(logit.mean())) < 0.03 and abs(float(logit.std()) - 1) < 0.03


def test_get_process_errors():
    assert isinstance(get_process("edm"), EDM)
    with pytest.raises(ValueError, match="unknown process"):
        get_process("ddpm2")
    with pytest.raises(ValueError, match="t_sampling"):
        RectifiedFlow(t_sampling="beta")
