"""ADM-style U-Net (Dhariwal & Nichol 2021, "Diffusion Models Beat GANs on Image Synthesis").

Layout (``L = len(channel_mult)`` levels, level ``i`` has ``model_channels * channel_mult[i]``
channels and resolution ``image_size / patch_size / 2**i``)::

    conv_in
    encoder: per level, num_res_blocks x [ResBlock (+ Attention)], then Downsample (not last)
    middle:  ResBlock, Attention, ResBlock
    decoder: per level (reversed), (num_res_blocks + 1) x [concat skip, ResBlock
             (+ Attention)], then Upsample (not first)
    GroupNorm, SiLU, conv_out (zero-initialised)

With ``patch_size`` p > 1 the image is first folded into p x p patches (space-to-depth,
``pixel_unshuffle``: (C, H, W) -> (C p^2, H/p, W/p)) and unfolded at the end, so the whole
U-Net runs at 1/p the resolution: about p^2 times cheaper (the "avoid high-resolution feature
maps" advice of Hoogeboom et al. 2023, "simple diffusion"). Useful on CPU for 28x28 MNIST
(p = 2: a 14x14 U-Net, measured 3.5x the training throughput of the unpatched one).

Residual blocks use adaptive GroupNorm (ADM's ``use_scale_shift_norm``): the second norm is
modulated per sample by ``(1 + scale, shift)`` projected from the conditioning embedding. The
last conv of every residual branch, the output projection of every attention block and
``conv_out`` start at zero, so a fresh network is the zero function and every residual block
starts as the identity.

Every block has the signature ``block(h, emb, context=None)``. With ``context_dim`` set the
network takes text (``context`` (B, L, context_dim), ``context_mask`` (B, L)): every attention
block (at ``attention_resolutions`` and in the middle) follows its self-attention with
cross-attention to the text tokens, as the transformer blocks of Stable Diffusion (Rombach et
al. 2022, LDM §3.3) and Imagen's U-Net (Saharia et al. 2022), and the mean text token is added
to the conditioning embedding; the blocks then receive the prepared
:class:`~sfumato.nets.context.Context` (see that module: learned null token, masks).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UsageError
from ._common import check_heads, zero_
from .context import Context, ContextEmbedding, CrossAttention, prepare_context, require_context
from .embedding import ConditionEmbedding

__all__ = ["UNet", "ResBlock", "AttentionBlock", "Downsample", "Upsample"]


class ResBlock(nn.Module):
    """Residual block (B, C_in, H, W) -> (B, C_out, H, W) conditioned on emb (B, E).

    ``GN-SiLU-conv3x3``, then the embedding enters: with ``scale_shift`` (ADM default)
    ``GN(h) * (1 + scale) + shift``, otherwise ``GN(h + proj(emb))``; then
    ``SiLU-dropout-conv3x3`` (zero-initialised). The skip is the identity, or a 1x1 conv when
    the channel count changes.
    """

    def __init__(self, in_channels: int, out_channels: int, emb_dim: int, dropout: float = 0.0,
                 norm_groups: int = 32, scale_shift: bool = True, eps: float = 1e-5) -> None:
        super().__init__()
        self.scale_shift = scale_shift
        self.norm1 = nn.GroupNorm(norm_groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, out_channels * (2 if scale_shift else 1))
        self.norm2 = nn.GroupNorm(norm_groups, out_channels, eps=eps)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = zero_(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip = (nn.Identity() if in_channels == out_channels
                     else nn.Conv2d(in_channels, out_channels, 1))

    def forward(self, x: torch.Tensor, emb: torch.Tensor,
                context: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        e = self.emb_proj(F.silu(emb))
        n2 = self.norm2
        if self.scale_shift:
            # GN affine and the (1 + scale, shift) modulation folded into one per-sample affine
            # map: GN_hat(h) * w (1 + scale) + (b (1 + scale) + shift).
            scale, shift = e.chunk(2, dim=1)
            scale = 1 + scale
            w = (n2.weight * scale)[:, :, None, None]
            b = torch.addcmul(shift, n2.bias, scale)[:, :, None, None]
            h = torch.addcmul(b, F.group_norm(h, n2.num_groups, eps=n2.eps), w)
        else:
            h = n2(h + e[:, :, None, None])
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the H*W positions, residual: (B, C, H, W) -> same.

    GroupNorm, a linear qkv projection of each position, ``F.scaled_dot_product_attention``,
    a zero-initialised linear output projection. With ``context_dim`` a
    :class:`~sfumato.nets.context.CrossAttention` from the positions to the prepared
    ``context`` (a :class:`~sfumato.nets.context.Context`, required then) follows, also
    residual and zero-initialised; without it ``context`` is ignored.
    """

    def __init__(self, channels: int, num_heads: int, norm_groups: int = 32,
                 eps: float = 1e-5, context_dim: int | None = None) -> None:
        super().__init__()
        check_heads(channels, num_heads, "attention channels")
        self.num_heads = num_heads
        self.norm = nn.GroupNorm(norm_groups, channels, eps=eps)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = zero_(nn.Linear(channels, channels))
        self.cross = (CrossAttention(channels, context_dim, num_heads) if context_dim
                      else None)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None,
                context: Context | None = None) -> torch.Tensor:
        B, C, H, W = x.shape
        L, nh = H * W, self.num_heads
        tokens = self.norm(x).permute(0, 2, 3, 1).reshape(B, L, C)
        q, k, v = self.qkv(tokens).reshape(B, L, 3, nh, C // nh).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v)  # (B, nh, L, C/nh)
        a = self.proj(a.transpose(1, 2).reshape(B, L, C))
        if self.cross is not None:
            t = x.permute(0, 2, 3, 1).reshape(B, L, C) + a
            a = a + self.cross(t, require_context(context, "attention block"))
        return x + a.reshape(B, H, W, C).permute(0, 3, 1, 2)


class Downsample(nn.Module):
    """Stride-2 3x3 conv: (B, C, H, W) -> (B, C, H/2, W/2); H and W must be even."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None,
                context: torch.Tensor | None = None) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest x2 then 3x3 conv: (B, C, H, W) -> (B, C, 2H, 2W)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None,
                context: torch.Tensor | None = None) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UNet(nn.Module):
    """ADM U-Net: ``forward(x, c_noise, class_labels=None, context=None) -> y``, y like x.

    Args:
        image_size: spatial size the network is built for (int, square). It places attention
            (``attention_resolutions``) and must be divisible by
            ``patch_size * 2**(len(channel_mult)-1)``: 28 with three levels is 28 -> 14 -> 7.
            Other input sizes are accepted at forward when they divide the same way
            (attention stays at the same levels).
        in_channels: channels of x.
        out_channels: channels of y (default: in_channels).
        model_channels: width of the first level; level i has ``model_channels *
            channel_mult[i]``.
        channel_mult: per-level width multipliers; its length is the number of levels.
        num_res_blocks: residual blocks per level in the encoder (the decoder has one more).
        attention_resolutions: feature-map sizes (e.g. ``(16, 8)`` for a 32x32 image) at
            which self-attention follows each residual block; must be level sizes
            ``image_size // patch_size // 2**i``.
        num_heads: attention heads (used when ``num_head_channels`` is None).
        num_head_channels: channels per head; overrides ``num_heads`` when set.
        dropout: dropout inside residual blocks.
        scale_shift_norm: adaptive GroupNorm (ADM's use_scale_shift_norm); False adds the
            embedding to the features instead.
        mid_attention: self-attention in the middle block.
        norm_groups: GroupNorm groups; must divide every level's width.
        emb_dim: conditioning width (default ``4 * model_channels``).
        embedding: noise embedding, ``"positional"`` (DDPM/ADM) or ``"fourier"`` (NCSN++/EDM).
        fourier_scale, max_period: parameters of the noise embedding.
        num_classes: class-conditional when set; label ``num_classes`` is the null class and
            ``class_labels=None`` means null (see :class:`~.embedding.ConditionEmbedding`).
        patch_size: fold p x p patches into channels before the first conv (see above).
        context_dim: width of text token states; when set, cross-attention in every attention
            block and pooled text in the conditioning embedding (see the module docstring);
            needs at least one attention block. None refuses ``context``.

    Shapes: x (B, in_channels, H, W), c_noise scalar or (B,), class_labels (B,) long,
    extra_embedding (B, emb_dim) added to the conditioning vector, context
    (B or 1, L, context_dim) and context_mask (B or 1, L) bool (True = token; None = all;
    ``context=None`` = the learned null text); returns
    (B, out_channels, H, W).
    """

    def __init__(
        self,
        image_size: int,
        in_channels: int,
        out_channels: int | None = None,
        model_channels: int = 64,
        channel_mult: Sequence[int] = (1, 2),
        num_res_blocks: int = 2,
        attention_resolutions: Sequence[int] = (),
        num_heads: int = 4,
        num_head_channels: int | None = None,
        dropout: float = 0.0,
        scale_shift_norm: bool = True,
        mid_attention: bool = True,
        norm_groups: int = 32,
        emb_dim: int | None = None,
        embedding: str = "positional",
        fourier_scale: float = 16.0,
        max_period: float = 10000.0,
        num_classes: int | None = None,
        patch_size: int = 1,
        context_dim: int | None = None,
    ) -> None:
        super().__init__()
        channel_mult = tuple(int(m) for m in channel_mult)
        levels = len(channel_mult)
        if levels < 1:
            raise UsageError("channel_mult must have at least one level")
        if patch_size < 1:
            raise UsageError(f"patch_size must be >= 1, got {patch_size}")
        self.patch_size = patch_size
        self.factor = patch_size * 2 ** (levels - 1)
        if image_size % self.factor:
            raise UsageError(
                f"image_size {image_size} is not divisible by patch_size * 2**(levels-1) = "
                f"{self.factor} for channel_mult {channel_mult}, patch_size {patch_size}: use "
                "fewer levels or pad the images"
            )
        sizes = [image_size // patch_size // 2**i for i in range(levels)]
        attn_levels = set()
        for r in attention_resolutions:
            if r not in sizes:
                raise UsageError(f"attention resolution {r} is not a level size for "
                                 f"image_size {image_size}; level sizes are {sizes}")
            attn_levels.add(sizes.index(r))
        widths = [model_channels * m for m in channel_mult]
        for c in {model_channels, *widths}:
            if c % norm_groups:
                raise UsageError(f"norm_groups {norm_groups} does not divide channel count {c}; "
                                 f"level widths are {widths}")

        self.image_size = image_size
        self.in_channels = in_channels
        self.out_channels = out_channels or in_channels
        self.num_classes = num_classes
        self.emb_dim = emb_dim or 4 * model_channels
        self.cond = ConditionEmbedding(model_channels, self.emb_dim, embedding, num_classes,
                                       max_period, fourier_scale)
        self.context_dim = context_dim
        if context_dim and not (attn_levels or mid_attention):
            raise UsageError("context_dim needs attention blocks for cross-attention: set "
                             "attention_resolutions or mid_attention=True")
        self.context_embed = (ContextEmbedding(context_dim, self.emb_dim) if context_dim
                              else None)

        def heads(c: int) -> int:
            if num_head_channels is None:
                return num_heads
            if c % num_head_channels:
                raise UsageError(f"num_head_channels {num_head_channels} does not divide {c}")
            return c // num_head_channels

        def res(cin: int, cout: int) -> ResBlock:
            return ResBlock(cin, cout, self.emb_dim, dropout, norm_groups, scale_shift_norm)

        def attn(c: int) -> AttentionBlock:
            return AttentionBlock(c, heads(c), norm_groups, context_dim=context_dim)

        p2 = patch_size * patch_size
        self.conv_in = nn.Conv2d(in_channels * p2, model_channels, 3, padding=1)
        self.down = nn.ModuleList()
        skips = [model_channels]
        ch = model_channels
        for lvl, w in enumerate(widths):
            for _ in range(num_res_blocks):
                stage = [res(ch, w)] + ([attn(w)] if lvl in attn_levels else [])
                self.down.append(nn.ModuleList(stage))
                ch = w
                skips.append(ch)
            if lvl < levels - 1:
                self.down.append(nn.ModuleList([Downsample(ch)]))
                skips.append(ch)
        self.mid = nn.ModuleList([res(ch, ch)] + ([attn(ch)] if mid_attention else [])
                                 + [res(ch, ch)])
        self.up = nn.ModuleList()
        for lvl in reversed(range(levels)):
            w = widths[lvl]
            for i in range(num_res_blocks + 1):
                stage = [res(ch + skips.pop(), w)] + ([attn(w)] if lvl in attn_levels else [])
                ch = w
                if lvl > 0 and i == num_res_blocks:
                    stage.append(Upsample(ch))
                self.up.append(nn.ModuleList(stage))
        self.norm_out = nn.GroupNorm(norm_groups, ch)
        self.conv_out = zero_(nn.Conv2d(ch, self.out_channels * p2, 3, padding=1))

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor | float,
                class_labels: torch.Tensor | None = None, context: torch.Tensor | None = None,
                extra_embedding: torch.Tensor | None = None, *,
                context_mask: torch.Tensor | None = None,
                down_residuals: Sequence[torch.Tensor] | None = None,
                mid_residual: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, in_channels, H, W) -> (B, out_channels, H, W).

        ``down_residuals`` (one tensor per skip feature of :meth:`encode`, same shapes) are
        added to the skip features before the decoder reads them, ``mid_residual`` to the
        middle block's output: the hooks through which a ControlNet steers a frozen U-Net
        (:mod:`sfumato.nets.controlnet`, Zhang et al. 2023, eq. 2).
        """
        emb = self.cond(c_noise, len(x), x.device, class_labels, extra_embedding)
        emb, context = prepare_context(self.context_embed, "UNet", emb, context, context_mask)
        hs, h = self.encode(x, emb, context)
        hs, h = add_residuals(hs, h, down_residuals, mid_residual)
        for stage in self.up:
            h = torch.cat([h, hs.pop()], dim=1)
            for block in stage:
                h = block(h, emb, context)
        y = self.conv_out(F.silu(self.norm_out(h)))
        return F.pixel_shuffle(y, self.patch_size) if self.patch_size > 1 else y

    def encode(self, x: torch.Tensor, emb: torch.Tensor, context: Context | None = None,
               ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The encoder half: x (B, in_channels, H, W), emb (B, emb_dim) and the prepared
        context (``prepare_context``, as in :meth:`forward`) -> (hs, h_mid), the skip features
        and the middle block's output.

        ``hs`` holds ``len(self.down) + 1`` tensors: the ``conv_in`` output
        (B, model_channels, H/p, W/p), then the output of every encoder stage; ``h_mid`` is
        (B, C_last, H/factor, W/factor). See :func:`encoder_features`.
        """
        h = self.conv_in(fold_input(x, self.in_channels, self.patch_size, self.factor))
        return encoder_features(self.down, self.mid, h, emb, context)


def fold_input(x: torch.Tensor, in_channels: int, patch_size: int, factor: int) -> torch.Tensor:
    """Check a U-Net input x (B, in_channels, H, W) (H and W divisible by ``factor =
    patch_size * 2**(levels-1)``) and fold it into patches: (B, in_channels p^2, H/p, W/p)."""
    if x.ndim != 4 or x.shape[1] != in_channels:
        raise UsageError(f"UNet expects x of shape (B, {in_channels}, H, W); "
                         f"got {tuple(x.shape)}")
    H, W = x.shape[-2:]
    if H % factor or W % factor:
        raise UsageError(f"input size {H}x{W} is not divisible by {factor} "
                         "(= patch_size * 2**(levels-1)); pad the input or use fewer levels")
    return F.pixel_unshuffle(x, patch_size) if patch_size > 1 else x


def encoder_features(down: nn.ModuleList, mid: nn.ModuleList, h: torch.Tensor,
                     emb: torch.Tensor, context: Context | None = None,
                     ) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Run U-Net encoder stages ``down`` then middle blocks ``mid`` from the ``conv_in``
    features h (B, C, h, w): returns the skip list ``[h, stage_1(h), ...]`` (``len(down) + 1``
    tensors) and the middle output. Shared by :meth:`UNet.encode` and the trainable encoder
    copy of :class:`~sfumato.nets.controlnet.ControlNet`."""
    hs = [h]
    for stage in down:
        for block in stage:
            h = block(h, emb, context)
        hs.append(h)
    for block in mid:
        h = block(h, emb, context)
    return hs, h


def add_residuals(hs: list[torch.Tensor], h_mid: torch.Tensor,
                  down_residuals: Sequence[torch.Tensor] | None = None,
                  mid_residual: torch.Tensor | None = None,
                  ) -> tuple[list[torch.Tensor], torch.Tensor]:
    """``(hs + down_residuals, h_mid + mid_residual)`` elementwise, each residual optional;
    ValueError naming the first residual whose count or shape does not match."""
    if down_residuals is not None:
        if len(down_residuals) != len(hs):
            raise UsageError(f"down_residuals must hold one tensor per skip feature: "
                             f"{len(hs)} for this UNet; got {len(down_residuals)}")
        for i, (h, r) in enumerate(zip(hs, down_residuals, strict=True)):
            if r.shape != h.shape:
                raise UsageError(f"down_residuals[{i}] has shape {tuple(r.shape)}; the skip "
                                 f"feature it is added to has shape {tuple(h.shape)}")
        hs = [h + r for h, r in zip(hs, down_residuals, strict=True)]
    if mid_residual is not None:
        if mid_residual.shape != h_mid.shape:
            raise UsageError(f"mid_residual has shape {tuple(mid_residual.shape)}; the middle "
                             f"block's output has shape {tuple(h_mid.shape)}")
        h_mid = h_mid + mid_residual
    return hs, h_mid
