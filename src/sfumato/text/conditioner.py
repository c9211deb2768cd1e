"""Text conditioning of a training run: captions of a labelled image set, encoded once.

:class:`TextConditioner` turns a run's ``text`` config section into the conditioning kwargs
its network takes:

- ``encoder: "minilm"``: the frozen MiniLM's token states, ``{"context": (B, L, 384),
  "context_mask": (B, L)}``, for a UNet/DiT built with ``context_dim: 384``. Every distinct
  caption is encoded once (:class:`~sfumato.text.EmbeddingCache`), before training, and the
  table is kept on disk (:meth:`TextConditioner.cache_path`) so later runs and prompts reuse
  it.
- ``encoder: "tiny"``: byte tokens ``{"text_ids": (B, L), "text_mask": (B, L)}`` for a
  ``"text_conditioned"`` network, whose small Transformer encoder trains with it.

Captions (:func:`~sfumato.text.make_captions`): ``n_variants`` phrasings per training image
from its label and its measured thickness / slant / size (per-class tercile thresholds); each
step draws one variant per image. A caption is dropped (its mask row set all False, the
network's null text) with probability ``drop``, so one model serves classifier-free guidance
(:meth:`null`).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .captions import attribute_thresholds, digit_attributes, make_captions
from .encoders import EmbeddingCache, MiniLMEncoder, TinyTextEncoder, text_encoder_class


class TextConditioner:
    """Captions and their encodings for one run.

    Args:
        cfg: the run's ``text`` section: ``encoder`` ("minilm" | "tiny"), ``max_length``,
            ``n_variants``, ``drop``, ``keep`` (probability of keeping each attribute word).
    """

    def __init__(self, cfg: dict[str, Any]) -> None:
        text_encoder_class(cfg.get("encoder"))  # the run's text.encoder must be registered
        self.cfg = dict(cfg)
        self.kind = cfg["encoder"]
        self.max_length = int(cfg["max_length"])
        self._cache: EmbeddingCache | None = None
        self.rows: torch.Tensor | None = None  # (N, n_variants) caption index per image
        self.class_prompts: list[str] | None = None
        self.captions: list[str] = []
        self.kept_out: list[str] = []  # captions not in the table (see _kept_out)

    @property
    def keys(self) -> tuple[str, str]:
        """The conditioning kwargs' names: (tokens-or-states, mask)."""
        return ("context", "context_mask") if self.kind == "minilm" else ("text_ids",
                                                                          "text_mask")

    def cache_path(self) -> Path:
        """The on-disk per-caption table of the frozen encoder, shared by every run:
        ``cache_dir()/text/minilm-L{max_length}.safetensors``."""
        from ..files import cache_dir

        return cache_dir() / "text" / f"minilm-L{self.max_length}.safetensors"

    def _encode(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.kind == "tiny":
            return TinyTextEncoder.tokenize(list(captions), self.max_length)
        if self._cache is None:
            self._cache = EmbeddingCache(MiniLMEncoder(self.max_length))
            if self.cache_path().is_file():
                try:
                    self._cache.load(self.cache_path())
                except (ValueError, OSError) as e:  # unreadable or another encoder: re-encode
                    warnings.warn(f"ignoring text embedding cache {self.cache_path()}: {e}",
                                  stacklevel=2)
        n = len(self._cache)
        out = self._cache.encode(list(captions))
        if len(self._cache) > n:
            self._cache.save(self.cache_path())
        return out

    def fit(self, images: torch.Tensor, labels: torch.Tensor, num_classes: int,
            generator: torch.Generator) -> TextConditioner:
        """Caption every image (N, 1, H, W) with labels (N,) and encode the distinct captions."""
        attrs = digit_attributes(images)
        thr = attribute_thresholds(images, labels, num_classes, attrs=attrs)
        caps = make_captions(labels, attrs, thr, generator, n_variants=self.cfg["n_variants"],
                             keep=self.cfg["keep"])
        return self.fit_rows(caps)

    def fit_given(self, captions: Sequence[str], labels: torch.Tensor | None = None,
                  class_names: Sequence[str] | None = None) -> TextConditioner:
        """Use the data set's own captions (one per image, e.g. emoji names) instead of
        measured digit attributes. Variants per image: the caption, "an emoji of" it, and
        with a class name (category) "CATEGORY: caption" and the category alone, "a CATEGORY
        image", so that category prompts are in the training distribution too; the first
        ``n_variants`` of these."""
        rows: list[list[str]] = []
        # the prompt that names class k ("a CATEGORY image"), recorded in the run
        self.class_prompts = [f"a {n.lower()} image" for n in class_names] \
            if labels is not None and class_names is not None else None
        for i, c in enumerate(captions):
            v = [c, f"an image of {c}"]
            if labels is not None and class_names is not None:
                cat = class_names[int(labels[i])].lower()
                v += [f"{cat}: {c}", f"a {cat} image"]
            rows.append(v[: max(1, int(self.cfg["n_variants"]))])
        width = min(len(r) for r in rows)
        return self.fit_rows([r[:width] for r in rows])

    def _kept_out(self, captions: Sequence[str]) -> set[str]:
        """The captions to keep out of the encoded table (and the on-disk cache): none here;
        a subclass that encodes some captions itself (e.g. with a learned token) says which."""
        return set()

    def fit_rows(self, caps: Sequence[Sequence[str]]) -> TextConditioner:
        """Encode the distinct captions of ``caps`` (N rows of variants) once. ``rows`` index
        ``table``; a caption kept out of it (:meth:`_kept_out`) gets row
        ``len(table[0]) + j`` for ``kept_out[j]``."""
        self.captions = list(dict.fromkeys(c for row in caps for c in row))
        out = self._kept_out(self.captions)
        cached = [c for c in self.captions if c not in out]
        if self.kind == "minilm":  # rows index the cache's own table: no second copy of it
            self._encode(cached)
            index = {c: self._cache.index[c] for c in cached}
            self.table = (self._cache.states, self._cache.mask)
        else:
            index = {c: i for i, c in enumerate(cached)}
            self.table = self._encode(cached)
        self.kept_out = [c for c in self.captions if c in out]
        index.update({c: len(self.table[0]) + j for j, c in enumerate(self.kept_out)})
        self.rows = torch.tensor([[index[c] for c in row] for row in caps], dtype=torch.long)
        return self

    def _draw(self, idx: torch.Tensor, generator: torch.Generator,
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """For training images ``idx`` (B,): the drawn caption's row of ``table`` (B,) long
        and whether it is kept, not dropped (B,) bool (draws from ``generator``)."""
        if self.rows is None:
            raise RuntimeError("call fit() first")
        B = idx.shape[0]
        v = torch.randint(0, self.rows.shape[1], (B,), generator=generator)
        keep = torch.rand(B, generator=generator) >= self.cfg["drop"]
        return self.rows[idx, v], keep

    def batch(self, idx: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Conditioning of training images ``idx`` (B,): one caption variant each, dropped with
        probability ``drop`` (draws from ``generator``)."""
        r, keep = self._draw(idx, generator)
        tokens, mask = self.table[0][r], self.table[1][r] & keep[:, None]
        return dict(zip(self.keys, (tokens, mask), strict=True))

    def prompts(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Conditioning of free-text prompts: (P, L, ...) tensors."""
        return dict(zip(self.keys, self._encode(list(prompts)), strict=True))

    def null(self) -> dict[str, torch.Tensor]:
        """The unconditional branch for classifier-free guidance: an all-False mask (the
        network's learned null text), batch 1 (broadcast)."""
        return {self.keys[1]: torch.zeros(1, self.max_length, dtype=torch.bool)}
