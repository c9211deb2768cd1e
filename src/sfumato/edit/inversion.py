"""Inversion: the starting noise that a deterministic sampler maps to a given image.

A single-step sampler makes x_{i+1} = Φ_i(x_i) from σ_i to σ_{i+1}. Going backwards, x_i
solves the implicit equation Φ_i(x_i) = x_{i+1}; DDIM inversion (Song et al. 2021, eq. (13)
read backwards; Dhariwal & Nichol 2021, App. F) takes one explicit step instead, with the
slope evaluated at x_{i+1}, and is exact only as the steps shrink. Here the explicit step is
the first guess and fixed-point iterations on the residual g(x_i) = x_{i+1} - Φ_i(x_i),

    x_i <- x_i + g(x_i)

(as in Pan et al. 2023's AIDI and Garibi et al. 2024's ReNoise), with Anderson acceleration
(Walker & Ni 2011, eq. (2.1), memory 3: plain iterations stall where the step's Jacobian
has eigenvalues near -1, at mid noise levels of coarse grids) solve the equation to
``tol``, so sampling the returned noise with the same sampler, grid and conditioning
reproduces the image to the iterations' tolerance, at any guidance scale where they
converge (coarse grids at high guidance may not: use more steps). ``iters = 0`` is plain
DDIM inversion.

Multistep samplers carry history across steps, so their step is not a function of x_i
alone; inversion takes the single-step deterministic samplers in :data:`INVERTIBLE`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..errors import UsageError
from ..samplers import get_sampler
from ..samplers._common import check_sigmas

#: deterministic samplers whose run over a grid is the composition of its single steps
INVERTIBLE = ("euler", "ddim", "heun", "dpm_solver_2", "dpmpp_2s")


def _rms(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).pow(2).mean(1).sqrt()


def anderson_solve(residual: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, *,
                   iters: int, tol: float, memory: int = 3) -> torch.Tensor:
    """Solve residual(x) = 0 per sample for a fixed-point map x -> x + residual(x) by
    Anderson acceleration (type II; Walker & Ni 2011, eq. (2.1)); x (B, ...). Stops when
    every sample's residual RMS is below ``tol`` or after ``iters`` residual evaluations."""
    B = x.shape[0]
    xs, gs = [], []
    for _ in range(iters):
        g = residual(x)
        if bool((_rms(g) < tol).all()):
            break
        xs, gs = (xs + [x.flatten(1)])[-memory - 1:], (gs + [g.flatten(1)])[-memory - 1:]
        if len(gs) == 1:
            x = x + g
            continue
        dG = torch.stack([b - a for a, b in zip(gs[:-1], gs[1:], strict=True)], -1)  # (B,D,m)
        dX = torch.stack([b - a for a, b in zip(xs[:-1], xs[1:], strict=True)], -1)
        gram = dG.transpose(1, 2) @ dG
        ridge = 1e-10 * gram.diagonal(dim1=1, dim2=2).sum(-1).clamp_min(1e-30)
        eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
        gamma, info = torch.linalg.solve_ex(gram + ridge[:, None, None] * eye,
                                            dG.transpose(1, 2) @ gs[-1][..., None])  # (B,m,1)
        # a sample whose differences vanished (converged, or stalled) takes a plain step
        ok = (info == 0) & torch.isfinite(gamma).all(dim=(1, 2))
        gamma = torch.where(ok[:, None, None], gamma, torch.zeros_like(gamma))
        x = (xs[-1] + gs[-1] - ((dX + dG) @ gamma)[..., 0]).reshape(B, *x.shape[1:])
    return x


@torch.no_grad()
def invert(denoiser: Callable, x0: torch.Tensor, sigmas: torch.Tensor, *,
           sampler: str = "euler", iters: int = 20, tol: float = 1e-5,
           path: bool = False, **cond) -> torch.Tensor | list[torch.Tensor]:
    """The state x at ``sigmas[0]`` (B, C, H, W) that ``sampler`` over ``sigmas`` (ending in
    0) maps to x0; divide by ``sigmas[0]`` for the unit noise ``Model.sample(noise=...)``
    takes. ``iters`` iterations per step at most (0: plain DDIM inversion), each one sampler
    step; a step stops early when every sample's residual RMS is below ``tol``. ``path``:
    return the whole trajectory instead, [x at sigmas[0], ..., x at sigmas[-1] = x0]."""
    if sampler not in INVERTIBLE:
        raise UsageError(f"inversion runs a single-step deterministic sampler backwards; "
                         f"{sampler!r} is not one of {', '.join(INVERTIBLE)} (multistep and "
                         f"stochastic samplers have no per-step inverse)")
    check_sigmas(sigmas)
    step = get_sampler(sampler)
    x, states = x0, [x0]
    for i in range(len(sigmas) - 2, -1, -1):
        s, s_next = sigmas[i], sigmas[i + 1]
        # explicit guess: the PF-ODE slope at the known point (at level s if s_next = 0)
        at = s_next if s_next > 0 else s
        d = (x - denoiser(x, at.to(x).expand(x.shape[0]), **cond)) / at
        target, x = x, x + (s - s_next) * d
        x = anderson_solve(lambda z, t=target, i=i: t - step(denoiser, z, sigmas[i:i + 2],
                                                                   **cond),
                           x, iters=iters, tol=tol)
        states.append(x)
    return states[::-1] if path else x
