"""Running the benchmark: every (method, NFE) cell against the problem's reference.

- **Methods**: a sfumato sampler spec (:mod:`sfumato.bench.specs`) on a grid of
  :data:`sfumato.sigmas.GRIDS`, or fitted to the model (``calibration``,
  :mod:`sfumato.bench.calibrated`); the adaptive ``rk45`` sweep; diffusers configurations
  (:mod:`sfumato.bench.diffusers_adapters`, imported only when some are given).
- **NFE**: counted with :class:`sfumato.accuracy.CountingDenoiser` (one per batched call, i.e.
  evaluations per sample). For a target NFE each method uses the largest step count whose
  counted NFE does not exceed it (Heun with n steps costs 2n - 1, PNDM n + 1, ...); the NFE
  actually used is recorded.
- **Error**: RMS over all samples and coordinates against the reference, in data space
  (σ-space at sigma = 0); per-sample mean squared errors are kept for the bootstrap of
  :func:`sfumato.bench.report.ratio_interval`.
- **Stochastic samplers** (``sfumato.samplers.STOCHASTIC``, diffusers' ancestral/SDE
  schedulers) do not converge to the ODE solution and are refused. The adaptive ``rk45``
  sampler, whose NFE is set by a tolerance, gets its own rows and is not in the best-of.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..accuracy import CountingDenoiser
from ..errors import UsageError
from ..samplers import SAMPLERS, STOCHASTIC, get_sampler
from .calibrated import (
    CALIBRATION_SAMPLES,
    CALIBRATIONS,
    OPTIMIZED,
    TUNED,
    calibrated_solver,
    calibration_notes,
    tunable,
)
from .problem import Problem, start_state
from .results import Result, finite_error, steps_for_budget
from .specs import parse_grid, parse_sampler, spec_name

if TYPE_CHECKING:
    from .diffusers_adapters import DiffusersConfig

__all__ = ["DEFAULT_NFES", "DEFAULT_GRIDS", "Task", "run_sfumato", "run_benchmark",
           "rk45_sweep", "rk45_results", "deterministic_samplers", "method_label",
           "check_nfes", "check_choices", "diffusers_available"]

DEFAULT_NFES = (5, 10, 20, 50)
#: the grids the full benchmark runs (specs over :data:`sfumato.sigmas.GRIDS`)
DEFAULT_GRIDS = ("karras", "loglinear", "polyexponential(rho=2)", "gaussian_lte",
                 "gaussian_cov", "uniform_t", "trailing", "linspace", "leading")
#: variants above a sampler's default order that the full benchmark also runs (UniPC-4 with
#: its order-5 corrector pays from ~20 steps on)
HIGHER_ORDER_VARIANTS = ("unipc(order=4)",)


def method_label(sampler: str, grid: str | None, calibration: str | None = None) -> str:
    """A sfumato method's row name: ``'unipc / karras'``, ``'unipc_bh1 / optimized grid'``."""
    return f"{sampler} / {grid if calibration is None else CALIBRATIONS[calibration]}"


def check_nfes(nfes: Iterable[int]) -> list[int]:
    """Sorted unique positive integers, or a UsageError saying what is wrong."""
    try:
        vals = [int(k) for k in nfes]
    except (TypeError, ValueError):
        raise UsageError(f"NFE values must be positive integers; got {nfes!r}") from None
    if not vals or any(k < 1 for k in vals):
        raise UsageError(f"NFE values must be positive integers; got {vals}")
    return sorted(set(vals))


def diffusers_available() -> bool:
    """True if diffusers can be imported (the optional ``bench`` extra)."""
    try:
        import diffusers  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return False
    return True


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
        out += [v for v in HIGHER_ORDER_VARIANTS if spec_name(v) in SAMPLERS]
    return out


