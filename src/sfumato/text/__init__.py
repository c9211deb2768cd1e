"""Text conditioning: captions for digit images and text encoders.

- :mod:`~sfumato.text.captions`: measure stroke thickness, slant and size of digit images
  (:func:`digit_attributes`), turn them into words with training-set quantiles
  (:func:`attribute_thresholds`, :func:`describe`), render varied captions
  (:func:`make_captions`) and read label and words back (:func:`parse_prompt`).
- :mod:`~sfumato.text.encoders`: ``encode(captions) -> (states (N, L, D), mask (N, L))`` with
  the frozen MiniLM (:class:`MiniLMEncoder`, optional ``text`` extra) or a small trainable
  byte-level Transformer (:class:`TinyTextEncoder`, used inside
  :class:`sfumato.nets.TextConditioned`); :class:`EmbeddingCache` encodes each caption once.

The networks take the states as ``context``/``context_mask`` (UNet and DiT built with
``context_dim``; see :mod:`sfumato.nets.context`).
"""

from .captions import (
    ATTRIBUTES,
    NUMBER_WORDS,
    TEMPLATES,
    attribute_thresholds,
    caption,
    describe,
    digit_attributes,
    make_captions,
    parse_prompt,
)
from .encoders import (
    TEXT_ENCODERS,
    EmbeddingCache,
    MiniLMEncoder,
    TinyTextEncoder,
    get_text_encoder,
    minilm_path,
)

__all__ = [
    "ATTRIBUTES",
    "NUMBER_WORDS",
    "TEMPLATES",
    "TEXT_ENCODERS",
    "EmbeddingCache",
    "MiniLMEncoder",
    "TinyTextEncoder",
    "attribute_thresholds",
    "caption",
    "describe",
    "digit_attributes",
    "get_text_encoder",
    "make_captions",
    "minilm_path",
    "parse_prompt",
]
