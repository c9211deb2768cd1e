"""Linear multistep samplers on the PF-ODE in σ-space: LMS (Karras et al. 2022 / k-diffusion)
and PLMS / PNDM (Liu et al. 2022).

Both integrate dx/dsigma = eps_hat(x, sigma) = (x - D(x, sigma)) / sigma (Karras et al. 2022,
eq. 3) and reuse the eps_hat of earlier steps, so after a short warm-up they cost one network
evaluation per step.

- :func:`sample_lms` is Adams-Bashforth in sigma with coefficients integrated exactly for the
  grid at hand (any spacing).
- :func:`sample_plms` combines eps estimates with the fixed, equal-step Adams-Bashforth weights
  of Liu et al.; it is order 4 only on grids uniform in sigma. Prefer LMS on other grids.

Neither takes the first-order step x = D(x, sigma_min) into sigma = 0 (see
:mod:`sfumato.sigmas`): both integrate the polynomial through their stored slopes from
sigma_min to 0, which needs no evaluation at 0 (LMS with its own formula, of its ``order``;
PLMS with :func:`._common.final_step`, of its ``final_order``, default 3).
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import pairwise

import torch

from ..errors import UsageError
from ._common import (
    Callback,
    Generator,
    final_step,
    finish,
    lms_weights,
    prepare,
    report,
    to_d,
)


def _rk4_in_sigma(eps: Callable, x: torch.Tensor, sigma: torch.Tensor,
                  sigma_next: torch.Tensor, e1: torch.Tensor) -> torch.Tensor:
    """Classical RK4 step of dx/dsigma = eps(x, sigma) from sigma to sigma_next, given
    e1 = eps(x, sigma); 3 more NFE. In PNDM's words: the pseudo Runge-Kutta gradient part with
    the DDIM transfer x + (sigma_to - sigma) e (Liu et al. 2022, eq. 13)."""
    mid = 0.5 * (sigma + sigma_next)
    e2 = eps(x + (mid - sigma) * e1, mid)[0]
    e3 = eps(x + (mid - sigma) * e2, mid)[0]
    e4 = eps(x + (sigma_next - sigma) * e3, sigma_next)[0]
    return x + (sigma_next - sigma) * (e1 + 2 * e2 + 2 * e3 + e4) / 6


@torch.no_grad()
def sample_lms(denoiser: Callable, x: torch.Tensor, sigmas: torch.Tensor, *, order: int = 4,
               warmup: str = "ab", generator: Generator = None, callback: Callback = None,
               **cond) -> torch.Tensor:
    """Linear multistep (Adams-Bashforth) in sigma with exact non-uniform-grid coefficients,
    as k-diffusion's ``sample_lms``.

    With d_k = (x_k - D(x_k, s_k)) / s_k and the last m = min(i + 1, order) of them::

        x_{i+1} = x_i + sum_{j<m} c_{ij} d_{i-j},
        c_{ij}  = int_{s_i}^{s_{i+1}} l_j(s) ds,

    where l_j is the Lagrange basis polynomial through s_i, s_{i-1}, ..., s_{i-m+1}: the
    variable-step Adams-Bashforth method (Hairer, Norsett & Wanner, "Solving ODEs I",
    sec. III.5), integrated exactly by :func:`._common.lms_weights` (k-diffusion uses numerical
    quadrature). One NFE per step after the warm-up.

    Warm-up. ``warmup="ab"`` (k-diffusion's choice) ramps up with Adams-Bashforth orders
    1, 2, ..., order, costing nothing extra. ``warmup="rk4"`` takes the first order-1 steps
    with classical RK4 in sigma (4 NFE each, like PNDM's pseudo Runge-Kutta start), which keeps
    the method's full order: LMS-4 with it is a true order-4 method.

    Order with ``warmup="ab"``: the multistep formula is order m, but a warm-up step of order
    q leaves a global error O(h^q), so asymptotically LMS is order 2 (the single Euler step)
    for any order >= 2.
    On PF-ODEs that first step sits at high sigma, where the solution is nearly linear in
    sigma, so the O(h^2) term is small and the measured order stays well above 2 until many
    hundreds of steps (tests/test_samplers_multistep.py measures it). The step into sigma = 0 is
    the same formula with s_{i+1} = 0, of order m (no evaluation at 0 is needed; the
    Adams-Bashforth step of :func:`._common.final_step`). ``generator`` is unused.
    """
    if int(order) != order or order < 1:
        raise UsageError(f"order must be a positive integer; got {order!r}")
    if warmup not in ("ab", "rk4"):
        raise UsageError(f"warmup must be 'ab' or 'rk4'; got {warmup!r}")
    model, x, sigmas, dtype = prepare(denoiser, x, sigmas, cond)
    s = sigmas.double().cpu().tolist()
    eps = _eps_fn(model)
    ds: list[torch.Tensor] = []  # most recent last
    for i in range(len(s) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        d, denoised = eps(x, sigma)
        if warmup == "rk4" and len(ds) < order - 1 and s[i + 1] > 0:
            ds.append(d)
            x = _rk4_in_sigma(eps, x, sigma, sigma_next, d)
        else:
            ds.append(d)
            ds = ds[-order:]
            m = len(ds)
            coeffs = lms_weights([s[i - j] for j in range(m)], s[i], s[i + 1])
            x = x + sum(c * d for c, d in zip(coeffs, reversed(ds), strict=True))
        report(callback, i, x, sigma, sigma_next, denoised)
    return finish(x, dtype)


def _eps_fn(model: Callable) -> Callable:
    """eps(x, sigma) -> ((x - D) / sigma, D) for a prepared model."""

    def eps(x_: torch.Tensor, sigma_: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        denoised_ = model(x_, sigma_)
        return to_d(x_, sigma_, denoised_), denoised_

    return eps


#: Adams-Bashforth weights for equal steps, newest eps first (4: Liu et al. 2022's PLMS)
_AB = {1: (1.0,), 2: (3 / 2, -1 / 2), 3: (23 / 12, -16 / 12, 5 / 12),
       4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


@torch.no_grad()
def sample_plms(denoiser: Callable, x: torch.Tensor, sigmas: torch.Tensor, *,
                warmup: str = "prk", final_order: int = 3, generator: Generator = None,
                callback: Callback = None, **cond) -> torch.Tensor:
    """Pseudo linear multistep, PNDM / PLMS (Liu et al. 2022, "Pseudo numerical methods
    for diffusion models on manifolds", sec. 3, eq. 9-12).

    PNDM splits a step into a *gradient part*, an estimate e' of the noise over the step, and
    a *transfer part* phi that moves x with it. phi is the DDIM step, which in σ-space
    is an Euler step with e' in place of eps_hat::

        phi(x, e', sigma -> sigma_next) = x + (sigma_next - sigma) e'

    Gradient parts, with e_k = (x_k - D(x_k, s_k)) / s_k:

    - PLMS: e' = (55 e_i - 59 e_{i-1} + 37 e_{i-2} - 9 e_{i-3}) / 24, 1 NFE per step.
    - ``warmup="prk"`` (F-PNDM): the first 3 steps are pseudo Runge-Kutta with
      midpoint s_mid = (s_i + s_{i+1}) / 2, 4 NFE each::

          e1 = e(x, s_i);            x1 = phi(x, e1, s_i -> s_mid)
          e2 = e(x1, s_mid);         x2 = phi(x, e2, s_i -> s_mid)
          e3 = e(x2, s_mid);         x3 = phi(x, e3, s_i -> s_{i+1})
          e4 = e(x3, s_{i+1});       e' = (e1 + 2 e2 + 2 e3 + e4) / 6

    - ``warmup="pie"`` (LDM's PLMS): the first step is pseudo improved Euler,
      e' = (e(x, s_i) + e(phi(x, e_i, s_i -> s_{i+1}), s_{i+1})) / 2 (2 NFE); then AB2 and AB3
      weights until four eps are stored.

    The fixed weights are Adams-Bashforth weights for *equal* steps, so they integrate eps
    exactly (to order 4) only when the grid is equally spaced in sigma itself: there, PLMS
    with the ``prk`` warm-up is exactly classical RK4 in sigma followed by AB4, order 4. On any
    other grid (Karras, log-linear, uniform in a VP time t) e' averages eps over equal steps of
    the grid's own parameter rather than over sigma; the weights still sum to 1, so it stays
    consistent, but the order drops to 2 on smooth grids (tests/test_samplers_multistep.py
    checks this on a log-linear grid). Use :func:`sample_lms` there: it integrates the same
    polynomial with the grid's actual spacing. The step into sigma = 0 integrates the stored
    slopes' polynomial in sigma (:func:`._common.final_step`, of order ``final_order``, at
    most 4, the slopes PLMS keeps; 1 gives x = D(x, sigma_min)).
    ``generator`` is unused.
    """
    if warmup not in ("prk", "pie"):
        raise UsageError(f"warmup must be 'prk' or 'pie'; got {warmup!r}")
    model, x, sigmas, dtype = prepare(denoiser, x, sigmas, cond)
    eps = _eps_fn(model)

    def phi(x_: torch.Tensor, e: torch.Tensor, sigma_: torch.Tensor,
            sigma_to: torch.Tensor) -> torch.Tensor:
        return x_ + (sigma_to - sigma_) * e

    old: list[torch.Tensor] = []  # eps at the grid points, most recent last
    s_hist: list[float] = []  # their sigmas
    for i, (sigma, sigma_next) in enumerate(pairwise(sigmas)):
        e1, denoised = eps(x, sigma)
        if sigma_next == 0:  # Adams-Bashforth in sigma over the stored slopes, into 0
            hist = list(zip(s_hist, old, strict=True)) + [(float(sigma), e1)]
            x = final_step(x, hist, order=final_order)
            report(callback, i, x, sigma, sigma_next, denoised)
            break
        if warmup == "prk" and len(old) < 3:
            old, s_hist = (old + [e1])[-3:], (s_hist + [float(sigma)])[-3:]
            x = _rk4_in_sigma(eps, x, sigma, sigma_next, e1)
            report(callback, i, x, sigma, sigma_next, denoised)
            continue
        if warmup == "pie" and not old:
            e2, _ = eps(phi(x, e1, sigma, sigma_next), sigma_next)
            e_prime = 0.5 * (e1 + e2)
        else:
            weights = _AB[len(old) + 1]  # AB2, AB3 while ramping up (pie), then AB4
            e_prime = sum(w * e for w, e in zip(weights, [e1] + old[::-1], strict=True))
        old = (old + [e1])[-3:]
        s_hist = (s_hist + [float(sigma)])[-3:]
        x = phi(x, e_prime, sigma, sigma_next)
        report(callback, i, x, sigma, sigma_next, denoised)
    return finish(x, dtype)
