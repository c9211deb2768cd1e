"""Residual MLP for vector data (B, D), e.g. 2-D toy distributions."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UsageError
from ._common import no_context, zero_
from .embedding import ConditionEmbedding

__all__ = ["MLP", "MLPBlock"]

EMB_MODES = ("add", "concat")


class MLPBlock(nn.Module):
    """Pre-norm residual block (B, H) -> (B, H): ``h + W2 SiLU(W1 LN(h) [+ P emb])``.

    With ``emb_dim`` set, a projection of the (SiLU'd) conditioning embedding is added after
    the first linear layer. W2 starts at zero, so the block starts as the identity.
    """

    def __init__(self, hidden: int, emb_dim: int | None = None, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.fc1 = nn.Linear(hidden, hidden)
        self.emb_proj = nn.Linear(emb_dim, hidden) if emb_dim else None
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc2 = zero_(nn.Linear(hidden, hidden))

    def forward(self, h: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        z = self.fc1(self.norm(h))
        if self.emb_proj is not None:
            z = z + self.emb_proj(F.silu(emb))
        return h + self.fc2(self.dropout(F.silu(z)))


class MLP(nn.Module):
    """Residual MLP raw network: ``forward(x, c_noise, class_labels=None, context=None) -> y``.

    Args:
        dim: data dimension D.
        hidden: width of the residual stream.
        num_blocks: residual blocks.
        emb_dim: width of the conditioning embedding (default ``hidden``).
        emb_mode: ``"add"`` (a projection of the embedding is added inside every block) or
            ``"concat"`` (the embedding is concatenated to x at the input layer only).
        embedding: ``"positional"`` or ``"fourier"`` noise features.
        fourier_scale, max_period: parameters of the noise features.
        num_classes: class-conditional when set; label ``num_classes`` (or None) is the null
            class.
        dropout: dropout inside blocks.
        out_dim: output dimension (default D).

    Shapes: x (B, D), c_noise scalar or (B,), class_labels (B,) long, extra_embedding
    (B, emb_dim); returns (B, out_dim). The output layer is zero-initialised, so a fresh
    network outputs exactly 0.
    """

    def __init__(self, dim: int = 2, hidden: int = 256, num_blocks: int = 4,
                 emb_dim: int | None = None, emb_mode: str = "add",
                 embedding: str = "positional", fourier_scale: float = 16.0,
                 max_period: float = 10000.0, num_classes: int | None = None,
                 dropout: float = 0.0, out_dim: int | None = None) -> None:
        super().__init__()
        if emb_mode not in EMB_MODES:
            raise UsageError(f"unknown emb_mode {emb_mode!r}; choose one of {EMB_MODES}")
        self.dim = dim
        self.out_dim = out_dim or dim
        self.emb_mode = emb_mode
        self.emb_dim = emb_dim or hidden
        self.num_classes = num_classes
        self.cond = ConditionEmbedding(hidden, self.emb_dim, embedding, num_classes, max_period,
                                       fourier_scale)
        in_features = dim + (self.emb_dim if emb_mode == "concat" else 0)
        self.fc_in = nn.Linear(in_features, hidden)
        block_emb = self.emb_dim if emb_mode == "add" else None
        self.blocks = nn.ModuleList(MLPBlock(hidden, block_emb, dropout)
                                    for _ in range(num_blocks))
        self.norm_out = nn.LayerNorm(hidden)
        self.fc_out = zero_(nn.Linear(hidden, self.out_dim))

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor | float,
                class_labels: torch.Tensor | None = None, context: torch.Tensor | None = None,
                extra_embedding: torch.Tensor | None = None) -> torch.Tensor:
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise UsageError(f"MLP expects x of shape (B, {self.dim}); got {tuple(x.shape)}")
        no_context("MLP", context)
        emb = self.cond(c_noise, x.shape[0], x.device, class_labels, extra_embedding)
        if self.emb_mode == "concat":
            h = self.fc_in(torch.cat([x, emb.to(x.dtype)], dim=1))
        else:
            h = self.fc_in(x)
        for block in self.blocks:
            h = block(h, emb)
        return self.fc_out(F.silu(self.norm_out(h)))
