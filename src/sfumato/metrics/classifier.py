"""A small CNN classifier per data set: its penultimate layer is the feature space for the
Fréchet distance, its predictions give the class accuracy of conditional samples.

Trained deterministically (fixed seed, explicit generators) on the data set's train split
and cached as safetensors weights plus a JSON sidecar in :func:`cache_dir`. The sidecar
holds the recipe, a hash of recipe and data, the held-out accuracy and the SHA-256 of the
weights file; a cache entry whose hash or checksum does not match, or that fails to load, is
reported and retrained. Nothing is ever unpickled. Files are written atomically (temporary
file + rename, :mod:`sfumato.files`).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import time
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data.base import ImageData, resize
from ..errors import UsageError
from ..files import atomic_write, cache_dir, sha256_file
from ..runtime import torch_threads

__all__ = ["RECIPES", "SmallCNN", "Classifier", "cache_dir", "get_classifier",
           "train_classifier"]

#: bump when the training code changes in a way the recipe dict does not show
RECIPE_VERSION = 1

_BASE = {"version": RECIPE_VERSION, "width": 16, "convs": 2, "features": 128,
         "batch_size": 64, "lr": 2e-3, "weight_decay": 1e-4, "epochs": 40, "max_shift": 1,
         "seed": 0, "threads": 1}

#: training recipes of the built-in data sets (others use ``RECIPES["default"]``)
RECIPES: dict[str, dict] = {
    "digits": dict(_BASE),
    "mnist": {**_BASE, "convs": 1, "batch_size": 128, "epochs": 3, "max_shift": 2},
    "default": {**_BASE, "epochs": None, "steps": 2000},
}


class SmallCNN(nn.Module):
    """Stages of ``convs`` conv3x3 + ReLU, the first with ``width`` channels, each next one
    after a 2x max-pool with twice the channels (at most 4 ``width``), until the side is
    <= 4; then flatten -> linear(``features``) -> ReLU -> linear(classes). ``features(x)`` is
    the penultimate linear layer's output (before its ReLU)."""

    def __init__(self, in_channels: int, size: tuple[int, int], num_classes: int,
                 width: int = 16, features: int = 128, convs: int = 1):
        super().__init__()

        def stage(c_in: int, c_out: int) -> list[nn.Module]:
            out: list[nn.Module] = []
            for i in range(convs):
                out += [nn.Conv2d(c_in if i == 0 else c_out, c_out, 3, padding=1), nn.ReLU()]
            return out

        layers = stage(in_channels, width)
        c, (h, w) = width, size
        while min(h, w) > 4:
            c_next = min(2 * c, 4 * width)
            layers += [nn.MaxPool2d(2), *stage(c, c_next)]
            c, h, w = c_next, h // 2, w // 2
        self.body = nn.Sequential(*layers, nn.Flatten())
        self.fc = nn.Linear(c * h * w, features)
        self.head = nn.Linear(features, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.features(x)))


def _shift(x: torch.Tensor, p: int, g: torch.Generator) -> torch.Tensor:
    """Random translation of each image by up to ``p`` pixels, padding with the background -1."""
    if p <= 0:
        return x
    b, _, h, w = x.shape
    xp = F.pad(x, (p, p, p, p), value=-1.0)
    dy = torch.randint(0, 2 * p + 1, (b,), generator=g)
    dx = torch.randint(0, 2 * p + 1, (b,), generator=g)
    rows = (dy[:, None] + torch.arange(h))[:, :, None]
    cols = (dx[:, None] + torch.arange(w))[:, None, :]
    return xp[torch.arange(b)[:, None, None], :, rows, cols].permute(0, 3, 1, 2)


