"""``sfumato compare``: a one-minute version of the full benchmark, with a plot.

It runs the samplers and grids that ``docs/samplers.md`` recommends (what the full benchmark,
``benchmarks/samplers.py``, found best) and the strongest diffusers configurations on the
benchmark's default problem, with enough samples that the 90 % bootstrap intervals of the
ratios are narrow; the methods fitted to the model (optimised grids, tuned solvers) on
request.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..errors import UsageError
from ..runtime import torch_threads
from . import report
from .problem import MIXTURES, make_problem
from .runner import check_choices, check_nfes, diffusers_available, run_benchmark

__all__ = ["compare", "COMPARE_SAMPLERS", "COMPARE_GRIDS", "COMPARE_FITTED", "COMPARE_MIXTURE",
           "COMPARE_BATCH", "COMPARE_REF_STEPS"]

#: the samplers ``sfumato compare`` runs by default: the recommended ones of docs/samplers.md
COMPARE_SAMPLERS = ("unipc_bh1", "unipc(order=2)", "unipc", "unipc(order=4)", "dpmpp_2m",
                    "dpmpp_3m", "lms")
#: the grids it runs them on: the recommended ``gaussian_lte`` (and its data-aware form),
#: and the common ``loglinear`` and ``karras``
COMPARE_GRIDS = ("gaussian_lte", "gaussian_cov", "loglinear", "karras")
#: what ``optimize=True`` / ``tune=True`` fit (``sfumato compare --optimize`` / ``--tune``)
COMPARE_FITTED = ("unipc_bh1",)
#: the default problem: image-shaped like the full benchmark's img3 but 16-dimensional, a
#: third of the cost per sample, and lighter-tailed errors (on img3 a handful of samples that
#: cross between components carry most of the squared error at NFE 10-20, so even 4096 draws
#: leave the ratio's 90 % interval spanning 1 there)
COMPARE_MIXTURE = "img1"
#: samples: the error is heavy-tailed over them; 4096 put the NFE-5 and NFE-10 intervals within
#: about +-0.1 of the ratio on img1 (1024: the NFE-10 one spans 0.43-0.88)
COMPARE_BATCH = 4096
#: RK4 steps of the reference: ~1e-5 RMS from its own half-step solve, ~100x below the
#: smallest error here, at half the cost of the full benchmark's 400
COMPARE_REF_STEPS = 200
PLOT_PER_GROUP = 6  # lines per kind (sfumato, fitted, diffusers) in compare.png


def _fitted(spec: Sequence[str] | bool) -> list[str]:
    return list(COMPARE_FITTED) if spec is True else list(spec or ())


def compare(out: str | Path = "sfumato-compare", *, nfes: Sequence[int] = (5, 10, 20),
            seed: int = 0, samplers: Sequence[str] | None = None,
            grids: Sequence[str] | None = None, mixture: str | None = None,
            schedule: str = "scaled_linear", batch: int | None = None,
            use_diffusers: bool = True, quick: bool = False, progress: bool = True,
            threads: int | None = 1, log: Callable[[str], None] | None = print,
            optimize: Sequence[str] | bool = (), tune: Sequence[str] | bool = ()
            ) -> dict[str, Any]:
    """A sfumato-vs-diffusers comparison; writes ``out/compare.png`` (error vs NFE, log-log, the
    best few methods of each kind) and ``out/compare.json`` (every method), and returns the JSON
    payload plus ``'table'``, ``'summary'`` (printable text) and ``'results'``.

    Runs ``samplers`` x ``grids`` (sampler and grid specs; default :data:`COMPARE_SAMPLERS` x
    :data:`COMPARE_GRIDS`) and, if diffusers is installed, its strongest configurations
    (``diffusers_configs('small')``) on ``mixture`` (default :data:`COMPARE_MIXTURE`) under a VP
    ``schedule`` with ``batch`` samples (default :data:`COMPARE_BATCH`). ``optimize``: samplers
    that also run on a grid optimised for the model (1024 calibration draws); ``tune``: UniPC
    samplers that also run with tuned coefficients (twice as many draws); ``True`` for
    :data:`COMPARE_FITTED`. ``quick``: at most 32 samples, a coarser reference and 64
    calibration draws (for tests). Raises :class:`~sfumato.errors.UsageError` (a ValueError) for
    bad input (unknown sampler, grid or mixture, a stochastic sampler, non-positive NFE or
    batch).
    """
    t0, c0 = time.perf_counter(), time.process_time()
    nfes = check_nfes(nfes)
    samplers = list(COMPARE_SAMPLERS if samplers is None else samplers)
    grids = list(COMPARE_GRIDS if grids is None else grids)
    optimize, tune = _fitted(optimize), _fitted(tune)
    mixture = mixture or COMPARE_MIXTURE
    batch = COMPARE_BATCH if batch is None else batch
    check_choices(samplers + optimize + tune, grids)
    if mixture not in MIXTURES:  # before any work (make_problem checks it too)
        raise UsageError(f"unknown mixture {mixture!r}; choose one of {sorted(MIXTURES)}")
    notes: list[str] = []
    cfgs = []
    if use_diffusers and diffusers_available():
        from .diffusers_adapters import diffusers_configs

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
        problem = make_problem(mixture, schedule, batch=min(batch, 32) if quick else batch,
                               seed=seed,
                               ref_steps=COMPARE_REF_STEPS // 2 if quick else COMPARE_REF_STEPS)
        bench = run_benchmark(problem, samplers=samplers, grids=grids, diffusers=cfgs,
                              nfes=nfes, rk45=False, progress=progress, log=log,
                              desc="sfumato compare", optimize=optimize, tune=tune,
                              calibration_samples=64 if quick else 1024)
    results = bench["results"]
    notes += bench["notes"]
    notes.append("stochastic samplers are left out: they do not converge to the ODE solution")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    title = (f"{mixture} mixture, VP {schedule}, {problem.x_start.shape[0]} samples: "
             f"error vs NFE (best {PLOT_PER_GROUP} of each kind)")
    shown = report.best_methods(results, PLOT_PER_GROUP)
    png = report.plot_errors([r for r in results if r.method in shown], nfes, out / "compare.png",
                      title=title)
    payload = report.results_payload(problem, results, nfes, notes)
    payload.update({"diffusers": bool(cfgs), "png": str(png), "json": str(out / "compare.json"),
                    "runtime_s": round(time.perf_counter() - t0, 2),
                    "cpu_s": round(time.process_time() - c0, 2)})
    (out / "compare.json").write_text(json.dumps(payload, indent=2, default=str))
    payload["table"] = report.format_table(results, nfes)
    payload["summary"] = report.format_summary(report.summarize(results, nfes))
    payload["results"] = [r.to_dict() for r in results]
    return payload
