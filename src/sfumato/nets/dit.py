"""DiT: a Transformer on image patches with adaLN-Zero conditioning (Peebles & Xie 2023,
"Scalable Diffusion Models with Transformers").

x (B, C, H, W) -> conv patch embedding (kernel = stride = patch_size) -> tokens
(B, N, hidden), N = (H/p)(W/p), plus a fixed 2-D sine-cosine position embedding -> ``depth``
blocks -> final adaLN layer and linear map to p*p*C_out per token -> unpatchify.

Each block is ``x + gate * Attn(LN(x) (1 + scale) + shift)`` then the same with an MLP; the
six (shift, scale, gate) vectors come from a linear map of the conditioning embedding that
starts at zero (adaLN-Zero), so every block starts as the identity. The final linear layer
also starts at zero, so a fresh DiT is the zero function.

With ``context_dim`` set the DiT takes text (``context`` (B, L, context_dim), ``context_mask``
(B, L)): each block gets a cross-attention sublayer between self-attention and MLP,
``x + CrossAttn(LN(x), context)`` with a zero-initialised output projection (PixArt-α, Chen
et al. 2023), and the mean text token is added to the conditioning embedding (see
:mod:`sfumato.nets.context`: learned null token for ``context=None``, masks).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UsageError
from ._common import check_heads, zero_
from .context import Context, ContextEmbedding, CrossAttention, prepare_context, require_context
from .embedding import ConditionEmbedding

__all__ = ["DiT", "DiTBlock", "sincos_pos_embed_2d"]


def sincos_pos_embed_2d(dim: int, h: int, w: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embedding (as MAE/DiT): (h * w, dim), row-major.

    Half of the channels encode the row, half the column, each as ``[sin(p w_i), cos(p w_i)]``
    with ``w_i = 10000 ** (-i / (dim/4))``. ``dim`` must be divisible by 4.
    """
    if dim % 4:
        raise UsageError(f"position embedding dim must be divisible by 4, got {dim}")
    q = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(q, dtype=torch.float64) / q)
    rows, cols = torch.meshgrid(torch.arange(h, dtype=torch.float64),
                                torch.arange(w, dtype=torch.float64), indexing="ij")

    def enc(pos: torch.Tensor) -> torch.Tensor:
        arg = pos.reshape(-1, 1) * omega[None]
        return torch.cat([arg.sin(), arg.cos()], dim=1)

    return torch.cat([enc(rows), enc(cols)], dim=1).to(torch.float32)


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (B, N, D) * (1 + scale) + shift, with shift/scale (B, D)."""
    return torch.addcmul(shift[:, None], x, 1 + scale[:, None])


class Attention(nn.Module):
    """Multi-head self-attention on tokens (B, N, D) -> (B, N, D) with SDPA."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        check_heads(dim, num_heads, "hidden_size")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, D // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, heads, N, d)
        a = F.scaled_dot_product_attention(q, k, v)
        return self.proj(a.transpose(1, 2).reshape(B, N, D))


