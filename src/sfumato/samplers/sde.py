"""Reverse-SDE samplers in σ-space: Euler-Maruyama (the reverse-diffusion predictor) and
predictor-corrector with a Langevin corrector (Song et al. 2021b, "Score-based generative
modeling through stochastic differential equations").

In σ-space every process is the VE SDE dx = g dw with g^2 = d[sigma^2]/dt, whose reverse-time
SDE (Song et al. 2021b, eq. 6) is

    dx = -g^2 grad log p_sigma(x) dt + g dw_bar,

with the score read off the denoiser (Tweedie): grad log p_sigma(x) = (D(x, sigma) - x) / sigma^2.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import pairwise

import torch

from ..errors import UsageError
from ._common import Callback, Generator, finish, noise_like, prepare, report, to_d


def _score(x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    """grad_x log p_sigma(x) = (D(x, sigma) - x) / sigma^2."""
    return (denoised - x) / sigma**2


def _norm(t: torch.Tensor) -> torch.Tensor:
    """Per-sample Euclidean norm, shape (B,)."""
    return t.reshape(t.shape[0], -1).norm(dim=1)


def _predict(x: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor,
             denoised: torch.Tensor, predictor: str, s_noise: float, denoise_final: bool,
             generator: Generator, caller: str) -> torch.Tensor:
    """One predictor step sigma -> sigma_next from a known D(x, sigma); ``caller`` names the
    sampler in the error for a missing generator."""
    if predictor == "ode":
        return x + (sigma_next - sigma) * to_d(x, sigma, denoised)
    var = sigma**2 - sigma_next**2
    x = x + var * _score(x, sigma, denoised)  # = D when sigma_next = 0
    if sigma_next == 0 and denoise_final:
        return x
    return x + noise_like(x, generator, caller) * (s_noise * var.sqrt())


@torch.no_grad()
def sample_euler_maruyama(denoiser: Callable, x: torch.Tensor, sigmas: torch.Tensor, *,
                          s_noise: float = 1.0, denoise_final: bool = True,
                          generator: Generator = None, callback: Callback = None,
                          **cond) -> torch.Tensor:
    """Euler-Maruyama on the reverse SDE in σ-space (Song et al. 2021b, eq. 6), in the form of
    their reverse-diffusion predictor (App. E, VE case)::

        score  = (D(x, s_i) - x) / s_i^2
        x_next = x + (s_i^2 - s_{i+1}^2) score + s_noise sqrt(s_i^2 - s_{i+1}^2) z

    Weak order 1, 1 NFE per step; needs many steps (a few hundred) to sample well.

    Final denoise: the step into sigma = 0 gives x + s_i^2 score = D(x, s_i) plus noise of std
    s_i. With ``denoise_final=True`` (default, Song et al.'s ``denoise=True``) that noise is
    left out and the step returns the posterior mean D(x, sigma_min), the first-order step into
    0 of the one-step samplers (see :mod:`sfumato.sigmas`); with False the sample keeps noise of
    level sigma_min. A grid ending at a
    positive sigma has no final denoise.
    """
    model, x, sigmas, dtype = prepare(denoiser, x, sigmas, cond)
    for i, (sigma, sigma_next) in enumerate(pairwise(sigmas)):
        denoised = model(x, sigma)
        x = _predict(x, sigma, sigma_next, denoised, "euler_maruyama", s_noise, denoise_final,
                     generator, "Euler-Maruyama")
        report(callback, i, x, sigma, sigma_next, denoised)
    return finish(x, dtype)


@torch.no_grad()
def sample_pc(denoiser: Callable, x: torch.Tensor, sigmas: torch.Tensor, *, snr: float = 0.16,
              n_corrector: int = 1, predictor: str = "euler_maruyama",
              step_size: str = "sigma", s_noise: float = 1.0, denoise_final: bool = True,
              generator: Generator = None, callback: Callback = None, **cond) -> torch.Tensor:
    """Predictor-corrector sampling (Song et al. 2021b, Alg. 2: PC sampling for the VE SDE,
    with the Langevin corrector of Alg. 4): at each level s_i, ``n_corrector`` Langevin steps
    at fixed sigma = s_i, then one predictor step s_i -> s_{i+1} (corrector first, as in the
    authors' code; Alg. 2 writes the predictor first)::

        g = (D(x, s_i) - x) / s_i^2,   z ~ N(0, I),   x = x + eps g + sqrt(2 eps) z

    The predictor is ``"euler_maruyama"`` (the reverse-diffusion predictor of
    :func:`sample_euler_maruyama`) or ``"ode"`` (an Euler step of the probability-flow ODE).
    NFE per step = 1 + n_corrector. ``denoise_final`` and ``s_noise`` act on the
    Euler-Maruyama predictor as in :func:`sample_euler_maruyama`.

    Langevin step size eps, for a target signal-to-noise ratio ``snr`` = ||eps g|| /
    ||sqrt(2 eps) z|| (Alg. 4: eps = 2 (snr ||z|| / ||g||)^2):

    - ``"sigma"`` (default): eps = 2 (snr s_i)^2, Alg. 4's rule with ||z|| / ||g|| replaced
      by s_i, its value whenever x - D(x, s_i) ~ s_i z: when the denoiser nearly recovers x0
      and when s_i is far above the data's scale, so in high dimension at almost every level
      (it is also the annealed-Langevin schedule eps ~ sigma^2 of Song & Ermon 2019, Alg. 1).
      It depends neither on x nor on the batch: each sample is the same for any batch size,
      and the corrector targets p_sigma.
    - ``"batch"``: the authors' code, with ||z|| and ||g|| averaged over the batch: targets
      p_sigma too, but a sample depends on the other samples in the batch.

    A per-sample ratio eps(x) = 2 (snr ||z|| / ||g(x)||)^2 is not offered: a step size that
    depends on x changes the corrector's stationary law (for small steps) to
    p_sigma(x) / eps(x) ~ p_sigma ||g||^2, which pushes samples away from the modes; in low
    dimension, where ||z|| / ||g|| does not concentrate, it visibly inflates the sampled
    covariance.
    """
    if predictor not in ("euler_maruyama", "ode"):
        raise UsageError(f"predictor must be 'euler_maruyama' or 'ode'; got {predictor!r}")
    if step_size not in ("sigma", "batch"):
        raise UsageError(f"step_size must be 'sigma' or 'batch'; got {step_size!r}")
    if int(n_corrector) != n_corrector or n_corrector < 0:
        raise UsageError(f"n_corrector must be a nonnegative integer; got {n_corrector!r}")
    if not snr > 0:
        raise UsageError(f"snr must be positive; got {snr!r}")
    model, x, sigmas, dtype = prepare(denoiser, x, sigmas, cond)
    caller = "the predictor-corrector sampler"
    for i, (sigma, sigma_next) in enumerate(pairwise(sigmas)):
        for _ in range(n_corrector):
            g = _score(x, sigma, model(x, sigma))
            z = noise_like(x, generator, caller)
            if step_size == "sigma":
                eps = 2 * (snr * sigma) ** 2
            else:
                g_norm, z_norm = _norm(g).mean(), _norm(z).mean()
                eps = 2 * (snr * z_norm / g_norm) ** 2 if g_norm > 0 else torch.zeros_like(sigma)
            x = x + eps * g + (2 * eps).sqrt() * z
        denoised = model(x, sigma)
        x = _predict(x, sigma, sigma_next, denoised, predictor, s_noise, denoise_final,
                     generator, caller)
        report(callback, i, x, sigma, sigma_next, denoised)
    return finish(x, dtype)