def run_sfumato(problem: Problem, sampler: str, grid: str | None, nfe: int,
                nfe_cache: dict[tuple[str, int], int] | None = None, *,
                calibration: str | None = None,
                calibration_samples: int = CALIBRATION_SAMPLES) -> Result:
    """Run sfumato ``sampler`` (a spec) on ``grid`` (a grid spec), or fitted to the model as
    ``calibration`` (then ``grid`` is None), with the largest step count costing <= ``nfe``.

    The step count is found by counting calls on a one-sample dry run; ``nfe_cache`` (keyed by
    (sampler, steps)) shares those counts between grids, and the real run's count is checked.
    A fitted method is fitted for that step count (``calibration_samples`` draws); a
    fixed-grid sampler's NFE does not depend on the levels, so its count uses a log-linear
    grid. Raises NotImplementedError if the sampler is not implemented yet (callers skip it).
    """
    if (grid is None) == (calibration is None):
        raise UsageError("run_sfumato needs either a grid or a calibration")
    base, kwargs = parse_sampler(sampler)
    fn = functools.partial(get_sampler(base), **kwargs) if kwargs else get_sampler(base)
    name = method_label(sampler, grid, calibration)
    conf: dict[str, Any] = ({"sampler": sampler, "grid": grid} if calibration is None
                            else {"sampler": sampler, "calibration": calibration})
    cell = {"calibration": calibration, "config": conf}

    def nfe_of(n: int, cache: dict | None = nfe_cache) -> int:
        if cache is not None and (sampler, n) in cache:
            return cache[(sampler, n)]
        sig = problem.grid(grid or "loglinear", n)
        counter = CountingDenoiser(problem.model)
        fn(counter, start_state(problem, float(sig[0]))[:1], sig)
        if cache is not None:
            cache[(sampler, n)] = counter.nfe
        return counter.nfe

    out, counter, n = None, None, None
    for cache in (nfe_cache, None) if nfe_cache is not None else (None,):
        try:
            found = steps_for_budget(lambda n, c=cache: nfe_of(n, c), nfe)
            if found is None:
                return Result(name, "sfumato", nfe, status="n/a",
                              note="one step costs more NFE", **cell)
            n = found[0]
            if calibration is None:
                run, sig = fn, problem.grid(grid, n)
            else:
                run, sig, conf["fit"] = calibrated_solver(problem, sampler, fn, calibration, n,
                                                          calibration_samples)
            counter = CountingDenoiser(problem.model)
            out = run(counter, start_state(problem, float(sig[0])), sig)
        except NotImplementedError:
            raise
        except Exception as e:  # noqa: BLE001 - record, don't abort the table
            return Result(name, "sfumato", nfe, steps=n, status="error",
                          note=f"{type(e).__name__}: {e}", **cell)
        if counter.nfe <= nfe:
            break
    if counter.nfe > nfe:
        return Result(name, "sfumato", nfe, nfe=counter.nfe, steps=n, status="error",
                      note=f"used {counter.nfe} NFE > {nfe}", **cell)
    return Result(name, "sfumato", nfe, nfe=counter.nfe, steps=n, **cell,
                  **finite_error(out, problem.reference))


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
        res = finite_error(x, problem.reference)
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


@dataclass
class Task:
    """One row of the table: a sfumato ``sampler`` on a ``grid`` or fitted (``calibration``),
    the ``rk45`` sweep, or a diffusers configuration (``diffusers``); ``nfes``: the NFEs it
    runs at (None: all; the others are recorded as skipped)."""

    kind: str  # "sfumato" | "rk45" | "diffusers"
    name: str  # sampler spec | "rk45" | diffusers config name
    grid: str | None = None
    calibration: str | None = None
    diffusers: Any = None  # a DiffusersConfig
    nfes: frozenset[int] | None = None


def check_choices(samplers: Sequence[str], grids: Sequence[str]) -> None:
    """Sampler and grid specs, checked: only deterministic samplers (the table measures ODE
    error) and known grids; UsageError else."""
    for s in samplers:
        if parse_sampler(s)[0] in STOCHASTIC:
            raise UsageError(f"sampler {s!r} is stochastic: it does not converge to the ODE "
                             "solution this comparison measures against")
    for g in grids:
        parse_grid(g)


def _tasks(samplers: Sequence[str], grids: Sequence[str], fitted: dict[str, list[str]],
           fitted_nfes: dict[str, set[int]], rk45: bool,
           cfgs: Sequence[DiffusersConfig]) -> list[Task]:
    tasks = [Task("sfumato", s, g) for s in samplers if spec_name(s) != "rk45" for g in grids]
    tasks += [Task("sfumato", s, calibration=c, nfes=frozenset(fitted_nfes[c]))
              for c in (OPTIMIZED, TUNED) for s in fitted[c]]
    if rk45 and "rk45" in SAMPLERS:
        tasks.append(Task("rk45", "rk45"))
    return tasks + [Task("diffusers", c.name, diffusers=c) for c in cfgs]


