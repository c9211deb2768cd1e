"""Spatial hints for ControlNet (:mod:`sfumato.nets.controlnet`) and how well samples follow them.

A hint is an image-shaped map (B, 1, H, W) in {-1, 1} (the image range: -1 off, +1 on)
computed from a training image, fed to the ControlNet along with the noisy image:

- ``edges`` (:func:`edge_map`): thresholded Sobel gradient magnitude, the outline of the digit;
- ``mask`` (:func:`coarse_mask`): the digit's silhouette at a coarser resolution.

Agreement between a hint and a sample is measured by :func:`hint_iou`: the intersection over
union of the hint's "on" pixels and those of the same hint computed from the sample (e.g.
``hint_iou(edge_map(samples), hint)``), to compare with the base model without control.
:func:`load_hint` reads a hint from a PNG/JPEG file (``sfumato sample --control hint.png``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from .data.base import from_uint8
from .errors import UsageError, did_you_mean

__all__ = ["HINTS", "SOBEL_MAX", "coarse_mask", "edge_map", "hint_iou", "load_hint",
           "make_hint"]

#: The largest Sobel gradient magnitude ``sqrt(gx^2 + gy^2)`` an image with values in [0, 1]
#: can have: ``sqrt(20)``, reached by a 3x3 window with one corner's L of three pixels on,
#: e.g. ``[[0, 0, 0], [0, 0, 1], [1, 1, 1]]`` (gx = 2, gy = 4). A full-contrast straight step
#: edge gives 4 = 0.894 of it.
SOBEL_MAX = math.sqrt(20.0)

_SOBEL_X = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])


def _gray01(images: torch.Tensor, what: str) -> torch.Tensor:
    """(B, C, H, W) in [-1, 1] -> (B, 1, H, W) float32 in [0, 1], the mean over channels."""
    if images.ndim != 4:
        raise UsageError(f"{what} expects images (B, C, H, W) in [-1, 1]; got shape "
                         f"{tuple(images.shape)}")
    return (images.float().mean(dim=1, keepdim=True) + 1) / 2


def _on_off(on: torch.Tensor) -> torch.Tensor:
    """bool -> float {-1, 1}."""
    return on.float() * 2 - 1


def edge_map(images: torch.Tensor, threshold: float = 0.25) -> torch.Tensor:
    """Sobel edge map: images (B, C, H, W) in [-1, 1] -> (B, 1, H, W) in {-1, 1}.

    The channel mean, rescaled to [0, 1], is convolved with the 3x3 Sobel kernels (borders
    replicated, so the image border is no edge); a pixel is an edge (+1) where the gradient
    magnitude ``sqrt(gx^2 + gy^2)`` is at least ``threshold * SOBEL_MAX`` (``SOBEL_MAX =
    sqrt(20)``, the largest magnitude possible in [0, 1]). The default 0.25 marks a
    full-contrast step edge on both of its sides (magnitude 4 = 0.89 SOBEL_MAX, the outer
    corner of a square sqrt(2) = 0.32 SOBEL_MAX) and any step of more than about 0.28 of the
    range. So the edges of a filled shape form a two-pixel band: its 3x3 dilation minus its
    3x3 erosion. Works at any size >= 1x1 (8x8 digits, 28x28 MNIST).
    """
    if not 0.0 < threshold <= 1.0:
        raise UsageError(f"threshold is relative to SOBEL_MAX and must be in (0, 1]; "
                         f"got {threshold}")
    g = F.pad(_gray01(images, "edge_map"), (1, 1, 1, 1), mode="replicate")
    kx = _SOBEL_X.to(g.device)
    k = torch.stack([kx, kx.T])[:, None]  # (2, 1, 3, 3): d/dx, d/dy
    grad = F.conv2d(g, k)
    mag = grad.square().sum(dim=1, keepdim=True).sqrt()
    return _on_off(mag >= threshold * SOBEL_MAX - 1e-6)


def coarse_mask(images: torch.Tensor, factor: int = 2, threshold: float = 0.0) -> torch.Tensor:
    """Coarse silhouette: images (B, C, H, W) in [-1, 1] -> (B, 1, H, W) in {-1, 1}.

    The channel mean is average-pooled over ``factor x factor`` blocks (H and W must be
    divisible by ``factor``); a block is on (+1) where its mean exceeds ``threshold`` (in the
    image range: 0 = mid-grey, i.e. brighter than half on average), and the blocks are
    upsampled back to H x W (nearest), so the mask is constant on each block.
    """
    if images.ndim != 4:
        raise UsageError(f"coarse_mask expects images (B, C, H, W) in [-1, 1]; got shape "
                         f"{tuple(images.shape)}")
    H, W = images.shape[-2:]
    if factor < 1 or H % factor or W % factor:
        raise UsageError(f"coarse_mask factor must be >= 1 and divide the image size {H}x{W}; "
                         f"got {factor}")
    pooled = F.avg_pool2d(images.float().mean(dim=1, keepdim=True), factor)
    on = (pooled > threshold).repeat_interleave(factor, dim=2).repeat_interleave(factor, dim=3)
    return _on_off(on)


HINTS: dict[str, Callable[..., torch.Tensor]] = {"edges": edge_map, "mask": coarse_mask}


def make_hint(name: str, images: torch.Tensor, **kwargs) -> torch.Tensor:
    """The hint ``name`` (a key of :data:`HINTS`) of images (B, C, H, W) in [-1, 1] ->
    (B, 1, H, W) in {-1, 1}; ``kwargs`` go to the hint function (e.g. ``threshold``)."""
    if name not in HINTS:
        raise UsageError(f"unknown hint {name!r}{did_you_mean(name, HINTS)}; choose one of "
                         f"{sorted(HINTS)}")
    return HINTS[name](images, **kwargs)


def hint_iou(hint_a: torch.Tensor, hint_b: torch.Tensor) -> torch.Tensor:
    """Intersection over union of the "on" pixels of two hints, per sample: (B, ...) -> (B,).

    Inputs are bool (on = True) or float in {-1, 1} (on = > 0), of equal shapes. The IoU is
    1.0 where both hints are empty (nothing to disagree on).
    """
    if hint_a.shape != hint_b.shape or hint_a.ndim < 1:
        raise UsageError(f"hint_iou needs two hints of the same shape (B, ...); got "
                         f"{tuple(hint_a.shape)} and {tuple(hint_b.shape)}")
    a = (hint_a if hint_a.dtype == torch.bool else hint_a > 0).flatten(1)
    b = (hint_b if hint_b.dtype == torch.bool else hint_b > 0).flatten(1)
    inter = (a & b).sum(dim=1).double()
    union = (a | b).sum(dim=1).double()
    iou = torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))
    return iou.float()


def load_hint(path: str | os.PathLike, size: int | tuple[int, int], channels: int = 1,
              threshold: float | None = None) -> torch.Tensor:
    """Read a hint image (PNG, JPEG, anything Pillow reads) -> (1, channels, H, W) float32 in
    [-1, 1], with ``size`` an int (H = W) or (H, W).

    Converted to grayscale (``channels=1``) or RGB (3), then resized to cover ``size`` and
    center-cropped (Pillow, bicubic; no resampling when the file already has that size), as
    :func:`sfumato.data.load_folder` reads training images. With ``threshold`` (image range)
    the result is binarised to {-1, 1} (on where > threshold), like the hints of
    :data:`HINTS`. FileNotFoundError for a missing file, ValueError for one that is no
    readable image.
    """
    from PIL import UnidentifiedImageError

    from .data.images import image_shape, read_image

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"hint image {str(p)!r} does not exist or is no file")
    try:
        a = read_image(p, image_shape(size, channels), channels)
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise UsageError(f"hint {str(p)!r} is not a readable image file ({e})") from e
    x = from_uint8(a[None])
    return x if threshold is None else _on_off(x > threshold)
