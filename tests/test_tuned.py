"""Tabulated multistep solvers (sfumato.samplers.tuned) and their tuning to a model
(sfumato.calibrate.tune_coefficients): UniPC's table must hold the coefficients an independent
derivation gives (sample_unipc runs that table, so this pins the sampler too; its orders and
exactness on polynomial denoisers are in test_exp_integrators.py), a tuned table must stay
exact for a constant denoiser and lower the error on noise it was not fitted on, and bad
tables are refused with clear errors."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from _util import gen

from sfumato import bench, sigmas
from sfumato.accuracy import rms
from sfumato.calibrate import tune_coefficients
from sfumato.mixture import random_mixture
from sfumato.samplers import get_sampler, sample_unipc
from sfumato.samplers.tuned import StepTable, sample_tabulated, unipc_table

GM = random_mixture(dim=3, k=4, generator=gen(0))


def _grids(n: int):
    g = sigmas.karras(n, 0.01, 20.0)
    return [g, g[:-1]] if n > 1 else [g]  # ending in 0, and ending above 0


@pytest.mark.parametrize("variant", ["bh1", "bh2"])
def test_unipc_table_is_unipc(variant):
    x0 = torch.randn(32, 3, generator=gen(1), dtype=torch.float64)
    for n, order, corrector, lof, fo in itertools.product(
            (1, 2, 3, 5, 8, 16), (1, 2, 3, 4, 5), (True, False), (True, False), (1, 3)):
        for g in _grids(n):
            kw = {"order": order, "variant": variant, "use_corrector": corrector,
                  "lower_order_final": lof, "final_order": fo}
            a = sample_unipc(GM, g[0] * x0, g, **kw)
            b = sample_tabulated(GM, g[0] * x0, g, table=unipc_table(g, **kw))
            assert (a - b).abs().max() < 1e-11, (n, kw)


def _exp_lagrange_weights(h: float, nodes: list[float]) -> list[float]:
    """w_k = int_0^h e^{-(h - tau)} l_k(tau / h) dtau for the Lagrange basis l_k on
    ``[0] + nodes`` (k >= 1): the weights that make the step exact for every denoiser that is
    a polynomial in lambda of degree <= len(nodes). By Gauss-Legendre quadrature, independent
    of the Vandermonde solve in sfumato.samplers.unipc."""
    r = np.array([0.0] + nodes)
    t, wq = np.polynomial.legendre.leggauss(40)
    u = (t + 1) / 2  # tau / h on [0, 1]
    kernel = h / 2 * wq * np.exp(-h * (1 - u))
    out = []
    for k in range(1, len(r)):
        others = np.delete(r, k)
        basis = np.prod([(u - o) / (r[k] - o) for o in others], axis=0)
        out.append(float(np.sum(kernel * basis)))
    return out


@pytest.mark.parametrize("variant", ["bh1", "bh2"])
def test_unipc_table_coefficients_match_an_independent_derivation(variant):
    """Every row with two or more unknowns is UniPC's exact solve, so it must equal the weights
    that integrate the exponential kernel against the interpolating polynomial (B cancels);
    a row with one unknown has UniPC's a_1 = 1/2, i.e. -B(h) / (2 r). The final weights are
    the Adams-Bashforth weights in sigma: they integrate polynomials of their degree exactly
    from the last positive sigma to 0."""
    for n, order, corrector, lof, fo in itertools.product(
            (3, 5, 8, 16), (1, 2, 3, 4, 5), (True, False), (True, False), (1, 2, 3)):
        g = sigmas.karras(n, 0.01, 20.0).tolist()
        t = unipc_table(g, order=order, variant=variant, use_corrector=corrector,
                        lower_order_final=lof, final_order=fo)
        lam = [-math.log(v) for v in g[:-1]]
        for i, (prow, crow) in enumerate(zip(t.predictor, t.corrector, strict=True)):
            h = lam[i + 1] - lam[i]
            nodes = [(lam[i - k] - lam[i]) / h for k in range(1, len(prow) + 1)]
            rows = [(prow, nodes)]
            if corrector and crow:
                rows.append((crow, nodes + [1.0]))
            else:  # the predictor alone, nothing on the new value
                assert crow == prow + [0.0]
            for row, r in rows:
                B = -h if variant == "bh1" else math.expm1(-h)
                want = [-B / (2 * r[0])] if len(r) == 1 else _exp_lagrange_weights(h, r)
                assert row == pytest.approx(want, rel=1e-9, abs=1e-12), (n, order, i, r)
        m = len(t.final)
        assert m == min(max(fo, 1), n)
        nodes = np.array(g[n - m:n][::-1])
        for deg in range(m):  # int_{s_m}^0 s^deg ds
            exact = -g[n - 1] ** (deg + 1) / (deg + 1)
            assert float(np.dot(t.final, nodes ** deg)) == pytest.approx(exact, rel=1e-10)


def test_tabulated_contract():
    g = sigmas.karras(6, 0.01, 20.0)
    t = unipc_table(g, variant="bh1")
    x = g[0] * torch.randn(16, 3, generator=gen(2))
    x_copy = x.clone()
    seen = []
    out = sample_tabulated(GM, x, g, table=t.to_dict(), callback=lambda d: seen.append(d["i"]))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert torch.equal(x, x_copy) and seen == list(range(6))
    assert get_sampler("tabulated") is sample_tabulated
    with pytest.raises(ValueError, match="not the grid the table was made for"):
        sample_tabulated(GM, x, sigmas.karras(6, 0.02, 20.0), table=t)


def test_table_validation():
    t = unipc_table(sigmas.karras(4, 0.01, 20.0)).to_dict()
    assert StepTable.from_dict(t).to_dict() == t
    with pytest.raises(ValueError, match="predictor and corrector rows"):
        StepTable.from_dict({**t, "predictor": t["predictor"][:-1]})
    with pytest.raises(ValueError, match="final weights"):
        StepTable.from_dict({**t, "final": []})
    with pytest.raises(ValueError, match="earlier denoised values"):
        StepTable.from_dict({**t, "predictor": [[1.0]] + t["predictor"][1:]})
    with pytest.raises(ValueError, match="decreasing"):
        StepTable.from_dict({**t, "sigmas": t["sigmas"][::-1]})
    with pytest.raises(ValueError, match="not a solver table"):
        StepTable.from_dict({"sigmas": [1.0, 0.0]})


@pytest.fixture(scope="module")
def problem():
    with bench.torch_threads(1):  # evaluation noise: seed 0; calibration draws other seeds
        yield bench.make_problem("img1", "scaled_linear", batch=512, seed=0, ref_steps=200)


@pytest.fixture(scope="module")
def tuned(problem):
    grid = problem.grid("gaussian_lte", 5)
    with bench.torch_threads(1):
        return tune_coefficients(problem.model, grid, shape=problem.model.event_shape,
                                 generator=gen(321), samples=2048, iters=200,
                                 ref_sigma=bench.REF_SIGMA)


def test_tuned_solver_beats_unipc_on_new_noise(problem, tuned):
    x, ref = problem.x_start, problem.reference
    before = rms(sample_tabulated(problem.model, x, tuned.sigmas, table=tuned.init_table), ref)
    after = rms(sample_tabulated(problem.model, x, tuned.sigmas, table=tuned.table), ref)
    assert before == pytest.approx(rms(get_sampler("unipc_bh1")(problem.model, x,
                                                                 tuned.sigmas), ref), rel=1e-9)
    assert tuned.error < 0.9 * tuned.init_error and tuned.best_iter > 0
    assert after < 0.9 * before, (before, after)
    assert tuned.nfe > 801  # targets (4 x 200 + 1 calls per draw) plus training


def test_tuned_solver_exact_for_constant_denoiser(tuned):
    """P and C act on differences of denoised values and the final weights keep their sum at
    -sigma_m, so D = c gives x = c exactly however far the coefficients moved."""
    t = tuned.table
    assert sum(t.final) == pytest.approx(-t.sigmas[-2], rel=1e-12)
    assert t.predictor != tuned.init_table.predictor  # it did move
    c = torch.randn(1, 1, 4, 4, generator=gen(5), dtype=torch.float64)
    x = t.sigmas[0] * torch.randn(8, 1, 4, 4, generator=gen(6), dtype=torch.float64)
    out = sample_tabulated(lambda x, s: c.expand_as(x), x, tuned.sigmas, table=t)
    assert (out - c).abs().max() < 1e-12


def test_tune_picks_the_best_candidate_and_keeps_unipc_at_zero_iters(problem):
    cands = [problem.grid(g, 4) for g in ("trailing", "loglinear", "karras")]
    with bench.torch_threads(1):
        fit = tune_coefficients(problem.model, cands, shape=problem.model.event_shape,
                                generator=gen(9), samples=256, iters=0)
    # trailing ends at a large sigma: never the best of these
    assert fit.table.to_dict() == fit.init_table.to_dict() and fit.best_iter == 0
    assert fit.table.sigmas in [c.tolist() for c in cands[1:]]
    with pytest.raises(ValueError, match="end in 0"):
        tune_coefficients(problem.model, cands[1][:-1], shape=(1, 4, 4), generator=gen(0))
    with pytest.raises(ValueError, match="share their first level"):
        tune_coefficients(problem.model, [cands[1], problem.grid("karras", 5)],
                          shape=(1, 4, 4), generator=gen(0))


def test_bench_runs_tuned_solvers_as_calibrated(problem):
    with bench.torch_threads(1):
        out = bench.run_benchmark(problem, samplers=["unipc_bh1"], grids=["loglinear"],
                                  nfes=[4], rk45=False, log=None, tune=["unipc_bh1"],
                                  calibration_samples=256)
    rows = {r.method: r for r in out["results"]}
    tuned = rows["unipc_bh1 / tuned coefficients"]
    assert tuned.calibration == bench.TUNED
    assert tuned.valid and tuned.nfe == 4 and "table" in tuned.config["fit"]
    summary = bench.summarize(out["results"], [4])[4]
    assert summary["sfumato_generic"] == "unipc_bh1 / loglinear"
    with pytest.raises(ValueError, match="only UniPC"):
        bench.run_benchmark(problem, samplers=[], nfes=[4], tune=["dpmpp_2m"], log=None)