def run_benchmark(problem: Problem, *, samplers: Iterable[str] | None = None,
                  grids: Iterable[str] | None = None,
                  diffusers: Sequence[DiffusersConfig] | None = None,
                  nfes: Sequence[int] = DEFAULT_NFES, rk45: bool = True,
                  sigma_source: str = "scheduler", progress: bool | Any = False,
                  log: Callable[[str], None] | None = print,
                  desc: str = "benchmark", optimize: Iterable[str] = (),
                  optimize_nfes: Iterable[int] | None = None,
                  calibration_samples: int = CALIBRATION_SAMPLES, tune: Iterable[str] = (),
                  tune_nfes: Iterable[int] | None = None) -> dict[str, Any]:
    """Run every (method, NFE) cell; returns ``{'results': [...], 'notes': [...], ...}``.

    ``samplers`` (specs) defaults to :func:`deterministic_samplers`, ``grids`` (grid specs) to
    :data:`DEFAULT_GRIDS`, ``diffusers`` to none (pass
    :func:`~sfumato.bench.diffusers_adapters.diffusers_configs`; duplicates are dropped).
    Samplers that raise NotImplementedError are skipped with a note. ``progress``: True for a
    tqdm bar (on stderr).

    ``optimize``: samplers that also run on their optimised grid, fitted at each NFE in
    ``optimize_nfes`` (default: all) on ``calibration_samples`` draws; other NFEs are skipped.
    ``tune``: UniPC samplers that also run as tuned solvers at each NFE in ``tune_nfes``
    (default: all; fitted after the optimised grids, so those are among its candidate grids).
    """
    nfes = check_nfes(nfes)
    samplers = list(deterministic_samplers() if samplers is None else samplers)
    grids = list(DEFAULT_GRIDS if grids is None else grids)
    fitted = {OPTIMIZED: list(optimize), TUNED: list(tune)}
    fitted_nfes = {OPTIMIZED: set(nfes if optimize_nfes is None else optimize_nfes),
                   TUNED: set(nfes if tune_nfes is None else tune_nfes)}
    check_choices(samplers + fitted[OPTIMIZED] + fitted[TUNED], grids)
    for t in fitted[TUNED]:
        tunable(t)
    notes: list[str] = []
    cfgs = list(diffusers or [])
    run_diffusers = None
    if cfgs:  # only now: a diffusers release cannot break the rest of the benchmark
        from .diffusers_adapters import dedupe_diffusers, run_diffusers

        cfgs, dup_notes = dedupe_diffusers(problem, cfgs, nfes)
        notes += dup_notes
    notes += calibration_notes(fitted[OPTIMIZED], fitted[TUNED], calibration_samples)
    tasks = _tasks(samplers, grids, fitted, fitted_nfes, rk45, cfgs)

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
        try:
            if task.name in skipped:
                pass
            elif task.kind == "rk45":
                results += rk45_results(rk45_sweep(problem, max_nfe=max(nfes)), nfes)
            else:
                for k in nfes:
                    if task.nfes is not None and k not in task.nfes:
                        results.append(Result(
                            method_label(task.name, task.grid, task.calibration), "sfumato", k,
                            status="skipped", note="not fitted at this NFE",
                            calibration=task.calibration,
                            config={"sampler": task.name, "calibration": task.calibration}))
                    elif task.kind == "sfumato":
                        results.append(run_sfumato(
                            problem, task.name, task.grid, k, nfe_cache,
                            calibration=task.calibration,
                            calibration_samples=calibration_samples))
                    else:
                        results.append(run_diffusers(problem, task.diffusers, k,
                                                     sigma_source=sigma_source))
        except NotImplementedError:
            skipped.append(task.name)
            results = [r for r in results if r.config.get("sampler") != task.name]
            msg = (f"skipped sfumato sampler {task.name!r}: not implemented yet "
                   "(NotImplementedError)")
            notes.append(msg)
            if say:
                say(msg)
        if bar is not None:
            bar.update(len(nfes))
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
        return tuple(sorted((str(r.config.get("grid")), str(r.calibration), r.nfe_target,
                             r.status, r.nfe,
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
            r = dataclasses.replace(
                r, method=method_label(rename[spec], r.config.get("grid"), r.calibration),
                config={**r.config, "same_as": rename[spec].split("=")})
        out.append(r)
    return out, merged
