"""Sampler benchmark harness: sfumato samplers and diffusers schedulers on one exact model.

Used by ``benchmarks/samplers.py`` (the full table) and ``sfumato compare`` (a small version
with a plot). Everything here measures *ODE solver error*: how far a deterministic sampler's
output is from the exact probability-flow ODE solution that starts from the same noise.

The setting
-----------
- **Process**: a discrete VP process (:class:`~sfumato.process.VPDiscrete`, 1000 steps,
  ``scaled_linear`` or ``linear`` betas), the setting diffusers' schedulers are built for.
  Every diffusers scheduler gets these exact betas (``trained_betas``).
- **Model**: a :class:`~sfumato.toy.GaussianMixture`, whose denoiser ``D(x, sigma)`` is exact.
  sfumato samplers call it directly (σ-space). diffusers schedulers call :class:`EpsModel`,
  the same mixture read as an eps-prediction network in VP coordinates:
  ``x = x_t sqrt(1 + sigma^2)``, ``eps = (x - D(x, sigma)) / sigma``.
- **Noise levels**: sfumato grids stay inside the process's trained range
  ``[sigma(t=0), sigma(t=T-1)]`` and then take the final step to 0, as diffusers does.
- **Same noise, same initial value problem**: one draw ``z``; the σ-space start is
  ``x_start = sigma_max z`` at ``sigma_max = sigma(T-1)``; in VP coordinates that is the
  latent ``L = x_start / sqrt(1 + sigma_max^2)`` (= 0.998 z for scaled_linear, where a diffusers
  pipeline would use z itself; we use L so that both libraries solve exactly the same initial
  value problem). A method whose first noise level ``sigma_0`` is below ``sigma_max``
  ("leading" spacing) starts, as in a diffusers pipeline, from the same VP latent read at its
  own first level: σ-space ``L sqrt(1 + sigma_0^2)``; its error then includes what skipping the
  top of the schedule costs.
- **Reference**: :func:`sfumato.check.reference_ode` (RK4 in log sigma, float64) from
  ``(sigma_max, x_start)`` down to ``sigma = 1e-4``, then ``D(x, 1e-4)``: the PF-ODE solution at
  sigma = 0. Its own accuracy is estimated by halving its step count and reported.
- **Comparison space**: every method's output is compared in data space (σ-space at sigma = 0).
  All configurations end at sigma = 0 (sfumato grids append 0; DDIM/PNDM use
  ``set_alpha_to_one=True``; the others ``final_sigmas_type='zero'``), where the VP scale is 1,
  so the VP output *is* the data-space output. The one exception, UniPC-bh1 with
  ``final_sigmas_type='sigma_min'`` (bh1 returns NaN when it steps into 0), ends at
  sigma(t=0); its VP output ``x`` is read as ``x sqrt(1 + sigma^2)`` there.
- **The diffusers model's sigma**: a scheduler passes a timestep; the wrapper evaluates the
  mixture at the sigma the scheduler itself assumes for that call (``scheduler.sigmas[i]``,
  whose timestep diffusers may have rounded, e.g. with Karras sigmas), i.e. diffusers' best
  case; ``sigma_source='timestep'`` uses sigma(t) instead (what an integer-t network sees;
  it moves the best diffusers errors by a few percent, either way). diffusers schedulers
  compute in float32, sfumato here in float64: measured, the errors agree to 4-5 digits
  (e.g. sfumato Euler vs diffusers Euler on the same Karras grid), so precision plays no part.
- **Final-step floor**: every fixed-grid method ends with a step from its last positive sigma
  (at best sigma(t=0), ~0.03 for Stable Diffusion's betas) into 0. The error of an *exact* solve
  down to sigma(t=0) followed by the first-order step ``D(x, sigma(t=0))`` is reported as
  ``final_step_floor``; methods whose last step is higher order (diffusers' LMS) can go below.
- **Error**: RMS over all samples and coordinates (:func:`sfumato.check.rms`).
- **NFE**: counted by wrapping the model (:class:`~sfumato.check.CountingDenoiser`); for a
  target NFE each method uses the largest step count whose counted NFE does not exceed it
  (Heun with n steps costs 2n - 1, PNDM n + 1, ...). The actual NFE is recorded.
- **Optimised grids** (grid ``optimized``, :mod:`sfumato.calibrate`): for the samplers and
  NFEs asked for, the grid is fitted to the model on calibration noise drawn from another seed
  (never the benchmark's ``z``), against the same kind of reference (to sigma = 1e-4). The
  offline cost (reference solves + trial grids) is not counted in NFE, as for any schedule
  optimisation; :func:`summarize` also reports the best sfumato method without them.
- **Stochastic samplers** (``sfumato.samplers.STOCHASTIC``, diffusers' ancestral/SDE
  schedulers) do not converge to the ODE solution and are left out. The adaptive ``rk45``
  sampler, whose NFE is set by a tolerance, gets its own rows and is not in the best-of.

diffusers is optional (``pip install sfumato[bench]``); without it only sfumato runs.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import functools
import inspect
import json
import logging
import math
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import sigmas as grids
from .calibrate import OptimizedSigmas, TunedSolver, optimize_sigmas, tune_coefficients
from .check import CountingDenoiser, reference_ode, rms
from .process import VPDiscrete
from .samplers import SAMPLERS, STOCHASTIC, get_sampler
from .samplers.tuned import UNIPC_VARIANTS, sample_tabulated
from .toy import GaussianMixture, random_mixture

__all__ = [
    "MIXTURES",
    "GRIDS",
    "DEFAULT_NFES",
    "Problem",
    "Result",
    "make_mixture",
    "make_problem",
    "start_state",
    "sfumato_grid",
    "DATA_GRIDS",
    "OPTIMIZED",
    "TUNED",
    "CALIBRATED",
    "deterministic_samplers",
    "parse_sampler",
    "run_sfumato",
    "rk45_sweep",
    "rk45_results",
    "diffusers_available",
    "EpsModel",
    "DiffusersConfig",
    "diffusers_configs",
    "run_diffusers",
    "dedupe_diffusers",
    "run_benchmark",
    "summarize",
    "format_table",
    "format_summary",
    "plot_errors",
    "compare",
    "check_nfes",
    "torch_threads",
    "results_payload",
    "COMPARE_SAMPLERS",
    "COMPARE_GRIDS",
]

DEFAULT_NFES = (5, 10, 20, 50)
REF_SIGMA = 1e-4  # the reference ODE stops here, then takes D(x, REF_SIGMA)
#: grid name of the per-(sampler, NFE) optimised grids (not a :data:`GRIDS` builder)
OPTIMIZED = "optimized"
#: grid name of the per-(sampler, NFE) tuned solvers (grid + UniPC coefficients fitted)
TUNED = "tuned"
#: the pseudo-grids fitted to the model (left out of the "generic" best-of)
CALIBRATED = (OPTIMIZED, TUNED)
CALIBRATION_SAMPLES = 4096  # calibration draws of an optimised grid (see sfumato.calibrate)
CALIBRATION_SEED = 7_000_003  # + the problem's seed: calibration noise, apart from z


# ---------------------------------------------------------------------------------------
# the problem: mixture, process, noise, reference
# ---------------------------------------------------------------------------------------
def _mix_2d(g: torch.Generator) -> GaussianMixture:
    return random_mixture(dim=2, k=8, scale=1.0, min_std=0.05, max_std=0.3, generator=g)


def _mix_img(shape: tuple[int, ...]) -> Callable[[torch.Generator], GaussianMixture]:
    def build(g: torch.Generator) -> GaussianMixture:
        d = math.prod(shape)
        return random_mixture(dim=d, k=8, scale=0.5, min_std=0.05, max_std=0.3,
                              generator=g, event_shape=shape)

    return build


#: mixture name -> (description, builder(generator))
MIXTURES: dict[str, tuple[str, Callable[[torch.Generator], GaussianMixture]]] = {
    "gmm2d": ("2-D, 8 components, std 0.05-0.3, means ~ N(0, 1)", _mix_2d),
    "img1": ("image-shaped (1, 4, 4), 8 components, std 0.05-0.3, means ~ N(0, 0.25)",
             _mix_img((1, 4, 4))),
    "img3": ("image-shaped (3, 4, 4), 8 components, std 0.05-0.3, means ~ N(0, 0.25)",
             _mix_img((3, 4, 4))),
}


def make_mixture(name: str, seed: int = 0) -> GaussianMixture:
    """A benchmark mixture by name (see :data:`MIXTURES`), deterministic in ``seed``."""
    if name not in MIXTURES:
        raise ValueError(f"unknown mixture {name!r}; choose one of {sorted(MIXTURES)}")
    return MIXTURES[name][1](torch.Generator().manual_seed(1000 + seed))


@dataclass
class Problem:
    """One benchmark problem: the process, the exact model, the shared noise and the reference.

    Attributes:
        process: the discrete VP process (float64 tables).
        model: the exact σ-space denoiser (a Gaussian mixture).
        x_start: σ-space start ``sigma_max * z``, float64, shape (B, *event_shape).
        latent: the same start in VP coordinates, ``x_start / sqrt(1 + sigma_max^2)``.
        reference: the PF-ODE solution at sigma = 0 from ``(sigma_max, x_start)``.
        ref_accuracy: RMS between the reference and one computed with half the steps.
        info: a JSON-able description, including ``final_step_floor``: the error of the exact
            ODE solution at sigma_min = sigma(t=0) followed by the final step ``D(x, sigma_min)``
            -- the least error any grid that ends at sigma_min can reach.
    """

    process: VPDiscrete
    model: GaussianMixture
    x_start: torch.Tensor
    latent: torch.Tensor
    reference: torch.Tensor
    ref_accuracy: float
    info: dict[str, Any] = field(default_factory=dict)
    _optimized: dict[tuple, OptimizedSigmas] = field(default_factory=dict, repr=False)
    _tuned: dict[tuple, TunedSolver] = field(default_factory=dict, repr=False)
    #: calibration sets (starts, targets) shared by every fit on this model (same seed and
    #: size -> same draws, whatever the sampler or step count)
    _calibration: dict = field(default_factory=dict, repr=False)

    @property
    def sigma_max(self) -> float:
        return self.process.sigma_max

    @functools.cached_property
    def data_std(self) -> torch.Tensor:
        """Standard deviations of the data along its principal axes (square roots of the
        eigenvalues of the mixture's covariance), ascending: the data statistic the
        ``gaussian_cov`` grid uses (with real data: a PCA of the training set)."""
        return torch.linalg.eigvalsh(self.model.covariance()).clamp(min=0).sqrt()

    @property
    def sigma_min(self) -> float:
        return self.process.sigma_min

    def optimized_grid(self, sampler: str, n: int,
                       samples: int = CALIBRATION_SAMPLES) -> OptimizedSigmas:
        """The ``n``-step grid of ``sampler`` (a :func:`parse_sampler` spec) fitted to this
        model by :func:`sfumato.calibrate.optimize_sigmas` from ``gaussian_lte``, on
        ``samples`` calibration draws seeded apart from the benchmark's noise; cached."""
        key = (sampler, n, samples)
        cache = self._optimized
        if key not in cache:
            base, kwargs = parse_sampler(sampler)
            cache[key] = optimize_sigmas(
                self.model, base, n, sigma_min=self.sigma_min, sigma_max=self.sigma_max,
                shape=self.model.event_shape, sampler_kwargs=kwargs, samples=samples,
                generator=torch.Generator().manual_seed(CALIBRATION_SEED + self.info["seed"]),
                init=sfumato_grid("gaussian_lte", self.process, n), ref_sigma=REF_SIGMA,
                cache=self._calibration)
        return cache[key]

    def tuned_solver(self, sampler: str, n: int,
                     samples: int = CALIBRATION_SAMPLES) -> TunedSolver:
        """UniPC (``sampler``: ``unipc``, ``unipc_bh1`` or ``unipc_bh2``, optionally with
        ``order``) with its ``n``-step coefficients tuned to this model by
        :func:`sfumato.calibrate.tune_coefficients`, on the candidate grid with the least
        held-out error among the generic ones (``gaussian_lte``, ``gaussian_cov``,
        ``loglinear``, ``karras``) and every :meth:`optimized_grid` fitted with ``n`` steps;
        ``2 * samples`` calibration draws (half held out) from another seed than the optimised
        grids'; cached."""
        key = (sampler, n, samples)
        if key not in self._tuned:
            variant, order = _tunable(sampler)
            cands = [sfumato_grid(g, self.process, n, self.data_std)
                     for g in ("gaussian_lte", "gaussian_cov", "loglinear", "karras")]
            cands += [fit.sigmas for (_, m, _), fit in self._optimized.items() if m == n]
            self._tuned[key] = tune_coefficients(
                self.model, cands, shape=self.model.event_shape, order=order, variant=variant,
                samples=2 * samples, ref_sigma=REF_SIGMA, cache=self._calibration,
                generator=torch.Generator().manual_seed(CALIBRATION_SEED + 1 + self.info["seed"]))
        return self._tuned[key]


def _tunable(sampler: str) -> tuple[str, int]:
    """(variant, order) of a UniPC spec whose coefficients can be tuned; ValueError else."""
    base, kw = parse_sampler(sampler)
    extra = set(kw) - {"order", "variant"}
    if base not in UNIPC_VARIANTS or extra:
        raise ValueError(f"only UniPC's coefficients can be tuned ({sorted(UNIPC_VARIANTS)}, "
                         f"with 'order'); got {sampler!r}")
    return kw.get("variant", UNIPC_VARIANTS[base]), int(kw.get("order", 3))


def add_problem_arguments(parser, *, mixture: str, batch_type: Callable[[str], int] = int,
                          batch: int = 128) -> None:
    """``--mixture``, ``--schedule``, ``--batch``: the arguments of :func:`make_problem`, as
    ``sfumato compare`` and ``benchmarks/samplers.py`` take them (argparse ``parser``), with
    default mixture ``mixture`` and sample count ``batch``."""
    parser.add_argument("--mixture", default=mixture, choices=sorted(MIXTURES),
                        help="the exact model (default: %(default)s)")
    parser.add_argument("--schedule", default="scaled_linear",
                        choices=["scaled_linear", "linear"],
                        help="VP beta schedule, 1000 steps (default: %(default)s)")
    parser.add_argument("--batch", type=batch_type, default=batch,
                        help="number of samples (default: %(default)s)")


def make_problem(mixture: str = "img3", schedule: str = "scaled_linear", batch: int = 128,
                 seed: int = 0, ref_steps: int = 400) -> Problem:
    """Build the benchmark problem (deterministic in ``seed``).

    ``ref_steps`` RK4 steps in log sigma from sigma_max to 1e-4 (4 model calls each) give the
    reference; ``ref_steps // 2`` more give its accuracy estimate (RK4 is 4th order, so the
    reference is ~15x more accurate than that estimate).
    """
    if batch < 1:
        raise ValueError(f"batch must be a positive integer; got {batch}")
    process = VPDiscrete(schedule=schedule, n=1000)
    model = make_mixture(mixture, seed)
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(batch, *model.event_shape, generator=g, dtype=torch.float64)
    smax = process.sigma_max
    x_start = smax * z
    latent = x_start / math.sqrt(1 + smax**2)

    def solve(steps: int) -> tuple[torch.Tensor, float]:
        # two legs, sigma_max -> sigma_min -> REF_SIGMA, steps split by log-sigma length, so
        # the state at sigma_min gives the final-step floor for free
        smin = process.sigma_min
        l1, l2 = math.log(smax / smin), math.log(smin / REF_SIGMA)
        n1 = max(1, round(steps * l1 / (l1 + l2)))
        x_min = reference_ode(model, x_start, smax, smin, steps=n1)
        x = reference_ode(model, x_min, smin, REF_SIGMA, steps=max(1, steps - n1))
        ref = model(x, torch.full((batch,), REF_SIGMA, dtype=torch.float64))
        return ref, rms(model(x_min, torch.full((batch,), smin, dtype=torch.float64)), ref)

    reference, floor = solve(ref_steps)
    ref_acc = rms(reference, solve(max(ref_steps // 2, 2))[0])
    info = {"mixture": mixture, "mixture_desc": MIXTURES[mixture][0], "schedule": schedule,
            "batch": batch, "seed": seed, "event_shape": list(model.event_shape),
            "sigma_min": process.sigma_min, "sigma_max": smax, "ref_steps": ref_steps,
            "ref_accuracy": ref_acc, "final_step_floor": floor}
    return Problem(process, model, x_start, latent, reference, ref_acc, info)


def start_state(problem: Problem, sigma0: float) -> torch.Tensor:
    """σ-space start for a method whose first noise level is ``sigma0``.

    ``x_start`` when ``sigma0`` is sigma_max (up to float32 rounding); otherwise the shared VP
    latent read at ``sigma0``: ``latent * sqrt(1 + sigma0^2)`` (what a diffusers pipeline does
    with "leading" spacing).
    """
    if abs(sigma0 - problem.sigma_max) <= 1e-5 * problem.sigma_max:
        return problem.x_start
    return problem.latent * math.sqrt(1 + sigma0**2)


# ---------------------------------------------------------------------------------------
# sfumato: grids and samplers
# ---------------------------------------------------------------------------------------
def _grid_karras(p: VPDiscrete, n: int) -> torch.Tensor:
    return grids.karras(n, p.sigma_min, p.sigma_max, rho=7.0)


def _grid_loglinear(p: VPDiscrete, n: int) -> torch.Tensor:
    return grids.loglinear(n, p.sigma_min, p.sigma_max)


def _grid_polyexp(p: VPDiscrete, n: int) -> torch.Tensor:
    return grids.polyexponential(n, p.sigma_min, p.sigma_max, rho=2.0)


def _grid_gaussian_lte(p: VPDiscrete, n: int) -> torch.Tensor:
    return grids.gaussian_lte(n, p.sigma_min, p.sigma_max, sigma_data=0.5, order=3)


def _grid_gaussian_cov(p: VPDiscrete, n: int, data_std: torch.Tensor) -> torch.Tensor:
    return grids.gaussian_lte(n, p.sigma_min, p.sigma_max, sigma_data=data_std, order=3,
                              propagate=True)


def _grid_uniform_t(p: VPDiscrete, n: int) -> torch.Tensor:
    return grids.uniform_t(p, n)


def _grid_discrete(spacing: str) -> Callable[[VPDiscrete, int], torch.Tensor]:
    def build(p: VPDiscrete, n: int) -> torch.Tensor:
        return grids.discrete(p, n, spacing=spacing)

    return build


#: grid name -> builder(process, n_steps) -> sigmas (n + 1 values ending in 0); the builders
#: named in :data:`DATA_GRIDS` also take ``data_std`` (:attr:`Problem.data_std`)
GRIDS: dict[str, Callable[..., torch.Tensor]] = {
    "karras": _grid_karras,
    "loglinear": _grid_loglinear,
    "polyexp2": _grid_polyexp,
    "gaussian_lte": _grid_gaussian_lte,
    "gaussian_cov": _grid_gaussian_cov,
    "uniform_t": _grid_uniform_t,
    "trailing": _grid_discrete("trailing"),
    "linspace": _grid_discrete("linspace"),
    "leading": _grid_discrete("leading"),
}


#: grids built from a data statistic: the data's standard deviations along its principal axes
#: (``gaussian_cov``: :func:`sfumato.sigmas.gaussian_lte` on the Gaussian surrogate with the
#: data's covariance, errors weighted by how much of them reaches sigma = 0, order 3 = UniPC-2
#: with its corrector)
DATA_GRIDS = ("gaussian_cov",)


def sfumato_grid(name: str, process: VPDiscrete, n: int,
                 data_std: torch.Tensor | None = None) -> torch.Tensor:
    """Grid ``name`` (see :data:`GRIDS`) with ``n`` steps, inside the process's range, then 0.

    The grids in :data:`DATA_GRIDS` need ``data_std`` (see :attr:`Problem.data_std`).
    """
    if name not in GRIDS:
        raise ValueError(f"unknown grid {name!r}; choose one of {sorted(GRIDS)}")
    if name in DATA_GRIDS:
        if data_std is None:
            raise ValueError(f"grid {name!r} needs data_std (the data's standard deviations "
                             "along its principal axes, e.g. Problem.data_std)")
        return GRIDS[name](process, n, data_std)
    return GRIDS[name](process, n)


def parse_sampler(spec: str) -> tuple[str, dict[str, Any]]:
    """``'unipc(order=2)'`` -> ``('unipc', {'order': 2})``; a plain name has no keywords.

    Raises ValueError for an unknown sampler or a malformed spec.
    """
    spec = spec.strip()
    name, _, rest = spec.partition("(")
    name = name.strip()
    get_sampler(name)  # clear error for unknown names
    kwargs: dict[str, Any] = {}
    if rest:
        if not rest.endswith(")"):
            raise ValueError(f"malformed sampler spec {spec!r}; use name(key=value, ...)")
        for item in filter(None, (x.strip() for x in rest[:-1].split(","))):
            key, eq, val = item.partition("=")
            if not eq or not key.strip().isidentifier():
                raise ValueError(f"malformed sampler spec {spec!r}; use name(key=value, ...)")
            try:
                kwargs[key.strip()] = ast.literal_eval(val.strip())
            except (ValueError, SyntaxError):
                kwargs[key.strip()] = val.strip()
        params = inspect.signature(SAMPLERS[name]).parameters
        unknown = [k for k in kwargs if k not in params]
        if unknown:
            raise ValueError(f"sampler {name!r} has no parameter(s) {unknown}")
    return name, kwargs


def _base(spec: str) -> str:
    return spec.partition("(")[0].strip()


def deterministic_samplers(variants: bool = True) -> list[str]:
    """Registered samplers that solve the PF-ODE on a fixed grid (not stochastic, not rk45).

    With ``variants``, a sampler with an integer ``order`` parameter also appears at each lower
    order down to 2, e.g. ``'unipc(order=2)'`` (diffusers' schedulers are run at every solver
    order too), and the entries of :data:`HIGHER_ORDER_VARIANTS` are added.
    """
    out = []
    for n, fn in SAMPLERS.items():
        if n in STOCHASTIC or n == "rk45":
            continue
        out.append(n)
        p = inspect.signature(fn).parameters.get("order")
        if variants and p is not None and isinstance(p.default, int):
            out += [f"{n}(order={k})" for k in range(2, p.default)]
    if variants:
        out += [v for v in HIGHER_ORDER_VARIANTS if _base(v) in SAMPLERS]
    return out


#: variants above a sampler's default order that the full benchmark also runs (UniPC-4 with
#: its order-5 corrector pays from ~20 steps on)
HIGHER_ORDER_VARIANTS = ("unipc(order=4)",)


@dataclass
class Result:
    """One cell of the table. ``error`` is the RMS error, ``nan`` for NaN/Inf output."""

    method: str
    family: str  # "sfumato" | "diffusers" | "sfumato-adaptive"
    nfe_target: int
    nfe: int | None = None
    steps: int | None = None
    error: float | None = None
    status: str = "ok"  # ok | nan | error | n/a | skipped
    note: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    #: (B,) mean squared error of each sample (float64), for the bootstrap of :func:`summarize`
    sample_mse: torch.Tensor | None = field(default=None, repr=False, compare=False)

    @property
    def valid(self) -> bool:
        return self.status == "ok" and self.error is not None and math.isfinite(self.error)

    def to_dict(self) -> dict[str, Any]:
        """The JSON-able fields (all but ``sample_mse``)."""
        return {k: v for k, v in asdict(self).items() if k != "sample_mse"}


def _finite_error(out: torch.Tensor, ref: torch.Tensor) -> dict[str, Any]:
    """``error`` (RMS over everything), ``status`` and ``sample_mse`` (per sample) of an
    output against the reference, as :class:`Result` keywords."""
    if not torch.isfinite(out).all():
        return {"error": float("nan"), "status": "nan"}
    mse = (out.to(torch.float64) - ref).pow(2).reshape(out.shape[0], -1).mean(1)
    return {"error": float(mse.mean().sqrt()), "status": "ok", "sample_mse": mse}


def _count_nfe(fn: Callable[[Callable], Any], model: Callable) -> int:
    counter = CountingDenoiser(model)
    fn(counter)
    return counter.nfe


def _steps_for_nfe(nfe_of: Callable[[int], int], target: int) -> tuple[int, int] | None:
    """Largest n with nfe_of(n) <= target (nfe_of non-decreasing); None if even n = 1 exceeds."""
    seen: dict[int, int] = {}

    def at(m: int) -> int:
        if m not in seen:
            seen[m] = nfe_of(m)
        return seen[m]

    n = target
    while n >= 1:
        k = at(n)
        if k <= target:
            # climb back up in case a big jump overshot downwards
            while n + 1 <= target:
                k2 = at(n + 1)
                if k2 > target:
                    break
                n, k = n + 1, k2
            return n, k
        n = min(n - 1, max(1, (n * target) // max(k, 1)))
    return None


def run_sfumato(problem: Problem, sampler: str, grid: str, nfe: int,
                nfe_cache: dict[tuple[str, int], int] | None = None,
                calibration_samples: int = CALIBRATION_SAMPLES) -> Result:
    """Run sfumato ``sampler`` on ``grid`` with the largest step count costing <= ``nfe``.

    The step count is found by counting calls on a one-sample dry run; ``nfe_cache`` (keyed by
    (sampler, steps)) shares those counts between grids, and the real run's count is checked.
    ``grid`` :data:`TUNED` runs :meth:`Problem.tuned_solver` (UniPC samplers only);
    ``grid`` :data:`OPTIMIZED` fits the grid for (sampler, steps) first
    (:meth:`Problem.optimized_grid` with ``calibration_samples`` draws; a fixed-grid sampler's
    NFE does not depend on the levels, so the count uses a log-linear grid).
    Raises NotImplementedError if the sampler is not implemented yet (callers skip it).
    """
    base, kwargs = parse_sampler(sampler)
    fn = functools.partial(get_sampler(base), **kwargs) if kwargs else get_sampler(base)
    name = f"{sampler} / {grid}"
    conf = {"sampler": sampler, "grid": grid}

    def nfe_of(n: int, cache: dict | None = nfe_cache) -> int:
        if cache is not None and (sampler, n) in cache:
            return cache[(sampler, n)]
        sig = sfumato_grid("loglinear" if grid in CALIBRATED else grid, problem.process, n,
                           problem.data_std)
        x1 = start_state(problem, float(sig[0]))[:1]
        k = _count_nfe(lambda m: fn(m, x1, sig), problem.model)
        if cache is not None:
            cache[(sampler, n)] = k
        return k

    out, counter, n = None, None, None
    for cache in (nfe_cache, None) if nfe_cache is not None else (None,):
        try:
            found = _steps_for_nfe(lambda n, c=cache: nfe_of(n, c), nfe)
            if found is None:
                return Result(name, "sfumato", nfe, status="n/a",
                              note="one step costs more NFE", config=conf)
            n = found[0]
            run = fn
            if grid == OPTIMIZED:
                fit = problem.optimized_grid(sampler, n, calibration_samples)
                sig = fit.sigmas
                conf["calibration"] = {**fit.to_dict(), "samples": calibration_samples}
            elif grid == TUNED:
                tuned = problem.tuned_solver(sampler, n, calibration_samples)
                sig = tuned.sigmas
                run = functools.partial(sample_tabulated, table=tuned.table)
                conf["calibration"] = {**tuned.to_dict(), "samples": calibration_samples}
            else:
                sig = sfumato_grid(grid, problem.process, n, problem.data_std)
            counter = CountingDenoiser(problem.model)
            out = run(counter, start_state(problem, float(sig[0])), sig)
        except NotImplementedError:
            raise
        except Exception as e:  # noqa: BLE001 - record, don't abort the table
            return Result(name, "sfumato", nfe, steps=n, status="error",
                          note=f"{type(e).__name__}: {e}", config=conf)
        if counter.nfe <= nfe:
            break
    if counter.nfe > nfe:
        return Result(name, "sfumato", nfe, nfe=counter.nfe, steps=n, status="error",
                      note=f"used {counter.nfe} NFE > {nfe}", config=conf)
    return Result(name, "sfumato", nfe, nfe=counter.nfe, steps=n, config=conf,
                  **_finite_error(out, problem.reference))


RK45_TOLS = tuple(10.0 ** (-k / 2) for k in range(2, 17))  # 1e-1 ... 1e-8


def rk45_sweep(problem: Problem, tols: Sequence[float] = RK45_TOLS,
               max_nfe: int | None = None) -> list[dict[str, Any]]:
    """Run the adaptive ``rk45`` sampler at each tolerance (``rtol = atol = tol``) from
    ``sigma_max`` over the grid ``[sigma_max, sigma_min, 0]``; returns
    ``[{'tol', 'nfe', 'error', 'status'}, ...]``, stopping once NFE exceeds ``max_nfe``.

    Raises NotImplementedError while the sampler is not implemented.
    """
    fn = get_sampler("rk45")
    params = inspect.signature(fn).parameters
    keys = [k for k in ("rtol", "atol") if k in params]
    if not keys:
        return [{"tol": None, "nfe": None, "error": None, "status": "n/a",
                 "note": "sample_rk45 takes no rtol/atol"}]
    sig = torch.tensor([problem.sigma_max, problem.sigma_min, 0.0], dtype=torch.float64)
    out = []
    for tol in tols:
        counter = CountingDenoiser(problem.model)
        try:
            x = fn(counter, problem.x_start, sig, **{k: tol for k in keys})
        except NotImplementedError:
            raise
        except Exception as e:  # noqa: BLE001
            out.append({"tol": tol, "nfe": counter.nfe, "error": None, "status": "error",
                        "note": f"{type(e).__name__}: {e}"})
            break
        res = _finite_error(x, problem.reference)
        out.append({"tol": tol, "nfe": counter.nfe, "error": res["error"],
                    "status": res["status"], "note": ""})
        if max_nfe is not None and counter.nfe > max_nfe:
            break
    return out


def rk45_results(sweep: Sequence[dict[str, Any]], nfes: Sequence[int]) -> list[Result]:
    """Per target NFE, the sweep point with the smallest error among those with NFE <= target."""
    name = "rk45 (adaptive)"
    res = []
    for k in nfes:
        ok = [p for p in sweep if p["nfe"] is not None and p["nfe"] <= k and p["status"] == "ok"]
        if ok:
            p = min(ok, key=lambda p: p["error"])
            res.append(Result(name, "sfumato-adaptive", k, nfe=p["nfe"], error=p["error"],
                              note=f"tol={p['tol']:.0e}", config={"tol": p["tol"]}))
        else:
            bad = [p for p in sweep if p["status"] in ("error", "n/a")]
            res.append(Result(name, "sfumato-adaptive", k,
                              status="error" if bad and bad[0]["status"] == "error" else "n/a",
                              note=bad[0]["note"] if bad else "needs more NFE at every tolerance"))
    return res


# ---------------------------------------------------------------------------------------
# diffusers
# ---------------------------------------------------------------------------------------
def diffusers_available() -> bool:
    """True if diffusers can be imported (the optional ``bench`` extra)."""
    try:
        import diffusers  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return False
    return True


class EpsModel:
    """A σ-space denoiser read as a diffusers eps-prediction model in VP coordinates.

    ``model(x_t, t, sigma=None) -> eps`` with ``x_t = s (x0 + sigma eps)``,
    ``s = 1 / sqrt(1 + sigma^2)``: ``x = x_t / s``, ``eps = (x - D(x, sigma)) / sigma``.

    ``sigma`` defaults to the process's ``sigma(t)`` (log-sigma interpolation between integer
    steps, the inverse of diffusers' ``_sigma_to_t``); the benchmark passes the scheduler's own
    sigma when it can read it (see :func:`run_diffusers`). Computes in float64 and returns
    ``x_t``'s dtype. Counts calls in ``nfe``.
    """

    def __init__(self, denoiser: Callable, process: VPDiscrete) -> None:
        self.denoiser, self.process, self.nfe = denoiser, process, 0

    def sigma_of(self, t: torch.Tensor | float) -> torch.Tensor:
        return self.process.sigma(torch.as_tensor(t, dtype=torch.float64))

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor | float,
                 sigma: torch.Tensor | float | None = None) -> torch.Tensor:
        self.nfe += 1
        sig = self.sigma_of(t) if sigma is None else torch.as_tensor(sigma, dtype=torch.float64)
        sig = sig.to(torch.float64).reshape(-1)
        if sig.numel() == 1:
            sig = sig.expand(x_t.shape[0])
        b = sig.reshape((-1,) + (1,) * (x_t.ndim - 1))
        x = x_t.to(torch.float64) * (1 + b**2).sqrt()
        eps = (x - self.denoiser(x, sig)) / b
        return eps.to(x_t.dtype)


#: diffusers schedulers whose ``sample`` is the σ-space state (k-diffusion style)
_SIGMA_SPACE = {"EulerDiscreteScheduler", "HeunDiscreteScheduler", "LMSDiscreteScheduler",
                "KDPM2DiscreteScheduler"}


@dataclass
class DiffusersConfig:
    """A diffusers scheduler class name and the keyword arguments it is built with.

    ``label`` is the name without the timestep-spacing part (used when the spacing turns out
    not to matter, see :func:`dedupe_diffusers`).
    """

    name: str
    cls: str
    kwargs: dict[str, Any]
    label: str = ""


def _accepts(cls_name: str, key: str) -> bool:
    try:
        import diffusers

        return key in inspect.signature(getattr(diffusers, cls_name).__init__).parameters
    except Exception:  # noqa: BLE001
        return False


def diffusers_configs(level: str = "full") -> list[DiffusersConfig]:
    """The diffusers configurations benchmarked (deterministic, eps-driven; needs diffusers).

    ``level='full'``: every scheduler x its timestep spacings (leading with steps_offset=1 as
    Stable Diffusion ships, trailing, linspace; where the scheduler has the option) x sigma
    options (default, Karras, exponential, and Lu's uniform-logSNR for DPM-Solver++) x solver
    order/variant. All end at sigma = 0 (``set_alpha_to_one=True`` for DDIM/PLMS, the default
    ``final_sigmas_type='zero'`` elsewhere), except UniPC-bh1, which gives NaN when its last
    step reaches sigma = 0 and is also run with ``final_sigmas_type='sigma_min'``.
    ``'small'``: a handful of strong ones for ``sfumato compare``.
    """
    if level == "small":  # the best diffusers configurations of the full benchmark
        return [
            DiffusersConfig("Euler karras", "EulerDiscreteScheduler",
                            {"use_karras_sigmas": True}),
            DiffusersConfig("LMS karras", "LMSDiscreteScheduler", {"use_karras_sigmas": True}),
            DiffusersConfig("DPM++2M karras", "DPMSolverMultistepScheduler",
                            {"solver_order": 2, "use_karras_sigmas": True}),
            DiffusersConfig("UniPC-bh2 o2 exp", "UniPCMultistepScheduler",
                            {"solver_order": 2, "solver_type": "bh2",
                             "use_exponential_sigmas": True}),
            DiffusersConfig("DEIS o3 karras", "DEISMultistepScheduler",
                            {"solver_order": 3, "use_karras_sigmas": True}),
        ]
    if level != "full":
        raise ValueError(f"unknown level {level!r}; use 'full' or 'small'")
    spacings = [("leading", {"timestep_spacing": "leading", "steps_offset": 1}),
                ("trailing", {"timestep_spacing": "trailing"}),
                ("linspace", {"timestep_spacing": "linspace"})]
    out: list[DiffusersConfig] = []

    def add(label: str, cls: str, sigma_opts: Sequence[tuple[str, dict]], **kw: Any) -> None:
        sps = spacings if _accepts(cls, "timestep_spacing") else [("", {})]
        for so_name, so in sigma_opts:
            lab = " ".join(x for x in (label, so_name) if x)
            for sp_name, sp in sps:
                out.append(DiffusersConfig(" ".join(x for x in (lab, sp_name) if x), cls,
                                           {**kw, **sp, **so}, label=lab))

    plain = [("", {})]
    kexp = [("", {}), ("karras", {"use_karras_sigmas": True}),
            ("exp", {"use_exponential_sigmas": True})]
    add("DDIM", "DDIMScheduler", plain, clip_sample=False, set_alpha_to_one=True)
    add("PLMS", "PNDMScheduler", plain, skip_prk_steps=True, set_alpha_to_one=True)
    add("LMS", "LMSDiscreteScheduler", kexp)
    add("Euler", "EulerDiscreteScheduler", kexp)
    add("Heun", "HeunDiscreteScheduler", kexp)
    add("KDPM2", "KDPM2DiscreteScheduler", kexp)
    for order in (2, 3):
        add(f"DPM++{order}M", "DPMSolverMultistepScheduler",
            kexp + [("lu", {"use_lu_lambdas": True})],
            solver_order=order, algorithm_type="dpmsolver++")
    for order in (2, 3):
        add(f"DPM++{order}S", "DPMSolverSinglestepScheduler", kexp,
            solver_order=order, algorithm_type="dpmsolver++")
    for variant in ("bh1", "bh2"):
        for order in (1, 2, 3):
            add(f"UniPC-{variant} o{order}", "UniPCMultistepScheduler", kexp,
                solver_order=order, solver_type=variant)
    for order in (1, 2, 3):
        add(f"UniPC-bh1 o{order} end@sigma_min", "UniPCMultistepScheduler", kexp,
            solver_order=order, solver_type="bh1", final_sigmas_type="sigma_min")
    for order in (2, 3):
        add(f"DEIS o{order}", "DEISMultistepScheduler", kexp, solver_order=order)
    return out


#: diffusers schedulers left out of the ODE table because they are stochastic
DIFFUSERS_STOCHASTIC = ("DDPMScheduler", "EulerAncestralDiscreteScheduler",
                        "KDPM2AncestralDiscreteScheduler", "DPMSolverSDEScheduler",
                        "DPMSolverMultistepScheduler(algorithm_type='sde-dpmsolver++')")


@contextlib.contextmanager
def _quiet_diffusers():
    """Silence diffusers' deprecation warnings and config-change log lines while we drive it
    (they are about diffusers' own API, not about the benchmark); restores both after."""
    logger = logging.getLogger("diffusers")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _build_scheduler(cfg: DiffusersConfig, process: VPDiscrete):
    import diffusers

    cls = getattr(diffusers, cfg.cls)
    return cls(num_train_timesteps=process.n, trained_betas=process.betas.numpy(),
               prediction_type="epsilon", **cfg.kwargs)


def _scheduler_sigma(sched, i: int) -> float | None:
    """The sigma the scheduler assumes for its i-th model call, if it keeps one."""
    name = type(sched).__name__
    if name == "KDPM2DiscreteScheduler":
        idx = sched.step_index if sched.step_index is not None else 0
        table = sched.sigmas if sched.state_in_first_order else sched.sigmas_interpol
        return float(table[idx])
    sig = getattr(sched, "sigmas", None)
    if sig is not None and len(sig) == len(sched.timesteps) + 1:
        return float(sig[i])
    return None


def run_diffusers(problem: Problem, cfg: DiffusersConfig, nfe: int,
                  sigma_source: str = "scheduler", dtype: torch.dtype = torch.float32) -> Result:
    """Drive diffusers scheduler ``cfg`` with the exact eps model at the largest step count
    whose model-call count is <= ``nfe``.

    ``sigma_source='scheduler'`` evaluates the model at the sigma the scheduler itself assumes
    for each call when it keeps one (e.g. its Karras sigmas, whose timesteps diffusers rounds
    to integers): diffusers' best case, as if the network understood fractional timesteps.
    ``'timestep'`` evaluates at ``sigma(t)`` of the timestep passed, as a network trained on
    integer t sees it. Latents run in ``dtype`` (diffusers casts to float32 internally anyway).
    """
    with _quiet_diffusers():
        return _run_diffusers(problem, cfg, nfe, sigma_source, dtype)


def _run_diffusers(problem: Problem, cfg: DiffusersConfig, nfe: int, sigma_source: str,
                   dtype: torch.dtype) -> Result:
    if sigma_source not in ("scheduler", "timestep"):
        raise ValueError("sigma_source must be 'scheduler' or 'timestep'")
    name = cfg.name
    conf = {"scheduler": cfg.cls, **cfg.kwargs}
    try:
        sched = _build_scheduler(cfg, problem.process)

        def nfe_of(n: int) -> int:
            sched.set_timesteps(n)
            return len(sched.timesteps)

        found = _steps_for_nfe(nfe_of, nfe)
    except Exception as e:  # noqa: BLE001
        return Result(name, "diffusers", nfe, status="error", note=f"{type(e).__name__}: {e}",
                      config=conf)
    if found is None:
        return Result(name, "diffusers", nfe, status="n/a", config=conf)
    n, _ = found
    model = EpsModel(problem.model, problem.process)
    max_dt, fallbacks = 0.0, 0
    try:
        sched.set_timesteps(n)
        vp_coords = cfg.cls not in _SIGMA_SPACE
        if vp_coords:
            x = problem.latent.to(dtype)
        else:
            x = start_state(problem, float(sched.sigmas[0])).to(dtype)
        for i, t in enumerate(sched.timesteps):
            x_in = sched.scale_model_input(x, t)
            sig = _scheduler_sigma(sched, i) if sigma_source == "scheduler" else None
            if sig is not None:
                dt = abs(float(problem.process.t_from_sigma(torch.tensor(sig,
                                                                       dtype=torch.float64)))
                         - float(t))
                if dt > 0.51 and sig > 0:  # not the sigma of this call: don't trust it
                    sig, fallbacks = None, fallbacks + 1
                else:
                    max_dt = max(max_dt, dt)
            eps = model(x_in, t, sig)
            x = sched.step(eps, t, x).prev_sample
    except Exception as e:  # noqa: BLE001
        return Result(name, "diffusers", nfe, steps=n, status="error",
                      note=f"{type(e).__name__}: {e}", config=conf)
    # the output is the sample at the scheduler's last level: 0 for every config here except
    # final_sigmas_type='sigma_min'; a VP sample there is s (x0 + sigma eps): read it in σ-space
    sig_last = float(sched.sigmas[-1]) if getattr(sched, "sigmas", None) is not None else 0.0
    if vp_coords and sig_last > 0:
        x = x.to(torch.float64) * math.sqrt(1 + sig_last**2)
    res = _finite_error(x, problem.reference)
    notes = []
    if max_dt > 0.01:
        notes.append(f"model sigma != sigma(t) by up to {max_dt:.2f} steps")
    if fallbacks:
        notes.append(f"{fallbacks} calls at sigma(t): the scheduler's sigma did not match t")
    if sig_last > 0:
        notes.append(f"ends at sigma={sig_last:.3g}")
    note = "; ".join(notes)
    return Result(name, "diffusers", nfe, nfe=model.nfe, steps=n, note=note, config=conf, **res)


# ---------------------------------------------------------------------------------------
# the benchmark
# ---------------------------------------------------------------------------------------
def _diffusers_fingerprint(problem: Problem, cfg: DiffusersConfig,
                           nfes: Sequence[int]) -> tuple | None:
    """What a config actually runs at each NFE (class, non-spacing options, timesteps,
    sigmas): two configs with the same fingerprint give identical results."""
    with _quiet_diffusers():
        return _fingerprint(problem, cfg, nfes)


def _fingerprint(problem: Problem, cfg: DiffusersConfig, nfes: Sequence[int]) -> tuple | None:
    try:
        sched = _build_scheduler(cfg, problem.process)
        parts: list[Any] = [cfg.cls, tuple(sorted((k, repr(v)) for k, v in cfg.kwargs.items()
                                                  if k not in ("timestep_spacing",
                                                               "steps_offset")))]
        for k in nfes:
            def nfe_of(n: int) -> int:
                sched.set_timesteps(n)
                return len(sched.timesteps)

            found = _steps_for_nfe(nfe_of, k)
            if found is None:
                parts.append(None)
                continue
            sched.set_timesteps(found[0])
            sig = getattr(sched, "sigmas", None)
            parts.append((tuple(float(t) for t in sched.timesteps),
                          None if sig is None else tuple(round(float(v), 7) for v in sig)))
        return tuple(parts)
    except Exception:  # noqa: BLE001 - a broken config is reported by run_diffusers
        return None


def dedupe_diffusers(problem: Problem, cfgs: Sequence[DiffusersConfig],
                     nfes: Sequence[int]) -> tuple[list[DiffusersConfig], list[str]]:
    """Drop configs that run exactly the same schedule as an earlier one (e.g. Karras sigmas
    make DPM-Solver's timestep spacing irrelevant); returns (kept, notes)."""
    groups: dict[tuple, list[DiffusersConfig]] = {}
    kept: list[DiffusersConfig] = []
    for cfg in cfgs:
        fp = _diffusers_fingerprint(problem, cfg, nfes)
        if fp is None:
            kept.append(cfg)
        elif fp in groups:
            groups[fp].append(cfg)
        else:
            groups[fp] = [cfg]
            kept.append(cfg)
    dup = []
    by_first = {id(g[0]): g for g in groups.values()}
    for i, cfg in enumerate(kept):
        g = by_first.get(id(cfg))
        if not g or len(g) == 1:
            continue
        if cfg.label and all(c.label == cfg.label for c in g):
            new = DiffusersConfig(f"{cfg.label} (any spacing)", cfg.cls, cfg.kwargs, cfg.label)
            kept[i] = new
            dup.append(f"{new.name}: spacing makes no difference")
        else:
            dup.append(f"{', '.join(c.name for c in g[1:])} = {cfg.name}")
    notes = [f"{sum(len(g) - 1 for g in groups.values())} diffusers configurations run "
             "exactly the same schedule as another and are not repeated ("
             + "; ".join(dup) + ")"] if dup else []
    return kept, notes


@dataclass
class _Task:
    kind: str  # sfumato | rk45 | diffusers
    key: str
    arg: Any = None


def _check_choices(samplers: Sequence[str], grid_names: Sequence[str]) -> None:
    """Only deterministic samplers (the table measures ODE error) and known grids."""
    for s in samplers:
        if parse_sampler(s)[0] in STOCHASTIC:
            raise ValueError(f"sampler {s!r} is stochastic: it does not converge to the ODE "
                             "solution this comparison measures against")
    for gname in grid_names:
        if gname not in GRIDS:
            raise ValueError(f"unknown grid {gname!r}; choose one of {sorted(GRIDS)}")


def run_benchmark(problem: Problem, *, samplers: Iterable[str] | None = None,
                  grids_: Iterable[str] | None = None,
                  diffusers: Sequence[DiffusersConfig] | None = None,
                  nfes: Sequence[int] = DEFAULT_NFES, rk45: bool = True,
                  sigma_source: str = "scheduler", progress: bool | Any = False,
                  log: Callable[[str], None] | None = print,
                  desc: str = "benchmark", optimize: Iterable[str] = (),
                  optimize_nfes: Iterable[int] | None = None,
                  calibration_samples: int = CALIBRATION_SAMPLES, tune: Iterable[str] = (),
                  tune_nfes: Iterable[int] | None = None) -> dict[str, Any]:
    """Run every (method, NFE) cell; returns ``{'results': [...], 'notes': [...], ...}``.

    ``samplers`` defaults to :func:`deterministic_samplers`, ``grids_`` to every grid in
    :data:`GRIDS`, ``diffusers`` to none (pass :func:`diffusers_configs`; duplicates are
    dropped by :func:`dedupe_diffusers`). Samplers that raise NotImplementedError are skipped
    with a note. ``progress``: True for a tqdm bar (on stderr).

    ``optimize``: samplers that also run on their :data:`OPTIMIZED` grid, fitted at each NFE in
    ``optimize_nfes`` (default: all) on ``calibration_samples`` draws; other NFEs are skipped.
    ``tune``: UniPC samplers that also run as :data:`TUNED` solvers at each NFE in
    ``tune_nfes`` (default: all; :meth:`Problem.tuned_solver`, after the optimised grids, so
    those are among its candidate grids).
    """
    nfes = check_nfes(nfes)
    samplers = list(deterministic_samplers() if samplers is None else samplers)
    grid_names = list(GRIDS if grids_ is None else grids_)
    optimize = list(optimize)
    optimize_nfes = set(nfes if optimize_nfes is None else optimize_nfes)
    tune = list(tune)
    tune_nfes = set(nfes if tune_nfes is None else tune_nfes)
    _check_choices(samplers + optimize + tune, grid_names)
    for t in tune:
        _tunable(t)
    notes: list[str] = []
    cfgs = list(diffusers or [])
    if cfgs:
        cfgs, dup_notes = dedupe_diffusers(problem, cfgs, nfes)
        notes += dup_notes
    tasks = [_Task("sfumato", s, g) for s in samplers if _base(s) != "rk45"
             for g in grid_names]
    tasks += [_Task("sfumato", s, OPTIMIZED) for s in optimize]
    tasks += [_Task("sfumato", s, TUNED) for s in tune]
    if optimize:
        notes.append(f"{OPTIMIZED} grids: fitted per sampler and NFE by "
                     f"sfumato.calibrate.optimize_sigmas on {calibration_samples} calibration "
                     "draws (another seed than the benchmark's noise), starting from "
                     "gaussian_lte; the grid and its offline cost (calls per calibration draw) "
                     "are in the JSON, not in the NFE")
    if tune:
        notes.append(f"{TUNED} solvers: UniPC's coefficients fitted per NFE by "
                     "sfumato.calibrate.tune_coefficients on the candidate grid with the least "
                     f"held-out error (the optimised grids among them), {2 * calibration_samples} "
                     "calibration draws (half held out; another seed than the benchmark's "
                     "noise); tables and offline cost in the JSON, not in the NFE")
    if rk45 and "rk45" in SAMPLERS:
        tasks.append(_Task("rk45", "rk45"))
    tasks += [_Task("diffusers", c.name, c) for c in cfgs]

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(tasks) * len(nfes), desc=desc, unit="run", leave=False)
    say = (bar.write if bar is not None else log) if log else None
    results: list[Result] = []
    skipped: list[str] = []
    nfe_cache: dict[tuple[str, int], int] = {}
    t0, c0 = time.perf_counter(), time.process_time()
    for task in tasks:
        if task.key in skipped:
            if bar is not None:
                bar.update(len(nfes))
            continue
        try:
            if task.kind == "rk45":
                rs = rk45_results(rk45_sweep(problem, max_nfe=max(nfes)), nfes)
                results += rs
                if bar is not None:
                    bar.update(len(nfes))
                continue
            for k in nfes:
                if (task.arg == OPTIMIZED and k not in optimize_nfes) or \
                        (task.arg == TUNED and k not in tune_nfes):
                    results.append(Result(f"{task.key} / {task.arg}", "sfumato", k,
                                          status="skipped", note="not fitted at this NFE",
                                          config={"sampler": task.key, "grid": task.arg}))
                elif task.kind == "sfumato":
                    results.append(run_sfumato(problem, task.key, task.arg, k, nfe_cache,
                                               calibration_samples))
                else:
                    results.append(run_diffusers(problem, task.arg, k,
                                                 sigma_source=sigma_source))
                if bar is not None:
                    bar.update(1)
        except NotImplementedError:
            skipped.append(task.key)
            results = [r for r in results if r.config.get("sampler") != task.key]
            msg = f"skipped sfumato sampler {task.key!r}: not implemented yet (NotImplementedError)"
            notes.append(msg)
            if say:
                say(msg)
            if bar is not None:
                bar.update(len(nfes))  # approximate; the bar closes below anyway
    if bar is not None:
        bar.close()
    results, merged = _merge_identical_samplers(results)
    if merged:
        notes.append("sfumato samplers with identical results on every grid and NFE share a "
                     "row: " + "; ".join(merged))
    bad = sorted({r.method for r in results if r.status == "nan"})
    if bad:
        notes.append("NaN/Inf output (counted as failures): " + ", ".join(bad))
    for e in sorted({f"{r.method}: {r.note}" for r in results if r.status == "error"}):
        notes.append(f"error in {e}")
    return {"results": results, "notes": notes, "nfes": nfes,
            "elapsed_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0,
            "skipped": skipped, "diffusers_configs": len(cfgs)}


def _merge_identical_samplers(results: list[Result]) -> tuple[list[Result], list[str]]:
    """Give sfumato samplers that are the same method (e.g. ``ddim`` at eta = 0 is ``euler``)
    one row, named ``euler=ddim``; returns (results, descriptions of the merges)."""
    cells: dict[str, list[Result]] = {}
    for r in results:
        if r.family == "sfumato":
            cells.setdefault(r.config["sampler"], []).append(r)

    def signature(rs: list[Result]) -> tuple:
        return tuple(sorted((r.config["grid"], r.nfe_target, r.status, r.nfe,
                             None if r.error is None else f"{r.error:.10e}") for r in rs))

    groups: dict[tuple, list[str]] = {}
    for spec, rs in cells.items():
        groups.setdefault(signature(rs), []).append(spec)
    rename, drop, merged = {}, set(), []
    for specs in groups.values():
        if len(specs) > 1:
            label = "=".join(specs)
            rename[specs[0]] = label
            drop.update(specs[1:])
            merged.append(label)
    out = []
    for r in results:
        spec = r.config.get("sampler") if r.family == "sfumato" else None
        if spec in drop:
            continue
        if spec in rename:
            r = dataclasses.replace(r, method=f"{rename[spec]} / {r.config['grid']}",
                                    config={**r.config, "same_as": rename[spec].split("=")})
        out.append(r)
    return out, merged


BOOTSTRAP_DRAWS = 2000


def ratio_interval(a: torch.Tensor, b: torch.Tensor, level: float = 0.9,
                   draws: int = BOOTSTRAP_DRAWS, seed: int = 0) -> tuple[float, float]:
    """Paired bootstrap interval of the RMS ratio ``sqrt(mean a) / sqrt(mean b)``.

    ``a``, ``b``: (B,) per-sample mean squared errors of two methods on the same noise draws.
    Samples are redrawn with replacement (the same indices for both methods) ``draws`` times;
    returns the central ``level`` interval. The RMS error of an ODE solver on a mixture is
    heavy-tailed in the samples -- the few trajectories that cross between modes late carry
    most of it (on ``img3`` at NFE 5, 1 % of the samples carry ~60 % of the squared error) --
    so the ratio measured on one draw of noise needs this interval next to it.
    """
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"need two (B,) tensors of per-sample errors; got {tuple(a.shape)} "
                         f"and {tuple(b.shape)}")
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, a.shape[0], (draws, a.shape[0]), generator=g)
    r = (a.double()[idx].mean(1) / b.double()[idx].mean(1).clamp(min=1e-300)).sqrt()
    lo, hi = torch.quantile(r, torch.tensor([(1 - level) / 2, (1 + level) / 2],
                                            dtype=torch.float64)).tolist()
    return lo, hi


def summarize(results: Sequence[Result], nfes: Sequence[int]) -> dict[int, dict[str, Any]]:
    """Per NFE: best sfumato (fixed-grid samplers only), best diffusers, their ratio and the
    ratio's 90 % paired bootstrap interval ``ratio_ci`` (:func:`ratio_interval`; None when
    per-sample errors are missing); when optimised grids or tuned solvers ran, also the best
    sfumato method without them (``sfumato_generic``, ``sfumato_generic_error``,
    ``ratio_generic``)."""
    out: dict[int, dict[str, Any]] = {}
    for k in nfes:
        row: dict[str, Any] = {}
        best: dict[str, Result] = {}
        for fam in ("sfumato", "diffusers"):
            cands = [r for r in results if r.family == fam and r.nfe_target == k and r.valid]
            generic = [r for r in cands if r.config.get("grid") not in CALIBRATED]
            if fam == "sfumato" and len(generic) < len(cands):
                g = min(generic, key=lambda r: r.error) if generic else None
                row["sfumato_generic"] = g.method if g else None
                row["sfumato_generic_error"] = g.error if g else None
            if cands:
                b = best[fam] = min(cands, key=lambda r: r.error)
                row[fam], row[f"{fam}_error"], row[f"{fam}_nfe"] = b.method, b.error, b.nfe
            else:
                row[fam], row[f"{fam}_error"], row[f"{fam}_nfe"] = None, None, None
        se, de = row["sfumato_error"], row["diffusers_error"]
        row["ratio"] = se / de if se is not None and de else None
        if row.get("sfumato_generic_error") is not None and de:
            row["ratio_generic"] = row["sfumato_generic_error"] / de
        mses = [best[f].sample_mse for f in best]  # both present whenever ratio is
        row["ratio_ci"] = (ratio_interval(*mses) if row["ratio"] is not None
                           and None not in mses else None)
        out[k] = row
    return out


def _fmt(r: Result | None) -> str:
    if r is None:
        return "-"
    if r.status == "ok":
        return f"{r.error:.2e}"
    return {"nan": "NaN", "error": "error", "n/a": "n/a", "skipped": "skip"}.get(r.status, "?")


def format_table(results: Sequence[Result], nfes: Sequence[int]) -> str:
    """Rows = method, columns = NFE, values = RMS error vs the reference ODE solution."""
    methods: dict[tuple[str, str], dict[int, Result]] = {}
    for r in results:
        methods.setdefault((r.family, r.method), {})[r.nfe_target] = r
    width = max([11 + len(m) for _, m in methods] + [20]) + 1
    head = f"{'method':<{width}}" + "".join(f"{'NFE ' + str(k):>11}" for k in nfes)
    lines = [head, "-" * len(head)]
    last_family = None
    for (fam, m), cells in methods.items():
        if last_family is not None and fam != last_family:
            lines.append("")
        last_family = fam
        label = f"{fam[:9]:<9}  {m}"
        lines.append(f"{label:<{width}}" + "".join(f"{_fmt(cells.get(k)):>11}" for k in nfes))
    return "\n".join(lines)


def format_summary(summary: dict[int, dict[str, Any]]) -> str:
    lines = []
    for k, row in summary.items():
        s = f"{row['sfumato']} ({row['sfumato_error']:.2e})" if row["sfumato"] else "none"
        d = f"{row['diffusers']} ({row['diffusers_error']:.2e})" if row["diffusers"] else "none"
        ratio = f"{row['ratio']:.3f}" if row["ratio"] is not None else "n/a"
        if row.get("ratio_ci"):
            ratio += " (90% bootstrap interval {:.2f}-{:.2f})".format(*row["ratio_ci"])
        lines.append(f"NFE {k:>3}: best sfumato {s}  |  best diffusers {d}  |  ratio {ratio}")
        if row.get("ratio_generic") is not None:
            lines.append(f"         without {OPTIMIZED} grids or {TUNED} solvers: "
                         f"{row['sfumato_generic']} "
                         f"({row['sfumato_generic_error']:.2e})  |  ratio "
                         f"{row['ratio_generic']:.3f}")
    return "\n".join(lines)


def plot_errors(results: Sequence[Result], nfes: Sequence[int], path: str | Path,
                title: str = "") -> Path:
    """Error vs NFE on log-log axes, one line per method (sfumato solid, diffusers dashed)."""
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    path = Path(path)
    methods: dict[tuple[str, str], list[tuple[int, float]]] = {}
    for r in results:
        pts = methods.setdefault((r.family, r.method), [])
        if r.valid and r.error > 0:
            pts.append((r.nfe if r.nfe else r.nfe_target, r.error))
    # the Agg canvas directly: no pyplot, no global backend switch
    fig = Figure(figsize=(9.5, 5.2), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    colors = matplotlib.colormaps["tab20"].colors
    for j, ((fam, m), pts) in enumerate(methods.items()):
        if not pts:
            continue
        pts.sort()
        xs, ys = zip(*pts, strict=True)
        sf = fam.startswith("sfumato")
        ax.plot(xs, ys, "-" if sf else "--", marker="o" if sf else "s", ms=4,
                color=colors[j % len(colors)],
                label=f"{'sfumato' if sf else 'diffusers'}: {m}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(list(nfes))
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("NFE (denoiser calls)")
    ax.set_ylabel("RMS error vs exact PF-ODE solution")
    ax.set_title(title or "sampler error vs NFE")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


# ---------------------------------------------------------------------------------------
# sfumato compare
# ---------------------------------------------------------------------------------------
#: the handful of samplers and grids ``sfumato compare`` runs by default
COMPARE_SAMPLERS = ("euler", "heun", "dpmpp_2m", "dpmpp_3m", "unipc", "unipc(order=2)", "lms")
COMPARE_GRIDS = ("karras", "loglinear")


def _json_num(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def check_nfes(nfes: Iterable[int]) -> list[int]:
    """Sorted unique positive integers, or a ValueError saying what is wrong."""
    try:
        vals = [int(k) for k in nfes]
    except (TypeError, ValueError):
        raise ValueError(f"NFE values must be positive integers; got {nfes!r}") from None
    if not vals or any(k < 1 for k in vals):
        raise ValueError(f"NFE values must be positive integers; got {vals}")
    return sorted(set(vals))


@contextlib.contextmanager
def torch_threads(n: int | None):
    """Temporarily set torch's intra-op thread count (the benchmark's tensors are small, so
    one thread is fastest and immune to a busy machine); ``None`` leaves it alone."""
    if n is None:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(max(1, int(n)))
    try:
        yield
    finally:
        torch.set_num_threads(old)


def results_payload(problem: Problem, results: Sequence[Result], nfes: Sequence[int],
                    notes: Sequence[str] = ()) -> dict[str, Any]:
    """A JSON-able summary: problem, per-method errors per NFE, best-of per NFE, notes."""
    nfes = list(nfes)
    summary = summarize(results, nfes)
    methods: dict[str, dict[str, Any]] = {}
    for r in results:
        m = methods.setdefault(r.method, {"family": r.family, "config": r.config,
                                          "errors": [None] * len(nfes),
                                          "nfe_used": [None] * len(nfes),
                                          "status": ["-"] * len(nfes),
                                          "notes": [""] * len(nfes)})
        j = nfes.index(r.nfe_target)
        m["errors"][j] = _json_num(r.error) if r.status == "ok" else None
        m["nfe_used"][j] = r.nfe
        m["status"][j] = r.status
        m["notes"][j] = r.note
    return {
        "problem": problem.info,
        "nfe": nfes,
        "methods": methods,
        "best": {str(k): {kk: _json_num(v) for kk, v in row.items()}
                 for k, row in summary.items()},
        "notes": list(notes),
    }


def compare(out: str | Path = "sfumato-compare", *, nfes: Sequence[int] = (5, 10, 20),
            seed: int = 0, samplers: Sequence[str] | None = None,
            grids_: Sequence[str] | None = None, mixture: str = "img1",
            schedule: str = "scaled_linear", batch: int = 128, use_diffusers: bool = True,
            quick: bool = False, progress: bool = True, threads: int | None = 1,
            log: Callable[[str], None] | None = print,
            optimize: Sequence[str] = (), tune: Sequence[str] = ()) -> dict[str, Any]:
    """A small sfumato-vs-diffusers comparison; writes ``out/compare.png`` (error vs NFE,
    log-log) and ``out/compare.json``, and returns the JSON payload plus ``'table'``,
    ``'summary'`` (printable text) and ``'results'``.

    Runs :data:`COMPARE_SAMPLERS` x :data:`COMPARE_GRIDS` and, if diffusers is installed, a few
    strong diffusers configurations (:func:`diffusers_configs` ``'small'``) on a small problem.
    ``optimize``: samplers that also run on their :data:`OPTIMIZED` grid (1024 calibration
    draws); ``tune``: UniPC samplers that also run as :data:`TUNED` solvers (twice as many
    draws). ``quick`` uses fewer samples, a coarser reference and 64 calibration draws (for
    tests). Raises ValueError for bad input (unknown sampler/grid/mixture, non-positive NFE).
    """
    t0 = time.perf_counter()
    nfes = check_nfes(nfes)
    samplers = list(COMPARE_SAMPLERS if samplers is None else samplers)
    grid_names = list(COMPARE_GRIDS if grids_ is None else grids_)
    _check_choices(samplers, grid_names)
    if mixture not in MIXTURES:
        raise ValueError(f"unknown mixture {mixture!r}; choose one of {sorted(MIXTURES)}")
    if batch < 1:
        raise ValueError(f"batch must be a positive integer; got {batch}")
    if quick:
        batch = min(batch, 32)
    notes: list[str] = []
    cfgs: list[DiffusersConfig] = []
    if use_diffusers and diffusers_available():
        cfgs = diffusers_configs("small")
    elif use_diffusers:
        notes.append("diffusers is not installed (pip install 'sfumato[bench]'): "
                     "comparing sfumato samplers only")
    else:
        notes.append("diffusers left out on request: sfumato samplers only")
    if log:
        for n in notes:
            log(n)
    with torch_threads(threads):
        problem = make_problem(mixture, schedule, batch=batch, seed=seed,
                               ref_steps=200 if quick else 400)
        bench = run_benchmark(problem, samplers=samplers, grids_=grid_names, diffusers=cfgs,
                              nfes=nfes, rk45=False, progress=progress, log=log,
                              desc="sfumato compare", optimize=optimize, tune=tune,
                              calibration_samples=64 if quick else 1024)
    results: list[Result] = bench["results"]
    notes += bench["notes"]
    notes.append("stochastic samplers are left out: they do not converge to the ODE solution")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    title = (f"{mixture} mixture, VP {schedule}, {problem.x_start.shape[0]} samples: "
             "error vs NFE")
    png = plot_errors(results, nfes, out / "compare.png", title=title)
    payload = results_payload(problem, results, nfes, notes)
    payload.update({"diffusers": bool(cfgs), "png": str(png), "json": str(out / "compare.json"),
                    "runtime_s": round(time.perf_counter() - t0, 2)})
    (out / "compare.json").write_text(json.dumps(payload, indent=2, default=str))
    payload["table"] = format_table(results, nfes)
    payload["summary"] = format_summary(summarize(results, nfes))
    payload["results"] = [r.to_dict() for r in results]
    return payload
