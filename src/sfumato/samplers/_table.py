"""The coefficient-table form of a data-prediction multistep solver, and its solver loop.

Every data-prediction multistep exponential integrator (DPM-Solver++(2M/3M), UniPC with its
corrector) takes, in σ-space with r_i = sigma_{i+1} / sigma_i and m_j = D(x_j, sigma_j), the
form (Lu et al. 2022b, eq. 9-10; Zhao et al. 2023, Alg. 1-3)::

    base      = r_i x_i + (1 - r_i) m_i                                  (exact for constant D)
    x_pred    = base + sum_k P_ik (m_{i-k} - m_i)                        (predictor)
    m_{i+1}   = D(x_pred, sigma_{i+1})                                   (the step's one NFE)
    x_{i+1}   = base + sum_k C_ik (m_{i-k} - m_i) + C_i0 (m_{i+1} - m_i) (corrector)

and, into sigma = 0, x(0) = x_n + sum_j F_j d_j over the last PF-ODE slopes
d_j = (x_j - m_j) / sigma_j, taken at the points where D was evaluated
(:func:`sfumato.samplers._common.final_step`). The method is nothing but the numbers
(P, C, F) on its grid (:class:`StepTable`), run by :func:`run_table`: UniPC is the table of
:func:`sfumato.samplers.unipc.unipc_table`, and :mod:`sfumato.samplers.tuned` runs any table,
e.g. one fitted to a model. Because P and C act on differences of denoised values, every table
is exact for a constant denoiser in its steps to positive sigmas, and the step into 0 is too
when sum_j F_j = -sigma_m (the last positive sigma).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import UsageError
from ._common import BoundDenoiser, Callback, report

__all__ = ["StepTable", "run_table", "run_reporting"]


@dataclass
class StepTable:
    """The coefficients of a multistep solver on one grid (see the module docstring).

    Attributes:
        sigmas: the grid, n + 1 decreasing values (normally ending in 0).
        predictor: per step to a positive sigma, P_ik for k = 1, 2, ... (history depth).
        corrector: per such step, C_ik for k = 1, 2, ... then C_i0 (on the new value) last;
            an empty list means no corrector (the last step of a grid that ends above 0).
        final: F_j for the step into 0, newest slope first (empty if the grid ends above 0).
    """

    sigmas: list[float]
    predictor: list[list[float]]
    corrector: list[list[float]]
    final: list[float]

    def __post_init__(self) -> None:
        s = [float(v) for v in self.sigmas]
        if len(s) < 2 or any(b >= a for a, b in zip(s, s[1:], strict=False)) or s[-1] < 0:
            raise UsageError(f"sigmas must be a decreasing grid of >= 2 values >= 0; got {s}")
        positive = len(s) - 1 - (s[-1] == 0)
        if len(self.predictor) != positive or len(self.corrector) != positive:
            raise UsageError(f"a grid with {positive} steps to a positive sigma needs that many "
                             f"predictor and corrector rows; got {len(self.predictor)} and "
                             f"{len(self.corrector)}")
        if (s[-1] == 0) != bool(self.final):
            raise UsageError("final weights are needed exactly when the grid ends in 0")
        for i, (p, c) in enumerate(zip(self.predictor, self.corrector, strict=True)):
            if len(p) > i or len(c) > i + 1:
                raise UsageError(f"step {i} can use {i} earlier denoised values; its row asks "
                                 f"for {len(p)} (predictor) / {max(len(c) - 1, 0)} (corrector)")
        if len(self.final) > positive + 1:
            raise UsageError(f"the final step can use {positive + 1} slopes; got "
                             f"{len(self.final)} weights")

    @property
    def depth(self) -> int:
        """How many denoised values the solver keeps."""
        rows = [len(p) for p in self.predictor] + [len(c) - 1 for c in self.corrector]
        return max(rows, default=0) + 1

    def to_dict(self) -> dict:
        """JSON-able form."""
        return {"sigmas": [float(v) for v in self.sigmas],
                "predictor": [[float(v) for v in r] for r in self.predictor],
                "corrector": [[float(v) for v in r] for r in self.corrector],
                "final": [float(v) for v in self.final]}

    @classmethod
    def from_dict(cls, d: dict) -> StepTable:
        """Inverse of :meth:`to_dict` (validates the shape of every row)."""
        try:
            return cls([float(v) for v in d["sigmas"]],
                       [[float(v) for v in r] for r in d["predictor"]],
                       [[float(v) for v in r] for r in d["corrector"]],
                       [float(v) for v in d["final"]])
        except (KeyError, TypeError) as e:
            raise UsageError(f"not a solver table (needs sigmas, predictor, corrector and final "
                             f"lists): {e}") from None


def run_table(model: Callable[[torch.Tensor, float], torch.Tensor], x: torch.Tensor,
              table: StepTable, coef: Callable[[str, int, int, float], object] | None = None,
              on_step: Callable | None = None) -> torch.Tensor:
    """The solver loop of the module docstring, from ``x`` (B, ...) at ``table.sigmas[0]`` to
    the state at ``table.sigmas[-1]``; ``model(x, sigma) -> D(x, sigma)`` (B, ...), sigma a
    float in data units.

    ``coef(kind, i, k, value)`` may replace each table entry (``kind`` 'P', 'C' or 'F'), e.g.
    by a tensor that requires grad (:func:`sfumato.calibrate.tune_coefficients`); by default
    the table's numbers are used. ``on_step(i, x, m_i)`` sees each new state.
    """
    c = coef or (lambda kind, i, k, v: v)
    s, depth = table.sigmas, table.depth
    ms = [model(x, s[0])]
    slopes = [(x - ms[0]) / s[0]]  # newest last, at the predicted states (as UniPC)
    for i, (prow, crow) in enumerate(zip(table.predictor, table.corrector, strict=True)):
        m0, r = ms[-1], s[i + 1] / s[i]
        base = r * x + (1 - r) * m0
        x_pred = base
        for k, v in enumerate(prow):
            x_pred = x_pred + c("P", i, k, v) * (ms[-2 - k] - m0)
        if not crow:  # last step of a grid that ends above 0: no evaluation
            x = x_pred
            if on_step:
                on_step(i, x, m0)
            break
        m_next = model(x_pred, s[i + 1])
        x = base + c("C", i, len(crow) - 1, crow[-1]) * (m_next - m0)
        for k, v in enumerate(crow[:-1]):
            x = x + c("C", i, k, v) * (ms[-2 - k] - m0)
        ms = (ms + [m_next])[-depth:]
        slopes = (slopes + [(x_pred - m_next) / s[i + 1]])[-max(len(table.final), 1):]
        if on_step:
            on_step(i, x, m0)
    if table.final:
        m_last = ms[-1]
        newest = slopes[::-1][:len(table.final)]
        x = x + sum(c("F", 0, j, w) * d
                    for j, (w, d) in enumerate(zip(table.final, newest, strict=True)))
        if on_step:
            on_step(len(s) - 2, x, m_last)
    return x


def run_reporting(model: BoundDenoiser, x: torch.Tensor, sigmas: torch.Tensor,
                  table: StepTable, callback: Callback) -> torch.Tensor:
    """:func:`run_table` for a sampler function: ``model`` and ``x`` (B, ...) from
    :func:`sfumato.samplers._common.prepare`, ``sigmas`` the prepared grid (the table's), and
    the user's ``callback`` told of every step as the other samplers tell it (step i, the state
    at sigmas[i + 1], D at the step's start)."""

    def step(i: int, xi: torch.Tensor, m: torch.Tensor) -> None:
        report(callback, i, xi, sigmas[i], sigmas[i + 1], m)

    return run_table(model, x, table, on_step=step if callback else None)
