"""Methods fitted to the benchmark's model: optimised grids and tuned solvers.

A result's ``calibration`` (its own axis, next to sampler and grid) says what was fitted:

- ``'optimized'``: the sampler on a grid fitted to the model for (sampler, step count) by
  :func:`sfumato.calibrate.optimize_sigmas`, started from ``gaussian_lte``;
- ``'tuned'``: UniPC with its coefficients fitted by
  :func:`sfumato.calibrate.tune_coefficients`, on the candidate grid (generic and optimised)
  with the least held-out error.

Both fit on calibration noise drawn from other seeds than the benchmark's ``z``, against the
same kind of reference (to sigma = 1e-4). The offline cost (reference solves, trial grids,
Adam steps) is reported in the JSON, not counted in NFE, as for any schedule optimisation;
:func:`sfumato.bench.report.summarize` reports the best method without them too.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any

import torch

from ..calibrate import OptimizedSigmas, TunedSolver, optimize_sigmas, tune_coefficients
from ..errors import UsageError
from ..samplers.tuned import UNIPC_VARIANTS, sample_tabulated
from .problem import REF_SIGMA, Problem
from .specs import parse_sampler

__all__ = ["OPTIMIZED", "TUNED", "CALIBRATIONS", "CALIBRATION_SAMPLES", "tunable",
           "optimized_grid", "tuned_solver", "calibrated_solver", "calibration_notes"]

OPTIMIZED = "optimized"
TUNED = "tuned"
#: calibration -> what tables call it
CALIBRATIONS = {OPTIMIZED: "optimized grid", TUNED: "tuned coefficients"}
CALIBRATION_SAMPLES = 4096  # calibration draws of an optimised grid (see sfumato.calibrate)
CALIBRATION_SEED = 7_000_003  # + the problem's seed: calibration noise, apart from z
#: generic grids a tuned solver may start from (with the optimised grids of its step count)
TUNE_CANDIDATES = ("gaussian_lte", "gaussian_cov", "loglinear", "karras")


def tunable(sampler: str) -> tuple[str, int]:
    """(variant, order) of a UniPC spec whose coefficients can be tuned; UsageError else."""
    base, kw = parse_sampler(sampler)
    extra = set(kw) - {"order", "variant"}
    if base not in UNIPC_VARIANTS or extra:
        raise UsageError(f"only UniPC's coefficients can be tuned ({sorted(UNIPC_VARIANTS)}, "
                         f"with 'order'); got {sampler!r}")
    return kw.get("variant", UNIPC_VARIANTS[base]), int(kw.get("order", 3))


def _generator(problem: Problem, offset: int) -> torch.Generator:
    return torch.Generator().manual_seed(CALIBRATION_SEED + offset + problem.info["seed"])


def optimized_grid(problem: Problem, sampler: str, n: int,
                   samples: int = CALIBRATION_SAMPLES) -> OptimizedSigmas:
    """The ``n``-step grid of ``sampler`` (a sampler spec) fitted to the problem's model by
    :func:`sfumato.calibrate.optimize_sigmas` from ``gaussian_lte``, on ``samples``
    calibration draws seeded apart from the benchmark's noise; cached in ``problem.fits``."""
    key = (OPTIMIZED, sampler, n, samples)
    if key not in problem.fits:
        base, kwargs = parse_sampler(sampler)
        problem.fits[key] = optimize_sigmas(
            problem.model, base, n, sigma_min=problem.sigma_min, sigma_max=problem.sigma_max,
            shape=problem.model.event_shape, sampler_kwargs=kwargs, samples=samples,
            generator=_generator(problem, 0), init=problem.grid("gaussian_lte", n),
            ref_sigma=REF_SIGMA, cache=problem.calibration_sets)
    return problem.fits[key]


def tuned_solver(problem: Problem, sampler: str, n: int,
                 samples: int = CALIBRATION_SAMPLES) -> TunedSolver:
    """UniPC (``sampler``: ``unipc``, ``unipc_bh1`` or ``unipc_bh2``, optionally with
    ``order``) with its ``n``-step coefficients tuned to the problem's model by
    :func:`sfumato.calibrate.tune_coefficients`, on the candidate grid with the least held-out
    error among :data:`TUNE_CANDIDATES` and every :func:`optimized_grid` fitted with ``n``
    steps so far; ``2 * samples`` calibration draws (half held out) from another seed than the
    optimised grids'; cached in ``problem.fits``."""
    key = (TUNED, sampler, n, samples)
    if key not in problem.fits:
        variant, order = tunable(sampler)
        cands = [problem.grid(g, n) for g in TUNE_CANDIDATES]
        cands += [fit.sigmas for k, fit in problem.fits.items()
                  if k[0] == OPTIMIZED and k[2] == n]
        problem.fits[key] = tune_coefficients(
            problem.model, cands, shape=problem.model.event_shape, order=order,
            variant=variant, samples=2 * samples, ref_sigma=REF_SIGMA,
            cache=problem.calibration_sets,
            generator=_generator(problem, 1))
    return problem.fits[key]


def calibrated_solver(problem: Problem, sampler: str, fn: Callable, calibration: str, n: int,
                      samples: int = CALIBRATION_SAMPLES
                      ) -> tuple[Callable, torch.Tensor, dict[str, Any]]:
    """``(sampler function, grid (n + 1,), fit record)`` of ``sampler`` (whose function is
    ``fn``) fitted as ``calibration`` with ``n`` steps; the record (the fit's ``to_dict()``
    and ``samples``) goes into the result's config for the JSON."""
    if calibration == OPTIMIZED:
        fit = optimized_grid(problem, sampler, n, samples)
        run = fn
    elif calibration == TUNED:
        fit = tuned_solver(problem, sampler, n, samples)
        run = functools.partial(sample_tabulated, table=fit.table)
    else:
        raise UsageError(f"unknown calibration {calibration!r}; choose one of "
                         f"{list(CALIBRATIONS)}")
    return run, fit.sigmas, {**fit.to_dict(), "samples": samples}


def calibration_notes(optimize: Iterable[str], tune: Iterable[str],
                      samples: int) -> list[str]:
    """The notes a benchmark prints when it runs optimised grids or tuned solvers."""
    notes = []
    if list(optimize):
        notes.append(f"{CALIBRATIONS[OPTIMIZED]}s: fitted per sampler and NFE by "
                     f"sfumato.calibrate.optimize_sigmas on {samples} calibration "
                     "draws (another seed than the benchmark's noise), starting from "
                     "gaussian_lte; the grid and its offline cost (calls per calibration draw) "
                     "are in the JSON, not in the NFE")
    if list(tune):
        notes.append(f"{CALIBRATIONS[TUNED]}: UniPC's coefficients fitted per NFE by "
                     "sfumato.calibrate.tune_coefficients on the candidate grid with the least "
                     f"held-out error (the optimised grids among them), {2 * samples} "
                     "calibration draws (half held out; another seed than the benchmark's "
                     "noise); tables and offline cost in the JSON, not in the NFE")
    return notes
