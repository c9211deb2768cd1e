"""Noise-level and conditioning embeddings shared by the networks.

A raw network receives ``c_noise`` of shape (B,): ``log(sigma) / 4`` for the EDM target, a
(possibly fractional) timestep for a VP process, ... (see :class:`sfumato.denoiser.Denoiser`).
It is first mapped to ``dim`` features by a fixed function of one of two kinds, then by an MLP
to the network's embedding width ``emb_dim``:

- ``positional``: sinusoidal features ``[cos(c w_i), sin(c w_i)]`` with geometrically spaced
  frequencies ``w_i = max_period ** (-i / half)``, as the Transformer position encoding used
  for timesteps by DDPM (Ho et al. 2020) and ADM (Dhariwal & Nichol 2021).
- ``fourier``: random Fourier features ``[cos(2 pi c f_i), sin(2 pi c f_i)]`` with fixed
  ``f_i ~ N(0, scale^2)`` (Tancik et al. 2020), used on log-sigma by NCSN++ (Song et al. 2021)
  and EDM (Karras et al. 2022).

:class:`ConditionEmbedding` is the whole conditioning path of a network: the noise embedding
plus an optional class embedding (with a null class for classifier-free guidance) plus an
optional externally supplied embedding.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UsageError

__all__ = [
    "EMBEDDINGS",
    "PositionalEmbedding",
    "FourierEmbedding",
    "NoiseEmbedding",
    "ConditionEmbedding",
    "as_batch",
]

EMBEDDINGS = ("positional", "fourier")


def as_batch(c_noise: torch.Tensor | float, batch: int, device: torch.device) -> torch.Tensor:
    """c_noise as a float32 tensor of shape (batch,); a scalar is broadcast."""
    c = torch.as_tensor(c_noise, device=device).to(torch.float32)
    if c.ndim == 0:
        c = c.expand(batch)
    if c.shape != (batch,):
        raise UsageError(
            f"c_noise must be a scalar or have shape (batch,) = ({batch},); "
            f"got shape {tuple(c.shape)}"
        )
    return c


class PositionalEmbedding(nn.Module):
    """Sinusoidal embedding (DDPM/ADM): (B,) -> (B, dim), ``[cos(c w), sin(c w)]``.

    Frequencies ``w_i = max_period ** (-i / half)``, i = 0..half-1 (half = dim // 2), span 1
    down to ~1/max_period. An odd ``dim`` is padded with one zero feature.
    """

    def __init__(self, dim: int, max_period: float = 10000.0) -> None:
        super().__init__()
        if dim < 2:
            raise UsageError(f"embedding dim must be >= 2, got {dim}")
        self.dim = dim
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        arg = c.to(torch.float32)[:, None] * self.freqs[None]
        emb = torch.cat([arg.cos(), arg.sin()], dim=1)
        if self.dim % 2:
            emb = F.pad(emb, (0, 1))
        return emb


class FourierEmbedding(nn.Module):
    """Random Fourier features (NCSN++/EDM): (B,) -> (B, dim), ``[cos(2 pi c f), sin(2 pi c f)]``.

    ``f ~ N(0, scale^2)`` is drawn once at construction (from the global RNG, so it follows
    ``torch.manual_seed``) and saved with the weights as a non-trainable buffer. ``dim`` must be
    even.
    """

    def __init__(self, dim: int, scale: float = 16.0) -> None:
        super().__init__()
        if dim < 2 or dim % 2:
            raise UsageError(f"fourier embedding dim must be even and >= 2, got {dim}")
        self.dim = dim
        self.register_buffer("freqs", torch.randn(dim // 2) * scale)

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        arg = (2 * math.pi) * c.to(torch.float32)[:, None] * self.freqs[None].to(torch.float32)
        return torch.cat([arg.cos(), arg.sin()], dim=1)


class NoiseEmbedding(nn.Module):
    """c_noise (B,) -> (B, emb_dim): fixed features of width ``dim``, then Linear-SiLU-Linear.

    Args:
        dim: width of the fixed sinusoidal/Fourier features.
        emb_dim: output width.
        kind: ``"positional"`` or ``"fourier"``.
        max_period: positional only.
        fourier_scale: fourier only, std of the random frequencies.
    """

    def __init__(self, dim: int, emb_dim: int, kind: str = "positional",
                 max_period: float = 10000.0, fourier_scale: float = 16.0) -> None:
        super().__init__()
        if kind == "positional":
            self.features: nn.Module = PositionalEmbedding(dim, max_period)
        elif kind == "fourier":
            self.features = FourierEmbedding(dim, fourier_scale)
        else:
            raise UsageError(f"unknown embedding {kind!r}; choose one of {EMBEDDINGS}")
        self.kind = kind
        self.mlp = nn.Sequential(nn.Linear(dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        feats = self.features(c).to(self.mlp[0].weight.dtype)
        return self.mlp(feats)


class ConditionEmbedding(nn.Module):
    """The conditioning vector of a network: noise embedding + class embedding + extra.

    Shapes: ``c_noise`` scalar or (B,); ``class_labels`` (B,) integers in [0, num_classes],
    where index ``num_classes`` is the null ("unconditional") class, so a trainer drops labels
    by replacing them with ``num_classes`` and classifier-free guidance calls the same net with
    the null class; ``class_labels=None`` means the null class. ``extra_embedding`` (B, emb_dim)
    is added as is (a hook for other conditioning, computed outside the network). Returns
    (B, emb_dim).

    Args:
        dim: width of the fixed noise features.
        emb_dim: width of the result.
        embedding: ``"positional"`` or ``"fourier"``.
        num_classes: number of classes, or None for an unconditional network (then
            ``class_labels`` must be None).
        max_period, fourier_scale: see :class:`NoiseEmbedding`.
    """

    def __init__(self, dim: int, emb_dim: int, embedding: str = "positional",
                 num_classes: int | None = None, max_period: float = 10000.0,
                 fourier_scale: float = 16.0) -> None:
        super().__init__()
        self.emb_dim = emb_dim
        self.noise = NoiseEmbedding(dim, emb_dim, embedding, max_period, fourier_scale)
        if num_classes is not None and num_classes < 1:
            raise UsageError(f"num_classes must be >= 1 or None, got {num_classes}")
        self.num_classes = num_classes
        self.label = nn.Embedding(num_classes + 1, emb_dim) if num_classes else None

    def forward(self, c_noise: torch.Tensor | float, batch: int, device: torch.device,
                class_labels: torch.Tensor | None = None,
                extra_embedding: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.noise(as_batch(c_noise, batch, device))
        if self.label is not None:
            if class_labels is None:
                class_labels = torch.full((batch,), self.num_classes, dtype=torch.long,
                                          device=device)
            elif class_labels.shape != (batch,):
                raise UsageError(
                    f"class_labels must have shape (batch,) = ({batch},) of integers in "
                    f"[0, {self.num_classes}]; got shape {tuple(class_labels.shape)}"
                )
            emb = emb + self.label(class_labels.long())
        elif class_labels is not None:
            raise UsageError("class_labels given, but the network was built with "
                             "num_classes=None (unconditional)")
        if extra_embedding is not None:
            if extra_embedding.shape != emb.shape:
                raise UsageError(f"extra_embedding must have shape {tuple(emb.shape)}; "
                                 f"got {tuple(extra_embedding.shape)}")
            emb = emb + extra_embedding.to(emb.dtype)
        return emb
