"""Image grids and PNG output with Pillow (atomic writes)."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import NamedTuple

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


def read_images(path: str | os.PathLike, channels: int) -> np.ndarray:
    """A user's images as (N, H, W, channels) uint8, unresized: one image file (PNG, JPEG,
    anything Pillow reads; converted to grayscale or RGB) or an ``.npz`` whose ``images`` is
    uint8 NHWC (as ``sfumato sample`` writes). Clear errors for a missing, unreadable or
    mis-shaped file; never unpickles (``allow_pickle=False``)."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"input {str(p)!r} does not exist or is no file")
    if p.suffix.lower() == ".npz":
        try:
            with np.load(p, allow_pickle=False) as f:
                a = np.asarray(f["images"])
        except (OSError, ValueError, KeyError) as e:
            raise DataError(f"{str(p)!r} is not an .npz with an 'images' array (uint8 NHWC, as "
                            f"'sfumato sample --out FILE.npz' writes): {e}") from None
        a = a[..., None] if a.ndim == 3 else a
        if a.dtype != np.uint8 or a.ndim != 4 or a.shape[-1] != channels:
            raise DataError(f"{str(p)!r}: 'images' must be uint8 (N, H, W, {channels}); got "
                            f"{a.dtype} {a.shape}")
        return a
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(p) as im:
            im.load()
            a = np.array(im.convert("L" if channels == 1 else "RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise DataError(f"{str(p)!r} is not a readable image file ({e})") from None
    return a.reshape(1, a.shape[0], a.shape[1], channels)


def write_images(images: np.ndarray, path: str | os.PathLike, nrow: int | None = None,
                 **arrays: np.ndarray) -> Path:
    """Write uint8 NHWC images as a PNG grid (``.png``) or an ``.npz`` with ``images`` and the
    other ``arrays`` (``.npz``), atomically."""
    path = Path(path)
    if path.suffix == ".png":
        return save_grid(images, path, nrow=nrow)
    if path.suffix != ".npz":
        raise DataError(f"output must end in .png (a grid) or .npz (arrays); got {str(path)!r}")
    with atomic_write(path) as tmp:
        np.savez(tmp, images=images, **arrays)
    return path


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class ImageFolder(NamedTuple):
    """What :func:`read_image_folder` read: ``images`` (N, C, H, W) in [-1, 1], the names of
    the ``skipped`` files, and the ``names`` of the N files read, in order."""

    images: torch.Tensor
    skipped: list[str]
    names: list[str]


def read_image_folder(folder: str | os.PathLike, channels: int, size: tuple[int, int]
                      ) -> ImageFolder:
    """The image files in ``folder`` (PNG, JPEG, ...; any size, sorted by name) as (N,
    channels, H, W) float32 in [-1, 1], each resized to ``size`` (H, W) as a data set is
    (:func:`sfumato.data.base.resize`), with the names of the files skipped because they are
    not readable images and of those read. DataError for a missing folder or one without a
    readable image."""
    from .data.base import from_uint8, resize

    d = Path(folder)
    if not d.is_dir():
        raise DataError(f"image folder {str(d)!r} does not exist or is no folder")
    files = sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    images, skipped, names = [], [], []
    for f in files:
        try:
            images.append(resize(from_uint8(read_images(f, channels)), size))
            names.append(f.name)
        except DataError:
            skipped.append(f.name)
    if not images:
        raise DataError(f"image folder {str(d)!r} holds no readable image ("
                        + (f"{len(skipped)} unreadable: {', '.join(skipped[:5])}" if skipped
                           else f"no file ending in {', '.join(IMAGE_SUFFIXES)}") + ")")
    return ImageFolder(torch.cat(images), skipped, names)
