"""Truth tests for the reverse-SDE samplers (Euler-Maruyama, predictor-corrector): the sampled
distribution against the exact Gaussian-mixture model, NFE, bad options, and the registry-wide
contract (test_samplers_registry.py) with non-default options.
"""

from __future__ import annotations

import math

import pytest
import torch
from _util import check_options_finite_deterministic_no_inplace

from sfumato import sigmas as S
from sfumato.accuracy import CountingDenoiser, sliced_wasserstein
from sfumato.samplers.multistep import sample_lms, sample_plms
from sfumato.samplers.sde import sample_euler_maruyama, sample_pc

pytestmark = pytest.mark.usefixtures("one_thread_module")


# ---------------------------------------------------------------------------------------
# Euler-Maruyama and predictor-corrector: distributions
# ---------------------------------------------------------------------------------------
N_DIST = 4000


@pytest.fixture(scope="module")
def dist_case(gm):
    data = gm.sample(N_DIST, generator=torch.Generator().manual_seed(10))
    floor = sliced_wasserstein(data, gm.sample(N_DIST, generator=torch.Generator().manual_seed(11)))
    x = 80.0 * torch.randn(N_DIST, 2, generator=torch.Generator().manual_seed(12),
                           dtype=torch.float64)
    return data, floor, x


@pytest.mark.parametrize(("sampler", "kw"), [
    (sample_euler_maruyama, {}),
    (sample_pc, {}),
    (sample_pc, {"predictor": "ode"}),
    (sample_pc, {"step_size": "batch"}),
])
def test_sde_samplers_match_the_distribution(gm, dist_case, sampler, kw):
    data, floor, x = dist_case
    out = sampler(gm, x, S.karras(200, 0.002, 80.0),
                  generator=torch.Generator().manual_seed(13), **kw)
    assert torch.isfinite(out).all()
    mean, cov = gm.mean(), gm.covariance()
    se = math.sqrt(float(cov.trace()) / N_DIST)  # standard error of the mean's norm, roughly
    assert float((out.mean(0) - mean).norm()) < 4 * se
    assert float((torch.cov(out.T) - cov).norm() / cov.norm()) < 0.08
    sw = sliced_wasserstein(out, data)
    assert sw < 1.5 * floor, (sw, floor)


# ---------------------------------------------------------------------------------------
# options: finite, deterministic, batch-independent, no in-place edits
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(("sampler", "kw"), [
    (sample_euler_maruyama, {"denoise_final": False}),
    (sample_pc, {"predictor": "ode", "n_corrector": 2}),
    (sample_pc, {"snr": 0.05}),
])
def test_options_finite_deterministic_no_inplace(gm, sampler, kw):
    check_options_finite_deterministic_no_inplace(gm, sampler, kw)


def test_em_denoise_final_only_drops_the_last_noise(gm):
    x = 80.0 * torch.randn(5, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    sig = S.karras(6, 0.002, 80.0)
    seen = []
    kept = sample_euler_maruyama(gm, x, sig, denoise_final=False, callback=seen.append,
                                 generator=torch.Generator().manual_seed(0))
    dropped = sample_euler_maruyama(gm, x, sig, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(dropped, seen[-1]["denoised"])
    assert 0 < float((kept - dropped).abs().max()) < 0.002 * 6


def test_pc_nfe_and_bad_options(gm):
    cd = CountingDenoiser(gm)
    sample_pc(cd, torch.zeros(2, 2), S.karras(7, 0.002, 80.0), n_corrector=2,
              generator=torch.Generator().manual_seed(0))
    assert cd.nfe == 7 * 3
    with pytest.raises(ValueError, match="predictor"):
        sample_pc(gm, torch.zeros(2, 2), S.karras(3, 0.1, 1.0), predictor="heun")
    with pytest.raises(ValueError, match="step_size"):
        sample_pc(gm, torch.zeros(2, 2), S.karras(3, 0.1, 1.0), step_size="sample")
    with pytest.raises(ValueError, match="warmup"):
        sample_plms(gm, torch.zeros(2, 2), S.karras(3, 0.1, 1.0), warmup="rk")
    with pytest.raises(ValueError, match="order"):
        sample_lms(gm, torch.zeros(2, 2), S.karras(3, 0.1, 1.0), order=0)
