"""RePaint (Lugmayr et al. 2022, Alg. 1 and § 4.2) and plain replacement.

At every step down the grid, the measured part of x is replaced by the measurement noised to
the new level, and the rest comes from an unconditional sampler step (eq. (8)):

    x_{i+1} = (I - P) step(x_i, σ_i → σ_{i+1}) + A^+ y + σ_{i+1} P ε,    P = A^+ A,

(in σ-space, where noising is adding σ ε). RePaint's resampling then jumps back up:
after reaching a level that is a multiple of ``jump_length`` steps, x is re-noised
``jump_length`` levels up, ``x += sqrt(σ_up² - σ²) ε`` (eq. (9), the forward process), and
the stretch is walked down again, ``jump_n_sample - 1`` times in all, so the generated part
harmonises with the pasted one. ``jump_n_sample = 1`` is plain replacement (Song et al. 2021,
App. I's imputation; the baseline). Needs an operator with an exact pseudo-inverse
(inpainting, super-resolution); the measurement noise σ_y is not modelled.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..errors import UsageError
from ..samplers import get_sampler
from ..samplers._common import Generator, noise_like
from .operators import Operator


def repaint_path(steps: int, jump_length: int | None = None, jump_n_sample: int = 10
                 ) -> list[int]:
    """Indices into a (steps + 1)-level grid that RePaint visits, starting at 0 (σ_max) and
    ending at ``steps`` (σ = 0); consecutive entries differ by +1 (a step down) or -1
    (re-noising one level up). ``jump_n_sample = 1`` walks straight down. ``jump_length``
    None: steps // 5 (at least 1; the paper's 10 for its 250 steps would never jump on a
    short grid). Costs about ``jump_n_sample`` times ``steps`` sampler steps."""
    if jump_length is None:
        jump_length = max(1, steps // 5)
    if jump_length < 1 or jump_n_sample < 1:
        raise UsageError("RePaint needs jump_length >= 1 and jump_n_sample >= 1; got "
                         f"{jump_length} and {jump_n_sample}")
    jumps = {i: jump_n_sample - 1 for i in range(jump_length, steps, jump_length)}
    path, i = [0], 0
    while i < steps:
        i += 1
        path.append(i)
        if jumps.get(i, 0) > 0:
            jumps[i] -= 1
            for _ in range(jump_length):
                i -= 1
                path.append(i)
    return path


def sample_repaint(denoiser: Callable, x: torch.Tensor, sigmas: torch.Tensor,
                   operator: Operator, y: torch.Tensor, *, jump_length: int | None = None,
                   jump_n_sample: int = 10, sampler: str = "ddpm",
                   generator: Generator = None, **cond) -> torch.Tensor:
    """RePaint from x = σ_0 z (B, C, H, W) down ``sigmas`` (ending in 0) for measurements
    y (B, *operator.out_shape); each step down is one step of ``sampler`` (DDPM's ancestral
    step by default, as in the paper; any single-step sampler works)."""
    if not operator.exact_pinv:
        raise UsageError(f"RePaint and replacement paste the measurement back, which needs an "
                         f"exact pseudo-inverse; {operator!r} has none: use dps or pigdm")
    step = get_sampler(sampler)
    known = operator.pinv(y.to(x))
    path = repaint_path(len(sigmas) - 1, jump_length, jump_n_sample)
    for i, j in zip(path[:-1], path[1:], strict=True):
        if j > i:  # down: sampler step on the unknown part, noised measurement on the known
            x = step(denoiser, x, sigmas[i:j + 1], generator=generator, **cond)
            eps = noise_like(x, generator, "RePaint")
            x = x - operator.project(x) + known + float(sigmas[j]) * operator.project(eps)
        else:  # up: the forward process from sigma_i to sigma_j > sigma_i
            up = float(sigmas[j] ** 2 - sigmas[i] ** 2) ** 0.5
            x = x + up * noise_like(x, generator, "RePaint")
    return x
