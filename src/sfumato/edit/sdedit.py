"""SDEdit (Meng et al. 2022, § 3 and Alg. 1): noise the input to an intermediate level and
solve back down; ``strength`` trades faithfulness to the input for realism.

The mapping, in σ-space: ``strength`` s in [0, 1] picks the starting level on the Karras
ρ = 7 curve between the run's σ_min and σ_max (Karras et al. 2022, eq. (5)),

    σ_start(s) = (σ_max^(1/ρ) + (1 - s) (σ_min^(1/ρ) - σ_max^(1/ρ)))^ρ,

so s = 1 is pure noise (an ordinary sample, the input forgotten) and s -> 0 keeps the input
(s = 0 returns it unchanged). Then x = input + σ_start ε and the sampler runs ``steps``
steps on the run's grid from σ_start down to 0: the number of denoiser calls is the
sampler's cost for ``steps`` steps whatever the strength (diffusers' img2img runs
``strength × steps`` steps of the full schedule instead, a common surprise).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..errors import UsageError
from ..samplers import get_sampler
from ..samplers._common import Generator, noise_like
from ..sigmas import get_sigmas

RHO = 7.0


def strength_to_sigma(strength: float, sigma_min: float, sigma_max: float) -> float:
    """σ_start for an SDEdit ``strength`` in [0, 1] (module docstring)."""
    if not 0.0 <= strength <= 1.0:
        raise UsageError(f"strength must lie in [0, 1] (0 keeps the input, 1 is pure noise); "
                         f"got {strength}")
    a, b = sigma_max ** (1 / RHO), sigma_min ** (1 / RHO)
    return (a + (1 - strength) * (b - a)) ** RHO


def partial_grid(strength: float, steps: int, sigma_min: float, sigma_max: float,
                 grid: str = "karras") -> torch.Tensor:
    """``steps`` steps of ``grid`` from σ_start(strength) down to 0 (strength > 0)."""
    start = strength_to_sigma(strength, sigma_min, sigma_max)
    return get_sigmas(grid, steps, sigma_min=min(sigma_min, start * 0.999), sigma_max=start)


def sdedit(denoiser: Callable, x: torch.Tensor, strength: float, *, steps: int,
           sigma_min: float, sigma_max: float, grid: str = "karras", sampler: str = "heun",
           generator: Generator, **cond) -> torch.Tensor:
    """Edit images x (B, C, H, W) in the data range: noise them to σ_start(strength) with
    noise from ``generator`` and run ``sampler`` for ``steps`` steps of ``grid`` from there
    to 0. Conditioning keywords (class, prompt, guidance through the denoiser) steer the
    edit."""
    if strength == 0.0:
        return x.clone()
    sigmas = partial_grid(strength, steps, sigma_min, sigma_max, grid)
    xt = x + float(sigmas[0]) * noise_like(x, generator, "SDEdit")
    return get_sampler(sampler)(denoiser, xt, sigmas, generator=generator, **cond)
