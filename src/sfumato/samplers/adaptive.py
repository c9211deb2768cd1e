"""Adaptive embedded Runge-Kutta (Dormand-Prince 5(4)) solver for the PF-ODE.

The probability-flow ODE dx/dsigma = (x - D(x, sigma)) / sigma (Karras et al. 2022, eq. 3) is
written in u = log(sigma)::

    dx/du = x - D(x, e^u),

which removes the 1/sigma and makes the solution smooth across the whole sigma range (this is
the variable of Song et al. 2021b's "black-box ODE solver" results and of
:func:`sfumato.accuracy.reference_ode`). The step size is chosen by the embedded error estimate,
so the user sets a tolerance instead of a number of steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from .._rk import dopri5, rms_norm
from ..errors import UsageError
from ._common import Callback, Generator, finish, prepare, report


@torch.no_grad()
def sample_rk45(denoiser: Callable, x: torch.Tensor, sigmas: torch.Tensor, *,
                rtol: float = 1e-4, atol: float = 1e-4, h_init: float | None = None,
                stats: dict[str, Any] | None = None, generator: Generator = None,
                callback: Callback = None, **cond) -> torch.Tensor:
    """Dormand-Prince 5(4) with first-same-as-last and step-size control on dx/du = x - D(x, e^u),
    u = log(sigma) (Dormand & Prince 1980; controller as in Hairer, Norsett & Wanner, "Solving
    ODEs I", sec. II.4, and scipy's ``RK45``).

    The positive ``sigmas`` are output points, not steps: the solver integrates through each
    interval with its own steps, stops exactly on every grid point (the callback sees the state
    there) and carries its step size across (each output point costs one NFE to restart the
    FSAL chain). The stepping itself is :func:`sfumato._rk.dopri5`. A step is accepted when::

        err_norm = max_b RMS_b( err / (atol + rtol * max(|x|, |x_new|)) ) <= 1

    (RMS over the elements of sample b; the worst sample decides for the batch). The next step
    is h * min(10, max(0.2, 0.9 err_norm^(-1/5))), never growing right after a rejection.
    ``h_init`` is the first step in u (default: Hairer's starting-step heuristic, 1 NFE).

    If the grid ends in 0 the last step is the final denoise x = D(x, sigma_min), which FSAL
    has already evaluated (no extra NFE). Tolerances apply to x in σ-space (data units).

    ``stats``, if a dict, receives ``nfe`` (denoiser calls), ``accepted`` and ``rejected``
    (step counts); the callback's dict carries ``nfe`` so far as well. ``generator`` is unused.
    """
    if not (rtol > 0 and atol >= 0):
        raise UsageError(f"need rtol > 0 and atol >= 0; got rtol={rtol}, atol={atol}")
    if h_init is not None and not h_init > 0:
        raise UsageError(f"h_init is a step length in log(sigma) and must be > 0; got {h_init}")
    model, x, sigmas, dtype = prepare(denoiser, x, sigmas, cond)
    s = sigmas.double().cpu().tolist()
    n_pos = len(s) if s[-1] > 0 else len(s) - 1
    accepted = rejected = 0
    last: dict[str, torch.Tensor] = {}

    def f(u_: float, x_: torch.Tensor) -> torch.Tensor:
        last["denoised"] = model(x_, math.exp(u_))
        return x_ - last["denoised"]

    h = h_init
    for i in range(n_pos - 1):
        x, info = dopri5(f, math.log(s[i]), math.log(s[i + 1]), x, rtol=rtol, atol=atol,
                         norm=rms_norm, h0=h)
        h = info["h"]
        accepted, rejected = accepted + info["steps"], rejected + info["rejected"]
        report(callback, i, x, sigmas[i], sigmas[i + 1], last["denoised"], nfe=model.nfe)
    if n_pos < len(s):  # final denoise into sigma = 0: the last stage evaluated D there
        denoised = last["denoised"] if n_pos > 1 else model(x, sigmas[0])
        x = denoised
        report(callback, len(s) - 2, x, sigmas[-2], sigmas[-1], denoised, nfe=model.nfe)
    if isinstance(stats, dict):
        stats.update(nfe=model.nfe, accepted=accepted, rejected=rejected)
    return finish(x, dtype)

