"""The uniform data object: tensors in memory, a deterministic, shardable batch iterator."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import DataError

__all__ = ["Data", "ImageData", "ToyData", "to_uint8", "from_uint8", "resize"]


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1], (N, C, H, W) float -> (N, H, W, C) uint8 in 0..255 (rounded,
    clipped). Exact inverse of :func:`from_uint8` on uint8 input."""
    x = torch.as_tensor(x)
    if x.ndim != 4:
        raise DataError(f"to_uint8 expects (N, C, H, W); got shape {tuple(x.shape)}")
    u = ((x.detach().float().cpu() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return u.permute(0, 2, 3, 1).contiguous()


def from_uint8(a: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(N, H, W, C) or (N, H, W) uint8 -> (N, C, H, W) float32 in [-1, 1]."""
    t = torch.as_tensor(np.asarray(a))
    if t.dtype != torch.uint8:
        raise DataError(f"from_uint8 expects uint8; got {t.dtype}")
    if t.ndim == 3:
        t = t[..., None]
    if t.ndim != 4:
        raise DataError(f"from_uint8 expects (N, H, W[, C]); got shape {tuple(t.shape)}")
    return t.permute(0, 3, 1, 2).float().div(127.5).sub(1).contiguous()


def resize(x: torch.Tensor, size: int | tuple[int, int] | None) -> torch.Tensor:
    """Bilinear resize of (N, C, H, W) images to ``size`` (antialiased when shrinking);
    ``None`` or the current size returns ``x`` unchanged."""
    if size is None:
        return x
    hw = (int(size), int(size)) if isinstance(size, int) else tuple(int(s) for s in size)
    if len(hw) != 2 or min(hw) < 1:
        raise DataError(f"size must be an int or (height, width); got {size!r}")
    if tuple(x.shape[-2:]) == hw:
        return x
    shrink = hw[0] < x.shape[-2] or hw[1] < x.shape[-1]
    y = F.interpolate(x.float(), size=hw, mode="bilinear", align_corners=False, antialias=shrink)
    return y.clamp(-1, 1)


class Data:
    """Common part of every data set: ``train`` (N, *shape) with optional integer ``labels``,
    an optional ``heldout`` split, and batch iteration.

    Attributes: ``name``, ``train``, ``labels`` (or None), ``heldout`` / ``heldout_labels``
    (or None), ``shape`` (one sample), ``num_classes`` (or None), ``data_range``,
    ``class_names`` (or None), ``info`` (JSON-able description: source, split seed, ...),
    ``split_indices`` (the seeded split's indices into the source, or None), ``captions`` /
    ``heldout_captions`` (one text per train / held-out sample, e.g. the emoji names, or
    None).
    """

    name: str
    train: torch.Tensor
    labels: torch.Tensor | None
    heldout: torch.Tensor | None
    heldout_labels: torch.Tensor | None
    num_classes: int | None
    class_names: list[str] | None
    data_range: tuple[float, float] | None
    info: dict
    captions: list[str] | None
    heldout_captions: list[str] | None

    def __init__(self, name: str, train: torch.Tensor, labels: torch.Tensor | None = None,
                 heldout: torch.Tensor | None = None, heldout_labels: torch.Tensor | None = None,
                 *, num_classes: int | None = None, class_names: list[str] | None = None,
                 data_range: tuple[float, float] | None = None, info: dict | None = None,
                 captions: list[str] | None = None, heldout_captions: list[str] | None = None):
        self.name, self.train, self.labels = name, train, labels
        self.heldout, self.heldout_labels = heldout, heldout_labels
        for x, y, what in ((train, labels, "train"), (heldout, heldout_labels, "heldout")):
            if y is not None and (x is None or y.shape != (x.shape[0],)):
                raise DataError(f"{what} labels must have shape (N,) matching the images")
        for x, c, what in ((train, captions, "train"), (heldout, heldout_captions, "heldout")):
            if c is not None and (x is None or len(c) != x.shape[0]):
                raise DataError(f"{what} captions must be one string per image")
        self.captions = None if captions is None else list(captions)
        self.heldout_captions = None if heldout_captions is None else list(heldout_captions)
        if labels is not None and num_classes is None:
            num_classes = int(labels.max()) + 1
        self.num_classes, self.class_names = num_classes, class_names
        self.data_range, self.info = data_range, dict(info or {})
        #: {"train": indices, "heldout": indices} into the source data when a split was made
        self.split_indices: dict[str, torch.Tensor] | None = None
        self._fingerprint: str | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of one sample, e.g. (1, 8, 8) or (2,)."""
        return tuple(self.train.shape[1:])

    def __len__(self) -> int:
        return self.train.shape[0]

    def __repr__(self) -> str:
        held = "none" if self.heldout is None else str(self.heldout.shape[0])
        return (f"{type(self).__name__}({self.name!r}, train={len(self)}, heldout={held}, "
                f"shape={self.shape}, num_classes={self.num_classes})")

    def _split(self, split: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        if split == "train":
            return self.train, self.labels
        if split == "heldout":
            if self.heldout is None:
                raise DataError(f"data set {self.name!r} has no held-out split")
            return self.heldout, self.heldout_labels
        raise DataError(f"split must be 'train' or 'heldout'; got {split!r}")

    def batches(self, batch_size: int, generator: torch.Generator, rank: int = 0,
                world_size: int = 1, *, drop_last: bool = True, split: str = "train",
                device: torch.device | str | None = None,
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        """One epoch of shuffled ``(x, labels)`` batches (labels None when unlabelled).

        The order is ``torch.randperm(N, generator=generator)``: deterministic given the
        generator's state. For distributed training give every rank a generator in the same
        state (same seed, same epoch): the permutation is then shared, trimmed to a multiple of
        ``world_size`` and dealt out round-robin, so ranks see disjoint shards of equal size and
        yield the same number of batches. ``batch_size`` is per rank.
        """
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise DataError(f"need batch_size >= 1 and 0 <= rank < world_size; got "
                            f"batch_size={batch_size}, rank={rank}, world_size={world_size}")
        x, y = self._split(split)
        n = x.shape[0]
        per_rank = n // world_size
        if drop_last and per_rank < batch_size:
            raise DataError(f"batch_size {batch_size} exceeds the {per_rank} samples per rank "
                            f"of {self.name!r}; lower it or pass drop_last=False")
        perm = torch.randperm(n, generator=generator)[: per_rank * world_size][rank::world_size]
        stop = per_rank - per_rank % batch_size if drop_last else per_rank
        for i in range(0, stop, batch_size):
            idx = perm[i: i + batch_size]
            xb = x[idx] if device is None else x[idx].to(device)
            yb = None if y is None else (y[idx] if device is None else y[idx].to(device))
            yield xb, yb

    def dataset(self, split: str = "train") -> torch.utils.data.TensorDataset:
        """The split as a ``TensorDataset`` (items ``(x,)`` or ``(x, y)``), for a standard
        ``DataLoader`` with a ``DistributedSampler``."""
        x, y = self._split(split)
        return torch.utils.data.TensorDataset(x) if y is None else \
            torch.utils.data.TensorDataset(x, y)

    def fingerprint(self) -> str:
        """SHA-256 of the train and held-out tensors and labels (hex); identifies the data for
        caches."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            for t in (self.train, self.labels, self.heldout, self.heldout_labels):
                if t is None:
                    h.update(b"none")
                    continue
                t = t.detach().cpu().contiguous()
                h.update(f"{t.dtype}{tuple(t.shape)}".encode())
                h.update(t.numpy().tobytes())
            self._fingerprint = h.hexdigest()
        return self._fingerprint


class ImageData(Data):
    """Images (N, C, H, W) float32 in ``data_range`` = (-1, 1)."""

    def __init__(self, name: str, train: torch.Tensor, labels: torch.Tensor | None = None,
                 heldout: torch.Tensor | None = None, heldout_labels: torch.Tensor | None = None,
                 **kwargs):
        kwargs.setdefault("data_range", (-1.0, 1.0))
        super().__init__(name, train, labels, heldout, heldout_labels, **kwargs)

    @staticmethod
    def to_uint8(x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) float in [-1, 1] -> (N, H, W, C) uint8; see :func:`to_uint8`."""
        return to_uint8(x)


class ToyData(Data):
    """A 2-D toy: ``train`` is a fixed sample (n, 2) drawn with ``seed``; ``sample(n,
    generator)`` draws fresh ground truth (unlimited)."""

    def __init__(self, name: str, n: int = 10000, seed: int = 0):
        from .toys import sample_toy

        self._toy = name
        train = sample_toy(name, n, torch.Generator().manual_seed(seed))
        super().__init__(name, train, info={"source": "toy", "n": n, "seed": seed})

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """A fresh (n, 2) float32 sample of the ground-truth distribution."""
        from .toys import sample_toy

        return sample_toy(self._toy, n, generator)
