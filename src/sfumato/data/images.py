"""Image data sets: scikit-learn's bundled digits, a folder of image files, ``.npz`` arrays.

Every loader returns an :class:`~sfumato.data.base.ImageData` with images (N, C, H, W)
float32 in [-1, 1]. Nothing is downloaded.
"""

from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError
from .base import ImageData, from_uint8, resize, to_uint8

__all__ = ["load_digits", "load_folder", "load_npz", "save_npz", "stratified_split"]


def stratified_split(labels: np.ndarray | None, n: int, heldout: int | float,
                     seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split of ``range(n)`` into sorted (train, heldout) index arrays.

    ``heldout`` is a count or a fraction in (0, 1). With labels every class keeps its share
    (largest-remainder rounding), so the held-out class histogram matches the data's. Uses
    ``numpy.random.RandomState(seed)``, whose stream numpy keeps fixed across versions.
    """
    k = int(round(heldout * n)) if isinstance(heldout, float) and 0 < heldout < 1 else heldout
    if not isinstance(k, (int, np.integer)) or not 0 <= k < n:
        raise DataError(f"heldout must be a count in [0, {n}) or a fraction in (0, 1); "
                        f"got {heldout!r}")
    rng = np.random.RandomState(seed)
    if labels is None:
        perm = rng.permutation(n)
        return np.sort(perm[k:]), np.sort(perm[:k])
    labels = np.asarray(labels)
    classes, counts = np.unique(labels, return_counts=True)
    quota = k * counts / n
    take = np.floor(quota).astype(int)
    order = np.argsort(-(quota - take), kind="stable")
    take[order[: k - take.sum()]] += 1
    held = []
    for c, t in zip(classes, take, strict=True):
        idx = np.flatnonzero(labels == c)
        held.append(idx[rng.permutation(idx.size)[:t]])
    held = np.sort(np.concatenate(held))
    mask = np.ones(n, dtype=bool)
    mask[held] = False
    return np.flatnonzero(mask), held


def _split_data(name: str, images: torch.Tensor, labels: torch.Tensor | None,
                heldout: int | float, seed: int, info: dict,
                captions: list[str] | None = None, **kwargs) -> ImageData:
    if not heldout:
        return ImageData(name, images, labels, info=info, captions=captions, **kwargs)
    tr, he = stratified_split(None if labels is None else labels.numpy(), images.shape[0],
                              heldout, seed)
    info = {**info, "heldout": int(he.size), "split_seed": seed}
    tr_t, he_t = torch.from_numpy(tr), torch.from_numpy(he)
    if captions is not None:
        kwargs.update(captions=[captions[i] for i in tr],
                      heldout_captions=[captions[i] for i in he])
    data = ImageData(name, images[tr_t], None if labels is None else labels[tr_t],
                     images[he_t], None if labels is None else labels[he_t], info=info, **kwargs)
    data.split_indices = {"train": tr_t, "heldout": he_t}
    return data


# -- scikit-learn digits ------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits as _load
    except ImportError as e:  # pragma: no cover - scikit-learn is a core dependency
        raise ImportError("the digits data set ships with scikit-learn: "
                          "pip install scikit-learn") from e
    d = _load()
    return d.images.astype(np.float32), d.target.astype(np.int64)


def load_digits(*, size: int | tuple[int, int] | None = None, heldout: int | float = 300,
                seed: int = 0) -> ImageData:
    """scikit-learn's bundled 8 x 8 digits (1797 images, values 0..16, 10 classes).

    Images map 0..16 linearly to [-1, 1]. A seeded, stratified ``heldout`` split (default
    300, leaving 1497 for training) is ``heldout`` / ``heldout_labels``. ``size`` upsamples
    (bilinear, torch) after the split, e.g. ``size=16``.
    """
    images, target = _digits_arrays()
    x = torch.from_numpy(images[:, None] / 8.0 - 1.0).float()
    y = torch.from_numpy(target)
    data = _split_data("digits", x, y, heldout, seed, {"source": "sklearn.datasets.load_digits"},
                       num_classes=10, class_names=[str(i) for i in range(10)])
    return _resized(data, size)


def _resized(data: ImageData, size) -> ImageData:
    if size is None:
        return data
    data.info["native_size"] = list(data.shape[1:])
    data.train = resize(data.train, size)
    if data.heldout is not None:
        data.heldout = resize(data.heldout, size)
    data.info["size"] = list(data.shape[1:])
    data._fingerprint = None
    return data


# -- reading one image file ------------------------------------------------------------------
def image_shape(size: int | tuple[int, int], channels: int) -> tuple[int, int]:
    """(H, W) from ``size`` (int or (H, W)); ValueError for bad sizes or channel counts."""
    if channels not in (1, 3):
        raise DataError(f"channels must be 1 (grayscale) or 3 (RGB); got {channels!r}")
    hw = (size, size) if isinstance(size, int) else tuple(size)
    if len(hw) != 2 or min(hw) < 1:
        raise DataError(f"size must be an int or (height, width); got {size!r}")
    return hw


def read_image(path: str | os.PathLike, hw: tuple[int, int], channels: int) -> np.ndarray:
    """One image file -> (H, W, channels) uint8: converted to grayscale (1) or RGB (3),
    resized to cover (H, W) and center-cropped (Pillow, bicubic; no resampling at that size
    already). Raises whatever Pillow raises for a file that is no readable image."""
    try:
        from PIL import Image, ImageOps
    except ImportError as e:  # pragma: no cover - Pillow is a core dependency
        raise ImportError("reading images needs Pillow: pip install pillow") from e
    with Image.open(path) as im:
        im.load()
        im = ImageOps.fit(im.convert("L" if channels == 1 else "RGB"), (hw[1], hw[0]),
                          method=Image.Resampling.BICUBIC)
        return np.asarray(im, dtype=np.uint8).reshape(hw[0], hw[1], channels)


# -- a folder of image files --------------------------------------------------------------------
def load_folder(path: str | os.PathLike, *, size: int | tuple[int, int], channels: int = 3,
                labels: bool = False, heldout: int | float = 0, seed: int = 0) -> ImageData:
    """Every readable image file under ``path`` (recursively; hidden files ignored).

    Each image is converted to grayscale (``channels=1``) or RGB (``channels=3``), resized so
    it covers ``size`` and center-cropped to it (Pillow, bicubic). Files Pillow cannot read
    are skipped with a warning that counts them. ``labels=True`` takes the class from the
    first-level subfolder name (sorted names -> 0, 1, ...; ``class_names`` keeps them).
    ``heldout`` > 0 makes a seeded (stratified if labelled) held-out split.
    """
    hw = image_shape(size, channels)
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {str(root)!r} does not exist or is no folder")
    files = sorted(p for p in root.rglob("*") if p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(root).parts))
    if labels:
        top = [p for p in files if len(p.relative_to(root).parts) < 2]
        if top:
            raise DataError(f"labels=True takes classes from subfolder names, but "
                            f"{len(top)} file(s) lie directly in {str(root)!r} "
                            f"(e.g. {top[0].name!r})")
    arrays, classes, bad = [], [], []
    for p in files:
        try:
            a = read_image(p, hw, channels)
        except Exception:  # noqa: BLE001 - any decoding failure means "not a readable image"
            bad.append(p)
            continue
        arrays.append(a)
        classes.append(p.relative_to(root).parts[0] if labels else None)
    if bad:
        eg = ", ".join(repr(str(b.relative_to(root))) for b in bad[:3])
        warnings.warn(f"image folder {str(root)!r}: skipped {len(bad)} of {len(files)} files "
                      f"that are not readable images (e.g. {eg})", stacklevel=2)
    if not arrays:
        raise DataError(f"no readable images in {str(root)!r} ({len(files)} files found, "
                        f"{len(bad)} unreadable)")
    x = from_uint8(np.stack(arrays))
    y, names = None, None
    if labels:
        names = sorted(set(classes))
        lookup = {c: i for i, c in enumerate(names)}
        y = torch.tensor([lookup[c] for c in classes], dtype=torch.int64)
    info = {"source": "folder", "path": str(root), "size": list(hw), "channels": channels,
            "skipped": len(bad)}
    return _split_data("folder", x, y, heldout, seed, info, num_classes=None if names is None
                       else len(names), class_names=names)


# -- .npz arrays --------------------------------------------------------------------------------
_NPZ_HELP = ("expected 'images' as uint8 (N, H, W, C) or (N, H, W) in 0..255, or float "
             "(N, C, H, W) in [-1, 1], with C = 1 or 3, and optional integer 'labels' (N,); "
             "optionally 'heldout_images' / 'heldout_labels' alike")


def _images_from_array(a: np.ndarray, where: str) -> torch.Tensor:
    if a.dtype == np.uint8:
        if a.ndim == 3:
            a = a[..., None]
        if a.ndim != 4 or a.shape[-1] not in (1, 3):
            raise DataError(f"{where}: uint8 images of shape {a.shape} are not NHWC with 1 or "
                            f"3 channels; {_NPZ_HELP}")
        x = from_uint8(a)
    elif np.issubdtype(a.dtype, np.floating):
        if a.ndim != 4 or a.shape[1] not in (1, 3):
            raise DataError(f"{where}: float images of shape {a.shape} are not NCHW with 1 or "
                            f"3 channels; {_NPZ_HELP}")
        if not np.isfinite(a).all():
            raise DataError(f"{where}: float images contain NaN or inf")
        lo, hi = float(a.min(initial=0)), float(a.max(initial=0))
        if lo < -1.001 or hi > 1.001:
            raise DataError(f"{where}: float images span [{lo:.3g}, {hi:.3g}], not [-1, 1] "
                            f"(store 0..255 pixels as uint8 NHWC instead)")
        x = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).clamp(-1, 1)
    else:
        raise DataError(f"{where}: images have dtype {a.dtype}; {_NPZ_HELP}")
    if x.shape[0] == 0:
        raise DataError(f"{where}: no images (N = 0)")
    return x


def _labels_from_array(a: np.ndarray, n: int, where: str) -> torch.Tensor:
    if not np.issubdtype(a.dtype, np.integer):
        raise DataError(f"{where}: labels have dtype {a.dtype}, not an integer type")
    if a.shape != (n,):
        raise DataError(f"{where}: labels have shape {a.shape}, expected ({n},)")
    if n and a.min() < 0:
        raise DataError(f"{where}: labels must be >= 0; found {a.min()}")
    return torch.from_numpy(a.astype(np.int64))


def load_npz(path: str | os.PathLike, *, size: int | tuple[int, int] | None = None,
             heldout: int | float = 0, seed: int = 0) -> ImageData:
    """Images from an ``.npz`` file (read with ``allow_pickle=False``).

    Keys: ``images`` (uint8 NHWC/NHW 0..255, or float NCHW in [-1, 1]), optional ``labels``,
    optional ``heldout_images`` / ``heldout_labels``. Without stored held-out images,
    ``heldout`` > 0 makes a seeded (stratified if labelled) split. ``size`` resizes (torch,
    bilinear).
    """
    path = Path(path)
    where = str(path)
    try:
        z = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as e:
        raise DataError(f"{where}: not a readable .npz file ({e})") from e
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise DataError(f"{where}: holds a single array, not an .npz archive; {_NPZ_HELP}")
    with z:
        keys = set(z.files)
        extra = keys - {"images", "labels", "heldout_images", "heldout_labels"}
        if "images" not in keys or extra:
            raise DataError(f"{where}: keys {sorted(keys)}; {_NPZ_HELP}")
        try:
            arrays = {k: z[k] for k in keys}
        except ValueError as e:  # object arrays need pickle, which is refused
            raise DataError(f"{where}: {e}; {_NPZ_HELP}") from e
    x = _images_from_array(arrays["images"], where)
    y = _labels_from_array(arrays["labels"], x.shape[0], where) if "labels" in arrays else None
    info = {"source": "npz", "path": where}
    if "heldout_images" in arrays:
        if heldout:
            raise DataError(f"{where} stores heldout_images; do not also ask for heldout="
                            f"{heldout!r}")
        hx = _images_from_array(arrays["heldout_images"], where + " (heldout_images)")
        if hx.shape[1:] != x.shape[1:]:
            raise DataError(f"{where}: heldout_images {tuple(hx.shape[1:])} differ from "
                            f"images {tuple(x.shape[1:])}")
        hy = None
        if "heldout_labels" in arrays:
            hy = _labels_from_array(arrays["heldout_labels"], hx.shape[0], where)
        if (y is None) != (hy is None):
            raise DataError(f"{where}: give labels for both images and heldout_images, or "
                            f"for neither")
        nc = None if y is None else int(max(y.max(), hy.max())) + 1
        data = ImageData("npz", x, y, hx, hy, num_classes=nc, info=info)
    elif "heldout_labels" in arrays:
        raise DataError(f"{where}: heldout_labels without heldout_images")
    else:
        data = _split_data("npz", x, y, heldout, seed, info)
    return _resized(data, size)


def save_npz(path: str | os.PathLike, images: torch.Tensor | np.ndarray,
             labels: torch.Tensor | np.ndarray | None = None) -> None:
    """Write images (float NCHW in [-1, 1], converted with :func:`to_uint8`, or uint8 NHWC)
    and optional labels to an ``.npz`` that :func:`load_npz` reads back."""
    a = images
    if isinstance(a, torch.Tensor) and a.dtype != torch.uint8:
        a = to_uint8(a)
    a = np.asarray(a.cpu() if isinstance(a, torch.Tensor) else a)
    if a.dtype != np.uint8 and np.issubdtype(a.dtype, np.floating):
        a = to_uint8(torch.from_numpy(a)).numpy()
    arrays = {"images": a}
    if labels is not None:
        lab = labels.cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
        arrays["labels"] = lab.astype(np.int64)
    np.savez(path, **arrays)
