"""ControlNet (Zhang, Rao & Agrawala 2023, "Adding Conditional Control to Text-to-Image
Diffusion Models"): spatial control of a frozen :class:`~sfumato.nets.unet.UNet`.

A locked network block ``y = F(x; Θ)`` (eq. 1) becomes (eq. 2, Fig. 3)::

    y_c = F(x; Θ) + Z(F(x + Z(c; Θ_z1); Θ_c); Θ_z2)

- ``F(·; Θ_c)`` is a *trainable copy* of the base's encoder half (conditioning embedding,
  ``conv_in``, encoder stages, middle block), weights copied from the base;
- ``c`` is the hint (an edge map, a coarse mask, ...; see :mod:`sfumato.control`) at the input
  resolution, turned into a feature map ``c_f = E(c)`` (eq. 3) by a small conv stack
  (:class:`HintEncoder`) whose last conv is zero-initialised (``Z(c; Θ_z1)``) and whose output
  is added to the copy's ``conv_in`` features;
- ``Z(·; Θ_z2)`` are zero-initialised 1x1 convs, one per skip feature of the encoder and one
  for the middle block's output. Their outputs are added to the frozen base's skip features
  and middle output (``UNet.forward(..., down_residuals=, mid_residual=)``).

Every connection to the base starts at zero, so at initialisation the controlled network *is*
the base network, exactly, and the first gradient steps cannot damage it. Only the ControlNet
is trained, on the base's own denoising loss (eq. 4) with the hint as extra conditioning.

:class:`ControlledUNet` is the frozen base plus a ControlNet behind the raw-network signature
``net(x_in, c_noise, hint=None, class_labels=None, ...)``, so it drops into
:class:`sfumato.denoiser.Denoiser` (the hint arrives through ``**cond``; unlike x it is not
scaled by ``c_in``).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UsageError
from ._common import zero_
from .context import prepare_context
from .unet import UNet, encoder_features, fold_input

__all__ = ["ControlNet", "ControlledUNet", "HintEncoder"]


class HintEncoder(nn.Module):
    """The hint's feature map ``c_f = E(c)`` (eq. 3): (B, hint_channels, H, W) ->
    (B, out_channels, H/p, W/p), with p the base U-Net's ``patch_size``.

    ``conv3x3(hint_channels -> e_0)``, SiLU at the input resolution (thin edges are seen at full
    resolution), then the same space-to-depth fold as the U-Net's input (``pixel_unshuffle`` by
    p: e_0 p^2 channels at H/p), then ``conv3x3(e_{i-1} -> e_i)``, SiLU for the remaining
    widths of ``embed_channels = (e_0, e_1, ...)``, and a zero-initialised
    ``conv3x3(e_last -> out_channels)`` (the zero convolution ``Z(c; Θ_z1)`` of eq. 2).
    """

    def __init__(self, hint_channels: int, out_channels: int,
                 embed_channels: Sequence[int] = (16, 32), patch_size: int = 1) -> None:
        super().__init__()
        widths = [int(c) for c in embed_channels]
        if not widths or min(widths) < 1 or hint_channels < 1:
            raise UsageError(f"hint_channels must be >= 1 and hint_embed_channels a non-empty "
                             f"sequence of positive widths; got {hint_channels}, "
                             f"{tuple(embed_channels)}")
        self.patch_size = patch_size
        self.conv_first = nn.Conv2d(hint_channels, widths[0], 3, padding=1)
        ins = [widths[0] * patch_size**2] + widths[1:]  # input widths after the fold
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 3, padding=1)
                                   for a, b in zip(ins[:-1], widths[1:], strict=True))
        self.conv_out = zero_(nn.Conv2d(ins[-1], out_channels, 3, padding=1))

    def forward(self, hint: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.conv_first(hint))
        if self.patch_size > 1:
            h = F.pixel_unshuffle(h, self.patch_size)
        for conv in self.convs:
            h = F.silu(conv(h))
        return self.conv_out(h)


def _out_channels(stage: nn.Module) -> int:
    """Channels a U-Net stage (or block list) outputs: those of its last Conv2d (a ResBlock's
    skip/conv2 or a Downsample's conv; attention blocks keep the channel count)."""
    convs = [m for m in stage.modules() if isinstance(m, nn.Conv2d)]
    return convs[-1].out_channels


class ControlNet(nn.Module):
    """Trainable encoder copy of a :class:`~sfumato.nets.unet.UNet` conditioned on a hint image;
    build it with :meth:`from_unet`.

    ``forward(x_in, c_noise, hint, ...) -> (down_residuals, mid_residual)``, the inputs of
    ``UNet.forward(..., down_residuals=, mid_residual=)``: ``len(base.down) + 1`` tensors
    shaped like the base's skip features, and one shaped like its middle output. All zero at
    initialisation.

    Attributes copied from the base (trainable, weights equal to the base's at construction):
    ``cond``, ``context_embed`` (None unless the base has ``context_dim``), ``conv_in``,
    ``down``, ``mid``. New: ``hint_encoder`` (:class:`HintEncoder`),
    ``zero_convs`` (1x1, one per skip feature), ``mid_zero_conv`` (1x1).

    The state_dict holds only these; :attr:`config` with the base rebuilds the module:
    ``ControlNet.from_unet(base, **config).load_state_dict(sd)``.
    """

    def __init__(self, base: UNet, hint_channels: int = 1,
                 hint_embed_channels: Sequence[int] = (16, 32)) -> None:
        super().__init__()
        if not isinstance(base, UNet):
            inner = getattr(base, "net", None)
            tip = (" (it wraps one: pass its .net)" if isinstance(inner, UNet) else "")
            raise TypeError(f"ControlNet needs a sfumato UNet (sfumato.nets.UNet) as its base; "
                            f"got {type(base).__name__}{tip}")
        self.hint_channels = int(hint_channels)
        self.hint_embed_channels = tuple(int(c) for c in hint_embed_channels)
        self.in_channels, self.patch_size, self.factor = (base.in_channels, base.patch_size,
                                                          base.factor)
        # F(.; Θ_c): the trainable copy (eq. 2), starting from the base's weights
        self.cond = copy.deepcopy(base.cond)
        self.context_embed = copy.deepcopy(base.context_embed)  # None without context_dim
        self.conv_in = copy.deepcopy(base.conv_in)
        self.down = copy.deepcopy(base.down)
        self.mid = copy.deepcopy(base.mid)
        self.requires_grad_(True)  # the copy is trainable even when the base is frozen
        # E(c) ending in Z(c; Θ_z1) (eq. 2-3), and the output zero convs Z(.; Θ_z2)
        self.hint_encoder = HintEncoder(self.hint_channels, base.conv_in.out_channels,
                                        self.hint_embed_channels, base.patch_size)
        skips = [base.conv_in.out_channels] + [_out_channels(s) for s in base.down]
        self.zero_convs = nn.ModuleList(zero_(nn.Conv2d(c, c, 1)) for c in skips)
        c_mid = _out_channels(base.mid)
        self.mid_zero_conv = zero_(nn.Conv2d(c_mid, c_mid, 1))
        w = base.conv_in.weight
        for m in (self.hint_encoder, self.zero_convs, self.mid_zero_conv):
            m.to(w.device, w.dtype)

    @classmethod
    def from_unet(cls, base: UNet, hint_channels: int = 1,
                  hint_embed_channels: Sequence[int] = (16, 32)) -> ControlNet:
        """A ControlNet for ``base``: copies of its encoder half plus a hint encoder for hints
        of ``hint_channels`` channels (widths ``hint_embed_channels``) and the zero convs.
        TypeError when ``base`` is not a :class:`~sfumato.nets.unet.UNet`."""
        return cls(base, hint_channels, hint_embed_channels)

    @property
    def config(self) -> dict[str, Any]:
        """JSON-able constructor arguments besides the base (``hint_channels``,
        ``hint_embed_channels``)."""
        return {"hint_channels": self.hint_channels,
                "hint_embed_channels": list(self.hint_embed_channels)}

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor | float, hint: torch.Tensor,
                class_labels: torch.Tensor | None = None, context: torch.Tensor | None = None,
                extra_embedding: torch.Tensor | None = None, *,
                context_mask: torch.Tensor | None = None, conditioning_scale: float = 1.0,
                ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """x (B, in_channels, H, W) (the base's input, ``c_in * x`` under a Denoiser), hint
        (B or 1, hint_channels, H, W) -> (down_residuals, mid_residual), each scaled by
        ``conditioning_scale``. The other arguments are the base's conditioning (class labels,
        text ``context`` / ``context_mask``, ...), passed the same way as to the base."""
        B, (H, W) = len(x), x.shape[-2:]
        if (hint.ndim != 4 or hint.shape[0] not in (1, B)
                or tuple(hint.shape[1:]) != (self.hint_channels, H, W)):
            raise UsageError(f"hint must have shape (B, {self.hint_channels}, H, W) = "
                             f"({B}, {self.hint_channels}, {H}, {W}) (or a leading 1) for x of "
                             f"shape {tuple(x.shape)}; got {tuple(hint.shape)}")
        emb = self.cond(c_noise, B, x.device, class_labels, extra_embedding)
        emb, ctx = prepare_context(self.context_embed, "ControlNet (its base UNet)", emb,
                                   context, context_mask)
        h = self.conv_in(fold_input(x, self.in_channels, self.patch_size, self.factor))
        h = h + self.hint_encoder(hint.to(h.dtype))  # x + Z(c; Θ_z1), eq. (2)-(3)
        hs, h_mid = encoder_features(self.down, self.mid, h, emb, ctx)
        down = [z(f) for z, f in zip(self.zero_convs, hs, strict=True)]  # Z(.; Θ_z2)
        mid = self.mid_zero_conv(h_mid)
        if conditioning_scale != 1.0:
            down = [conditioning_scale * d for d in down]
            mid = conditioning_scale * mid
        return down, mid


class ControlledUNet(nn.Module):
    """A frozen base :class:`~sfumato.nets.unet.UNet` steered by a trainable
    :class:`ControlNet`: a raw network ``net(x_in, c_noise, hint=None, control_scale=1.0,
    class_labels=None, **kw) -> y`` for :class:`sfumato.denoiser.Denoiser`.

    ``hint=None`` runs the base alone (exactly). Otherwise the ControlNet's residuals, times
    ``control_scale``, are added to the base's skip features and middle output (eq. 2). Other
    keyword arguments (``context``, ``context_mask``, ``extra_embedding``) go to both
    networks.

    Args:
        base: the pretrained U-Net; frozen here (``requires_grad_(False)``), in place.
        controlnet: an existing ControlNet for ``base`` (e.g. loaded from a checkpoint), or None
            to make a fresh one from ``controlnet_config``.
        **controlnet_config: ``hint_channels``, ``hint_embed_channels`` (see
            :meth:`ControlNet.from_unet`).

    Shapes: x (B, C, H, W), c_noise scalar or (B,), hint (B, hint_channels, H, W) in the
    image range [-1, 1] (not scaled by the Denoiser's c_in). Returns (B, C_out, H, W).
    """

    def __init__(self, base: UNet, controlnet: ControlNet | None = None,
                 **controlnet_config: Any) -> None:
        super().__init__()
        if controlnet is not None and controlnet_config:
            raise UsageError("pass either a controlnet or its config, not both")
        self.controlnet = (controlnet if controlnet is not None
                           else ControlNet.from_unet(base, **controlnet_config))
        self.base = base.requires_grad_(False)

    @property
    def controlnet_config(self) -> dict[str, Any]:
        """JSON-able config that, with the base, rebuilds the ControlNet (see
        :attr:`ControlNet.config`)."""
        return self.controlnet.config

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The ControlNet's parameters, the only ones to optimise."""
        return list(self.controlnet.parameters())

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor | float,
                hint: torch.Tensor | None = None, control_scale: float = 1.0,
                class_labels: torch.Tensor | None = None, **kw: Any) -> torch.Tensor:
        if hint is None:
            return self.base(x, c_noise, class_labels=class_labels, **kw)
        down, mid = self.controlnet(x, c_noise, hint, class_labels=class_labels,
                                    conditioning_scale=control_scale, **kw)
        return self.base(x, c_noise, class_labels=class_labels, down_residuals=down,
                         mid_residual=mid, **kw)
