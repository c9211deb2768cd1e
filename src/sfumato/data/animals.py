"""Animal silhouettes (Animal-MNIST) from the ``animal-mnist`` package: 10 000 white-on-black
28 x 28 silhouettes, 1000 per class, a grey class-labelled set the digit models never saw.

Install it without its dependencies (its own loader imports tensorflow; sfumato reads only
the two data files)::

    pip install --no-deps animal-mnist

The files are gzip pickles of numpy arrays, read with the restricted
:class:`~sfumato.data.mnist.NumpyUnpickler` (numpy arrays only; any other global refused).
Class k is ``ANIMALS[k]`` (checked by eye on the package's images: the classes are in the
alphabetical order its description lists). The package is MIT-licensed.
"""

from __future__ import annotations

import functools
import gzip
import os
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError
from .base import ImageData, from_uint8
from .images import _resized, _split_data
from .mnist import load_numpy_pickle, package_file

__all__ = ["ANIMALS", "animals_dir", "load_animals"]

ANIMALS = ("bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep",
           "zebra")
_FILES = ("animal_data_version_3.gz", "animal_label_version_3.gz")
INSTALL_HINT = ("the animal silhouettes need the 'animal-mnist' package, which ships the data "
                "files: pip install --no-deps animal-mnist  (--no-deps: its own loader pulls "
                "in tensorflow; sfumato only reads the files)")


def animals_dir() -> Path:
    """The folder of the data files inside the installed ``animal-mnist`` distribution."""
    d = package_file("animal-mnist", "animal_mnist/data/Animal_MNIST", INSTALL_HINT)
    if not all((d / f).is_file() for f in _FILES):
        raise FileNotFoundError(f"animal-mnist is installed but {d} lacks {', '.join(_FILES)}; "
                                "reinstall it: pip install --force-reinstall --no-deps "
                                "animal-mnist")
    return d


@functools.lru_cache(maxsize=2)
def _arrays(folder: str) -> tuple[np.ndarray, np.ndarray]:
    with gzip.open(Path(folder) / _FILES[0], "rb") as f:
        x = load_numpy_pickle(f)
    with gzip.open(Path(folder) / _FILES[1], "rb") as f:
        y = load_numpy_pickle(f)
    if not (isinstance(x, np.ndarray) and isinstance(y, np.ndarray) and x.ndim == 3
            and x.shape[1:] == (28, 28) and y.shape == (x.shape[0],)
            and x.dtype == np.uint8 and 0 <= y.min() and y.max() < len(ANIMALS)):
        raise DataError(f"{folder}: expected uint8 images (N, 28, 28) and labels (N,) in "
                        f"[0, {len(ANIMALS)})")
    return x, y.astype(np.int64)


def load_animals(*, size: int | tuple[int, int] | None = None, heldout: int | float = 1000,
                 seed: int = 0, path: str | os.PathLike | None = None) -> ImageData:
    """The 10 000 animal silhouettes, 28 x 28 grey in [-1, 1] (silhouette = +1), labels 0..9
    (:data:`ANIMALS`). A seeded, stratified ``heldout`` split (default 1000, 100 per class);
    ``size`` resizes (bilinear); ``path`` a folder with the two data files instead of the
    package's."""
    folder = Path(path) if path is not None else animals_dir()
    x, y = _arrays(str(folder))
    data = _split_data("animals", from_uint8(x[..., None]), torch.from_numpy(y.copy()),
                       heldout, seed, {"source": "animal-mnist"}, num_classes=len(ANIMALS),
                       class_names=list(ANIMALS))
    return _resized(data, size)
