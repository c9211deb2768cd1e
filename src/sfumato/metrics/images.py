"""Sample quality of images: Fréchet distance in a classifier's feature space with its
real-vs-real floor, and class accuracy (or the class histogram) of samples."""

from __future__ import annotations

import math
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from ..data.base import Data, ImageData, from_uint8
from ..errors import UsageError
from .classifier import Classifier, get_classifier
from .frechet import frechet_distance

__all__ = ["FeatureExtractor", "evaluate_images", "class_stats"]

_BUILTIN = ("digits", "mnist")


@runtime_checkable
class FeatureExtractor(Protocol):
    """Anything callable as ``extractor(images) -> features``: images (N, C, H, W) float in
    [-1, 1] (the data set's shape), features (N, D) array or tensor. A wrapper around
    Inception-v3 pool3 (resizing to 299 and mapping to its input range) makes
    :func:`evaluate_images` report FID."""

    def __call__(self, images: torch.Tensor) -> torch.Tensor | np.ndarray: ...


def _feats(extractor, images: torch.Tensor, batch_size: int = 1000) -> np.ndarray:
    out = [np.asarray(torch.as_tensor(extractor(images[i:i + batch_size])).detach().cpu()
                      .double()) for i in range(0, images.shape[0], batch_size)]
    return np.concatenate(out)


def class_stats(pred: torch.Tensor, num_classes: int) -> dict:
    """Histogram (fractions) of predicted classes, its entropy (nats) and the maximum
    ``log(num_classes)``: for unconditional samples, low entropy means missing classes."""
    hist = torch.bincount(pred.cpu(), minlength=num_classes).double()
    p = hist / hist.sum()
    ent = float(-(p[p > 0] * p[p > 0].log()).sum())
    return {"class_hist": [round(float(v), 6) for v in p], "class_entropy": ent,
            "class_entropy_max": math.log(num_classes)}


def evaluate_images(samples: torch.Tensor, dataset: str | dict | ImageData, *,
                    n: int | None = None, labels: torch.Tensor | None = None,
                    feature_extractor: FeatureExtractor | None = None,
                    classifier: Classifier | None = None, n_ref: int | None = None,
                    floor_repeats: int = 3, seed: int = 0,
                    cache: str | None = None) -> dict:
    """Fréchet distance of ``samples`` to the held-out split, and its real-vs-real floor.

    ``samples``: (N, C, H, W) float in [-1, 1] (or (N, H, W, C) uint8), the data set's shape;
    the first ``n`` (default all) are used. ``dataset``: an :class:`ImageData` with a
    held-out split, or a name / config for :func:`sfumato.data.get_dataset`.

    The reference is a random (``seed``) subset of ``n_ref`` held-out images (default
    ``min(n, held-out size)``). ``fd`` compares the samples with it; ``fd_floor`` compares
    ``n`` random training images with the same reference (the mean over ``floor_repeats``
    draws; ``fd_floor_std`` their spread) — what a sampler of the true distribution scores at
    this sample size. ``fd_ratio = fd / fd_floor``.

    Features: ``feature_extractor`` if given, else the data set's classifier
    (:func:`~sfumato.metrics.classifier.get_classifier`, cached). With a classifier the
    result also holds ``classifier_test_acc``, the predicted ``class_hist`` /
    ``class_entropy``, and ``accuracy`` of the predictions against ``labels`` (the classes
    the samples were conditioned on) when given.
    """
    if not isinstance(dataset, Data):
        from ..data import get_dataset

        dataset = get_dataset(dataset)
    if dataset.heldout is None:
        raise UsageError(f"data set {dataset.name!r} has no held-out split to compare with; "
                         f"load it with heldout=... > 0")
    x = torch.as_tensor(samples)
    if x.dtype == torch.uint8:
        x = from_uint8(x)
    x = x.detach().float().cpu()
    if tuple(x.shape[1:]) != dataset.shape:
        raise UsageError(f"samples have shape {tuple(x.shape[1:])}, the data set "
                         f"{dataset.name!r} {dataset.shape}")
    n = x.shape[0] if n is None else n
    if not 2 <= n <= x.shape[0]:
        raise UsageError(f"n must lie in [2, {x.shape[0]}] (the number of samples); got {n}")
    if n > len(dataset):
        raise UsageError(f"n = {n} exceeds the {len(dataset)} training images available for "
                         f"the floor")
    x = x[:n]
    if not torch.isfinite(x).all():
        raise UsageError("samples contain NaN or inf")
    if labels is not None:
        labels = torch.as_tensor(labels).long().cpu()[:n]
        if labels.shape != (n,):
            raise UsageError(f"labels must have shape ({n},); got {tuple(labels.shape)}")

    # the classifier gives the features unless an extractor is passed, and the class numbers
    # (trained on first use; for a user's data set only when they are asked for)
    wanted = feature_extractor is None or labels is not None or dataset.name in _BUILTIN
    if classifier is None and dataset.labels is not None and wanted:
        classifier = get_classifier(dataset, cache=cache)
    extractor = feature_extractor if feature_extractor is not None else classifier
    if extractor is None:
        raise UsageError(f"data set {dataset.name!r} has no labels for a built-in classifier: "
                         f"pass feature_extractor=...")

    held = dataset.heldout
    m = min(n, held.shape[0]) if n_ref is None else n_ref
    if not 2 <= m <= held.shape[0]:
        raise UsageError(f"n_ref must lie in [2, {held.shape[0]}]; got {m}")
    rng = np.random.RandomState(seed)
    ref_idx = torch.from_numpy(np.sort(rng.choice(held.shape[0], m, replace=False)))
    f_ref = _feats(extractor, held[ref_idx])
    fd = frechet_distance(_feats(extractor, x), f_ref)
    floors = []
    for _ in range(max(1, floor_repeats)):
        idx = torch.from_numpy(np.sort(rng.choice(len(dataset), n, replace=False)))
        floors.append(frechet_distance(_feats(extractor, dataset.train[idx]), f_ref))
    floor = float(np.mean(floors))
    out = {"fd": fd, "fd_floor": floor, "fd_floor_std": float(np.std(floors)),
           "fd_ratio": fd / floor if floor > 0 else math.inf, "n": n, "n_ref": m,
           "features": "classifier" if extractor is classifier else type(extractor).__name__}
    if classifier is not None:
        pred = classifier.predict(x)
        out["classifier_test_acc"] = classifier.test_acc
        out.update(class_stats(pred, classifier.meta["num_classes"]))
        if labels is not None:
            out["accuracy"] = float((pred == labels).double().mean())
    return out


def psnr(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of images x against ref, both (B, ...) in the range [-1, 1] (peak
    to peak 2): (B,) ``10 log10(4 / MSE)``, MSE floored at 1e-12 (identical images: 126 dB)."""
    return 10 * torch.log10(4 / (x - ref).pow(2).flatten(1).mean(1).clamp_min(1e-12))
