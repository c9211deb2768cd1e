"""Sequence (text) conditioning: cross-attention from image tokens to context tokens.

A network built with ``context_dim`` takes ``context`` (B, L, context_dim), e.g. text token
states, and ``context_mask`` (B, L) bool (True = real token, default all True). Two paths
carry it, both starting at zero so a fresh network ignores the text, like every other
residual branch here:

- cross-attention (Rombach et al. 2022, LDM §3.3; Saharia et al. 2022, Imagen; Chen et al.
  2023, PixArt-α): queries from the (normalised) image tokens, keys and values from the
  context, ``F.scaled_dot_product_attention`` with the padding mask, a zero-initialised output
  projection, added to the tokens (:class:`CrossAttention`);
- pooled text (Imagen's pooled embedding; also SDXL): a linear map of the mean of the real
  context tokens added to the conditioning embedding, so it reaches every residual block's
  adaptive norm (:class:`ContextEmbedding`, zero-initialised).

A learned null token (1, 1, context_dim) is always prepended to the keys. It is what the
network attends to when ``context`` is None (the unconditional text, so classifier-free
guidance can pass ``context=None`` for its unconditional branch) and it guarantees at least
one attendable key, so a mask row with no True entry gives finite output; such a row is the
same as ``context=None`` (the pooled input falls back to the null token too).

Inside a network the blocks receive the prepared :class:`Context` (states with the null token
in front and the matching mask) in their ``context`` argument.

Attention control (Prompt-to-Prompt, :mod:`sfumato.edit.p2p`): every :class:`CrossAttention`
has a plain attribute ``controller`` (not a parameter, buffer or submodule; never in the
state dict), None by default, and then the forward is SDPA as above. When it is set, the
attention probabilities are computed explicitly, ``probs = softmax(q k^T / sqrt(d))`` with
masked keys at -inf, shape (B, heads, N queries, 1 + L keys) with key 0 the null token, and
the output is ``controller(probs, layer) @ v`` through the same output projection.
:class:`ContextEmbedding` has the same attribute: when it is set and has a ``pooled``
method, its pooled text embedding (B, emb_dim) passes through ``controller.pooled`` (P2P
holds the source's there too: in these networks the pooled text fixes the layout as much as
the maps do).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UsageError
from ._common import check_heads, no_context, zero_


def require_context(context: object, block: str) -> Context:
    """``context`` if it is a prepared :class:`Context`, else a ValueError naming ``block``
    (a block built with cross-attention cannot run without it)."""
    if not isinstance(context, Context):
        raise UsageError(f"this {block} has cross-attention: pass the prepared Context (see "
                         "sfumato.nets.context)")
    return context

__all__ = ["Context", "ContextEmbedding", "CrossAttention", "attention_probs", "prepare_context"]


class Context(NamedTuple):
    """Prepared context for the blocks: states (B, 1 + L, D) with the null token first and
    mask (B, 1 + L) bool (True = attend; always True at index 0)."""

    states: torch.Tensor
    mask: torch.Tensor


class CrossAttention(nn.Module):
    """Multi-head cross-attention, residual branch only: tokens (B, N, dim) and a
    :class:`Context` -> (B, N, dim), to be added to the tokens.

    ``LayerNorm(tokens)`` -> q; ``context.states`` -> k, v (linear from ``context_dim``);
    SDPA with ``context.mask`` as a boolean attn_mask (B, 1, 1, L) broadcast over heads and
    queries; zero-initialised output projection (so the branch starts at zero).

    ``controller``: None (SDPA), or a callable ``(probs (B, heads, N, L), layer) -> probs``
    that edits the attention maps (module docstring); a plain attribute, not state.
    """

    controller: Callable[[torch.Tensor, CrossAttention], torch.Tensor] | None

    def __init__(self, dim: int, context_dim: int, num_heads: int) -> None:
        super().__init__()
        check_heads(dim, num_heads, "cross-attention width")
        self.num_heads = num_heads
        self.norm = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(context_dim, 2 * dim)
        self.proj = zero_(nn.Linear(dim, dim))
        self.controller = None

    def forward(self, x: torch.Tensor, context: Context) -> torch.Tensor:
        B, N, D = x.shape
        nh = self.num_heads
        q = self.q(self.norm(x)).reshape(B, N, nh, D // nh).transpose(1, 2)  # (B, nh, N, hs)
        s = context.states
        k, v = self.kv(s).reshape(B, s.shape[1], 2, nh, D // nh).permute(2, 0, 3, 1, 4)
        mask = context.mask[:, None, None, :]  # (B, 1, 1, L)
        if self.controller is None:
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            a = self.controller(attention_probs(q, k, mask), self) @ v
        return self.proj(a.transpose(1, 2).reshape(B, N, D))


def attention_probs(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``softmax(q k^T / sqrt(d))`` over the keys with masked keys (``mask`` False) at -inf:
    q (B, nh, N, d), k (B, nh, L, d), mask broadcastable to (B, nh, N, L) -> (B, nh, N, L)."""
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    return scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)


