"""Noise-level grids for samplers.

Every function returns a decreasing 1-D float64 tensor of ``n + 1`` values: ``n`` positive
noise levels from ``sigma_max`` down to ``sigma_min``, then a final ``0``. A sampler makes
``n`` steps, one per consecutive pair.

How the last step reaches sigma = 0. The final step goes from ``sigma_min`` to 0. For the
probability-flow ODE, ``dx/dsigma = (x - D(x, sigma)) / sigma``, an Euler step from sigma to 0
lands exactly on the denoiser output ``D(x, sigma_min)`` (the posterior mean at
``sigma_min``; EDM Alg. 1, line 9; the exponential integrators' limit h -> inf is the same
point). The one-step samplers take that first-order step into 0: Euler, DDIM, DDPM, the
ancestral samplers, Heun, EDM, DPM-Solver-2/3, DPM-Solver++(2S), the SDE samplers (the
DPM-Solver++ SDE ones with eta > 0) and RK45. The multistep ODE samplers do not: they
integrate the polynomial through the PF-ODE slopes ``(x - D) / sigma`` they already hold from
``sigma_min`` to 0, an Adams-Bashforth step in sigma that needs no evaluation at 0
(:func:`sfumato.samplers._common.final_step`). Its order is ``final_order`` (default 3; 1 gives
``D(x, sigma_min)`` again) for UniPC, PLMS and DPM-Solver++(2M)/(3M) (and their SDE forms with
eta = 0), LMS's own ``order`` (default 4) for LMS, and whatever its table holds for
``tabulated``. ``sigma_min`` matters either way: jumping from a large sigma straight to the
posterior mean collapses variance, while a small ``sigma_min`` (e.g. 0.002 for EDM, ~0.03 for
1000-step VP) leaves only a small final step. Pass ``final_zero=False`` to get a grid that
ends at ``sigma_min`` instead (for convergence studies, or to hand the last step to something
else).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import torch

from .errors import UsageError
from .process import Process, VPDiscrete

__all__ = [
    "karras",
    "nested",
    "loglinear",
    "polyexponential",
    "uniform_t",
    "discrete",
    "gaussian_lte",
    "gaussian_cov",
    "append_zero",
    "get_sigmas",
    "GRIDS",
    "PROCESS_GRIDS",
    "DATA_GRIDS",
]


def append_zero(sigmas: torch.Tensor) -> torch.Tensor:
    """Append a final 0 to a 1-D grid."""
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def _check(n: int, sigma_min: float, sigma_max: float) -> None:
    if int(n) != n or n < 1:
        raise UsageError(f"the number of steps must be a positive integer; got {n!r}")
    if not (0 < sigma_min < sigma_max) or not math.isfinite(sigma_max):
        raise UsageError(
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


def nested(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0,
           final_zero: bool = True) -> torch.Tensor:
    """Karras et al.'s rho-grid with n + 1 levels, the last (sigma_min) replaced by 0: levels
    ``(smax^(1/rho) + i/n (smin^(1/rho) - smax^(1/rho)))^rho``, i = 0..n-1, then 0. Grids
    nest: every other level of the 2n-step grid is the n-step grid, which is what
    progressive distillation needs (each student step spans two teacher steps)."""
    return _finish(karras(n + 1, sigma_min, sigma_max, rho, final_zero=False)[:-1], final_zero)


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
        raise UsageError(f"the number of steps must be a positive integer; got {n!r}")
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
        raise UsageError(f"the number of steps must be an integer in [1, {T}]; got {n!r}")
    if spacing == "leading":
        k = T // n
        ts = torch.arange(n, dtype=torch.float64).flip(0) * k + 1
        ts = ts.clamp(max=T - 1)
    elif spacing == "trailing":
        ts = (torch.arange(T, 0, -T / n, dtype=torch.float64).round() - 1)[:n]
    elif spacing == "linspace":
        ts = torch.linspace(0, T - 1, n, dtype=torch.float64).round().flip(0)
    else:
        raise UsageError(
            f"unknown spacing {spacing!r}; choose 'leading', 'trailing' or 'linspace'"
        )
    return _finish(process.sigmas[ts.long()], final_zero)


def gaussian_lte(n: int, sigma_min: float, sigma_max: float,
                 sigma_data: float | Sequence[float] | torch.Tensor = 0.5, order: int = 3,
                 propagate: bool = False, final_zero: bool = True) -> torch.Tensor:
    """Steps that equidistribute the local error of an order-``order`` exponential integrator
    on the Gaussian surrogate of the data (variance ``sigma_data^2``, EDM's default 0.5;
    Karras et al. 2022, sec. 5), with the step into sigma = 0 counted as one of the ``n`` steps.

    Derivation. With lambda = -log sigma, data N(mu, s^2 I) (s = sigma_data) and the PF-ODE
    solution x(sigma) = mu + sqrt(s^2 + sigma^2) w, the denoiser along the trajectory is

        D(lambda) = mu + s w g(y),   g(y) = (1 + e^{-2y})^{-1/2},   y = lambda + log s,

    so |g^{(q)}(y)| ~ e^{y} for sigma >> s (the top of the schedule, where D barely moves) and
    ~ e^{-2y} for sigma << s (D has settled). An order-q step of length h in lambda has local
    error ~ h^{q+1} |D^{(q)}|, and the classical step-size rule h ~ (tol / |D^{(q)}|)^{1/(q+1)}
    (Hairer, Norsett & Wanner, "Solving ODEs I", sec. II.4) makes every step's error equal:
    the steps are placed at equal increments of  int rho(lambda) dlambda  with the density

        rho(lambda) = E(y)^{1/(q+1)},   E(y) = e^{y} / (1 + e^{3y})

    (E is the smooth envelope of both asymptotes; the q-th derivative itself has zeros). rho is
    integrable towards sigma = 0, so the final step into 0 gets the density's tail beyond the
    last positive level as its share: that level is where the remaining mass is 1/n of the
    total, clipped at ``sigma_min`` (it is above sigma_min only for small n; the grid then
    ends with a larger last sigma and a longer final step, which samplers take with a high-order
    step in sigma, :func:`sfumato.samplers._common.final_step`). The positive levels
    equidistribute rho between ``sigma_max`` and that level.

    Compared with :func:`karras` and :func:`loglinear` this takes one long step at the top and
    fewer steps below sigma ~ sigma_data / 10; ``order=3`` matches UniPC-2 with its corrector.

    Data covariance (``sigma_data`` a sequence). Pass the standard deviations of the data along
    its principal axes (square roots of the covariance eigenvalues, e.g. from a PCA of the
    training set) to use the Gaussian surrogate with that covariance instead of an isotropic
    one (the linear-Gaussian view of Wang & Vastola 2023, "The hidden linear structure in
    score-based models"). Each axis i has its own y_i = lambda + log s_i and error size
    s_i E(y_i); the error density is their root mean square over axes (the benchmark error is an
    RMS over coordinates, and the axes are orthogonal). With one value this is the isotropic
    grid above. A spread of scales spreads the steps down to the smallest ones.

    ``propagate``: weight each local error by how much of it reaches sigma = 0. On the
    surrogate, x(sigma) = mu + sqrt(s^2 + sigma^2) w, so an error dx made at sigma ends as
    s / sqrt(s^2 + sigma^2) dx = g(y) dx: errors at the top (sigma >> s) shrink by s / sigma.
    The density that minimises the sum of the propagated errors is (g E)^{1/(q+1)} (the same
    variational argument as above, with the error density g E). This moves steps from the top
    of the schedule to sigma ~ s and below.
    """
    _check(n, sigma_min, sigma_max)
    stds = torch.as_tensor(sigma_data, dtype=torch.float64).detach().cpu().flatten()
    if stds.numel() == 0 or not (torch.isfinite(stds).all() and (stds > 0).all()):
        raise UsageError("sigma_data must be a positive number or a non-empty sequence of "
                         f"positive numbers; got {sigma_data!r}")
    if int(order) != order or order < 1:
        raise UsageError(f"order must be a positive integer; got {order!r}")
    lo, hi = -math.log(sigma_max), -math.log(sigma_min)
    # the density decays like e^{-2y/(q+1)} below sigma_data: integrate far enough for the tail
    lam = torch.linspace(lo, max(hi, -math.log(float(stds.min()))) + 12.0 * (order + 1),
                         200_001, dtype=torch.float64)
    softplus = torch.nn.functional.softplus
    y = lam[:, None] + stds.log()[None, :]
    # log of each axis's error size s E(y) = s e^y / (1 + e^{3y}), computed stably
    log_e = stds.log()[None, :] + y - softplus(3 * y)
    if propagate:  # times g(y) = (1 + e^{-2y})^{-1/2}
        log_e = log_e - 0.5 * softplus(-2 * y)
    # RMS over axes, in logs
    log_e = 0.5 * (torch.logsumexp(2 * log_e, dim=1) - math.log(stds.numel()))
    rho = (log_e / (order + 1)).exp()
    cum = torch.cat([rho.new_zeros(1), torch.cumsum((rho[1:] + rho[:-1]) / 2 * lam.diff(), 0)])

    def lam_at(c: torch.Tensor) -> torch.Tensor:  # inverse of the cumulative mass
        return torch.from_numpy(_interp(c.numpy(), cum.numpy(), lam.numpy()))

    last = lo if n == 1 else min(float(lam_at(cum[-1:] * (n - 1) / n)[0]), hi)
    c_last = float(_interp([last], lam.numpy(), cum.numpy())[0])
    levels = lam_at(torch.linspace(0, c_last, n, dtype=torch.float64))
    sig = (-levels).exp()
    sig[0] = sigma_max
    return _finish(sig, final_zero)


def _interp(x, xp, fp):
    import numpy as np

    return np.interp(np.asarray(x, dtype=np.float64), xp, fp)


def gaussian_cov(n: int, sigma_min: float, sigma_max: float, *,
                 sigma_data: float | Sequence[float] | torch.Tensor, order: int = 3,
                 final_zero: bool = True) -> torch.Tensor:
    """The data-aware grid: :func:`gaussian_lte` on the Gaussian surrogate with the data's
    covariance, local errors weighted by how much of them reaches sigma = 0
    (``propagate=True``).

    ``sigma_data``: (d,) standard deviations of the data along its principal axes, i.e. the
    square roots of the covariance eigenvalues (e.g. from a PCA of the training set), in the
    data's units; required. ``order=3`` matches UniPC-2 with its corrector.
    """
    return gaussian_lte(n, sigma_min, sigma_max, sigma_data=sigma_data, order=order,
                        propagate=True, final_zero=final_zero)


#: grid name -> function. Most take ``(n, sigma_min, sigma_max, **kw)``; those in
#: :data:`PROCESS_GRIDS` take ``(process, n, **kw)``. ``leading``, ``trailing`` and
#: ``linspace`` are :func:`discrete` with that spacing (diffusers' ``timestep_spacing``).
GRIDS: dict[str, Callable[..., torch.Tensor]] = {
    "karras": karras,
    "nested": nested,
    "loglinear": loglinear,
    "polyexponential": polyexponential,
    "uniform_t": uniform_t,
    "discrete": discrete,
    "leading": functools.partial(discrete, spacing="leading"),
    "trailing": functools.partial(discrete, spacing="trailing"),
    "linspace": functools.partial(discrete, spacing="linspace"),
    "gaussian_lte": gaussian_lte,
    "gaussian_cov": gaussian_cov,
}
#: grids built from a process's own time steps (they need ``process=``)
PROCESS_GRIDS = ("uniform_t", "discrete", "leading", "trailing", "linspace")
#: grids built from a data statistic (they need ``sigma_data=``, the data's spectrum)
DATA_GRIDS = ("gaussian_cov",)


def get_sigmas(name: str, n: int, *, sigma_min: float | None = None,
               sigma_max: float | None = None, process: Process | None = None,
               **kwargs) -> torch.Tensor:
    """Grid ``name`` (a key of :data:`GRIDS`) with ``n`` steps; ``kwargs`` go to its function.

    sigma_min/max default to the process's range when a process is given; the grids in
    :data:`PROCESS_GRIDS` need ``process`` (and ignore sigma_min/max), those in
    :data:`DATA_GRIDS` need ``sigma_data``.
    """
    if name not in GRIDS:
        raise UsageError(f"unknown sigma grid {name!r}; choose one of {tuple(GRIDS)}")
    if name in DATA_GRIDS and "sigma_data" not in kwargs:
        raise UsageError(f"grid {name!r} needs sigma_data=... (the data's standard deviations "
                         "along its principal axes)")
    fn = GRIDS[name]
    if name in PROCESS_GRIDS:
        if process is None:
            raise UsageError(f"grid {name!r} needs process=...")
        return fn(process, n, **kwargs)
    if process is not None:
        sigma_min = process.sigma_min if sigma_min is None else sigma_min
        sigma_max = process.sigma_max if sigma_max is None else sigma_max
    if sigma_min is None or sigma_max is None:
        raise UsageError(f"grid {name!r} needs sigma_min and sigma_max (or process=...)")
    return fn(n, sigma_min, sigma_max, **kwargs)
