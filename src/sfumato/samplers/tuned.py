"""A multistep solver given by its coefficient table: UniPC written out, or tuned to a model.

Every data-prediction multistep exponential integrator (DPM-Solver++(2M/3M), UniPC with its
corrector) takes, in σ-space with r_i = sigma_{i+1} / sigma_i and m_j = D(x_j, sigma_j), the
form (Lu et al. 2022b, eq. 9-10; Zhao et al. 2023, Alg. 1-3)::

    base      = r_i x_i + (1 - r_i) m_i                                  (exact for constant D)
    x_pred    = base + sum_k P_ik (m_{i-k} - m_i)                        (predictor)
    m_{i+1}   = D(x_pred, sigma_{i+1})                                   (the step's one NFE)
    x_{i+1}   = base + sum_k C_ik (m_{i-k} - m_i) + C_i0 (m_{i+1} - m_i) (corrector)

and, into sigma = 0, x(0) = x_n + sum_j F_j d_j over the last PF-ODE slopes
d_j = (x_j - m_j) / sigma_j (:func:`sfumato.samplers._common.final_step`). The method is
nothing but the numbers (P, C, F) on its grid: :func:`unipc_table` computes UniPC's (and
:func:`sample_tabulated` with it reproduces :func:`sfumato.samplers.sample_unipc` to rounding);
:func:`sfumato.calibrate.tune_coefficients` moves them to minimise the error on one model's
calibration draws, as the learned-solver papers do (Shaul et al. 2023, "Bespoke solvers";
Zheng et al. 2023, "DPM-Solver-v3", empirical model statistics; Frankel et al. 2025, "S4S:
solving for a diffusion model solver"). Because P and C act on differences of denoised
values, every table is exact for a constant denoiser in its steps to positive sigmas, and the
step into 0 is too when sum_j F_j = -sigma_m (the last positive sigma), which UniPC's weights
and the tuned ones satisfy.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ._common import Callback, Generator, finish, lms_weights, prepare, report
from ._exp import log_ratio, step_order

__all__ = ["StepTable", "unipc_table", "sample_tabulated", "run_table", "UNIPC_VARIANTS"]

#: the UniPC samplers whose coefficients a table holds (and tuning moves): name -> variant
UNIPC_VARIANTS = {"unipc": "bh2", "unipc_bh1": "bh1", "unipc_bh2": "bh2"}


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
            raise ValueError(f"sigmas must be a decreasing grid of >= 2 values >= 0; got {s}")
        positive = len(s) - 1 - (s[-1] == 0)
        if len(self.predictor) != positive or len(self.corrector) != positive:
            raise ValueError(f"a grid with {positive} steps to a positive sigma needs that many "
                             f"predictor and corrector rows; got {len(self.predictor)} and "
                             f"{len(self.corrector)}")
        if (s[-1] == 0) != bool(self.final):
            raise ValueError("final weights are needed exactly when the grid ends in 0")
        for i, (p, c) in enumerate(zip(self.predictor, self.corrector, strict=True)):
            if len(p) > i or len(c) > i + 1:
                raise ValueError(f"step {i} can use {i} earlier denoised values; its row asks "
                                 f"for {len(p)} (predictor) / {max(len(c) - 1, 0)} (corrector)")
        if len(self.final) > positive + 1:
            raise ValueError(f"the final step can use {positive + 1} slopes; got "
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
            raise ValueError(f"not a solver table (needs sigmas, predictor, corrector and final "
                             f"lists): {e}") from None


def unipc_table(sigmas: torch.Tensor | Sequence[float], *, order: int = 3,
                variant: str = "bh2", use_corrector: bool = True,
                lower_order_final: bool = True, final_order: int = 3) -> StepTable:
    """UniPC's coefficients on ``sigmas``, with the options of
    :func:`sfumato.samplers.sample_unipc` (Zhao et al. 2023, Alg. 1-3; the coefficient of
    (m_{i-k} - m_i) is -B(h) a_k / r_k in that function's notation)."""
    from .unipc import unipc_coefficients

    if order not in (1, 2, 3, 4, 5):
        raise ValueError(f"order must be 1, 2, 3, 4 or 5; got {order!r}")
    if variant not in ("bh1", "bh2"):
        raise ValueError(f"variant must be 'bh1' or 'bh2'; got {variant!r}")
    s = [float(v) for v in torch.as_tensor(sigmas, dtype=torch.float64).tolist()]
    n = len(s) - 1
    lam = [-math.log(v) if v > 0 else math.inf for v in s]
    pred, corr, have = [], [], 1
    for i in range(n):
        if s[i + 1] == 0:
            break
        p = step_order(order, have, i, s, lower_order_final)
        h = log_ratio(s[i], s[i + 1])
        rks = [(lam[i - k] - lam[i]) / h for k in range(1, p)]
        B, a = unipc_coefficients(h, rks, variant)
        pred.append([-B * ak / r for ak, r in zip(a, rks, strict=True)])
        if use_corrector and i < n - 1:
            B, a = unipc_coefficients(h, rks + [1.0], variant)
            corr.append([-B * ak / r for ak, r in zip(a, rks + [1.0], strict=True)])
        else:  # x = x_pred: the predictor's row and nothing on the new value
            corr.append([] if i == n - 1 else pred[-1] + [0.0])
        have = min(have + 1, order)
    final = []
    if s[-1] == 0:
        nodes = s[max(0, n - max(final_order, 1)):n][::-1]  # newest first
        final = lms_weights(nodes, s[n - 1], 0.0)
    return StepTable(s, pred, corr, final)


def run_table(model: Callable[[torch.Tensor, float], torch.Tensor], x: torch.Tensor,
              table: StepTable, coef: Callable[[str, int, int, float], object] | None = None,
              on_step: Callable | None = None) -> torch.Tensor:
    """The solver loop of the module docstring: ``model(x, sigma) -> D``, state ``x``.

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


@torch.no_grad()
def sample_tabulated(denoiser: Callable, x: torch.Tensor, sigmas: torch.Tensor, *,
                     table: StepTable | dict, generator: Generator = None,
                     callback: Callback = None, **cond) -> torch.Tensor:
    """Multistep sampler with the coefficients of ``table`` (a :class:`StepTable` or its
    dict, e.g. from :func:`sfumato.calibrate.tune_coefficients` or :func:`unipc_table`),
    on the table's own grid, which ``sigmas`` must equal. 1 NFE per step.
    ``generator`` is unused (deterministic)."""
    table = table if isinstance(table, StepTable) else StepTable.from_dict(table)
    model, x, sigmas, dtype = prepare(denoiser, x, sigmas, cond)
    s = sigmas.double().cpu()
    ts = torch.tensor(table.sigmas, dtype=torch.float64)
    if s.shape != ts.shape or not torch.allclose(s, ts, rtol=1e-6, atol=0):
        raise ValueError(f"sigmas {s.tolist()} are not the grid the table was made for "
                         f"{table.sigmas}: pass table.sigmas")

    def step(i: int, xi: torch.Tensor, m: torch.Tensor) -> None:
        report(callback, i, xi, sigmas[i], sigmas[i + 1], m)

    out = run_table(model, x, table, on_step=step if callback else None)
    return finish(out, dtype)
