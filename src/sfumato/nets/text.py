"""A backbone with its own trainable text encoder (``"text_conditioned"``).

Conditioning reaching a raw network is either ``context`` + ``context_mask`` (token states of a
frozen encoder, computed and cached outside, see :class:`sfumato.text.EmbeddingCache`) or, with
this wrapper, ``text_ids`` + ``text_mask`` (byte tokens from
:meth:`sfumato.text.TinyTextEncoder.tokenize`), encoded inside the model so the encoder trains
with it (as GLIDE's text transformer, Nichol et al. 2022).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..errors import UsageError
from ..text.encoders import TinyTextEncoder
from ._common import check_kwargs

__all__ = ["TextConditioned"]


class TextConditioned(nn.Module):
    """``forward(x, c_noise, class_labels=None, *, text_ids=None, text_mask=None, **kw)``
    = ``backbone(x, c_noise, class_labels, context=states, context_mask=mask, **kw)`` with
    ``states, mask = encoder(text_ids, text_mask)``.

    Args:
        backbone: a network built with ``context_dim`` (UNet, DiT), or its config dict for
            :func:`sfumato.nets.build_net`.
        encoder: a :class:`~sfumato.text.TinyTextEncoder`, or its constructor kwargs
            (default: ``dim = backbone.context_dim``).

    Shapes: text_ids (B, L) long, text_mask (B, L) bool (default ``text_ids != 0``).
    ``text_ids=None`` is the null text (the backbone's learned null token), and so is a row
    whose mask is all False: a trainer drops a caption for classifier-free guidance by
    zeroing its mask row.
    """

    def __init__(self, backbone: nn.Module | Mapping[str, Any],
                 encoder: TinyTextEncoder | Mapping[str, Any] | None = None) -> None:
        super().__init__()
        if isinstance(backbone, Mapping):
            from . import build_net

            backbone = build_net(backbone)
        context_dim = getattr(backbone, "context_dim", None)
        if not context_dim:
            raise UsageError(f"{type(backbone).__name__} backbone has no context_dim: build "
                             "it with context_dim=<text width> to take text")
        if encoder is None or isinstance(encoder, Mapping):
            cfg = {"dim": context_dim, **(encoder or {})}
            check_kwargs("text encoder config", TinyTextEncoder.__init__, cfg)
            encoder = TinyTextEncoder(**cfg)
        if encoder.dim != context_dim:
            raise UsageError(f"text encoder dim {encoder.dim} != backbone context_dim "
                             f"{context_dim}")
        self.backbone = backbone
        self.encoder = encoder

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor | float,
                class_labels: torch.Tensor | None = None, *,
                text_ids: torch.Tensor | None = None, text_mask: torch.Tensor | None = None,
                **kwargs: Any) -> torch.Tensor:
        if "context" in kwargs or "context_mask" in kwargs:
            raise UsageError("TextConditioned encodes text itself: pass text_ids/text_mask "
                             "(from TinyTextEncoder.tokenize), not context")
        states = mask = None
        if text_ids is not None:
            mask = text_ids != TinyTextEncoder.PAD if text_mask is None else text_mask.bool()
            empty = ~mask.any(dim=1)
            # an all-padding row still needs one attendable key inside the encoder; the
            # backbone then sees an all-False mask row, which is its null text
            enc_mask = mask.clone()
            enc_mask[:, 0] |= empty
            states, _ = self.encoder(text_ids, enc_mask)
        return self.backbone(x, c_noise, class_labels, context=states, context_mask=mask,
                             **kwargs)
