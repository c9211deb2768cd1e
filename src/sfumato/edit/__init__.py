"""Editing with a trained prior: SDEdit and inversion (:mod:`~sfumato.edit.sdedit`,
:mod:`~sfumato.edit.inversion`).

    from sfumato.edit import invert, sdedit
    z = invert(denoiser, x0, sigmas, sampler="heun") / sigmas[0]   # noise that reproduces x0
    x = sdedit(denoiser, x0, 0.5, steps=20, sigma_min=0.002, sigma_max=80.0, generator=g)

:meth:`sfumato.model.Model.edit` / :meth:`~sfumato.model.Model.invert` and the CLI
(``sfumato edit``, ``sfumato invert``, ``sfumato sample --noise``) run them on a run.
"""

from __future__ import annotations

from .inversion import INVERTIBLE, invert
from .sdedit import sdedit, strength_to_sigma

__all__ = ["INVERTIBLE", "invert", "sdedit", "strength_to_sigma"]
