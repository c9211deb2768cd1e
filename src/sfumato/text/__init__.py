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

What is digit-specific. Everything in :mod:`~sfumato.text.captions` describes handwritten
digits: the labels are the classes 0-9 read as numerals or number words (``NUMBER_WORDS``,
which :func:`parse_prompt` recognises), the templates and plain class prompts name "the digit"
/ "handwritten" / "number", and the attribute words (thin/thick, left/right slant, small/large)
come from stroke measurements (:func:`digit_attributes`) that assume one light-on-dark
grayscale glyph per image (ink = high values). :class:`~sfumato.text.conditioner.TextConditioner`
captions its training images with these. The encoders (:mod:`~sfumato.text.encoders`,
:class:`EmbeddingCache`) and the conditioning plumbing are generic: they take any captions.
"""

from . import captions, encoders
from .captions import *  # noqa: F403 - the public names of both modules, listed there
from .encoders import *  # noqa: F403

__all__ = [*captions.__all__, *encoders.__all__]
