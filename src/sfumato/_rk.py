"""Adaptive Dormand-Prince 5(4) Runge-Kutta with FSAL, for tensors.

Dormand & Prince 1980, "A family of embedded Runge-Kutta formulae", J. Comp. Appl. Math. 6;
the step-size control follows Hairer, Norsett & Wanner, *Solving ODEs I*, sec. II.4 (error
norm, controller, and the starting step of eq. (4.14)). The 5th-order solution is propagated
(local extrapolation); the embedded 4th-order one only estimates the error.

Small on purpose: :func:`dopri5` integrates ``dy/dt = f(t, y)`` for one tensor ``y`` from
``t0`` to ``t1`` (either direction) and lands on ``t1`` exactly. Callers that integrate
several quantities jointly stack them into one tensor and pass their own ``norm``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .errors import UsageError

__all__ = ["DP_C", "DP_A", "DP_B", "DP_B_ERR", "dopri5_step", "initial_step", "dopri5",
           "rms_norm"]

# Butcher tableau (c, A, b); DP_B_ERR = b(5th order) - b(4th order, embedded).
DP_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
DP_A = (
    (),
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
    (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
)
DP_B = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0)
_B4 = (5179 / 57600, 0.0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40)
DP_B_ERR = tuple(b5 - b4 for b5, b4 in zip(DP_B, _B4, strict=True))

Fn = Callable[[float, torch.Tensor], torch.Tensor]
Norm = Callable[[torch.Tensor], float]


def rms_norm(e: torch.Tensor) -> float:
    """Default error norm: RMS over each sample's elements (dim 0 is the batch), max over the
    batch, so one shared step size keeps every sample within tolerance."""
    if e.ndim < 2:
        return float(e.double().pow(2).mean().sqrt())
    return float(e.double().reshape(e.shape[0], -1).pow(2).mean(1).sqrt().max())


def _combo(y: torch.Tensor, h: float, coeffs, ks) -> torch.Tensor:
    out = y
    for a, k in zip(coeffs, ks, strict=False):
        if a != 0.0:
            out = out + (h * a) * k
    return out


def dopri5_step(f: Fn, t: float, y: torch.Tensor, h: float, k1: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One Dormand-Prince step from (t, y) with size h, given k1 = f(t, y).

    Returns (y_next, err, k7) with err = y5 - y4 (the embedded error estimate) and
    k7 = f(t + h, y_next), which is the next step's k1 (FSAL). Six evaluations of f.
    """
    ks = [k1]
    for i in range(1, 7):
        yi = _combo(y, h, DP_A[i], ks)
        ks.append(f(t + DP_C[i] * h, yi))
    # stage 7 is evaluated at y_next itself (A[6] == B), so y_next is the last yi
    y_next = yi
    err = _combo(torch.zeros_like(y), h, DP_B_ERR, ks)
    return y_next, err, ks[6]


def _scale(y0: torch.Tensor, y1: torch.Tensor, rtol: float, atol: float) -> torch.Tensor:
    return atol + rtol * torch.maximum(y0.abs(), y1.abs())


def initial_step(f: Fn, t0: float, y0: torch.Tensor, f0: torch.Tensor, direction: float,
                 rtol: float, atol: float, norm: Norm = rms_norm, order: int = 5) -> float:
    """Starting step size (Hairer et al., sec. II.4, eq. (4.14) and below); one f call."""
    sc = atol + rtol * y0.abs()
    d0, d1 = norm(y0 / sc), norm(f0 / sc)
    h0 = 1e-6 if d0 < 1e-5 or d1 < 1e-5 else 0.01 * d0 / d1
    y1 = y0 + direction * h0 * f0
    f1 = f(t0 + direction * h0, y1)
    d2 = norm((f1 - f0) / sc) / h0
    if max(d1, d2) <= 1e-15:
        h1 = max(1e-6, h0 * 1e-3)
    else:
        h1 = (0.01 / max(d1, d2)) ** (1.0 / order)
    return min(100 * h0, h1)


