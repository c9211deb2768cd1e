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

Super-resolution with noise-conditioning augmentation (Ho et al. 2022, §3): built with
``aug_level=True`` the wrapper also takes ``aug_sigma`` (B,) or a float, the level of the
Gaussian noise added to the input image (:mod:`sfumato.lowres`), embeds it with sinusoidal
features of ``AUG_SCALE * aug_sigma`` and an MLP whose last layer starts at zero, and adds it
to the base network's conditioning vector (``extra_embedding``), as the time embedding is
(their §3: the model is conditioned on the augmentation level). A fresh wrapper therefore
ignores the level until trained. Without ``aug_level`` (the default, and every instruct run)
there are no extra parameters and ``aug_sigma`` is refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..errors import UsageError
from ._common import check_kwargs, split_base, zero_
from .embedding import PositionalEmbedding, as_batch

__all__ = ["ImageConditioned", "AUG_SCALE"]

#: the augmentation level enters the sinusoidal features as ``AUG_SCALE * aug_sigma``: levels
#: in [0, 1] then span the features' periods as DDPM's timesteps 0..1000 do
AUG_SCALE = 1000.0


class ImageConditioned(nn.Module):
    """``base`` (a UNet/DiT with 2C input and C output channels) taking ``image`` (B, C, H, W)
    as extra input channels; shapes: x (B, C, H, W) -> (B, C, H, W). ``aug_level``: also take
    the input image's noise level ``aug_sigma`` (B,) (see the module docstring), embedded with
    ``aug_features`` sinusoidal features."""

    def __init__(self, base: nn.Module, aug_level: bool = False, aug_features: int = 32
                 ) -> None:
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
        self.aug_level = bool(aug_level)
        if self.aug_level:
            if not self.emb_dim:
                raise UsageError(f"aug_level needs a base network with a conditioning "
                                 f"embedding (emb_dim); got {type(base).__name__}")
            self.aug_features = PositionalEmbedding(aug_features, max_period=AUG_SCALE)
            self.aug_mlp = nn.Sequential(nn.Linear(aug_features, self.emb_dim), nn.SiLU(),
                                         zero_(nn.Linear(self.emb_dim, self.emb_dim)))

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor | float,
                class_labels: torch.Tensor | None = None, *, image: torch.Tensor | None = None,
                aug_sigma: torch.Tensor | float | None = None, **kwargs: Any) -> torch.Tensor:
        if self.aug_level:  # None: level 0, the clean input image
            s = as_batch(0.0 if aug_sigma is None else aug_sigma, x.shape[0], x.device)
            e = self.aug_mlp(self.aug_features(AUG_SCALE * s).to(self.aug_mlp[0].weight.dtype))
            if kwargs.get("extra_embedding") is not None:
                e = e + kwargs.pop("extra_embedding")
            kwargs["extra_embedding"] = e
        elif aug_sigma is not None:
            raise UsageError("aug_sigma given, but this network was built without aug_level "
                             "(model.aug_level true): it cannot be told the input's noise level")
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
    """``{"type": "image_conditioned", "base": {network config with in_channels = C},
    "aug_level": false, "aug_features": 32}`` -> :class:`ImageConditioned` around the base
    built with 2C in and C out channels (``num_classes``, as
    :func:`sfumato.run.network_config` adds it, goes to the base)."""
    from . import build_net

    base_cfg, kw = split_base(kwargs, "image_conditioned")
    if "in_channels" not in base_cfg:
        raise UsageError("an 'image_conditioned' net config's base needs in_channels (the "
                         "data's channels)")
    check_kwargs("'image_conditioned' net config", ImageConditioned.__init__, kw,
                 skip=("self", "base"))
    c = int(base_cfg["in_channels"])
    return ImageConditioned(build_net({**base_cfg, "in_channels": 2 * c, "out_channels": c}),
                            **kw)
