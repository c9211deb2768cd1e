"""Editing with a trained prior: SDEdit, inversion and DiffEdit (:mod:`~sfumato.edit.sdedit`,
:mod:`~sfumato.edit.inversion`, :mod:`~sfumato.edit.diffedit`).

    from sfumato.edit import invert, sdedit
    z = invert(denoiser, x0, sigmas, sampler="heun") / sigmas[0]   # noise that reproduces x0
    x = sdedit(denoiser, x0, 0.5, steps=20, sigma_min=0.002, sigma_max=80.0, generator=g)

:meth:`sfumato.model.Model.edit` / :meth:`~sfumato.model.Model.invert` and the CLI
(``sfumato edit``, ``sfumato invert``, ``sfumato sample --noise``) run them on a run.
"""

from __future__ import annotations

from .diffedit import diffedit, diffedit_mask
from .inversion import INVERTIBLE, anderson_solve, invert
from .sdedit import partial_grid, sdedit, strength_to_sigma

__all__ = ["INVERTIBLE", "anderson_solve", "diffedit", "diffedit_mask", "invert", "partial_grid",
           "sdedit", "strength_to_sigma"]
