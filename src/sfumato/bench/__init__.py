"""The sampler benchmark: sfumato samplers and diffusers schedulers on one exact model.

It measures *ODE solver error*: how far a deterministic sampler's output is from the exact
probability-flow ODE solution that starts from the same noise. Used by
``benchmarks/samplers.py`` (the full table) and ``sfumato compare`` (a short one with a plot).

Modules (each docstring gives its part of the setting):

- :mod:`~sfumato.bench.problem`: the exact mixtures, the process, the shared noise and the
  reference solution (:func:`make_problem`); grids by :data:`sfumato.sigmas.GRIDS` name
  (:meth:`Problem.grid`).
- :mod:`~sfumato.bench.specs`: ``'name(key=value)'`` specs of samplers and grids.
- :mod:`~sfumato.bench.results`: one cell (:class:`Result`) and how it is measured.
- :mod:`~sfumato.bench.runner`: every (method, NFE) cell at an NFE budget
  (:func:`run_benchmark`).
- :mod:`~sfumato.bench.calibrated`: methods fitted to the model (optimised grids, tuned
  solvers), a result's ``calibration``.
- :mod:`~sfumato.bench.diffusers_adapters`: diffusers schedulers on the same model; imported
  only when diffusers runs (``pip install 'sfumato[bench]'``).
- :mod:`~sfumato.bench.report`: best-of with bootstrap intervals, table, summary, plot, JSON.
- :mod:`~sfumato.bench.compare`: the ``sfumato compare`` command.
"""

from ..runtime import torch_threads
from .calibrated import CALIBRATION_SAMPLES, CALIBRATIONS, OPTIMIZED, TUNED
from .compare import compare
from .problem import (
    MIXTURES,
    REF_SIGMA,
    Problem,
    add_problem_arguments,
    make_problem,
    start_state,
)
from .report import (
    best_methods,
    format_summary,
    format_table,
    plot_errors,
    ratio_interval,
    results_payload,
    summarize,
)
from .results import Result
from .runner import (
    DEFAULT_GRIDS,
    DEFAULT_NFES,
    check_nfes,
    deterministic_samplers,
    diffusers_available,
    run_benchmark,
    run_sfumato,
)
from .specs import parse_grid, parse_sampler

__all__ = [
    "CALIBRATION_SAMPLES", "CALIBRATIONS", "OPTIMIZED", "TUNED", "compare", "MIXTURES",
    "REF_SIGMA", "Problem", "add_problem_arguments", "make_problem", "start_state",
    "best_methods", "format_summary", "format_table", "plot_errors", "ratio_interval",
    "results_payload", "summarize", "DEFAULT_GRIDS", "DEFAULT_NFES", "Result", "check_nfes",
    "deterministic_samplers", "diffusers_available", "run_benchmark", "run_sfumato",
    "torch_threads", "parse_grid", "parse_sampler",
]
