"""Measured attribute edits of digit images: the pairs InstructPix2Pix trains on, and the
directions its edits are checked against.

Each edit is a deterministic image transform with the attribute of
:func:`sfumato.text.captions.digit_attributes` it moves and the sign of the move:

============  =========================================================  ===========  ====
edit          transform (ink w = (x + 1)/2 in [0, 1], background 0)      attribute    sign
============  =========================================================  ===========  ====
``thicker``   ink curve w <- w^0.65                                      thickness    +1
``thinner``   ink curve w <- w^1.4                                       thickness    -1
``slant``     shear x <- x + k (y - ȳ) about the ink's centre, k = 0.15   slant        +1
``upright``   the shear that removes 0.7 of the measured slant            |slant|      -1
``bigger``    scale about the ink's centre by 1.1                        size         +1
``smaller``   scale about the ink's centre by 0.9                        size         -1
============  =========================================================  ===========  ====

At 8x8 a stroke is one or two pixels wide and its width lives in the grey levels of its
edge pixels, so thickness moves by the ink curve: grey dilation / erosion, even by half a
pixel, changes the digit's class for the held-out classifier 2-5x as often (measured: 0.78
/ 0.74 accuracy after dilation / erosion by half a pixel against 0.97 / 0.96 here). The sizes
of all six edits were chosen the same way: each keeps the classifier's accuracy on the
edited held-out digits at 0.95-0.97 (0.98 unedited) and moves its attribute on every one.
Geometric edits resample the image bilinearly (:func:`torch.nn.functional.grid_sample`,
zero ink outside). Every edit has several phrasings (:data:`INSTRUCTIONS`); the benchmark also asks
with phrasings the model never saw (:data:`HELDOUT_INSTRUCTIONS`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..errors import UsageError, did_you_mean
from ..text.captions import digit_attributes

__all__ = ["EDITS", "HELDOUT_INSTRUCTIONS", "INSTRUCTIONS", "apply_edit", "edit_moved"]

#: edit -> (attribute it moves, sign); "upright" moves |slant| down
EDITS: dict[str, tuple[str, int]] = {
    "thicker": ("thickness", 1), "thinner": ("thickness", -1),
    "slant": ("slant", 1), "upright": ("abs_slant", -1),
    "bigger": ("size", 1), "smaller": ("size", -1),
}

#: the phrasings a model is trained with, per edit
INSTRUCTIONS: dict[str, tuple[str, ...]] = {
    "thicker": ("make it thicker", "thicken the strokes", "make the lines bolder"),
    "thinner": ("make it thinner", "thin the strokes", "make the lines finer"),
    "slant": ("slant it to the right", "make it italic", "lean it to the right"),
    "upright": ("make it upright", "straighten it up", "remove the slant"),
    "bigger": ("make it bigger", "enlarge it", "scale it up"),
    "smaller": ("make it smaller", "shrink it", "scale it down"),
}

#: phrasings no training pair uses (for measuring how instructions generalise)
HELDOUT_INSTRUCTIONS: dict[str, str] = {
    "thicker": "use a heavier pen", "thinner": "use a finer pen",
    "slant": "tilt it rightwards", "upright": "stand it up straight",
    "bigger": "zoom in on it", "smaller": "zoom out",
}

def _ink(x: torch.Tensor) -> torch.Tensor:
    return ((x.float() + 1) / 2).clamp(0, 1)


def _ink_curve(x: torch.Tensor, gamma: float) -> torch.Tensor:
    return _ink(x).pow(gamma) * 2 - 1


def _affine(x: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """Resample images so the ink at pixel p moves to ``A (p - c) + c`` with c the ink's
    centre of mass; ``matrix`` (B, 2, 2) acts on (column, row-downwards) offsets in pixels."""
    B, _, H, W = x.shape
    w = _ink(x)
    ys, xs = torch.meshgrid(torch.arange(H, dtype=torch.float32),
                            torch.arange(W, dtype=torch.float32), indexing="ij")
    m = w.sum(dim=(1, 2, 3)).clamp_min(1e-8)
    cx = (w[:, 0] * xs).sum(dim=(1, 2)) / m
    cy = (w[:, 0] * ys).sum(dim=(1, 2)) / m
    # output pixel q samples input A^-1 (q - c) + c
    inv = torch.linalg.inv(matrix.float())
    off = torch.stack([xs.expand(B, H, W) - cx[:, None, None],
                       ys.expand(B, H, W) - cy[:, None, None]], dim=-1)  # (B, H, W, 2)
    src = torch.einsum("bij,bhwj->bhwi", inv, off)
    src = src + torch.stack([cx, cy], dim=-1)[:, None, None, :]
    grid = torch.stack([(src[..., 0] + 0.5) / W * 2 - 1, (src[..., 1] + 0.5) / H * 2 - 1], -1)
    out = F.grid_sample(w, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out * 2 - 1


def _shear(k: torch.Tensor) -> torch.Tensor:
    """(B,) shear factors -> (B, 2, 2): dx = -k dy_down, i.e. x <- x + k (height above
    centre), which tilts the top to the right for k > 0 (the slant of digit_attributes)."""
    m = torch.eye(2).repeat(k.shape[0], 1, 1)
    m[:, 0, 1] = -k
    return m


def _scale(x: torch.Tensor, factor: float) -> torch.Tensor:
    return _affine(x, torch.eye(2).repeat(x.shape[0], 1, 1) * factor)


_TRANSFORMS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "thicker": lambda x: _ink_curve(x, 0.65),
    "thinner": lambda x: _ink_curve(x, 1.4),
    "slant": lambda x: _affine(x, _shear(torch.full((x.shape[0],), 0.15))),
    "upright": lambda x: _affine(x, _shear(-0.7 * digit_attributes(x)["slant"])),
    "bigger": lambda x: _scale(x, 1.1),
    "smaller": lambda x: _scale(x, 0.9),
}


def apply_edit(name: str, images: torch.Tensor) -> torch.Tensor:
    """Edit ``name`` of images (B, 1, H, W) in [-1, 1] -> (B, 1, H, W) in [-1, 1] (float32)."""
    if name not in EDITS:
        raise UsageError(f"unknown edit {name!r}{did_you_mean(name, EDITS)}; choose one of "
                         f"{', '.join(EDITS)}")
    if images.ndim != 4 or images.shape[1] != 1:
        raise UsageError(f"attribute edits take grey images (B, 1, H, W); got "
                         f"{tuple(images.shape)}")
    return _TRANSFORMS[name](images).clamp(-1, 1)


def edit_moved(name: str, before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """(B,) bool: whether edit ``name``'s attribute moved in its direction from images
    ``before`` to ``after`` (both (B, 1, H, W) in [-1, 1])."""
    attr, sign = EDITS[name]
    a, b = digit_attributes(before), digit_attributes(after)
    if attr == "abs_slant":
        return (b["slant"].abs() - a["slant"].abs()) * sign > 0
    return (b[attr] - a[attr]) * sign > 0
