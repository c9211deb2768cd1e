"""Euler, Heun, EDM stochastic, DDIM and Euler-ancestral in σ-space.

All integrate the probability-flow ODE of Karras et al. 2022, eq. (3) in σ-space::

    dx/dsigma = (x - D(x, sigma)) / sigma

or take an ancestral step that adds fresh noise.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import pairwise

import torch

from ._common import Callback, Generator, ancestral_step, finish, noise_like, prepare, report, to_d


@torch.no_grad()
def sample_euler(denoiser: Callable, x: torch.Tensor, sigmas: torch.Tensor, *,
                 generator: Generator = None, callback: Callback = None, **cond) -> torch.Tensor:
    """Euler's method on the PF-ODE (Karras et al. 2022, Alg. 1 without the 2nd-order
    correction): x_{i+1} = x_i + (s_{i+1} - s_i) (x_i - D(x_i, s_i)) / s_i.

    Order 1, 1 NFE per step. Identical to deterministic DDIM (Song et al. 2021a, eq. 13) and to
    DPM-Solver-1 in σ-space. ``generator`` is unused.
    """
    return sample_ddim(denoiser, x, sigmas, eta=0.0, callback=callback, **cond)


@torch.no_grad()
def sample_ddim(denoiser: Callable, x: torch.Tensor, sigmas: torch.Tensor, *, eta: float = 0.0,
                s_noise: float = 1.0, generator: Generator = None, callback: Callback = None,
                **cond) -> torch.Tensor:
    """DDIM with stochasticity eta (Song et al. 2021a, eq. 12 and 16), written in σ-space.

    With (sigma_down, sigma_up) from :func:`ancestral_step`::

        eps_hat = (x - D) / sigma
        x_next  = D + sigma_down * eps_hat + s_noise * sigma_up * z

    eta = 0 is the deterministic DDIM = Euler; eta = 1 is DDPM's ancestral sampler (Ho et al.
    2020, Alg. 2 with the posterior variance beta_tilde). Order 1, 1 NFE per step.
    """
    model, x, sigmas, dtype = prepare(denoiser, x, sigmas, cond)
    for i, (sigma, sigma_next) in enumerate(pairwise(sigmas)):
        denoised = model(x, sigma)
        down, up = ancestral_step(sigma, sigma_next, eta)
        x = denoised + down * to_d(x, sigma, denoised)
        if up > 0:
            x = x + noise_like(x, generator, "DDIM with eta > 0") * s_noise * up
        report(callback, i, x, sigma, sigma_next, denoised)
    return finish(x, dtype)


@torch.no_grad()
def sample_euler_ancestral(denoiser: Callable, x: torch.Tensor, sigmas: torch.Tensor, *,
                           eta: float = 1.0, s_noise: float = 1.0, generator: Generator = None,
                           callback: Callback = None, **cond) -> torch.Tensor:
    """Euler ancestral: an Euler step to sigma_down, then fresh noise of std sigma_up.

    In σ-space this is the same update as :func:`sample_ddim` (see :func:`ancestral_step`),
    with eta = 1 by default (the DDPM posterior step). Order 1 (weak), 1 NFE per step.
    """
    return sample_ddim(denoiser, x, sigmas, eta=eta, s_noise=s_noise, generator=generator,
                       callback=callback, **cond)


@torch.no_grad()
def sample_heun(denoiser: Callable, x: torch.Tensor, sigmas: torch.Tensor, *,
                generator: Generator = None, callback: Callback = None, **cond) -> torch.Tensor:
    """Heun's 2nd-order method (Karras et al. 2022, Alg. 1).

    d_i = (x_i - D(x_i, s_i)) / s_i;  x' = x_i + h d_i;  if s_{i+1} > 0:
    x_{i+1} = x_i + h (d_i + d') / 2 with d' = (x' - D(x', s_{i+1})) / s_{i+1}; the step into
    sigma = 0 stays Euler (line 9). Order 2, 2 NFE per step (2n - 1 in total).
    """
    return sample_edm(denoiser, x, sigmas, s_churn=0.0, callback=callback, **cond)


@torch.no_grad()
def sample_edm(denoiser: Callable, x: torch.Tensor, sigmas: torch.Tensor, *,
               s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = float("inf"),
               s_noise: float = 1.0, generator: Generator = None, callback: Callback = None,
               **cond) -> torch.Tensor:
    """EDM stochastic sampler (Karras et al. 2022, Alg. 2).

    For sigma_i in [s_tmin, s_tmax], gamma = min(s_churn / n, sqrt(2) - 1); the state is first
    raised to sigma_hat = sigma_i (1 + gamma) with noise of std
    s_noise * sqrt(sigma_hat^2 - sigma_i^2) (lines 4-6), then a Heun step from sigma_hat to
    sigma_{i+1} (lines 7-10). s_churn = 0 gives the deterministic Heun sampler (Alg. 1).
    2 NFE per step (1 for the step into sigma = 0).
    """
    model, x, sigmas, dtype = prepare(denoiser, x, sigmas, cond)
    n = len(sigmas) - 1
    for i in range(n):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        gamma = min(s_churn / n, 2**0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0
        sigma_hat = sigma * (1 + gamma)
        if gamma > 0:
            eps = noise_like(x, generator, "the EDM sampler with s_churn > 0")
            x = x + eps * s_noise * (sigma_hat**2 - sigma**2).sqrt()
        denoised = model(x, sigma_hat)
        d = to_d(x, sigma_hat, denoised)
        x_next = x + (sigma_next - sigma_hat) * d
        if sigma_next > 0:
            d_next = to_d(x_next, sigma_next, model(x_next, sigma_next))
            x_next = x + (sigma_next - sigma_hat) * 0.5 * (d + d_next)
        x = x_next
        report(callback, i, x, sigma, sigma_next, denoised)
    return finish(x, dtype)


@torch.no_grad()
def sample_ddpm(denoiser: Callable, x: torch.Tensor, sigmas: torch.Tensor, *,
                generator: Generator = None, callback: Callback = None, **cond) -> torch.Tensor:
    """DDPM ancestral sampling (Ho et al. 2020, Alg. 2): :func:`sample_ddim` with eta = 1."""
    return sample_ddim(denoiser, x, sigmas, eta=1.0, generator=generator, callback=callback,
                       **cond)
