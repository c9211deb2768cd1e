"""Diffusion posterior sampling (DPS; Chung et al. 2023, Alg. 1 and eq. (16)).

DPS approximates p(y | x_σ) by p(y | x0 = D(x_σ, σ)) and takes the step
``x_{i-1} = x'_{i-1} - ζ_i ∇_{x_i} ||y - A(x̂0)||^2`` with ``ζ_i = ζ / ||y - A(x̂0)||``, i.e.
a step of 2ζ along ``-∇_x ||y - A(x̂0)||`` (the residual's norm, not its square) at every
sampler step. Here the same move is applied to the denoiser's output,

    D'(x, σ) = D(x, σ) - ζ ∇_x ||y - A D(x, σ)||,

so any sampler carries it with its own step weight and the method does not depend on the
grid being DDPM's. ζ is in data units (how far the x0 estimate moves per call); DPS is
known to be biased (its likelihood ignores the denoiser's uncertainty): the exact-posterior
benchmark (benchmarks/inverse.py) shows by how much.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ._guidance import ReconstructionGuidance
from .operators import Operator

#: ζ: the x0 move per denoiser call along the residual's gradient
DEFAULT_ZETA = 1.0


def dps_denoiser(denoiser: Callable, operator: Operator, y: torch.Tensor, *,
                 zeta: float = DEFAULT_ZETA) -> ReconstructionGuidance:
    """The DPS-guided denoiser for measurements y (B, *operator.out_shape)."""

    def move(r, sigma, vjp):  # -ζ ∇_x ||y - A D|| = ζ J^T A^T r / ||r||
        norm = r.flatten(1).norm(dim=1).clamp_min(1e-12).reshape((-1,) + (1,) * (r.ndim - 1))
        return vjp(zeta * operator.At(r / norm))

    return ReconstructionGuidance(denoiser, operator, y, move)
