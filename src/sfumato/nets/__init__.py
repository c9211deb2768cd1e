"""Networks: raw denoiser backbones called as ``net(x_in, c_noise, class_labels=None,
context=None) -> y`` (y has x_in's shape), to be wrapped by :class:`sfumato.denoiser.Denoiser`.

- :class:`MLP` (``"mlp"``): residual MLP for vectors (B, D).
- :class:`UNet` (``"unet"``): ADM-style U-Net for images (B, C, H, W).
- :class:`DiT` (``"dit"``): Diffusion Transformer with adaLN-Zero.
- :class:`DiffusersUNet` (``"diffusers_unet"``): diffusers' UNet2DModel behind the same
  signature (optional dependency).
- :class:`ControlledUNet` (``"controlnet"``): a frozen base U-Net steered by a trainable
  ControlNet from a spatial hint (``hint`` conditioning kwarg).
- :class:`EncoderClassifier` (``"classifier"``): a noise-conditional classifier
  ``net(x_in, c_noise) -> logits`` for classifier guidance (objective target "classifier").
- :class:`TextConditioned` (``"text_conditioned"``): a UNet/DiT with context_dim plus its own
  trainable :class:`~sfumato.text.TinyTextEncoder`, taking ``text_ids``/``text_mask``.
- :class:`ImageConditioned` (``"image_conditioned"``): a UNet/DiT taking an input image
  (``image`` kwarg) as extra channels (InstructPix2Pix).
- :class:`Autoencoder` (``"autoencoder"``): a KL or VQ image autoencoder for latent diffusion
  (not a denoiser: ``encode``/``decode``; objective target "autoencoder"), trained against a
  :class:`PatchDiscriminator`.

``build_net({"type": "unet", "image_size": 8, "in_channels": 1, ...})`` builds one from a
config dict (as stored in a JSON checkpoint config); :func:`count_params` counts parameters.
Conditioning common to all: ``class_labels`` (B,) with index ``num_classes`` the null class,
``extra_embedding`` (B, emb_dim) added to the conditioning vector. Text: UNet and DiT built
with ``context_dim`` take ``context`` (B, L, context_dim) token states and ``context_mask``
(B, L) bool (True = real token) through cross-attention and a pooled embedding, and read
``context=None`` (or an all-False mask row) as the learned null text, for classifier-free
guidance (see :mod:`sfumato.nets.context`). Networks built without ``context_dim``, the MLP and
DiffusersUNet refuse ``context`` with a ValueError rather than ignoring it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from ..errors import ConfigError, did_you_mean
from ._common import check_kwargs, split_base
from .autoencoder import Autoencoder, PatchDiscriminator
from .classifier import EncoderClassifier
from .controlnet import ControlledUNet, ControlNet
from .diffusers_adapter import DiffusersUNet
from .dit import DiT
from .embedding import ConditionEmbedding, FourierEmbedding, NoiseEmbedding, PositionalEmbedding
from .guidance_embedded import GuidanceEmbedded
from .image_conditioned import ImageConditioned, build_image_conditioned
from .mlp import MLP
from .text import TextConditioned
from .unet import UNet

__all__ = [
    "NETS",
    "build_net",
    "count_params",
    "MLP",
    "UNet",
    "DiT",
    "DiffusersUNet",
    "EncoderClassifier",
    "ControlNet",
    "ControlledUNet",
    "TextConditioned",
    "ImageConditioned",
    "Autoencoder",
    "PatchDiscriminator",
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
    "classifier": EncoderClassifier,
    "text_conditioned": TextConditioned,
    "autoencoder": Autoencoder,
}


def build_net(cfg: Mapping[str, Any]) -> nn.Module:
    """Build a network from ``{"type": name, **constructor kwargs}`` (cfg is not modified).

    Raises ValueError for a missing or unknown type (listing the known ones) and for any key
    the constructor does not take (naming it, suggesting the closest valid key, listing all).
    """
    if "type" not in cfg:
        raise ConfigError(f"net config needs a 'type', one of {sorted(NETS)}; got keys "
                          f"{sorted(cfg)}")
    kind = cfg["type"]
    if kind not in NETS and kind not in WRAPPERS:
        raise ConfigError(f"unknown net type {kind!r}{did_you_mean(kind, NETS)}; choose one of "
                          f"{sorted(NETS)}")
    kwargs = {k: v for k, v in cfg.items() if k != "type"}
    if kind in WRAPPERS:
        return WRAPPERS[kind](kwargs)
    cls = NETS[kind]
    check_kwargs(f"{kind!r} net config", cls.__init__, kwargs)
    return cls(**kwargs)


def _build_controlled(kwargs: dict[str, Any]) -> nn.Module:
    """``{"type": "controlnet", "base": {base U-Net config}, "hint": name, "hint_channels",
    "hint_embed_channels"}`` -> a :class:`ControlledUNet` (``hint`` names the hint the data
    pipeline makes; the network ignores it)."""
    kw = dict(kwargs)
    base_cfg = kw.pop("base", None)
    kw.pop("hint", None)
    kw.pop("num_classes", None)  # the base's, already in its config
    if not isinstance(base_cfg, Mapping):
        raise ConfigError("a 'controlnet' net config needs 'base': the base U-Net's config (the "
                          "trainer fills it in from the base run directory named there)")
    check_kwargs("'controlnet' net config", ControlNet.__init__, kw,
                 skip=("self", "base"))
    return ControlledUNet(build_net(base_cfg), **kw)


def _build_guidance_embedded(kwargs: dict[str, Any]) -> nn.Module:
    """``{"type": "guidance_embedded", "base": {network config}, "features": 32}`` -> a
    :class:`GuidanceEmbedded` (``num_classes``, as :func:`sfumato.run.network_config` adds it,
    goes to the base)."""
    base_cfg, kw = split_base(kwargs, "guidance_embedded")
    check_kwargs("'guidance_embedded' net config", GuidanceEmbedded.__init__, kw,
                 skip=("self", "base"))
    return GuidanceEmbedded(build_net(base_cfg), **kw)


#: networks built around another one given as ``base``
WRAPPERS = {"controlnet": _build_controlled, "guidance_embedded": _build_guidance_embedded,
            "image_conditioned": build_image_conditioned}


def count_params(net: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters of ``net`` (only those with requires_grad if trainable_only)."""
    return sum(p.numel() for p in net.parameters() if p.requires_grad or not trainable_only)
