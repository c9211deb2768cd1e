"""Multistep sampling of a consistency model (Song et al. 2023, "Consistency Models", Alg. 1).

A consistency student ``f(x, sigma)`` maps a point anywhere on a probability-flow ODE
trajectory to the trajectory's end at sigma = 0, so it is called through the same denoiser
contract as a diffusion model. One step is ``f(sigma_max z)``; each further step re-noises the
estimate to the next level of the grid and maps it back::

    x0 = f(x_i, sigma_i),   x_{i+1} = x0 + sigma_{i+1} z_i,   z_i ~ N(0, I)

(Alg. 1 adds sqrt(sigma_{i+1}^2 - sigma_min^2) z; with sigma_min = 0.002 the difference is
below 2e-6 relative and is dropped.) The last level is 0, where the estimate is returned.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import pairwise

import torch

from ._common import Callback, Generator, finish, noise_like, prepare, report


@torch.no_grad()
def sample_consistency(denoiser: Callable, x: torch.Tensor, sigmas: torch.Tensor, *,
                       generator: Generator = None, callback: Callback = None,
                       **cond) -> torch.Tensor:
    """Consistency-model sampling (Song et al. 2023, Alg. 1): denoise at ``sigmas[i]``,
    re-noise to ``sigmas[i+1]`` with noise drawn only from ``generator`` (one per sample keeps
    sample i independent of the batch). ``len(sigmas) - 1`` denoiser calls; with one step it
    is deterministic. Shapes: x (B, ...) at ``sigmas[0]``; returns (B, ...)."""
    model, x, sigmas, dtype = prepare(denoiser, x, sigmas, cond)
    for i, (sigma, sigma_next) in enumerate(pairwise(sigmas)):
        denoised = model(x, sigma)
        x = denoised
        if sigma_next > 0:
            x = denoised + sigma_next * noise_like(x, generator, "multistep consistency sampling")
        report(callback, i, x, sigma, sigma_next, denoised)
    return finish(x, dtype)
