"""Scalar helpers shared by the exponential integrators (DPM-Solver, DPM-Solver++, UniPC).

In σ-space with lambda = -log(sigma) (half the logSNR) the PF-ODE is linear in x plus the
denoiser term, dx/dlambda = D(x, lambda) - x, so a step of length h = lambda_next - lambda
is exactly (variation of constants; Lu et al. 2022a, Prop. 3.1, data-prediction form of
Lu et al. 2022b, with alpha = 1)::

    x_next = e^{-h} x + int_0^h e^{-(h - tau)} D(lambda + tau) dtau
           = e^{-h} x + sum_{k>=0} h^{k+1} phi_{k+1}(-h) D^{(k)}(lambda),

with the phi functions of exponential integrators (Hochbruck & Ostermann 2010, Acta Numerica)::

    phi_0(z) = e^z,   phi_{k+1}(z) = (phi_k(z) - 1/k!) / z = sum_{j>=0} z^j / (j + k + 1)!

All coefficients are computed in Python float64 from the grid's sigmas, whatever the dtype
of the state, so a float32 run does not lose the small-h cancellations in phi_k.
"""

from __future__ import annotations

import math

__all__ = ["phi", "log_ratio", "step_order", "LOWER_ORDER_FINAL_BELOW"]

_SERIES_RADIUS = 1.0
_SERIES_TERMS = 30


def phi(k: int, z: float) -> float:
    """phi_k(z) for k >= 0 and finite real z, accurate to float64 rounding.

    The recurrence phi_{k+1} = (phi_k - 1/k!) / z cancels catastrophically for small |z|
    (relative error ~ eps / |z|^k); there the Taylor series is summed instead.
    """
    if k == 0:
        return math.exp(z)
    if abs(z) < _SERIES_RADIUS:
        term, total = 1.0 / math.factorial(k), 0.0
        for j in range(_SERIES_TERMS):
            total += term
            term *= z / (j + k + 1)
        return total
    out = math.expm1(z) / z  # phi_1
    for j in range(1, k):
        out = (out - 1.0 / math.factorial(j)) / z
    return out


def log_ratio(sigma: float, sigma_next: float) -> float:
    """h = lambda_next - lambda = log(sigma / sigma_next) (> 0 for a decreasing grid)."""
    return math.log(sigma / sigma_next)


#: grids with fewer steps than this get ``lower_order_final`` (multistep samplers)
LOWER_ORDER_FINAL_BELOW = 15


def step_order(order: int, available: int, i: int, sigmas: list[float],
               lower_order_final: bool) -> int:
    """The order a multistep sampler uses for step i of the grid ``sigmas``.

    ``min(order, available)`` (warm-up: a step can use only the denoised values it has); with
    ``lower_order_final`` on grids of fewer than ``LOWER_ORDER_FINAL_BELOW`` steps, also at most
    the number of steps left to the last positive sigma, this one included (the last step
    into sigma_min is first order, the one before at most second, ...). The tail of a short
    Karras grid has steps h > 1 in lambda (h = 2.9 for the last positive step of 8 steps from
    80 to 0.002), where extrapolating the denoiser with a high-degree polynomial costs
    accuracy (``docs/samplers.md`` has the measured effect); grids of 15 steps or more are
    left alone. The step into sigma = 0 is not counted here: the caller takes it
    (:func:`sfumato.samplers._common.final_step` for the multistep ODE samplers).
    """
    n = len(sigmas) - 1
    p = min(order, available)
    if lower_order_final and n < LOWER_ORDER_FINAL_BELOW:
        positive_steps = n - 1 if sigmas[-1] == 0 else n
        p = min(p, max(positive_steps - i, 1))
    return max(p, 1)
