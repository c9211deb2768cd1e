"""A network conditioned on an input image by channel concatenation (InstructPix2Pix, Brooks et
al. 2023, §3.2: the input image's latent is concatenated to the noisy latent as extra input
channels; also SR3's low-resolution conditioning, Saharia et al. 2022).

``ImageConditioned(base)`` wraps a network built with ``in_channels = 2 C`` and
``out_channels = C``: ``forward(x, c_noise, class_labels=None, *, image=None, **kw)`` runs
``base(cat([x, image], dim=1), c_noise, class_labels, **kw)``. The image enters as it is (not
scaled with the noisy input by the preconditioning's c_in). ``image=None`` is the null image,
all zeros (the paper drops the image conditioning by zeroing it), so classifier-free guidance
over the image passes ``image=None`` (or zeros) in its unconditional branch and a trainer
drops it by zeroing rows.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..errors import UsageError
from ._common import split_base

__all__ = ["ImageConditioned"]


class ImageConditioned(nn.Module):
    """``base`` (a UNet/DiT with 2C input and C output channels) taking ``image`` (B, C, H, W)
    as extra input channels; shapes: x (B, C, H, W) -> (B, C, H, W)."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = base
        self.channels = int(getattr(base, "out_channels", 0) or 0)
        in_ch = int(getattr(base, "in_channels", 0) or 0)
        if not self.channels or in_ch != 2 * self.channels:
            raise UsageError(f"an image-conditioned network needs a base with in_channels = 2 x "
                             f"out_channels (noisy image + input image); got {in_ch} -> "
                             f"{self.channels}")
        self.emb_dim = getattr(base, "emb_dim", None)
        self.context_dim = getattr(base, "context_dim", None)

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor | float,
                class_labels: torch.Tensor | None = None, *, image: torch.Tensor | None = None,
                **kwargs: Any) -> torch.Tensor:
        if image is None:
            image = torch.zeros_like(x)
        elif image.shape != x.shape:
            if image.ndim == x.ndim and image.shape[0] == 1 and image.shape[1:] == x.shape[1:]:
                image = image.expand_as(x)
            else:
                raise UsageError(f"image must have the images' shape {tuple(x.shape)}; got "
                                 f"{tuple(image.shape)}")
        return self.base(torch.cat([x, image.to(x.dtype)], dim=1), c_noise, class_labels,
                         **kwargs)


def build_image_conditioned(kwargs: Mapping[str, Any]) -> nn.Module:
    """``{"type": "image_conditioned", "base": {network config with in_channels = C}}`` ->
    :class:`ImageConditioned` around the base built with 2C in and C out channels
    (``num_classes``, as :func:`sfumato.run.network_config` adds it, goes to the base)."""
    from . import build_net

    base_cfg, kw = split_base(kwargs, "image_conditioned")
    if "in_channels" not in base_cfg:
        raise UsageError("an 'image_conditioned' net config's base needs in_channels (the "
                         "data's channels)")
    if kw:
        raise UsageError(f"unknown 'image_conditioned' net config keys {sorted(kw)}: it takes "
                         "only 'base'")
    c = int(base_cfg["in_channels"])
    return ImageConditioned(build_net({**base_cfg, "in_channels": 2 * c, "out_channels": c}))
