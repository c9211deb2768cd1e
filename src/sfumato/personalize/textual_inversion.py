"""Textual inversion: a new word for a subject, learned in the frozen text encoder's input space.

Gal et al. 2023, "An Image is Worth One Word: Personalizing Text-to-Image Generation using
Textual Inversion" (ICLR 2023), section 3: a placeholder string ``S*`` (here e.g. ``"sks"``) is
added to the tokenizer as one new token, whose embedding vector ``v*`` is the only thing
trained; the text encoder and the diffusion network stay frozen and ``v*`` is found by the
network's ordinary denoising loss on captions that contain the placeholder ("a photo of S*").
``v*`` starts from the embedding of a coarse descriptor of the subject, one word such as
"digit" (section 4, implementation details). With ``n_vectors > 1`` the placeholder stands for
that many consecutive tokens (the paper's "extended latent space" ablation, section 4.3).

- :class:`TokenEmbedding` holds ``v*`` (n_vectors, 384) for one placeholder.
- :func:`encode_with_token` encodes captions like :meth:`MiniLMEncoder.encode`, but
  differentiably in ``v*``.
- :class:`TokenTextConditioner` is a run's :class:`~sfumato.text.conditioner.TextConditioner`
  whose captions may contain the placeholder; those never enter the shared on-disk cache.
- :func:`save_token` / :func:`load_token`: a tiny safetensors file.

Only the frozen MiniLM encoder is supported: the ``"tiny"`` byte-level encoder has no
vocabulary entries to add a token to (it would need an embedding for a new byte sequence).
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError, UsageError
from ..files import atomic_write, read_safetensors
from ..text.conditioner import TextConditioner
from ..text.encoders import MiniLMEncoder

__all__ = ["TokenEmbedding", "TokenTextConditioner", "check_new_token", "encode_with_token",
           "load_token", "save_token"]

METADATA_KEY = "sfumato.textual_inversion"
TENSOR_KEY = "token_embedding"


def _check_token_string(token: str) -> str:
    if not isinstance(token, str) or not token.strip():
        raise UsageError(f"the placeholder token must be a non-empty word, got {token!r}; "
                         "use a rare string such as 'sks' or '<sks>'")
    if token != token.strip() or any(ch.isspace() for ch in token):
        raise UsageError(f"the placeholder token {token!r} must be one word without spaces, "
                         "e.g. 'sks' or '<sks>'")
    return token


def check_new_token(encoder: MiniLMEncoder, token: str) -> None:
    """UsageError unless ``token`` can be added to ``encoder``'s vocabulary as a new word: not
    empty, no whitespace, and not (after the tokenizer's lowercasing) already one entry of the
    vocabulary, whose every use in captions it would otherwise take over."""
    _check_token_string(token)
    pieces = encoder.tokenizer.tokenize(token)
    if len(pieces) == 1 and pieces[0] != encoder.tokenizer.unk_token:
        raise UsageError(f"the placeholder token {token!r} is already the word {pieces[0]!r} "
                         "of the text encoder's vocabulary; choose a rare string that it "
                         "splits into pieces, such as 'sks' or '<sks>'")


class TokenEmbedding(nn.Module):
    """The learned input embedding ``v*`` of one placeholder token (Gal et al. 2023, sec. 3).

    Args:
        token: the placeholder string as it appears in captions (one word, e.g. ``"sks"``;
            matched as a whole word, case-insensitively, as MiniLM lowercases).
        dim: the text encoder's input width (384 for MiniLM).
        n_vectors: tokens the placeholder stands for (1 in the paper).

    ``vectors`` is an ``nn.Parameter`` (n_vectors, dim), zeros here: start from a word with
    :meth:`from_word`, as the paper does.
    """

    def __init__(self, token: str, dim: int = 384, n_vectors: int = 1) -> None:
        super().__init__()
        self.token = _check_token_string(token)
        if dim < 1 or n_vectors < 1:
            raise UsageError(f"dim and n_vectors must be >= 1, got {dim} and {n_vectors}")
        self.dim, self.n_vectors = int(dim), int(n_vectors)
        self.vectors = nn.Parameter(torch.zeros(self.n_vectors, self.dim))
        self._tokenizer: tuple[Any, Any, int] | None = None  # (source, copy with token, id)
        self.meta: dict[str, Any] = {}  # what save_token recorded, set by load_token

    @classmethod
    def from_word(cls, encoder: MiniLMEncoder, token: str, init_word: str,
                  n_vectors: int = 1) -> TokenEmbedding:
        """A placeholder initialised, every vector, to the mean input embedding of the word
        pieces of ``init_word`` (a coarse descriptor of the subject, e.g. ``"digit"``)."""
        check_new_token(encoder, token)
        ids = encoder.tokenizer(init_word, add_special_tokens=False)["input_ids"]
        if not ids or encoder.tokenizer.unk_token_id in ids:
            raise UsageError(f"init word {init_word!r} has no (known) word pieces in the text "
                             "encoder's vocabulary; use a plain word such as 'digit'")
        table = encoder.model.get_input_embeddings().weight
        emb = cls(token, int(table.shape[1]), n_vectors)
        with torch.no_grad():
            emb.vectors.copy_(table[torch.tensor(ids, device=table.device)].mean(0).cpu())
        return emb

    def tokenizer_for(self, encoder: MiniLMEncoder) -> tuple[Any, int]:
        """A copy of ``encoder``'s tokenizer with the placeholder added as one new whole-word
        token, and that token's id (>= the vocabulary size); made once per tokenizer. The
        encoder's own tokenizer is never changed."""
        src = encoder.tokenizer
        if self._tokenizer is None or self._tokenizer[0] is not src:
            from transformers import AddedToken

            check_new_token(encoder, self.token)
            tok = copy.deepcopy(src)
            tok.add_tokens([AddedToken(self.token, single_word=True)])
            new_id = int(tok.convert_tokens_to_ids(self.token))
            if new_id < encoder.model.get_input_embeddings().num_embeddings:
                raise UsageError(f"could not add {self.token!r} as a new token")
            self._tokenizer = (src, tok, new_id)
        return self._tokenizer[1], self._tokenizer[2]

    def contains(self, encoder: MiniLMEncoder, captions: Sequence[str]) -> list[bool]:
        """Whether each caption holds the placeholder as a word (what the tokenizer matches)."""
        tok, new_id = self.tokenizer_for(encoder)
        ids = tok(list(captions), add_special_tokens=False)["input_ids"] if captions else []
        return [new_id in row for row in ids]

    def extra_repr(self) -> str:
        return f"token={self.token!r}, dim={self.dim}, n_vectors={self.n_vectors}"


def encode_with_token(encoder: MiniLMEncoder, captions: Sequence[str], embedding: TokenEmbedding,
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(N,) captions -> states (N, L, 384) float32 (zero at padding), mask (N, L) bool, with
    ``L = encoder.max_length``: :meth:`MiniLMEncoder.encode`, but with ``embedding``'s vectors
    as the input embedding of the placeholder (each occurrence stands for ``n_vectors``
    tokens), differentiable in ``embedding.vectors``; the encoder's weights stay frozen.
    Captions without the placeholder encode exactly as ``encoder.encode`` does."""
    if embedding.dim != encoder.dim:
        raise UsageError(f"token embedding {embedding.token!r} has width {embedding.dim}, the "
                         f"text encoder {encoder.dim}")
    tok, new_id = embedding.tokenizer_for(encoder)
    n, L = embedding.n_vectors, encoder.max_length
    pieces = tok(list(captions), add_special_tokens=False)["input_ids"] if captions else []
    ids = torch.full((len(pieces), L), tok.pad_token_id, dtype=torch.long)
    slot = torch.full((len(pieces), L), -1, dtype=torch.long)  # vector index at the token
    mask = torch.zeros(len(pieces), L, dtype=torch.bool)
    for i, p in enumerate(pieces):  # [CLS] pieces [SEP], truncated at the end as encode() does
        row = [(t, k) for t in p for k in (range(n) if t == new_id else [-1])][: L - 2]
        row = [(tok.cls_token_id, -1), *row, (tok.sep_token_id, -1)]
        ids[i, : len(row)] = torch.tensor([t for t, _ in row])
        slot[i, : len(row)] = torch.tensor([k for _, k in row])
        mask[i, : len(row)] = True
    device = encoder.device
    ids, slot, mask = ids.to(device), slot.to(device), mask.to(device)
    words = encoder.model.get_input_embeddings()
    embeds = words(ids.clamp(max=words.num_embeddings - 1))
    learned = embedding.vectors.to(device, embeds.dtype)[slot.clamp(min=0)]
    embeds = torch.where((slot >= 0)[..., None], learned, embeds)
    out = encoder.model(inputs_embeds=embeds, attention_mask=mask.long(),
                        token_type_ids=torch.zeros_like(ids))
    return out.last_hidden_state.to(torch.float32) * mask[..., None], mask


class TokenTextConditioner(TextConditioner):
    """A run's text conditioning with a learned placeholder token (MiniLM only).

    Args:
        cfg: the run's ``text`` section, as for :class:`TextConditioner`; ``encoder`` must be
            ``"minilm"``.
        embedding: the placeholder and its (trained) vectors.

    Captions holding the placeholder (as a word) are never written to the shared on-disk
    :class:`~sfumato.text.EmbeddingCache`, as their states depend on the vectors: they are
    encoded by :func:`encode_with_token` on each use (with gradients in :meth:`batch`, without
    in :meth:`prompts`). Other captions go through the cache as before.
    """

    def __init__(self, cfg: dict[str, Any], embedding: TokenEmbedding) -> None:
        super().__init__(cfg)
        if self.kind != "minilm":
            raise UsageError(f"textual inversion needs text.encoder 'minilm', not {self.kind!r}: "
                             "the byte-level 'tiny' encoder has no vocabulary to add a token "
                             "to (a new word would need an embedding of its byte sequence)")
        self.embedding = embedding
        check_new_token(self.encoder, embedding.token)

    @property
    def encoder(self) -> MiniLMEncoder:
        """The frozen MiniLM (the cache's; loaded on first use)."""
        if self._cache is None:
            self._encode([])
        return self._cache.encoder

    def _kept_out(self, captions: Sequence[str]) -> set[str]:
        has = self.embedding.contains(self.encoder, captions)
        return {c for c, h in zip(captions, has, strict=True) if h}

    def _assemble(self, plain: tuple[torch.Tensor, torch.Tensor], where: torch.Tensor,
                  captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L, D) states and (B, L) mask: rows ``~where`` (B,) bool from ``plain`` (those
        rows, in order), rows ``where`` the placeholder ``captions`` (encoded once each)."""
        B = where.shape[0]
        states = plain[0].new_zeros(B, *plain[0].shape[1:])
        mask = plain[1].new_zeros(B, plain[1].shape[1])
        states[~where], mask[~where] = plain[0], plain[1]
        if where.any():
            uniq = list(dict.fromkeys(captions))
            s, m = encode_with_token(self.encoder, uniq, self.embedding)
            inv = torch.tensor([uniq.index(c) for c in captions], device=s.device)
            rows = (where.nonzero().squeeze(1),)
            states = states.index_put(rows, s[inv].to(states.device))
            mask = mask.index_put(rows, m[inv].to(mask.device))
        return states, mask

    def batch(self, idx: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """As :meth:`TextConditioner.batch` (the same draws), with the states of placeholder
        captions from :func:`encode_with_token`, differentiable in the vectors."""
        r, keep = self._draw(idx, generator)
        n = self.table[0].shape[0]
        where = r >= n
        plain = (self.table[0][r[~where]], self.table[1][r[~where]])
        caps = [self.kept_out[j] for j in (r[where] - n).tolist()]
        states, mask = self._assemble(plain, where, caps)
        return dict(zip(self.keys, (states, mask & keep[:, None]), strict=True))

    def prompts(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Conditioning of free-text prompts (P, L, ...); placeholder prompts without
        gradients, the others through the cache."""
        prompts = list(prompts)
        has = self.embedding.contains(self.encoder, prompts)
        where = torch.tensor(has, dtype=torch.bool)
        plain = self._encode([p for p, h in zip(prompts, has, strict=True) if not h])
        with torch.no_grad():
            out = self._assemble(plain, where, [p for p, h in zip(prompts, has, strict=True)
                                                if h])
        return dict(zip(self.keys, out, strict=True))


def save_token(embedding: TokenEmbedding, path: str | os.PathLike,
               meta: Mapping[str, Any] | None = None) -> Path:
    """Write ``embedding`` to ``path`` (safetensors, atomically): tensor ``token_embedding``
    (n_vectors, dim) and JSON ``{"token", "dim", "n_vectors", "meta"}`` in the header, ``meta``
    (JSON-serialisable, e.g. the base run) included. Returns the path."""
    from safetensors.torch import save_file

    info = {"token": embedding.token, "dim": embedding.dim, "n_vectors": embedding.n_vectors,
            "meta": dict(meta or {})}
    try:
        header = {"format": "pt", METADATA_KEY: json.dumps(info, sort_keys=True)}
    except (TypeError, ValueError) as e:
        raise UsageError(f"token file meta must be JSON-serialisable: {e}") from None
    tensors = {TENSOR_KEY: embedding.vectors.detach().to("cpu", torch.float32).contiguous()
               .clone()}
    path = Path(path)
    with atomic_write(path) as tmp:
        save_file(tensors, str(tmp), metadata=header)
    return path


def load_token(path: str | os.PathLike, dim: int | None = 384) -> TokenEmbedding:
    """The :class:`TokenEmbedding` written by :func:`save_token` (its ``meta`` as attribute
    ``meta``); nothing is unpickled. CheckpointError for a missing, unreadable or corrupt
    file, or vectors whose width is not ``dim`` (None: any)."""
    tensors, header = read_safetensors(path, "token file")
    vectors = tensors.get(TENSOR_KEY)
    try:
        info = json.loads(header[METADATA_KEY])
        token, n, d = info["token"], int(info["n_vectors"]), int(info["dim"])
        _check_token_string(token)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"token file {path} has no valid {METADATA_KEY!r} header "
                              f"(write it with save_token): {e}") from None
    if vectors is None or tuple(vectors.shape) != (n, d) or not vectors.is_floating_point():
        shape = None if vectors is None else tuple(vectors.shape)
        raise CheckpointError(f"token file {path}: tensor {TENSOR_KEY!r} has shape {shape}, "
                              f"its header says {(n, d)}")
    if dim is not None and d != dim:
        raise CheckpointError(f"token file {path} holds {d}-wide vectors; the text encoder "
                              f"takes {dim}")
    emb = TokenEmbedding(token, d, n)
    with torch.no_grad():
        emb.vectors.copy_(vectors)
    emb.meta = dict(info.get("meta") or {})
    return emb