class DiTBlock(nn.Module):
    """adaLN-Zero Transformer block: tokens (B, N, D), conditioning c (B, D) -> (B, N, D).

    With ``context_dim`` a cross-attention sublayer (not modulated, zero-initialised output)
    sits between self-attention and MLP and ``context`` (a prepared
    :class:`~sfumato.nets.context.Context`) is required; without it ``context`` is ignored.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0,
                 dropout: float = 0.0, context_dim: int | None = None) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"),
                                 nn.Dropout(dropout) if dropout > 0 else nn.Identity(),
                                 nn.Linear(hidden, dim))
        self.ada = zero_(nn.Linear(dim, 6 * dim))
        self.cross = CrossAttention(dim, context_dim, num_heads) if context_dim else None

    def forward(self, x: torch.Tensor, c: torch.Tensor,
                context: Context | None = None) -> torch.Tensor:
        sh1, sc1, g1, sh2, sc2, g2 = self.ada(F.silu(c)).chunk(6, dim=1)
        x = x + g1[:, None] * self.attn(_modulate(self.norm1(x), sh1, sc1))
        if self.cross is not None:
            x = x + self.cross(x, require_context(context, "DiT block"))
        return x + g2[:, None] * self.mlp(_modulate(self.norm2(x), sh2, sc2))


class DiT(nn.Module):
    """DiT raw network: ``forward(x, c_noise, class_labels=None, context=None) -> y``.

    Args:
        image_size: spatial size the position-embedding buffer is built for (square); other
            sizes divisible by ``patch_size`` work (the embedding is recomputed).
        in_channels: channels of x.
        out_channels: channels of y (default in_channels).
        patch_size: side of a square patch; H and W must be divisible by it.
        hidden_size: token width (divisible by 4 and by num_heads).
        depth: number of Transformer blocks.
        num_heads: attention heads.
        mlp_ratio: MLP hidden width / hidden_size.
        dropout: dropout in the MLPs.
        embedding: ``"positional"`` or ``"fourier"`` noise features.
        freq_dim: width of the fixed noise features (DiT uses 256).
        fourier_scale, max_period: parameters of the noise features.
        num_classes: class-conditional when set; label ``num_classes`` (or None) is the null
            class.
        context_dim: width of text token states; when set, cross-attention in every block and
            pooled text in the conditioning (see the module docstring). None refuses
            ``context``.

    Shapes: x (B, in_channels, H, W), c_noise scalar or (B,), class_labels (B,) long,
    extra_embedding (B, hidden_size), context (B or 1, L, context_dim) and context_mask
    (B or 1, L) bool (True = token; None = all; ``context=None`` = the learned null text);
    returns (B, out_channels, H, W).
    """

    def __init__(self, image_size: int, in_channels: int, out_channels: int | None = None,
                 patch_size: int = 2, hidden_size: int = 256, depth: int = 6,
                 num_heads: int = 4, mlp_ratio: float = 4.0, dropout: float = 0.0,
                 embedding: str = "positional", freq_dim: int = 256,
                 fourier_scale: float = 16.0, max_period: float = 10000.0,
                 num_classes: int | None = None, context_dim: int | None = None) -> None:
        super().__init__()
        if image_size % patch_size:
            raise UsageError(f"image_size {image_size} not divisible by patch_size {patch_size}")
        self.image_size = image_size
        self.in_channels = in_channels
        self.out_channels = out_channels or in_channels
        self.patch_size = patch_size
        self.hidden_size = hidden_size
        self.emb_dim = hidden_size
        self.num_classes = num_classes
        self.patch = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)
        g = image_size // patch_size
        self.register_buffer("pos_embed", sincos_pos_embed_2d(hidden_size, g, g),
                             persistent=False)
        self.cond = ConditionEmbedding(freq_dim, hidden_size, embedding, num_classes,
                                       max_period, fourier_scale)
        self.context_dim = context_dim
        self.context_embed = (ContextEmbedding(context_dim, hidden_size) if context_dim
                              else None)
        self.blocks = nn.ModuleList(DiTBlock(hidden_size, num_heads, mlp_ratio, dropout,
                                             context_dim) for _ in range(depth))
        self.norm_out = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.ada_out = nn.Linear(hidden_size, 2 * hidden_size)
        self.out = nn.Linear(hidden_size, patch_size * patch_size * self.out_channels)
        self._init_weights()

    def _init_weights(self) -> None:
        """DiT's initialisation: Xavier-uniform linears (and patch conv, as a linear), N(0,
        0.02) noise MLP and class table, zero adaLN modulations, output layer and the
        text paths' output projections."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.patch.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch.bias)
        for lin in (self.cond.noise.mlp[0], self.cond.noise.mlp[2]):
            nn.init.normal_(lin.weight, std=0.02)
        if self.cond.label is not None:
            nn.init.normal_(self.cond.label.weight, std=0.02)
        for blk in self.blocks:
            zero_(blk.ada)
            if blk.cross is not None:
                zero_(blk.cross.proj)
        if self.context_embed is not None:
            zero_(self.context_embed.pool)
        zero_(self.ada_out)
        zero_(self.out)

    def _pos(self, h: int, w: int, like: torch.Tensor) -> torch.Tensor:
        g = self.image_size // self.patch_size
        if (h, w) == (g, g):
            pos = self.pos_embed
        else:
            pos = sincos_pos_embed_2d(self.hidden_size, h, w).to(like.device)
        return pos.to(like.dtype)

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor | float,
                class_labels: torch.Tensor | None = None, context: torch.Tensor | None = None,
                extra_embedding: torch.Tensor | None = None, *,
                context_mask: torch.Tensor | None = None) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise UsageError(f"DiT expects x of shape (B, {self.in_channels}, H, W); "
                             f"got {tuple(x.shape)}")
        B, _, H, W = x.shape
        p = self.patch_size
        if H % p or W % p:
            raise UsageError(f"input size {H}x{W} not divisible by patch_size {p}")
        c = self.cond(c_noise, B, x.device, class_labels, extra_embedding)
        c, context = prepare_context(self.context_embed, "DiT", c, context, context_mask)
        h, w = H // p, W // p
        t = self.patch(x).flatten(2).transpose(1, 2)  # (B, N, D)
        t = t + self._pos(h, w, t)[None]
        for blk in self.blocks:
            t = blk(t, c, context)
        shift, scale = self.ada_out(F.silu(c)).chunk(2, dim=1)
        t = self.out(_modulate(self.norm_out(t), shift, scale))  # (B, N, p*p*C)
        t = t.reshape(B, h, w, p, p, self.out_channels)
        return torch.einsum("bhwpqc->bchpwq", t).reshape(B, self.out_channels, H, W)

