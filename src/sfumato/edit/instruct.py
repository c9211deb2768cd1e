"""InstructPix2Pix (Brooks et al. 2023): edit an input image by a text instruction.

The model D(x, σ; c_I, c_T) is a denoiser of the edited image that also sees the input image
c_I (as extra channels, :class:`sfumato.nets.ImageConditioned`) and the instruction c_T (as
text). It trains on pairs (input, instruction, edited) that this project makes itself
(:class:`InstructionPairs`, from the measured attribute edits of
:mod:`sfumato.edit.attributes`), dropping the image, the text or both (5% each, their §3.2.1)
so one network also gives the unconditional branches. Sampling mixes three predictions with
two scales (their eq. (3), written for x0 predictions, which mix as the scores do):

    D̃ = D(∅, ∅) + s_I (D(c_I, ∅) − D(∅, ∅)) + s_T (D(c_I, c_T) − D(c_I, ∅))

(:class:`InstructGuidance`): s_I says how closely to keep the input, s_T how strongly to
follow the instruction; s_I = s_T = 1 is the plain conditional model.
:meth:`sfumato.model.Model.instruct` and ``sfumato edit RUN --instruction TEXT`` run it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..errors import UsageError
from ..guidance import expand_null, repeat_sigma
from .attributes import EDITS, INSTRUCTIONS, apply_edit

__all__ = ["InstructGuidance", "InstructionPairs"]


class InstructionPairs:
    """Training pairs for an instruction-editing run.

    Args:
        edits: names of :data:`sfumato.edit.attributes.EDITS` to train on.
        encode: ``prompts -> {kwarg: (P, L, ...)}``, the run's text encoder
            (:meth:`sfumato.text.conditioner.TextConditioner.prompts`).
        null: the null text's kwargs (``TextConditioner.null()``), batch 1.
        drop: probability of dropping the image only, the text only, and both (each).

    ``batch(x0, generator)`` -> (edited images (B, 1, H, W), conditioning kwargs: ``image``
    (the input, zero where dropped) and the instruction's text kwargs), each row a random
    edit in a random phrasing of :data:`INSTRUCTIONS`.
    """

    def __init__(self, edits: Sequence[str], encode: Callable[[list[str]], dict],
                 null: Mapping[str, torch.Tensor], drop: float = 0.05) -> None:
        unknown = [e for e in edits if e not in EDITS]
        if not edits or unknown:
            raise UsageError(f"instruct.edits must name edits among {', '.join(EDITS)}; got "
                             f"{list(edits)}")
        if not 0 <= drop <= 1 / 3:
            raise UsageError(f"instruct.drop must be in [0, 1/3]; got {drop}")
        self.edits, self.drop = list(edits), float(drop)
        self.phrases = [(e, p) for e in self.edits for p in INSTRUCTIONS[e]]
        self.edit_of = torch.tensor([self.edits.index(e) for e, _ in self.phrases])
        self.table = encode([p for _, p in self.phrases])
        self.null = dict(null)

    def batch(self, x0: torch.Tensor, generator: torch.Generator
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        B = x0.shape[0]
        pick = torch.randint(0, len(self.phrases), (B,), generator=generator)
        u = torch.rand(B, generator=generator)
        x1, edit = torch.empty_like(x0), self.edit_of[pick]
        for k, name in enumerate(self.edits):
            rows = edit == k
            if rows.any():
                x1[rows] = apply_edit(name, x0[rows]).to(x0.dtype)
        no_image = u < 2 * self.drop  # [0, d): both, [d, 2d): image only, [2d, 3d): text only
        no_text = (u < self.drop) | ((u >= 2 * self.drop) & (u < 3 * self.drop))
        cond = {"image": torch.where(no_image[:, None, None, None], torch.zeros_like(x0), x0)}
        for key, table in self.table.items():
            value = table[pick]
            if key in self.null:  # the null text is an all-False mask (see TextConditioner)
                null = self.null[key].to(value.dtype).expand_as(value)
                value = torch.where(no_text.reshape(-1, *[1] * (value.ndim - 1)), null, value)
            cond[key] = value
        return x1, cond


    def examples(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Conditioning that asks image i (of (n, 1, H, W)) for edit i mod E in its first
        phrasing (a run's sample grid)."""
        first = [self.phrases.index((e, INSTRUCTIONS[e][0])) for e in self.edits]
        rows = torch.tensor([first[i % len(first)] for i in range(images.shape[0])])
        return {"image": images, **{k: v[rows] for k, v in self.table.items()}}


class InstructGuidance(nn.Module):
    """The two-scale guidance of InstructPix2Pix (Brooks et al. 2023, eq. (3)) around a
    denoiser ``D(x, sigma, image=..., **text)``; ``null_text`` replaces text kwargs in the
    text-free branches (leading dim 1 is broadcast). One call of 3B.

    Shapes: x (B, C, H, W), image (B or 1, C, H, W), text kwargs (B, ...). Returns (B, ...).
    """

    def __init__(self, denoiser: Callable, image_scale: float, text_scale: float, *,
                 null_text: Mapping[str, torch.Tensor]) -> None:
        super().__init__()
        self.denoiser, self.null_text = denoiser, dict(null_text)
        self.image_scale, self.text_scale = float(image_scale), float(text_scale)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, *, image: torch.Tensor,
                **text: torch.Tensor) -> torch.Tensor:
        B = x.shape[0]
        image = image.to(x).expand_as(x)
        cond: dict[str, Any] = {"image": torch.cat([torch.zeros_like(image), image, image])}
        for k, v in text.items():
            null = expand_null(self.null_text.get(k, v), v, B)
            cond[k] = torch.cat([null, null, v])
        d_none, d_image, d_full = self.denoiser(torch.cat([x, x, x]),
                                                repeat_sigma(sigma, B, 3, x.device),
                                                **cond).chunk(3)
        return (d_none + self.image_scale * (d_image - d_none)
                + self.text_scale * (d_full - d_image))

