"""Shared plumbing for the sampler functions: input checks, dtype policy, noise, callbacks,
and the Adams-Bashforth step into sigma = 0.

Dtype policy (:func:`working_dtype`; :mod:`sfumato.likelihood` follows it too): the sampler's
state and arithmetic run in float32, or float64 when x is float64, whatever precision the
network runs in; the denoiser receives the state in that dtype (a mixed-precision network
casts internally), its output is cast back up, and the result is returned in x's original
dtype. Inputs are never modified in place.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..errors import UsageError

Generator = torch.Generator | Sequence[torch.Generator] | None
Callback = Callable[[dict[str, Any]], None] | None


def working_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else (fp16, bf16, fp32) works in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_sigmas(sigmas: torch.Tensor) -> None:
    """Raise a clear error unless sigmas is a 1-D non-increasing grid of >= 2 finite values >= 0."""
    if not isinstance(sigmas, torch.Tensor):
        raise TypeError(f"sigmas must be a 1-D torch.Tensor; got {type(sigmas).__name__}")
    if sigmas.ndim != 1 or sigmas.numel() < 2:
        raise UsageError(
            f"sigmas must be 1-D with at least 2 values (n steps need n+1 levels); "
            f"got shape {tuple(sigmas.shape)}"
        )
    if not torch.isfinite(sigmas).all() or (sigmas < 0).any():
        raise UsageError("sigmas must be finite and >= 0")
    if (sigmas[1:] >= sigmas[:-1]).any():
        raise UsageError("sigmas must be strictly decreasing (e.g. sfumato.sigmas.karras(...))")


class BoundDenoiser:
    """The user's denoiser with its conditioning bound, as a sampler calls it:
    ``bound(x (B, ...), sigma) -> D(x, sigma)`` (B, ...) in x's dtype.

    Calls ``denoiser(x, sigma, **cond)`` with sigma (a float or 0-d tensor, in data units)
    broadcast to (B,), checks that the output has x's shape, and counts calls in ``nfe`` (one
    per batched denoiser evaluation).
    """

    def __init__(self, denoiser: Callable, x: torch.Tensor, cond: dict[str, Any]) -> None:
        if not callable(denoiser):
            raise TypeError("denoiser must be callable as denoiser(x, sigma, **cond) -> x0_hat")
        self.denoiser, self.cond, self.nfe = denoiser, cond, 0
        self.shape, self.dtype = x.shape, x.dtype

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        s = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).expand(x.shape[0])
        out = self.denoiser(x, s, **self.cond)
        self.nfe += 1
        if not isinstance(out, torch.Tensor) or out.shape != x.shape:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise UsageError(
                f"the denoiser must return x0_hat with the input's shape {tuple(x.shape)}; "
                f"got {got}"
            )
        return out.to(x.dtype)


def prepare(denoiser: Callable, x: torch.Tensor, sigmas: torch.Tensor, cond: dict[str, Any]
            ) -> tuple[BoundDenoiser, torch.Tensor, torch.Tensor, torch.dtype]:
    """Validate inputs; return (the bound denoiser, working copy of x, sigmas in the working
    dtype, the caller's dtype for :func:`finish`)."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError("x must be a floating-point torch.Tensor of shape (batch, ...)")
    if x.ndim < 2:
        raise UsageError(
            f"x must have shape (batch, ...) with at least 2 dims; got {tuple(x.shape)}. "
            "For a single vector use x[None]."
        )
    check_sigmas(sigmas)
    wd = working_dtype(x.dtype)
    xw = x.detach().to(wd).clone()
    sw = sigmas.detach().to(device=x.device, dtype=wd)
    return BoundDenoiser(denoiser, xw, cond), xw, sw, x.dtype


def finish(x: torch.Tensor, like_dtype: torch.dtype) -> torch.Tensor:
    """Return the result in the caller's dtype."""
    return x.to(like_dtype)


def noise_like(x: torch.Tensor, generator: Generator,
               caller: str = "this sampler") -> torch.Tensor:
    """Standard normal noise shaped like x, drawn only from ``generator``; ``caller`` names
    the sampler (and the option that makes it stochastic) in the error for a missing one.

    ``generator`` may be a single ``torch.Generator`` or a list with one generator per sample;
    with a list, sample i's noise comes from generator i only, so a sample does not change
    with the batch size or its position in the batch.
    """
    if generator is None:
        raise UsageError(
            f"{caller} is stochastic and draws only from an explicit generator: pass "
            "generator=torch.Generator(device).manual_seed(seed) (or one per sample)"
        )
    if isinstance(generator, torch.Generator):
        return torch.randn(x.shape, generator=generator, device=generator.device,
                           dtype=x.dtype).to(x.device)
    gens = list(generator)
    if len(gens) != x.shape[0]:
        raise UsageError(
            f"got {len(gens)} generators for a batch of {x.shape[0]}; pass one per sample"
        )
    return torch.stack([
        torch.randn(x.shape[1:], generator=g, device=g.device, dtype=x.dtype) for g in gens
    ]).to(x.device)


def report(callback: Callback, i: int, x: torch.Tensor, sigma: torch.Tensor,
           sigma_next: torch.Tensor, denoised: torch.Tensor, **extra: Any) -> None:
    """Call the user's callback with the step's state (k-diffusion's convention)."""
    if callback is not None:
        callback({"i": i, "x": x, "sigma": sigma, "sigma_next": sigma_next,
                  "denoised": denoised, **extra})


def to_d(x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    """PF-ODE derivative dx/dsigma = (x - D(x, sigma)) / sigma (Karras et al. 2022, eq. 3)."""
    return (x - denoised) / sigma


def ancestral_step(sigma: torch.Tensor, sigma_next: torch.Tensor,
                   eta: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigma_down, sigma_up) of an ancestral step sigma -> sigma_next.

    sigma_up^2 = eta^2 sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2 and
    sigma_down^2 = sigma_next^2 - sigma_up^2. In σ-space this is exactly DDIM's sigma_t(eta)
    (Song et al. 2021a, eq. 16) divided by the VP scale: eta = 1 is DDPM's posterior step.
    """
    if eta == 0 or sigma_next == 0:
        return sigma_next, torch.zeros_like(sigma_next)
    up = (eta**2 * sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2).sqrt()
    up = torch.minimum(up, sigma_next)
    return (sigma_next**2 - up**2).sqrt(), up


def lms_weights(nodes: Sequence[float], a: float, b: float) -> list[float]:
    """Weights w_j with  int_a^b p(s) ds = sum_j w_j p(nodes[j])  for every polynomial p of
    degree < len(nodes): the integrals of the Lagrange basis polynomials over [a, b], exact
    (no quadrature), float64. The variable-step Adams-Bashforth weights (Hairer, Norsett &
    Wanner, "Solving ODEs I", sec. III.5)."""
    import numpy as np
    from numpy.polynomial import polynomial as P

    h = b - a
    r = (np.asarray(nodes, dtype=np.float64) - a) / h
    weights = []
    for j in range(len(r)):
        others = np.delete(r, j)
        basis = P.polyfromroots(others) / np.prod(r[j] - others)  # l_j(r_k) = delta_jk
        antider = P.polyint(basis)
        weights.append(h * float(P.polyval(1.0, antider) - P.polyval(0.0, antider)))
    return weights


def final_step(x: torch.Tensor, history: Sequence[tuple[float, torch.Tensor]],
               order: int = 3) -> torch.Tensor:
    """The step from the last positive sigma into sigma = 0, of order up to ``order``.

    ``history`` holds (sigma_j, d_j) pairs, most recent last, with d_j = (x_j - D_j) / sigma_j
    the PF-ODE slope at earlier points of the same trajectory; its last entry must be at the
    current state (sigma_m, d_m). The step integrates the polynomial through the last ``order``
    slopes from sigma_m to 0 (Adams-Bashforth in sigma):

        x(0) = x(sigma_m) + sum_j w_j d_j,   w_j = int_{sigma_m}^0 l_j(s) ds.

    Only distinct positive sigmas are used, so fewer than ``order`` of them in ``history``
    give a step of that lower order. With order 1 this is x - sigma_m d_m = D(x, sigma_m), the
    usual final denoise. The data term dD/dsigma is smooth in sigma near 0 (not in log sigma,
    where 0 is infinitely far), so polynomial extrapolation in sigma is accurate here; the
    benchmark page ``docs/samplers.md`` has the measured effect.
    """
    pts: list[tuple[float, torch.Tensor]] = []
    for s_, d_ in reversed(history):  # newest first, distinct sigmas only
        if s_ > 0 and all(abs(s_ - q) > 1e-12 * max(s_, q) for q, _ in pts):
            pts.append((float(s_), d_))
        if len(pts) == order:
            break
    w = lms_weights([p for p, _ in pts], pts[0][0], 0.0)
    return x + sum(wj * dj for wj, (_, dj) in zip(w, pts, strict=True))
