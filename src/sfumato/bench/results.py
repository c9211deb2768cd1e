"""One benchmark cell and how it is measured: :class:`Result` (a method at an NFE budget, its
RMS error against the exact solution and per-sample errors), :func:`finite_error`, and
:func:`steps_for_budget` (the most steps a method can take within a budget). Shared by the
sfumato runner and the diffusers adapters."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

__all__ = ["Result", "finite_error", "steps_for_budget"]


@dataclass
class Result:
    """One cell of the table. ``error`` is the RMS error, ``nan`` for NaN/Inf output;
    ``calibration`` is None for a generic sfumato grid or diffusers, else what was fitted to
    the model (``'optimized'`` or ``'tuned'``)."""

    method: str
    family: str  # "sfumato" | "diffusers" | "sfumato-adaptive"
    nfe_target: int
    nfe: int | None = None
    steps: int | None = None
    error: float | None = None
    status: str = "ok"  # ok | nan | error | n/a | skipped
    note: str = ""
    calibration: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    #: (B,) mean squared error of each sample (float64), for the bootstrap of ``summarize``
    sample_mse: torch.Tensor | None = field(default=None, repr=False, compare=False)

    @property
    def valid(self) -> bool:
        return self.status == "ok" and self.error is not None and math.isfinite(self.error)

    def to_dict(self) -> dict[str, Any]:
        """The JSON-able fields (all but ``sample_mse``)."""
        return {k: v for k, v in asdict(self).items() if k != "sample_mse"}


def finite_error(out: torch.Tensor, ref: torch.Tensor) -> dict[str, Any]:
    """``error`` (RMS over everything), ``status`` and ``sample_mse`` (per sample, (B,)) of an
    output (B, ...) against the reference, as :class:`Result` keywords."""
    if not torch.isfinite(out).all():
        return {"error": float("nan"), "status": "nan"}
    mse = (out.to(torch.float64) - ref).pow(2).reshape(out.shape[0], -1).mean(1)
    return {"error": float(mse.mean().sqrt()), "status": "ok", "sample_mse": mse}


def steps_for_budget(nfe_of: Callable[[int], int], target: int) -> tuple[int, int] | None:
    """``(n, nfe_of(n))`` for the largest step count n with ``nfe_of(n) <= target``
    (``nfe_of`` non-decreasing); None if even n = 1 exceeds it."""
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
