"""One-call sampling: noise, grid and sampler chosen by name (:func:`sample`), or by a run's
``sample`` config section with one generator per sample (:func:`sample_from`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .. import sigmas as grids
from ..process import Process
from ._common import Generator, noise_like


def initial_noise(shape: Sequence[int], sigma_max: float, generator: Generator, *,
                  dtype: torch.dtype = torch.float32,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """sigma_max * z with z ~ N(0, I) of ``shape`` (B, ...), drawn from ``generator`` (one
    generator, or a list with one per sample for batch-size-independent samples)."""
    return sigma_max * noise_like(torch.empty(tuple(shape), dtype=dtype, device=device),
                                  generator, "initial_noise")


def sample(denoiser: Callable, shape: Sequence[int], *, sampler: str = "dpmpp_2m",
           steps: int = 20, grid: str = "karras", sigma_min: float | None = None,
           sigma_max: float | None = None, process: Process | None = None,
           generator: Generator = None, dtype: torch.dtype = torch.float32,
           device: torch.device | str = "cpu", callback: Callable | None = None,
           sampler_kwargs: dict | None = None, grid_kwargs: dict | None = None,
           sigmas: torch.Tensor | Sequence[float] | None = None, **cond) -> torch.Tensor:
    """Draw samples of ``shape`` (B, ...) from a σ-space denoiser.

    Defaults: DPM-Solver++(2M) on a Karras grid over [sigma_min, sigma_max] (EDM's 0.002..80
    unless a ``process`` gives its trained range). ``sigmas`` (a decreasing grid ending in 0,
    e.g. from :func:`sfumato.calibrate.optimize_sigmas`) replaces ``grid`` and ``steps``.
    ``generator`` is required (the starting noise is random). Conditioning keywords go to the
    denoiser.
    """
    from . import get_sampler

    fn = get_sampler(sampler)
    if process is None:
        sigma_min = 0.002 if sigma_min is None else sigma_min
        sigma_max = 80.0 if sigma_max is None else sigma_max
    if sigmas is not None:
        sig = torch.as_tensor(sigmas, dtype=torch.float64)
        if sig.ndim != 1 or len(sig) < 2 or sig[-1] != 0 or not (sig.diff() < 0).all():
            raise ValueError("sigmas must be a decreasing 1-D grid of at least 2 values "
                             f"ending in 0; got {sig.tolist()}")
    else:
        sig = grids.get_sigmas(grid, steps, sigma_min=sigma_min, sigma_max=sigma_max,
                               process=process, **(grid_kwargs or {}))
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
                callback=None, **cond) -> torch.Tensor:
    """Sample with a config dict {sampler, steps, grid, sigma_min, sigma_max, kwargs, sigmas}
    (``sigmas``, an explicit grid, replaces steps and grid), one generator per sample (see
    :func:`sfumato.samplers.sample`); ``cond`` tensors go to the denoiser."""
    if class_labels is not None:
        cond["class_labels"] = class_labels.to(device)
    return sample(denoiser, shape, sampler=sample_cfg.get("sampler", "heun"),
                  steps=int(sample_cfg.get("steps", 18)), grid=sample_cfg.get("grid", "karras"),
                  sigma_min=sample_cfg.get("sigma_min", 0.002),
                  sigma_max=sample_cfg.get("sigma_max", 80.0),
                  generator=per_sample_generators(seed, shape[0]), device=device,
                  callback=callback, sampler_kwargs=sample_cfg.get("kwargs"),
                  sigmas=sample_cfg.get("sigmas"), **cond)