class ContextEmbedding(nn.Module):
    """Prepares ``context`` for the blocks and computes the pooled-text embedding.

    ``forward(context, context_mask, batch) -> (Context, pooled (B, emb_dim))``.
    ``context`` (B or 1, L, context_dim) or None; ``context_mask`` (B or 1, L) bool or None
    (all True). The pooled embedding is ``Linear(mean of the real tokens)``, or of the null
    token when there is none; the linear map starts at zero.
    """

    def __init__(self, context_dim: int, emb_dim: int) -> None:
        super().__init__()
        if context_dim < 1:
            raise UsageError(f"context_dim must be >= 1 or None, got {context_dim}")
        self.context_dim = context_dim
        self.null = nn.Parameter(torch.zeros(1, 1, context_dim))
        self.pool = zero_(nn.Linear(context_dim, emb_dim))
        self.controller = None  # Prompt-to-Prompt: ``controller.pooled(p)`` edits the result

    def forward(self, context: torch.Tensor | None, context_mask: torch.Tensor | None,
                batch: int) -> tuple[Context, torch.Tensor]:
        null = self.null
        if context is None:
            if context_mask is not None:
                raise UsageError("context_mask given without context")
            states = null.expand(batch, 1, -1)
            mask = torch.ones(batch, 1, dtype=torch.bool, device=null.device)
            return Context(states, mask), self.pool(null[:, 0]).expand(batch, -1)
        if context.ndim != 3 or context.shape[0] not in (1, batch) \
                or context.shape[2] != self.context_dim:
            raise UsageError(f"context must have shape (B={batch}, L, {self.context_dim}) "
                             f"(or batch 1); got {tuple(context.shape)}")
        L = context.shape[1]
        context = context.to(null.dtype).expand(batch, -1, -1)
        if context_mask is None:
            context_mask = torch.ones(batch, L, dtype=torch.bool, device=context.device)
        elif context_mask.shape not in ((batch, L), (1, L)):
            raise UsageError(f"context_mask must have shape (B={batch}, L={L}) matching "
                             f"context; got {tuple(context_mask.shape)}")
        m = context_mask.to(torch.bool).expand(batch, -1)
        w = m[..., None].to(context.dtype)
        count = w.sum(1)
        mean = (context * w).sum(1) / count.clamp_min(1)
        pooled_in = torch.where(count > 0, mean, null[:, 0])
        states = torch.cat([null.expand(batch, 1, -1), context], dim=1)
        mask = torch.cat([m.new_ones(batch, 1), m], dim=1)
        pooled = self.pool(pooled_in)
        if hasattr(self.controller, "pooled"):
            pooled = self.controller.pooled(pooled)
        return Context(states, mask), pooled


def prepare_context(module: ContextEmbedding | None, name: str, emb: torch.Tensor,
                    context: torch.Tensor | None, context_mask: torch.Tensor | None,
                    ) -> tuple[torch.Tensor, Context | None]:
    """The networks' common entry: ``(emb + pooled text, Context)``, or for a network
    without ``context_dim`` (module None) refuse context/context_mask and return
    ``(emb, None)``."""
    if module is None:
        no_context(name, context)
        if context_mask is not None:
            raise UsageError(f"{name} has no cross-attention: `context_mask` is not supported "
                             "(build it with context_dim to take text)")
        return emb, None
    ctx, pooled = module(context, context_mask, emb.shape[0])
    return emb + pooled.to(emb.dtype), ctx
