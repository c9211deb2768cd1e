"""Networks: raw denoiser backbones called as ``net(x_in, c_noise, class_labels=None,
context=None) -> y`` (y has x_in's shape), to be wrapped by :class:`sfumato.denoiser.Denoiser`.

- :class:`MLP` (``"mlp"``): residual MLP for vectors (B, D).
- :class:`UNet` (``"unet"``): ADM-style U-Net for images (B, C, H, W).
- :class:`DiT` (``"dit"``): Diffusion Transformer with adaLN-Zero.
- :class:`DiffusersUNet` (``"diffusers_unet"``): diffusers' UNet2DModel behind the same
  signature (optional dependency).

``build_net({"type": "unet", "image_size": 8, "in_channels": 1, ...})`` builds one from a
config dict (as stored in a JSON checkpoint config); :func:`count_params` counts parameters.
Conditioning common to all: ``class_labels`` (B,) with index ``num_classes`` the null class,
``extra_embedding`` (B, emb_dim) added to the conditioning vector, ``context`` reserved for
cross-attention (refused until a network supports it).
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any

from torch import nn

from ._common import check_kwargs
from .diffusers_adapter import DiffusersUNet
from .dit import DiT
from .embedding import ConditionEmbedding, FourierEmbedding, NoiseEmbedding, PositionalEmbedding
from .mlp import MLP
from .unet import UNet

__all__ = [
    "NETS",
    "build_net",
    "count_params",
    "MLP",
    "UNet",
    "DiT",
    "DiffusersUNet",
    "ConditionEmbedding",
    "NoiseEmbedding",
    "PositionalEmbedding",
    "FourierEmbedding",
]

NETS: dict[str, type[nn.Module]] = {
    "mlp": MLP,
    "unet": UNet,
    "dit": DiT,
    "diffusers_unet": DiffusersUNet,
}


def build_net(cfg: Mapping[str, Any]) -> nn.Module:
    """Build a network from ``{"type": name, **constructor kwargs}`` (cfg is not modified).

    Raises ValueError for a missing or unknown type (listing the known ones) and for any key
    the constructor does not take (naming it, suggesting the closest valid key, listing all).
    """
    if "type" not in cfg:
        raise ValueError(f"net config needs a 'type', one of {sorted(NETS)}; got keys "
                         f"{sorted(cfg)}")
    kind = cfg["type"]
    if kind not in NETS:
        close = difflib.get_close_matches(str(kind), list(NETS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown net type {kind!r}{hint}; choose one of {sorted(NETS)}")
    cls = NETS[kind]
    kwargs = {k: v for k, v in cfg.items() if k != "type"}
    check_kwargs(f"{kind!r} net config", cls.__init__, kwargs)
    return cls(**kwargs)


def count_params(net: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters of ``net`` (only those with requires_grad if trainable_only)."""
    return sum(p.numel() for p in net.parameters() if p.requires_grad or not trainable_only)
