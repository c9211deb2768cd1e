"""Editing with a trained prior: SDEdit, inversion, null-text inversion and DiffEdit
(:mod:`~sfumato.edit.sdedit`, :mod:`~sfumato.edit.inversion`, :mod:`~sfumato.edit.nulltext`,
:mod:`~sfumato.edit.diffedit`).

    from sfumato.edit import invert, sdedit
    z = invert(denoiser, x0, sigmas, sampler="heun") / sigmas[0]   # noise that reproduces x0
    x = sdedit(denoiser, x0, 0.5, steps=20, sigma_min=0.002, sigma_max=80.0, generator=g)

:meth:`sfumato.model.Model.edit` / :meth:`~sfumato.model.Model.invert` and the CLI
(``sfumato edit``, ``sfumato invert``, ``sfumato sample --noise``) run them on a run.
Prompt-to-Prompt (:mod:`~sfumato.edit.p2p`) edits a text run's sample by editing its prompt
under cross-attention control.
"""

from __future__ import annotations

from .diffedit import diffedit, diffedit_mask
from .inversion import INVERTIBLE, anderson_solve, invert
from .nulltext import NullOffsetGuidance, NullTextInversion, embedding_width, null_text_invert
from .p2p import (
    AttentionController,
    AttentionRefine,
    AttentionReplace,
    AttentionReweight,
    attention_control,
    cross_attention_layers,
    fraction_to_sigma,
    prompt_to_prompt,
    prompt_tokens,
    token_alignment,
    word_positions,
)
from .sdedit import partial_grid, sdedit, strength_to_sigma

__all__ = ["AttentionController", "AttentionRefine", "AttentionReplace", "AttentionReweight",
           "attention_control", "cross_attention_layers", "fraction_to_sigma",
           "prompt_to_prompt", "prompt_tokens", "token_alignment", "word_positions",
           "INVERTIBLE", "NullOffsetGuidance", "NullTextInversion", "anderson_solve", "diffedit",
           "diffedit_mask", "embedding_width", "invert", "null_text_invert", "partial_grid",
           "sdedit", "strength_to_sigma"]
