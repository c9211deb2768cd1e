"""Reconstruction guidance as a denoiser: D'(x, σ) = D(x, σ) + J^T v, J = ∂D/∂x.

DPS and ΠGDM both move the denoiser's x0 estimate along a vector-Jacobian product through
the denoiser; they differ only in the vector ``v``, computed from the residual
``y - A D(x, σ)`` (ΠGDM's adaptive variance takes a second product to measure the
denoiser's Jacobian along the residual first). Wrapping the denoiser (as classifier guidance does,
:mod:`sfumato.guidance`) lets every sampler run them unchanged.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .operators import Operator

#: move(residual, sigma (B, 1, ...), vjp) -> J^T v, where vjp(v) = (∂D/∂x)^T v
Move = Callable[[torch.Tensor, torch.Tensor, Callable[[torch.Tensor], torch.Tensor]],
                torch.Tensor]


def per_sample_sigma(sigma: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """sigma as (B, 1, ..., 1) in x's dtype."""
    s = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1)
    return s.expand(x.shape[0]).reshape((-1,) + (1,) * (x.ndim - 1))


class ReconstructionGuidance(nn.Module):
    """``D'(x, σ) = D(x, σ) + move(r, σ, vjp)`` with r = y - A D(x, σ), the move made of
    vector-Jacobian products ``vjp(v) = (∂D/∂x)^T v``.

    Args:
        denoiser: σ-space denoiser ``D(x, sigma, **cond)``.
        operator: the measurement operator.
        y: (B, *operator.out_shape) measurements, one per sample.
        move: ``move(residual, sigma (B, 1, ...), vjp) -> (B, *x.shape[1:])``.

    The gradient is taken in float32 (or x's dtype if wider) with autograd enabled even
    inside ``torch.no_grad()``.
    """

    def __init__(self, denoiser: Callable, operator: Operator, y: torch.Tensor,
                 move: Move) -> None:
        super().__init__()
        self.denoiser, self.operator, self.y, self.move = denoiser, operator, y, move

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, **cond) -> torch.Tensor:
        dtype = torch.promote_types(x.dtype, torch.float32)
        with torch.enable_grad():
            xg = x.detach().to(dtype).requires_grad_(True)
            d = self.denoiser(xg, sigma, **cond).to(dtype)
            r = self.y.to(d) - self.operator.A(d)
            def vjp(v: torch.Tensor) -> torch.Tensor:
                return torch.autograd.grad(d, xg, grad_outputs=v, retain_graph=True)[0]

            jv = self.move(r.detach(), per_sample_sigma(sigma, d), vjp)
        return (d.detach() + jv).to(x.dtype)
