"""Image grids and PNG output with Pillow (atomic writes)."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch

from .errors import DataError
from .files import atomic_write


def make_grid(images: np.ndarray | torch.Tensor, nrow: int | None = None, pad: int = 1,
              scale: int = 1) -> np.ndarray:
    """Tile uint8 images (N, H, W, C) into one (H', W', C) array, ``nrow`` images per row,
    ``pad`` pixels of gap, each image enlarged ``scale`` times (nearest)."""
    a = images.cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if a.ndim != 4 or a.dtype != np.uint8:
        raise DataError(f"make_grid needs uint8 images (N, H, W, C); got {a.dtype} {a.shape}")
    if scale > 1:
        a = a.repeat(scale, 1).repeat(scale, 2)
    n, h, w, c = a.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    out = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, np.uint8)
    for i in range(n):
        r, q = divmod(i, nrow)
        top, left = pad + r * (h + pad), pad + q * (w + pad)
        out[top:top + h, left:left + w] = a[i]
    return out


def save_png(array: np.ndarray, path: str | os.PathLike) -> Path:
    """Write an (H, W, C) or (H, W) uint8 array as PNG, atomically (:mod:`sfumato.files`)."""
    from PIL import Image

    path = Path(path)
    a = array[..., 0] if array.ndim == 3 and array.shape[2] == 1 else array
    with atomic_write(path) as tmp:
        Image.fromarray(a).save(tmp, format="PNG")
    return path


def save_grid(images: np.ndarray | torch.Tensor, path: str | os.PathLike,
              nrow: int | None = None, scale: int | None = None) -> Path:
    """Save uint8 NHWC images as one PNG grid; small images are enlarged for viewing."""
    h = images.shape[1]
    scale = scale or max(1, 64 // h)
    return save_png(make_grid(images, nrow=nrow, scale=scale), path)
