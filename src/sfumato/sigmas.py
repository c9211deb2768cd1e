"""Noise-level grids for samplers.

Every function returns a decreasing 1-D float64 tensor of ``n + 1`` values: ``n`` positive
noise levels from ``sigma_max`` down to ``sigma_min``, then a final ``0``. A sampler makes
``n`` steps, one per consecutive pair.

How the last step reaches sigma = 0. The final step goes from ``sigma_min`` to 0. For the
probability-flow ODE, ``dx/dsigma = (x - D(x, sigma)) / sigma``, an Euler step from sigma to 0
lands exactly on the denoiser output ``D(x, sigma_min)`` (the posterior mean at
``sigma_min``); every sampler here takes that first-order step into 0 (EDM Alg. 1, line 9; the
exponential integrators' limit h -> inf is the same point). ``sigma_min`` therefore matters:
jumping from a large sigma straight to the posterior mean collapses variance, while a small
``sigma_min`` (e.g. 0.002 for EDM, ~0.03 for 1000-step VP) leaves only a small final
denoise. Pass ``final_zero=False`` to get a grid that ends at ``sigma_min`` instead (for
convergence studies, or to hand the last step to something else).
"""

from __future__ import annotations

import math

import torch

from .process import Process, VPDiscrete

__all__ = [
    "karras",
    "loglinear",
    "polyexponential",
    "uniform_t",
    "discrete",
    "append_zero",
    "get_sigmas",
    "GRIDS",
]


def append_zero(sigmas: torch.Tensor) -> torch.Tensor:
    """Append a final 0 to a 1-D grid."""
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def _check(n: int, sigma_min: float, sigma_max: float) -> None:
    if int(n) != n or n < 1:
        raise ValueError(f"the number of steps must be a positive integer; got {n!r}")
    if not (0 < sigma_min < sigma_max) or not math.isfinite(sigma_max):
        raise ValueError(
            f"need 0 < sigma_min < sigma_max < inf; got sigma_min={sigma_min}, "
            f"sigma_max={sigma_max}"
        )


def _finish(sig: torch.Tensor, final_zero: bool) -> torch.Tensor:
    return append_zero(sig) if final_zero else sig


def karras(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0,
           final_zero: bool = True) -> torch.Tensor:
    """Karras et al. 2022, eq. (5): sigma_i = (smax^(1/rho) + i/(n-1) (smin^(1/rho) -
    smax^(1/rho)))^rho, i = 0..n-1; then 0."""
    _check(n, sigma_min, sigma_max)
    ramp = torch.linspace(0, 1, n, dtype=torch.float64) if n > 1 else torch.zeros(1,
                                                                                 dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return _finish((hi + ramp * (lo - hi)) ** rho, final_zero)


def loglinear(n: int, sigma_min: float, sigma_max: float, final_zero: bool = True) -> torch.Tensor:
    """Uniform in log sigma, i.e. uniform in logSNR = -2 log sigma (Lu et al. 2022, sec. 3.3)."""
    return polyexponential(n, sigma_min, sigma_max, rho=1.0, final_zero=final_zero)


def polyexponential(n: int, sigma_min: float, sigma_max: float, rho: float = 1.0,
                    final_zero: bool = True) -> torch.Tensor:
    """log sigma = log smin + (1 - i/(n-1))^rho (log smax - log smin); rho = 1 is log-linear."""
    _check(n, sigma_min, sigma_max)
    ramp = torch.linspace(1, 0, n, dtype=torch.float64) if n > 1 else torch.ones(1,
                                                                                dtype=torch.float64)
    ramp = ramp**rho
    lo, hi = math.log(sigma_min), math.log(sigma_max)
    return _finish((lo + ramp * (hi - lo)).exp(), final_zero)


def uniform_t(process: Process, n: int, t_min: float | None = None, t_max: float | None = None,
              final_zero: bool = True) -> torch.Tensor:
    """t uniform from the process's t_max down to t_min, mapped through sigma(t)."""
    t_min = process.t_min if t_min is None else t_min
    t_max = process.t_max if t_max is None else t_max
    if int(n) != n or n < 1:
        raise ValueError(f"the number of steps must be a positive integer; got {n!r}")
    t = torch.linspace(t_max, t_min, n, dtype=torch.float64) if n > 1 else torch.tensor(
        [t_max], dtype=torch.float64)
    return _finish(process.sigma(t), final_zero)


def discrete(process: VPDiscrete, n: int, spacing: str = "trailing",
             final_zero: bool = True) -> torch.Tensor:
    """The training steps a discrete VP process samples at, as diffusers spaces them.

    - ``leading``: t = (0, k, 2k, ...)[::-1] with k = T // n, plus an offset of 1 (DDIM paper,
      Stable Diffusion); never reaches t = T-1.
    - ``trailing``: t = round(T - i T/n) - 1 (Lin et al. 2024, Table 2); starts at T-1.
    - ``linspace``: t = round(linspace(0, T-1, n))[::-1].
    """
    if not isinstance(process, VPDiscrete):
        raise TypeError("discrete spacings need a VPDiscrete process; use uniform_t otherwise")
    T = process.n
    if int(n) != n or not 1 <= n <= T:
        raise ValueError(f"the number of steps must be an integer in [1, {T}]; got {n!r}")
    if spacing == "leading":
        k = T // n
        ts = torch.arange(n, dtype=torch.float64).flip(0) * k + 1
        ts = ts.clamp(max=T - 1)
    elif spacing == "trailing":
        ts = (torch.arange(T, 0, -T / n, dtype=torch.float64).round() - 1)[:n]
    elif spacing == "linspace":
        ts = torch.linspace(0, T - 1, n, dtype=torch.float64).round().flip(0)
    else:
        raise ValueError(
            f"unknown spacing {spacing!r}; choose 'leading', 'trailing' or 'linspace'"
        )
    return _finish(process.sigmas[ts.long()], final_zero)


GRIDS = ("karras", "loglinear", "polyexponential", "uniform_t", "discrete")


def get_sigmas(name: str, n: int, *, sigma_min: float | None = None,
               sigma_max: float | None = None, process: Process | None = None,
               **kwargs) -> torch.Tensor:
    """Grid by name. sigma_min/max default to the process's range when a process is given."""
    if name in ("uniform_t", "discrete"):
        if process is None:
            raise ValueError(f"grid {name!r} needs process=...")
        fn = uniform_t if name == "uniform_t" else discrete
        return fn(process, n, **kwargs)
    if name not in GRIDS:
        raise ValueError(f"unknown sigma grid {name!r}; choose one of {GRIDS}")
    if process is not None:
        sigma_min = process.sigma_min if sigma_min is None else sigma_min
        sigma_max = process.sigma_max if sigma_max is None else sigma_max
    if sigma_min is None or sigma_max is None:
        raise ValueError(f"grid {name!r} needs sigma_min and sigma_max (or process=...)")
    fn = {"karras": karras, "loglinear": loglinear, "polyexponential": polyexponential}[name]
    return fn(n, sigma_min, sigma_max, **kwargs)
