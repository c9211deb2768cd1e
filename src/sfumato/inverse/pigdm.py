"""Pseudo-inverse guided diffusion (ΠGDM; Song et al. 2023, eqs. (7)-(8)).

ΠGDM approximates p(x0 | x_σ) by N(D(x_σ, σ), r² I), so that the measurement is Gaussian,
y | x_σ ~ N(A D, r² A A^T + σ_y² I), and its score through the denoiser is

    ∇_x log p(y | x_σ) ≈ (∂D/∂x)^T A^T (r² A A^T + σ_y² I)^-1 (y - A D(x, σ)).

Added to the prior score (``D = x + σ² ∇ log p``, Tweedie) this gives the guided denoiser

    D'(x, σ) = D(x, σ) + σ² (∂D/∂x)^T A^T (r² A A^T + σ_y² I)^-1 (y - A D(x, σ)).

The variance r² = σ² s² / (σ² + s²) is the posterior variance of x0 if the data were
Gaussian with standard deviation s (the paper's r_t² = σ_t² / (1 + σ_t²) for s = 1 in VE
form). With s the data's own standard deviation the measurement is under-weighted: data on
a low-dimensional set (images, tight clusters) has a far smaller posterior variance, and on
the exact-posterior testbed and the digits a small s is several times closer to the
posterior (benchmarks/inverse.py; docs/editing.md). The default s = 0.2 (data units, images
in [-1, 1]) is that measurement; its cap r <= s is what matters at high noise.

As σ → 0 with σ_y = 0 the move tends to A^+ (y - A D): a projection onto the measurement.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..errors import UsageError
from ._guidance import ReconstructionGuidance
from .operators import Operator

#: s, the prior standard deviation in ΠGDM's r² (data units)
DEFAULT_PRIOR_STD = 0.2


def pigdm_denoiser(denoiser: Callable, operator: Operator, y: torch.Tensor, *,
                   sigma_y: float = 0.0, prior_std: float = DEFAULT_PRIOR_STD
                   ) -> ReconstructionGuidance:
    """The ΠGDM-guided denoiser for measurements y (B, *operator.out_shape) with noise
    level ``sigma_y``; ``prior_std`` is s in r² = σ² s² / (σ² + s²)."""
    if not prior_std > 0:
        raise UsageError(f"ΠGDM's prior_std must be > 0; got {prior_std}")

    def move(r, sigma, vjp):
        s2 = sigma**2
        r2 = (s2 * prior_std**2 / (s2 + prior_std**2)).clamp_min(1e-20)  # σ = 0: no move
        return s2 * vjp(operator.At(operator.cov_solve(r, r2.flatten(), sigma_y)))

    return ReconstructionGuidance(denoiser, operator, y, move)
