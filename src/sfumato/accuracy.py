"""How accurate a sampler is, measured against exact models: reference ODE solutions, an
honest count of denoiser calls, RMS error, convergence order, distribution distances. Used by
the test-suite and the benchmark; handy for your own samplers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from . import sigmas as grids
from .errors import UsageError

__all__ = [
    "CountingDenoiser",
    "reference_ode",
    "rms",
    "median_error",
    "measure_order",
    "sliced_wasserstein",
]


class CountingDenoiser:
    """Wraps a denoiser and counts its evaluations: sfumato's one NFE counter.

    The convention: NFE is the number of denoiser evaluations *per sample*. A call on a batch
    evaluates each of its rows once, so ``nfe`` (calls) is a sampler's NFE whatever the batch
    size. ``rows`` adds up the batch sizes (``x.shape[0]``): code that evaluates changing
    subsets of its samples (calibration chunks and minibatches) reports
    :meth:`per_sample` = ``rows // samples``, the same unit.
    """

    def __init__(self, denoiser: Callable) -> None:
        self.denoiser, self.nfe, self.rows = denoiser, 0, 0

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **cond) -> torch.Tensor:
        self.nfe += 1
        self.rows += x.shape[0]
        return self.denoiser(x, sigma, **cond)

    def per_sample(self, samples: int) -> int:
        """Evaluations per sample when ``samples`` samples shared the calls (``rows //
        samples``)."""
        return self.rows // samples


@torch.no_grad()
def reference_ode(denoiser: Callable, x: torch.Tensor, sigma_from: float, sigma_to: float,
                  steps: int = 2000) -> torch.Tensor:
    """Classical RK4 on the PF-ODE written in u = log(sigma): dx/du = x - D(x, e^u).

    Order 4 in the uniform log-sigma step; run in float64 for a reference solution.
    ``sigma_to`` must be > 0 (add a final ``D(x, sigma_to)`` yourself to reach 0).
    """
    if not sigma_to > 0:
        raise UsageError("reference_ode integrates to a positive sigma_to")
    u = torch.linspace(math.log(sigma_from), math.log(sigma_to), steps + 1, dtype=torch.float64)

    def f(x, ui):
        return x - denoiser(x, torch.full((x.shape[0],), math.exp(ui), dtype=x.dtype,
                                          device=x.device))

    x = x.clone()
    for i in range(steps):
        a, h = float(u[i]), float(u[i + 1] - u[i])
        k1 = f(x, a)
        k2 = f(x + 0.5 * h * k1, a + 0.5 * h)
        k3 = f(x + 0.5 * h * k2, a + 0.5 * h)
        k4 = f(x + h * k3, a + h)
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return x


def rms(a: torch.Tensor, b: torch.Tensor) -> float:
    """Root-mean-square difference over all elements."""
    return float((a - b).double().pow(2).mean().sqrt())


def median_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """Median over samples of the per-sample RMS difference (robust to the few trajectories
    that pass near a boundary between modes, where the ODE is locally stiff)."""
    d = (a - b).double().reshape(a.shape[0], -1)
    return float(d.pow(2).mean(1).sqrt().median())


@torch.no_grad()
def measure_order(sampler: Callable, denoiser: Callable, x_T: torch.Tensor,
                  steps: Sequence[int] = (16, 32, 64), *, sigma_min: float = 0.05,
                  sigma_max: float = 20.0, grid: str = "loglinear",
                  reference: torch.Tensor | None = None, error: Callable = None,
                  **kwargs) -> tuple[list[float], list[float]]:
    """Empirical convergence order of a deterministic sampler.

    Solves from ``sigma_max`` to ``sigma_min`` (no final step into 0, so the error is the
    solver's, not the final denoise's) with each step count, against a fine reference, and
    returns (errors, orders) with ``orders[j] = log2(err[j] / err[j+1]) / log2(n[j+1]/n[j])``.
    ``x_T`` is the starting state at ``sigma_max`` (float64 recommended). ``error`` compares
    two batches (default :func:`median_error`; :func:`rms` weighs the stiff outliers more).
    """
    error = error or median_error
    if reference is None:
        reference = reference_ode(denoiser, x_T, sigma_max, sigma_min)
    errs = []
    for n in steps:
        sig = grids.get_sigmas(grid, n, sigma_min=sigma_min, sigma_max=sigma_max,
                               final_zero=False)
        errs.append(error(sampler(denoiser, x_T, sig, **kwargs), reference))
    orders = [math.log(errs[j] / errs[j + 1]) / math.log(steps[j + 1] / steps[j])
              for j in range(len(steps) - 1)]
    return errs, orders


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, n_proj: int = 256, *,
                       generator: torch.Generator | None = None) -> float:
    """Sliced 2-Wasserstein distance between two equal-size point clouds (N, ...).

    Averages W2^2 of 1-D projections on ``n_proj`` random unit directions and returns its
    square root. ``generator`` fixes the directions.
    """
    a = a.reshape(a.shape[0], -1).double()
    b = b.reshape(b.shape[0], -1).double()
    if a.shape != b.shape:
        raise UsageError(f"point clouds must have equal shapes; got {a.shape} and {b.shape}")
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    d = torch.randn(a.shape[1], n_proj, generator=g, dtype=torch.float64)
    d = d / d.norm(dim=0, keepdim=True)
    pa, _ = (a @ d).sort(0)
    pb, _ = (b @ d).sort(0)
    return float((pa - pb).pow(2).mean().sqrt())
