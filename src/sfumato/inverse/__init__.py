"""Inverse problems: restore x from a linear measurement y = A(x) + σ_y n with a diffusion
prior.

    from sfumato.inverse import box, restore
    op = box(4, 0, 4, 8, (1, 8, 8))                      # bottom half unknown
    y = op.measure(x_true)                                # (B, 1, 8, 8)
    out = restore(denoiser, y, op, method="pigdm", generator=[...])
    out.x, out.residual                                   # (B, 1, 8, 8), (B,) RMS

=============  ================================================  ==============================
method         how the measurement enters                        paper
=============  ================================================  ==============================
``pigdm``      denoiser + σ² J^T A^T (r²AA^T + σ_y²)^-1 residual  Song et al. 2023 (ΠGDM)
``dps``        denoiser - ζ ∇_x ||y - A D(x, σ)||                Chung et al. 2023 (DPS)
``repaint``    measured part replaced at every level, with       Lugmayr et al. 2022
               re-noising jumps
``replace``    measured part replaced at every level             Song et al. 2021 (baseline)
=============  ================================================  ==============================

DPS and ΠGDM wrap the denoiser, so every sampler runs them (a deterministic one gives a
deterministic restoration of the starting noise); RePaint and replacement are a loop around
a single-step sampler. For inpainting the known pixels are pasted back exactly at the end.
The exact posterior of a Gaussian-mixture prior (:meth:`sfumato.mixture.GaussianMixture.
posterior`) is the truth every method is tested and benchmarked against.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..errors import UsageError, did_you_mean
from ..samplers import get_sampler
from ..samplers._api import initial_noise
from ..samplers._common import Generator
from .dps import DEFAULT_ZETA, dps_denoiser
from .operators import (
    Blur,
    Inpaint,
    Operator,
    SuperRes,
    box,
    conjugate_gradient,
    parse_operator,
    random_pixels,
)
from .pigdm import DEFAULT_PRIOR_STD, pigdm_denoiser
from .repaint import repaint_path, sample_repaint

__all__ = ["METHODS", "Restoration", "restore", "Operator", "Inpaint", "SuperRes", "Blur", "box",
           "random_pixels", "parse_operator", "conjugate_gradient", "dps_denoiser",
           "pigdm_denoiser", "sample_repaint", "repaint_path", "DEFAULT_STEPS", "DEFAULT_ZETA"]

#: steps of the run's grid :meth:`sfumato.model.Model.restore` takes by default
DEFAULT_STEPS = 50

#: each method's defaults (the sampler it runs, and its own parameters)
METHODS: dict[str, dict] = {
    "pigdm": {"sampler": "euler_ancestral", "prior_std": DEFAULT_PRIOR_STD},
    "dps": {"sampler": "euler_ancestral", "zeta": DEFAULT_ZETA},
    "repaint": {"sampler": "ddpm", "jump_length": None, "jump_n_sample": 10},
    "replace": {"sampler": "ddpm"},
}


@dataclass
class Restoration:
    """What :func:`restore` returns: ``x`` (B, C, H, W) restorations and ``residual`` (B,),
    the RMS of A(x) - y over the measured coordinates (compare it with σ_y)."""

    x: torch.Tensor
    residual: torch.Tensor


def restore(denoiser: Callable, y: torch.Tensor, operator: Operator, *, method: str = "pigdm",
            sigmas: torch.Tensor | Sequence[float], sigma_y: float = 0.0,
            generator: Generator, sampler: str | None = None, options: dict | None = None,
            paste: bool = True, dtype=torch.float32,
            **cond) -> Restoration:
    """Posterior samples of x given y (B, *operator.out_shape), one per measurement.

    ``sigmas``: the noise-level grid (decreasing, ending in 0); ``generator``: one, or one
    per sample (then sample i depends only on generator i); ``sampler``: the method's default
    (:data:`METHODS`) if None. ``options`` override the method's own parameters
    (:data:`METHODS`: ``zeta`` of DPS, ``prior_std`` of ΠGDM, ``jump_length`` and
    ``jump_n_sample`` of RePaint). ``paste``:
    replace an inpainting operator's known pixels by y's at the end. Conditioning keywords
    go to the denoiser.
    """
    if method not in METHODS:
        raise UsageError(f"unknown restoration method {method!r}{did_you_mean(method, METHODS)};"
                         f" choose one of: {', '.join(METHODS)}")
    if sigma_y < 0:
        raise UsageError(f"the measurement noise sigma_y must be >= 0; got {sigma_y}")
    opts = dict(METHODS[method])
    sampler = sampler or opts["sampler"]
    del opts["sampler"]
    wrong = [k for k in options or {} if k not in opts]
    if wrong:
        raise UsageError(f"{', '.join(map(repr, wrong))}: not a parameter of {method!r} (its "
                         f"parameters: {', '.join(opts) or 'none'})")
    opts.update(options or {})
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
    operator._check(y, operator.out_shape, "y")
    x = initial_noise((y.shape[0], *operator.shape), float(sigmas[0]), generator, dtype=dtype,
                      device=y.device)
    y = y.to(dtype)
    if method in ("repaint", "replace"):
        if method == "replace":  # RePaint without resampling
            opts = {"jump_n_sample": 1}
        x = sample_repaint(denoiser, x, sigmas, operator, y, sampler=sampler,
                           generator=generator, **opts, **cond)
    else:
        guided = dps_denoiser(denoiser, operator, y, **opts) if method == "dps" else \
            pigdm_denoiser(denoiser, operator, y, sigma_y=sigma_y, **opts)
        x = get_sampler(sampler)(guided, x, sigmas, generator=generator, **cond)
    if paste and isinstance(operator, Inpaint):
        x = operator.paste(x, y)
    return Restoration(x=x, residual=operator.residual(x, y))
