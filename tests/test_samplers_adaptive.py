"""Truth tests for the adaptive sampler (RK45) against the exact Gaussian-mixture model: the
error follows the tolerance, honest NFE counts, the final denoise. Its default-parameter contract
is in test_samplers_registry.py.
"""

from __future__ import annotations

import pytest
import torch
from _util import SMAX, SMIN

from sfumato import sigmas as S
from sfumato.accuracy import CountingDenoiser, median_error
from sfumato.samplers.adaptive import sample_rk45

pytestmark = pytest.mark.usefixtures("one_thread_module")


# ---------------------------------------------------------------------------------------
# RK45
# ---------------------------------------------------------------------------------------
def test_rk45_error_falls_with_tolerance_and_nfe_is_honest(gm, ode_case):
    x, ref = ode_case
    sig = torch.tensor([SMAX, 5.0, 1.0, SMIN], dtype=torch.float64)
    errs, nfes = [], []
    for tol in (1e-2, 1e-4, 1e-6):
        cd, stats, seen = CountingDenoiser(gm), {}, []
        out = sample_rk45(cd, x, sig, rtol=tol, atol=tol, stats=stats, callback=seen.append)
        errs.append(median_error(out, ref))
        nfes.append(stats["nfe"])
        assert stats["nfe"] == cd.nfe == seen[-1]["nfe"]
        assert stats["accepted"] >= 3 and stats["rejected"] >= 0
        assert [float(c["sigma_next"]) for c in seen] == sig[1:].tolist()  # stops on the grid
    assert errs[0] > errs[1] > errs[2], errs
    assert nfes[0] < nfes[1] < nfes[2], nfes
    assert errs[2] < 1e-4, errs
    # the error tracks the tolerance: within a factor ~10 of it on this problem
    for tol, e in zip((1e-2, 1e-4, 1e-6), errs, strict=True):
        assert e < 10 * tol, (tol, e)


def test_rk45_final_denoise_costs_nothing(gm, ode_case):
    x, _ = ode_case
    sig = torch.tensor([SMAX, 1.0, SMIN], dtype=torch.float64)
    stats0, stats1 = {}, {}
    to_min = sample_rk45(gm, x, sig, stats=stats0)
    to_zero = sample_rk45(gm, x, S.append_zero(sig), stats=stats1)
    torch.testing.assert_close(to_zero, gm(to_min, torch.full((x.shape[0],), SMIN,
                                                              dtype=torch.float64)))
    assert stats1 == stats0
    # a single step into 0 is the posterior mean at sigma_max
    one = sample_rk45(gm, x, torch.tensor([SMAX, 0.0], dtype=torch.float64))
    torch.testing.assert_close(one, gm(x, torch.full((x.shape[0],), SMAX, dtype=torch.float64)))