class Classifier:
    """A trained :class:`SmallCNN` and what is known about it (``meta``: recipe, held-out
    accuracy ``test_acc``, training seconds, ...).

    Callable as a feature extractor: ``clf(images) -> (N, features)``. Images are (N, C, H,
    W) in [-1, 1] at any size; they are resized (torch, bilinear) to the size it was trained
    at. ``threads`` (default 1; None: torch's setting) is torch's intra-op thread count while
    it runs: the net is small, and one thread is reproducible and immune to oversubscribed
    machines.
    """

    def __init__(self, net: SmallCNN, input_shape: tuple[int, int, int], meta: dict,
                 threads: int | None = 1):
        self.net = net.eval()
        self.input_shape = tuple(input_shape)
        self.meta = meta
        self.threads = threads

    @property
    def test_acc(self) -> float | None:
        return self.meta.get("test_acc")

    def _run(self, fn, images: torch.Tensor, batch_size: int) -> torch.Tensor:
        x = torch.as_tensor(images)
        if x.ndim != 4 or x.shape[1] != self.input_shape[0]:
            raise UsageError(f"expected images (N, {self.input_shape[0]}, H, W); "
                             f"got {tuple(x.shape)}")
        out = []
        with torch.no_grad(), torch_threads(self.threads):
            for i in range(0, x.shape[0], batch_size):
                xb = resize(x[i:i + batch_size].detach().float().cpu(), self.input_shape[1:])
                out.append(fn(xb))
        return torch.cat(out) if out else torch.empty(0)

    def features(self, images: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
        """Penultimate-layer features (N, D), float32."""
        return self._run(self.net.features, images, batch_size)

    __call__ = features

    def logits(self, images: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
        return self._run(self.net, images, batch_size)

    def predict(self, images: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
        """Predicted classes (N,)."""
        return self.logits(images, batch_size).argmax(1)


def _resolve_recipe(name: str, data: ImageData, recipe: dict | None) -> dict:
    r = dict(recipe if recipe is not None else RECIPES.get(name, RECIPES["default"]))
    if r.get("epochs") is None:
        per_epoch = max(1, len(data) // r["batch_size"])
        r["epochs"] = max(1, math.ceil(r.pop("steps", 2000) / per_epoch))
    r.pop("steps", None)
    return r


def _net(shape, num_classes: int, r: dict) -> SmallCNN:
    return SmallCNN(shape[0], tuple(shape[1:]), num_classes, r["width"], r["features"],
                    r["convs"])


def train_classifier(data: ImageData, recipe: dict | None = None, *,
                     verbose: bool = False) -> Classifier:
    """Train a :class:`SmallCNN` on ``data.train`` / ``data.labels`` (deterministic given the
    recipe's seed; global RNG state is left untouched) and measure its accuracy on the
    held-out split if there is one."""
    if data.labels is None or not data.num_classes:
        raise UsageError(f"data set {data.name!r} has no labels to train a classifier on")
    r = _resolve_recipe(data.name, data, recipe)
    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(r["seed"])
        net = _net(data.shape, data.num_classes, r)
    g = torch.Generator().manual_seed(r["seed"])
    opt = torch.optim.AdamW(net.parameters(), lr=r["lr"], weight_decay=r["weight_decay"])
    steps = r["epochs"] * (len(data) // r["batch_size"])
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: 0.5 * (1 + math.cos(math.pi * min(i, steps) / steps)))
    net.train()
    with torch_threads(r.get("threads")):
        for epoch in range(r["epochs"]):
            total, count = 0.0, 0
            for xb, yb in data.batches(r["batch_size"], g):
                loss = F.cross_entropy(net(_shift(xb, r["max_shift"], g)), yb)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                total, count = total + loss.item(), count + 1
            if verbose:
                print(f"classifier {data.name}: epoch {epoch + 1}/{r['epochs']} "
                      f"loss {total / max(count, 1):.4f}")
    net.eval()
    seconds = time.perf_counter() - t0
    clf = Classifier(net, data.shape, {"recipe": r, "train_seconds": round(seconds, 2),
                                       "data": data.name, "input_shape": list(data.shape),
                                       "num_classes": data.num_classes})
    if data.heldout is not None and data.heldout_labels is not None:
        acc = (clf.predict(data.heldout) == data.heldout_labels).double().mean()
        clf.meta["test_acc"] = float(acc)
    return clf


def _builtin_data(name: str) -> ImageData:
    from ..data import get_dataset

    return get_dataset({"name": name})


def _load_cached(weights: Path, sidecar: Path, key: str) -> Classifier:
    meta = json.loads(sidecar.read_text())
    if meta.get("key") != key:
        raise UsageError("recipe/data hash differs")
    if sha256_file(weights) != meta.get("sha256"):
        raise UsageError("weights checksum differs")
    from safetensors.torch import load_file

    state = load_file(str(weights))
    shape = tuple(meta["input_shape"])
    r = meta["recipe"]
    net = _net(shape, meta["num_classes"], r)
    net.load_state_dict(state, strict=True)
    return Classifier(net, shape, meta)


def get_classifier(data: str | ImageData = "digits", *, cache: str | os.PathLike | None = None,
                   recipe: dict | None = None, retrain: bool = False,
                   verbose: bool = False) -> Classifier:
    """The classifier of a data set, from the cache or freshly trained (and then cached).

    ``data``: a built-in name (``"digits"``, ``"mnist"``: trained on the data set's default
    train split at its native size), or any labelled :class:`ImageData` (trained on it as
    given). ``cache``: folder (default :func:`cache_dir`). A cache entry that does not match
    the recipe and data or fails its checksum is retrained with a warning.
    """
    if isinstance(data, str):
        name, data = data, _builtin_data(data)
    else:
        name = data.name
        if name in ("digits", "mnist") and data.info.get("native_size"):
            data = _builtin_data(name)  # a resized copy: use the native-size classifier
    r = _resolve_recipe(name, data, recipe)
    key = hashlib.sha256(json.dumps({"recipe": r, "data": data.fingerprint()},
                                    sort_keys=True).encode()).hexdigest()
    folder = Path(cache) if cache is not None else cache_dir()
    stem = f"{name}-{'x'.join(map(str, data.shape))}-{key[:16]}"
    weights = folder / "classifiers" / f"{stem}.safetensors"
    sidecar = folder / "classifiers" / f"{stem}.json"
    if not retrain and (weights.exists() or sidecar.exists()):
        try:
            return _load_cached(weights, sidecar, key)
        except Exception as e:  # noqa: BLE001 - any failure means a bad cache entry
            warnings.warn(f"classifier cache {weights} is unusable ({type(e).__name__}: {e}); "
                          f"retraining", stacklevel=2)
    clf = train_classifier(data, r, verbose=verbose)
    meta = copy.deepcopy(clf.meta)
    meta.update(key=key, fingerprint=data.fingerprint())
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous() for k, v in clf.net.state_dict().items()}
    with atomic_write(weights) as tmp:
        save_file(state, str(tmp), metadata={"key": key})
    meta["sha256"] = sha256_file(weights)
    with atomic_write(sidecar) as tmp:
        tmp.write_text(json.dumps(meta, indent=2))
    clf.meta = meta
    return clf