def dopri5(f: Fn, t0: float, t1: float, y0: torch.Tensor, *, rtol: float = 1e-5,
           atol: float = 1e-5, norm: Norm = rms_norm, h0: float | None = None,
           max_steps: int = 100_000, callback: Callable[[float, torch.Tensor], None] | None = None
           ) -> tuple[torch.Tensor, dict[str, int]]:
    """Integrate dy/dt = f(t, y) from t0 to t1 with adaptive Dormand-Prince 5(4).

    Args:
        f: ``f(t, y) -> dy/dt`` with ``t`` a Python float and y's shape.
        t0, t1: start and end (t1 < t0 integrates backwards).
        y0: initial state (any shape; dim 0 is treated as the batch by the default norm).
        rtol, atol: a step is accepted when ``norm(err / (atol + rtol * max(|y|, |y_new|)))
            <= 1``.
        norm: maps the scaled error tensor to a float (default :func:`rms_norm`).
        h0: first step size (positive); chosen automatically if None (costs one f call).
        max_steps: raise RuntimeError after this many attempted steps.
        callback: called as ``callback(t, y)`` after each accepted step.

    Returns:
        (y(t1), info) with info = {"nfe": f calls, "steps": accepted, "rejected": rejected,
        "h": the step size proposed for a next step (to continue on a following interval)}.
    """
    if not (rtol > 0 and atol >= 0):
        raise UsageError(f"need rtol > 0 and atol >= 0; got rtol={rtol}, atol={atol}")
    info = {"nfe": 0, "steps": 0, "rejected": 0, "h": h0}
    span = t1 - t0
    if span == 0:
        return y0.clone(), info
    direction = 1.0 if span > 0 else -1.0

    def fc(t: float, y: torch.Tensor) -> torch.Tensor:
        info["nfe"] += 1
        return f(t, y)

    t, y = float(t0), y0
    k1 = fc(t, y)
    h = initial_step(fc, t, y, k1, direction, rtol, atol, norm) if h0 is None else float(h0)
    h = min(abs(h), abs(span))
    safety, fac_min, fac_max, order = 0.9, 0.2, 10.0, 5
    just_rejected = False
    while direction * (t1 - t) > 0:
        if info["steps"] + info["rejected"] >= max_steps:
            raise RuntimeError(
                f"dopri5 gave up after {max_steps} steps at t={t:.6g} (from {t0} to {t1}); "
                "loosen rtol/atol or check the right-hand side for blow-ups"
            )
        remaining = abs(t1 - t)
        last = h >= remaining * (1 - 1e-12)
        hs = direction * (remaining if last else h)
        y_new, err, k7 = dopri5_step(fc, t, y, hs, k1)
        e = norm(err / _scale(y, y_new, rtol, atol))
        if not math.isfinite(e):
            e = math.inf  # e.g. a stage stepped where f blows up: reject and shrink hard
        if e <= 1.0:
            t = t1 if last else t + hs
            y, k1 = y_new, k7
            info["steps"] += 1
            if callback is not None:
                callback(t, y)
            fac = fac_max if e == 0 else min(fac_max, max(fac_min, safety * e ** (-1.0 / order)))
            if just_rejected:  # no growth right after a rejection (Hairer et al., II.4)
                fac = min(1.0, fac)
            # a last step cut short to land on t1 says little about the step size
            h = max(abs(hs) * fac, h) if last else abs(hs) * fac
            just_rejected = False
        else:
            info["rejected"] += 1
            just_rejected = True
            fac = 0.1 if e == math.inf else max(fac_min, safety * e ** (-1.0 / order))
            h = abs(hs) * fac
            if h < 1e-14 * max(1.0, abs(t)):
                raise RuntimeError(
                    f"dopri5: step size underflow at t={t:.6g} (error norm {e:.3g}); "
                    "the right-hand side may be non-finite or discontinuous there"
                )
    info["h"] = h
    return y, info
