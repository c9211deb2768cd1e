"""A noise-conditional image classifier: the ADM U-Net's encoder half with a pooled head.

Dhariwal & Nichol (2021, §4, App. C) guide with "the downsampling trunk of the UNet model
with an attention pool at the 8x8 layer"; here the trunk is the same residual blocks with
adaptive GroupNorm on the noise embedding, and the head is GroupNorm, SiLU, global average
pooling and a linear layer. Wrap it in :class:`sfumato.guidance.NoisyClassifier` to call it in
σ-space as ``clf(x, sigma) -> logits``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UsageError
from .embedding import ConditionEmbedding
from .unet import Downsample, ResBlock


class EncoderClassifier(nn.Module):
    """``forward(x_in, c_noise) -> logits (B, num_classes)``.

    Args:
        image_size: not needed by the layers; checked against ``patch_size * 2**(levels-1)``.
        in_channels: channels of x.
        num_classes: number of classes (logits).
        model_channels, channel_mult, num_res_blocks, dropout, norm_groups, embedding,
        patch_size: as in :class:`~.unet.UNet`.

    Shapes: x_in (B, in_channels, H, W), c_noise scalar or (B,).
    """

    def __init__(self, image_size: int, in_channels: int, num_classes: int,
                 model_channels: int = 32, channel_mult: Sequence[int] = (1, 2),
                 num_res_blocks: int = 1, dropout: float = 0.0, norm_groups: int = 8,
                 embedding: str = "positional", patch_size: int = 1) -> None:
        super().__init__()
        levels = len(channel_mult)
        factor = patch_size * 2 ** (levels - 1)
        if image_size % factor:
            raise UsageError(f"image_size {image_size} is not divisible by patch_size * "
                             f"2**(levels-1) = {factor}")
        self.in_channels, self.num_classes, self.patch_size = in_channels, num_classes, patch_size
        emb_dim = 4 * model_channels
        self.cond = ConditionEmbedding(model_channels, emb_dim, embedding)
        self.conv_in = nn.Conv2d(in_channels * patch_size**2, model_channels, 3, padding=1)
        blocks: list[nn.Module] = []
        ch = model_channels
        for lvl, m in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                blocks.append(ResBlock(ch, model_channels * m, emb_dim, dropout, norm_groups))
                ch = model_channels * m
            if lvl < levels - 1:
                blocks.append(Downsample(ch))
        self.blocks = nn.ModuleList(blocks)
        self.norm_out = nn.GroupNorm(norm_groups, ch)
        self.head = nn.Linear(ch, num_classes)

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor | float) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise UsageError(f"EncoderClassifier expects x of shape (B, {self.in_channels}, H, "
                             f"W); got {tuple(x.shape)}")
        emb = self.cond(c_noise, x.shape[0], x.device)
        if self.patch_size > 1:
            x = F.pixel_unshuffle(x, self.patch_size)
        h = self.conv_in(x)
        for block in self.blocks:
            h = block(h, emb)
        return self.head(F.silu(self.norm_out(h)).mean(dim=(2, 3)))
