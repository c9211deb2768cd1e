"""A perceptual distance without downloaded weights.

LPIPS (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features as a Perceptual
Metric", eq. 1) compares images by the unit-normalised activations of a pretrained network,
layer by layer. Its weights cannot be fetched here, so the network is one this project trains
itself: a :class:`~sfumato.metrics.classifier.SmallCNN` classifier of the autoencoder's own
training images (their labels), with a recipe *different* from the evaluation classifier's
(another seed, two convolutions per stage where MNIST's has one: :data:`PERCEPTUAL_RECIPE`), so the
reconstruction loss does not optimise the very feature space the Fréchet distance is measured
in. It is trained once per data set and cached like the evaluation classifiers.

    d(x, y) = sum_l mean_{c,h,w} (f_l(x) / |f_l(x)| - f_l(y) / |f_l(y)|)^2

where f_l are the activations after each ReLU of the classifier's convolutional body and the
norm is over channels. Uniform layer weights: LPIPS learns them from human judgements, which
we do not have.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..data.base import ImageData
from ..errors import ConfigError

__all__ = ["PERCEPTUAL_RECIPE", "PerceptualLoss"]

#: the feature net's recipe (sfumato.metrics.classifier): unlike the evaluation classifiers
PERCEPTUAL_RECIPE = {"version": 1, "width": 16, "convs": 2, "features": 128, "batch_size": 64,
                     "lr": 2e-3, "weight_decay": 1e-4, "epochs": None, "steps": 1500,
                     "max_shift": 1, "seed": 1, "threads": None}


class PerceptualLoss(nn.Module):
    """``loss(x, y) -> (B,)``: the distance above between images x and y (B, C, H, W) in
    [-1, 1], differentiable in both, through a frozen feature net. Images of another size are
    resized (bilinear) to the size the net was trained at."""

    def __init__(self, body: nn.Sequential, size: tuple[int, int]) -> None:
        super().__init__()
        self.body = body.eval().requires_grad_(False)
        self.size = tuple(size)

    @classmethod
    def for_data(cls, data: ImageData, cache: str | None = None) -> PerceptualLoss:
        """The perceptual loss of a labelled image data set (trained and cached once)."""
        from ..metrics.classifier import get_classifier

        if data.labels is None or not data.num_classes:
            raise ConfigError(f"the perceptual loss uses a classifier of the data set's labels; "
                              f"{data.name!r} has none: set reconstruction.perceptual 0")
        clf = get_classifier(data, cache=cache, recipe=PERCEPTUAL_RECIPE)
        return cls(clf.net.body, clf.input_shape[1:])

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        if tuple(x.shape[-2:]) != self.size:
            x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False)
        out = []
        for layer in self.body:
            x = layer(x)
            if isinstance(layer, nn.ReLU):
                out.append(x / (x.pow(2).sum(1, keepdim=True).sqrt() + 1e-8))
        return out

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        fx, fy = self.features(x.float()), self.features(y.float())
        return sum((a - b).pow(2).mean((1, 2, 3)) for a, b in zip(fx, fy, strict=True))
