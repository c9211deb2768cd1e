"""Exact log-likelihood of a diffusion model through its probability-flow ODE.

The model. In σ-space (``x = x0 + sigma * eps``, see ``sfumato.process``) the marginals
``p_sigma`` are transported by the probability-flow ODE (Karras et al. 2022, eq. 3; Song et
al. 2021b, eq. 13)

    dx/dsigma = f(x, sigma) = (x - D(x, sigma)) / sigma,

with ``D`` the denoiser (posterior mean). Along a trajectory the log-density changes by the
instantaneous change-of-variables formula (Chen et al. 2018, thm. 1; Song et al. 2021b,
app. D.2, eq. 39), ``d log p_sigma(x(sigma)) / dsigma = -div_x f``, so

    log p_{sigma_min}(x) = log p_{sigma_max}(x(sigma_max)) + int div_x f dsigma.

The integral runs from ``sigma_min`` up to ``sigma_max`` and ``p_{sigma_max}`` is replaced by
the prior ``N(0, sigma_max^2 I)``. We integrate in ``u = log sigma`` (the ODE is well
conditioned there: ``dx/du = x - D`` and ``div_x(x - D) = d - tr(dD/dx)``), jointly for the
augmented state ``(x, delta)`` with ``d delta/du = d - tr(dD/dx)``, by adaptive Dormand-Prince
5(4) (``sfumato._rk``). Then

    log p(x) = log N(x(sigma_max); 0, sigma_max^2 I) + delta(sigma_max).

What "the data" is. The input ``x`` is treated as a sample at noise level ``sigma_min``:
the result is the log-density of ``x0 + sigma_min * eps``, not of ``x0`` itself (whose
density the ODE cannot reach, since D is not defined at sigma = 0 in general). For small
``sigma_min`` the two differ little for a smooth data density; for discrete data (images)
use :func:`bits_per_dim`, which dequantises first.

The two approximations are therefore (1) the prior mismatch ``log p_{sigma_max} -
log N(0, sigma_max^2)`` at the end point, of order ``|E x0| / sigma_max`` per sample plus
``Var(x0) / sigma_max^2`` per dimension (keep data centred and ``sigma_max`` well above the
data scale), and (2) the ODE solver error, set by ``rtol``/``atol``. ``stats`` reports the
prior term and the end point so the first can be checked against an exact model.

Divergence. ``tr(dD/dx)`` is computed either exactly (``exact_trace=True``: one
vector-Jacobian product per dimension, batched with ``is_grads_batched`` where the denoiser
supports vmap, a loop otherwise; only sensible for small dimension) or by Hutchinson's
estimator ``E_v[v^T (dD/dx) v]`` (Hutchinson 1990; Grathwohl et al. 2019) with Rademacher or
Gaussian probes drawn once per call from ``generator`` and held fixed along the trajectory, so
the ODE solver sees a smooth right-hand side and the estimate of log p is unbiased (the
Hutchinson term enters the integral linearly). Both assume the denoiser treats the samples of
a batch independently (no batch statistics).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from ._rk import dopri5
from .errors import UsageError
from .samplers._common import working_dtype

__all__ = ["log_likelihood", "bits_per_dim", "divergence"]

METHODS = ("rk45",)
PROBES = ("rademacher", "gaussian")
# elements of the grad_outputs block one batched VJP call may hold (exact trace)
_VJP_BUDGET = 2**24


def _vjps(out: torch.Tensor, x: torch.Tensor, vs: torch.Tensor, batched: list[bool],
          retain_last: bool) -> torch.Tensor:
    """v^T (d out/d x) for each v in vs (shape (n, *x.shape)); returns (n, *x.shape).

    Tries one vmapped call (``is_grads_batched``); if the graph does not support vmap, falls
    back to a loop and remembers that in ``batched[0]``.
    """
    if batched[0]:
        try:
            (g,) = torch.autograd.grad(out, x, grad_outputs=vs, is_grads_batched=True,
                                       retain_graph=True)
            return g
        except (RuntimeError, NotImplementedError):
            batched[0] = False
    gs = []
    for i in range(vs.shape[0]):
        (g,) = torch.autograd.grad(out, x, grad_outputs=vs[i],
                                   retain_graph=retain_last or i < vs.shape[0] - 1)
        gs.append(g)
    return torch.stack(gs)


def divergence(out: torch.Tensor, x: torch.Tensor, probes: torch.Tensor | None = None,
               batched: list[bool] | None = None) -> torch.Tensor:
    """tr(d out / d x) per sample, shape (B,), for ``out = F(x)`` built with x requiring grad.

    ``probes=None``: exact, one VJP per dimension (batched in chunks). Otherwise Hutchinson's
    estimate ``mean_j v_j^T (d out/dx) v_j`` over ``probes`` of shape (n, *x.shape).
    Samples must not interact inside F (the per-sample Jacobian blocks are read off the
    batch Jacobian).
    """
    batched = [True] if batched is None else batched
    B = x.shape[0]
    if probes is not None:
        g = _vjps(out, x, probes, batched, retain_last=False)
        return (g * probes).reshape(probes.shape[0], B, -1).sum(-1).mean(0)
    d = x[0].numel()
    chunk = max(1, min(d, _VJP_BUDGET // max(1, B * d)))
    eye = torch.eye(d, dtype=x.dtype, device=x.device)
    tr = x.new_zeros(B)
    for i0 in range(0, d, chunk):
        i1 = min(d, i0 + chunk)
        vs = eye[i0:i1, None, :].expand(i1 - i0, B, d).reshape(i1 - i0, *x.shape)
        g = _vjps(out, x, vs, batched, retain_last=i1 < d)
        tr = tr + g.reshape(i1 - i0, B, d).diagonal(offset=i0, dim1=0, dim2=2).sum(-1)
    return tr


def _draw_probes(kind: str, n: int, x: torch.Tensor, generator: torch.Generator
                 ) -> torch.Tensor:
    shape = (n, *x.shape)
    dev = generator.device
    if kind == "rademacher":
        v = torch.randint(0, 2, shape, generator=generator, device=dev).to(x.dtype) * 2 - 1
    else:
        v = torch.randn(shape, generator=generator, device=dev, dtype=x.dtype)
    return v.to(x.device)


def log_likelihood(denoiser: Callable, x: torch.Tensor, *, sigma_min: float = 0.002,
                   sigma_max: float = 80.0, exact_trace: bool = False, n_hutchinson: int = 1,
                   probe: str = "rademacher", generator: torch.Generator | None = None,
                   rtol: float = 1e-5, atol: float = 1e-5, method: str = "rk45",
                   stats: dict[str, Any] | None = None, **cond) -> torch.Tensor:
    """log p(x) per sample in nats, by the probability-flow ODE (see the module docstring).

    ``x`` is treated as the data *at noise level sigma_min*: the value is the log-density of
    ``x0 + sigma_min * eps`` at x under the model (prior ``N(0, sigma_max^2 I)`` at
    ``sigma_max`` transported by the PF-ODE), as in Song et al. 2021b, app. D.2.

    Args:
        denoiser: ``denoiser(x, sigma, **cond) -> x0_hat`` with sigma of shape (B,); must be
            differentiable in x and treat samples independently.
        x: (B, ...) floating point. Arithmetic runs in float64 if x is float64, else float32.
        sigma_min, sigma_max: the ODE runs from sigma_min up to sigma_max (0 < min < max).
            sigma_max should be far above the data scale (prior mismatch, module docstring).
        exact_trace: exact divergence, one VJP per dimension (small dimensions only).
        n_hutchinson: probes per sample for Hutchinson's estimator (exact_trace=False). The
            estimate is unbiased; its spread falls like 1/sqrt(n_hutchinson) and is large in
            low dimension (about 0.6 nats/dim with one probe on a 4-D test mixture), small
            per dimension for images. Probes cost VJPs, not extra denoiser forward passes.
        probe: ``"rademacher"`` (default, lower variance) or ``"gaussian"``.
        generator: ``torch.Generator`` the probes are drawn from; required unless
            exact_trace. A fixed seed gives identical output.
        rtol, atol: tolerances of the adaptive solver, applied to x and to the log-density
            integral (each sample's RMS error over x, and the log-density's error, must pass).
        method: ODE solver; ``"rk45"`` (adaptive Dormand-Prince 5(4)).
        stats: if a dict, filled with ``nfe`` (denoiser evaluations), ``steps``, ``rejected``
            (solver steps), ``prior_logp`` and ``delta_logp`` (the two terms of the result,
            shape (B,)), and ``x_sigma_max`` (the trajectory's end point, shape of x).
        **cond: passed to the denoiser.

    Returns:
        (B,) tensor of log-densities in nats, in x's working dtype (float64 or float32).
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError("x must be a floating-point torch.Tensor of shape (batch, ...); "
                        "for 8-bit images use bits_per_dim")
    if x.ndim < 2:
        raise UsageError(f"x must have shape (batch, ...); got {tuple(x.shape)}. "
                         "For a single vector use x[None].")
    if not callable(denoiser):
        raise TypeError("denoiser must be callable as denoiser(x, sigma, **cond) -> x0_hat")
    if not (0 < sigma_min < sigma_max < math.inf):
        raise UsageError(f"need 0 < sigma_min < sigma_max < inf; got sigma_min={sigma_min}, "
                         f"sigma_max={sigma_max}")
    if method not in METHODS:
        raise UsageError(f"unknown method {method!r}; choose one of {METHODS}")
    if not exact_trace:
        if generator is None:
            raise UsageError(
                "Hutchinson's trace estimator draws its probes only from an explicit "
                "generator: pass generator=torch.Generator().manual_seed(seed), or "
                "exact_trace=True for small dimensions"
            )
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator; got {type(generator).__name__}")
        if int(n_hutchinson) != n_hutchinson or n_hutchinson < 1:
            raise UsageError(f"n_hutchinson must be a positive integer; got {n_hutchinson!r}")
        if probe not in PROBES:
            raise UsageError(f"unknown probe {probe!r}; choose one of {PROBES}")

    wd = working_dtype(x.dtype)
    x = x.detach().to(wd)
    shape, B = x.shape, x.shape[0]
    d = x[0].numel()
    probes = None if exact_trace else _draw_probes(probe, int(n_hutchinson), x, generator)
    nfe = [0]
    batched = [True]

    def rhs(u: float, y: torch.Tensor) -> torch.Tensor:
        sigma = torch.full((B,), math.exp(u), dtype=wd, device=x.device)
        with torch.inference_mode(False), torch.enable_grad():
            xi = y[:, :d].detach().clone().reshape(shape).requires_grad_(True)
            den = denoiser(xi, sigma, **cond)
            nfe[0] += 1
            if not isinstance(den, torch.Tensor) or den.shape != shape:
                got = tuple(den.shape) if isinstance(den, torch.Tensor) else type(den).__name__
                raise UsageError(f"the denoiser must return x0_hat with the input's shape "
                                 f"{tuple(shape)}; got {got}")
            den = den.to(wd)
            if not den.requires_grad:
                raise RuntimeError("the denoiser's output does not depend differentiably on x "
                                   "(called under no_grad, or detached inside?); the "
                                   "likelihood needs its Jacobian")
            div_d = divergence(den, xi, probes, batched)
        dx = (xi.detach() - den.detach()).reshape(B, d)
        return torch.cat([dx, (d - div_d.detach())[:, None]], dim=1)

    def norm(e: torch.Tensor) -> float:
        ex = e[:, :d].double().pow(2).mean(1).sqrt()
        return float(torch.maximum(ex, e[:, d].double().abs()).max())

    y0 = torch.cat([x.reshape(B, d), x.new_zeros(B, 1)], dim=1)
    y1, info = dopri5(rhs, math.log(sigma_min), math.log(sigma_max), y0, rtol=rtol,
                      atol=atol, norm=norm)
    x_end, delta = y1[:, :d], y1[:, d]
    prior = (-0.5 * x_end.pow(2).sum(1) / sigma_max**2
             - 0.5 * d * math.log(2 * math.pi * sigma_max**2))
    if stats is not None:
        stats.update(nfe=nfe[0], steps=info["steps"], rejected=info["rejected"],
                     prior_logp=prior, delta_logp=delta, x_sigma_max=x_end.reshape(shape))
    return prior + delta


def bits_per_dim(denoiser: Callable, x_uint8: torch.Tensor, *,
                 generator: torch.Generator | None = None, dequantize: str = "uniform",
                 data_range: tuple[float, float] = (-1.0, 1.0), sigma_min: float = 0.002,
                 sigma_max: float = 80.0, exact_trace: bool = False, n_hutchinson: int = 1,
                 probe: str = "rademacher", rtol: float = 1e-5, atol: float = 1e-5,
                 method: str = "rk45", dtype: torch.dtype = torch.float32,
                 stats: dict[str, Any] | None = None, **cond) -> torch.Tensor:
    """Negative log-likelihood of 8-bit data in bits per dimension, shape (B,).

    Dequantisation (Theis et al. 2016, sec. 3.1; Uria et al. 2013). Pixel value k in
    {0..255} owns the bin ``[lo + k Δ, lo + (k+1) Δ)`` with ``Δ = (hi - lo) / 256`` and
    ``(lo, hi) = data_range``; the bins tile ``[lo, hi)``. With ``dequantize="uniform"`` the
    point ``x = lo + (k + u) Δ``, ``u ~ U[0, 1)^D`` from ``generator``, is scored by the
    continuous model (:func:`log_likelihood`). The map z = k + u -> x has Jacobian Δ^D, so the
    density of the dequantised pixels z is ``p(x) Δ^D`` and

        bpd = -(log p(x) + D log Δ) / (D ln 2).

    By Jensen, ``E_u[bpd] >= -log2 P_model(k) / D``: this is an upper bound on the discrete
    model's code length, the quantity reported by Ho et al. 2020 (sec. 4) and Song et al.
    2021b. For ``data_range=(-1, 1)``, ``-D log Δ / (D ln 2) = 7`` bits (8 for (0, 1)), the
    offset in Song et al.'s likelihood code. Note the bin centres ``lo + (k + 1/2) Δ`` are
    within Δ/2 of the common ``lo + k (hi - lo)/255`` pixel scaling, not equal to it.

    ``dequantize="center"`` uses u = 1/2 (deterministic, no generator needed for the
    dequantisation): a cheap point estimate, not a bound.

    Args:
        x_uint8: (B, ...) torch.uint8 tensor.
        generator: draws the dequantisation noise, then the Hutchinson probes.
        dtype: float dtype the continuous data and the ODE run in (float32 or float64).
        stats, the remaining args and ``**cond``: as for :func:`log_likelihood`.
    """
    if not isinstance(x_uint8, torch.Tensor) or x_uint8.dtype != torch.uint8:
        got = x_uint8.dtype if isinstance(x_uint8, torch.Tensor) else type(x_uint8).__name__
        raise TypeError(f"bits_per_dim takes 8-bit data as a torch.uint8 tensor; got {got}. "
                        "For continuous data use log_likelihood.")
    if x_uint8.ndim < 2:
        raise UsageError(f"x_uint8 must have shape (batch, ...); got {tuple(x_uint8.shape)}")
    lo, hi = (float(v) for v in data_range)
    if not hi > lo:
        raise UsageError(f"data_range must be (lo, hi) with hi > lo; got {data_range}")
    if dtype not in (torch.float32, torch.float64):
        raise UsageError(f"dtype must be torch.float32 or torch.float64; got {dtype}")
    if dequantize == "uniform":
        if generator is None:
            raise UsageError("uniform dequantisation draws its noise only from an explicit "
                             "generator: pass generator=torch.Generator().manual_seed(seed)")
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator; got {type(generator).__name__}")
        u = torch.rand(x_uint8.shape, generator=generator, device=generator.device,
                       dtype=dtype).to(x_uint8.device)
    elif dequantize == "center":
        u = torch.full(x_uint8.shape, 0.5, dtype=dtype, device=x_uint8.device)
    else:
        raise UsageError(f"unknown dequantize {dequantize!r}; choose 'uniform' or 'center'")
    delta_bin = (hi - lo) / 256
    x = lo + (x_uint8.to(dtype) + u) * delta_bin
    logp = log_likelihood(denoiser, x, sigma_min=sigma_min, sigma_max=sigma_max,
                          exact_trace=exact_trace, n_hutchinson=n_hutchinson, probe=probe,
                          generator=generator, rtol=rtol, atol=atol, method=method,
                          stats=stats, **cond)
    D = x[0].numel()
    return -(logp + D * math.log(delta_bin)) / (D * math.log(2))
