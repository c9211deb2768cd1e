"""One-call sampling: noise, grid and sampler chosen by name (:func:`sample`), or by a run's
``sample`` config section with one generator per sample (:func:`sample_from`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .. import sigmas as grids
from ..errors import UsageError
from ..process import Process
from ._common import Generator, noise_like

#: The one place sampling defaults live: :func:`sample`, :func:`sample_from`, a run's
#: ``sample`` config section and the CLI all start from these (EDM's Heun, 18 steps =
#: 35 denoiser calls, on Karras et al.'s rho = 7 grid over EDM's noise range).
SAMPLING_DEFAULTS: dict = {"sampler": "heun", "steps": 18, "grid": "karras",
                           "sigma_min": 0.002, "sigma_max": 80.0}


def initial_noise(shape: Sequence[int], sigma_max: float, generator: Generator, *,
                  dtype: torch.dtype = torch.float32,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """sigma_max * z with z ~ N(0, I) of ``shape`` (B, ...), drawn from ``generator`` (one
    generator, or a list with one per sample for batch-size-independent samples)."""
    return sigma_max * noise_like(torch.empty(tuple(shape), dtype=dtype, device=device),
                                  generator, "initial_noise")


def sample(denoiser: Callable, shape: Sequence[int], *,
           sampler: str = SAMPLING_DEFAULTS["sampler"], steps: int = SAMPLING_DEFAULTS["steps"],
           grid: str = SAMPLING_DEFAULTS["grid"], sigma_min: float | None = None,
           sigma_max: float | None = None, process: Process | None = None,
           generator: Generator = None, dtype: torch.dtype = torch.float32,
           device: torch.device | str = "cpu", callback: Callable | None = None,
           sampler_kwargs: dict | None = None, grid_kwargs: dict | None = None,
           sigmas: torch.Tensor | Sequence[float] | None = None,
           noise: torch.Tensor | None = None, **cond) -> torch.Tensor:
    """Draw samples of ``shape`` (B, ...) from a σ-space denoiser.

    Defaults: :data:`SAMPLING_DEFAULTS` (Heun, 18 steps, Karras grid over EDM's 0.002..80
    unless a ``process`` gives its trained range). ``sigmas`` (a decreasing grid ending in 0,
    e.g. from :func:`sfumato.calibrate.optimize_sigmas`) replaces ``grid`` and ``steps``.
    ``generator`` is required (the starting noise is random) unless ``noise`` (``shape``, unit
    variance; e.g. from :func:`sfumato.edit.invert`) gives the start, ``sigmas[0] * noise``.
    Conditioning keywords go to the denoiser.
    """
    from . import get_sampler

    fn = get_sampler(sampler)
    if process is None:
        sigma_min = SAMPLING_DEFAULTS["sigma_min"] if sigma_min is None else sigma_min
        sigma_max = SAMPLING_DEFAULTS["sigma_max"] if sigma_max is None else sigma_max
    if sigmas is not None:
        sig = torch.as_tensor(sigmas, dtype=torch.float64)
        if sig.ndim != 1 or len(sig) < 2 or sig[-1] != 0 or not (sig.diff() < 0).all() \
                or not sig.isfinite().all():
            raise UsageError("sigmas must be a decreasing 1-D grid of at least 2 values "
                             f"ending in 0; got {sig.tolist()}")
    else:
        sig = grids.get_sigmas(grid, steps, sigma_min=sigma_min, sigma_max=sigma_max,
                               process=process, **(grid_kwargs or {}))
    if noise is not None:
        if tuple(noise.shape) != tuple(shape):
            raise UsageError(f"noise must have the sample shape {tuple(shape)}; got "
                             f"{tuple(noise.shape)}")
        x = float(sig[0]) * noise.to(device=device, dtype=dtype)
    else:
        x = initial_noise(shape, float(sig[0]), generator, dtype=dtype, device=device)
    return fn(denoiser, x, sig, generator=generator, callback=callback,
              **(sampler_kwargs or {}), **cond)


def per_sample_generators(seed: int, n: int, start: int = 0,
                          device: torch.device | str = "cpu") -> list[torch.Generator]:
    """One generator per sample, seeded from (seed, index): sample i does not depend on how
    many samples are drawn together."""
    return [torch.Generator(device).manual_seed(seed * 1_000_003 + start + i) for i in range(n)]


@torch.no_grad()
def sample_from(denoiser, shape: tuple[int, ...], sample_cfg: dict, *, seed: int = 0,
                device: torch.device | str = "cpu", class_labels: torch.Tensor | None = None,
                callback=None, noise: torch.Tensor | None = None, **cond) -> torch.Tensor:
    """Sample with a config dict {sampler, steps, grid, sigma_min, sigma_max, kwargs, sigmas}
    (``sigmas``, an explicit grid, replaces steps and grid), one generator per sample (see
    :func:`sfumato.samplers.sample`); ``cond`` tensors go to the denoiser."""
    if class_labels is not None:
        cond["class_labels"] = class_labels.to(device)
    cfg = {**SAMPLING_DEFAULTS, **sample_cfg}
    return sample(denoiser, shape, sampler=cfg["sampler"], steps=int(cfg["steps"]),
                  grid=cfg["grid"], sigma_min=cfg["sigma_min"], sigma_max=cfg["sigma_max"],
                  generator=per_sample_generators(seed, shape[0]), device=device,
                  callback=callback, sampler_kwargs=cfg.get("kwargs"),
                  sigmas=cfg.get("sigmas"), noise=noise, **cond)
