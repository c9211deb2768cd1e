"""Exponential moving averages of network weights.

- :class:`EMA`: classic fixed decay beta (Polyak averaging), with an optional warm-up
  ``beta_t = min(decay, (1 + t) / (10 + t))`` so early averages are not dominated by the
  random initialisation.
- :class:`PowerEMA`: EDM2's power-function EMA (Karras et al. 2024, "Analyzing and Improving
  the Training Dynamics of Diffusion Models", eq. 3-4): beta_t = (1 - 1/t)^(gamma + 1), whose
  averaging profile has relative standard deviation
  sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3))) (eq. 5); give either.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..errors import ConfigError


def gamma_from_sigma_rel(sigma_rel: float) -> float:
    """Invert EDM2's sigma_rel(gamma) (Karras et al. 2024, eq. 5) by bisection."""
    if not 0 < sigma_rel < 0.5:
        raise ConfigError(f"sigma_rel must be in (0, 0.5); got {sigma_rel}")

    def rel(g: float) -> float:
        return ((g + 1) / ((g + 2) ** 2 * (g + 3))) ** 0.5

    lo, hi = 1e-6, 1e6  # rel is decreasing in gamma
    for _ in range(200):
        mid = (lo * hi) ** 0.5
        lo, hi = (mid, hi) if rel(mid) > sigma_rel else (lo, mid)
    return (lo * hi) ** 0.5


class EMA(nn.Module):
    """Classic EMA of a module's parameters (buffers are copied). ``self.module`` is the
    averaged copy, in float32."""

    def __init__(self, model: nn.Module, decay: float = 0.999, warmup: bool = True) -> None:
        super().__init__()
        if not 0 <= decay < 1:
            raise ConfigError(f"EMA decay must be in [0, 1); got {decay}")
        self.module = copy.deepcopy(model).float().eval().requires_grad_(False)
        self.decay, self.warmup = decay, warmup

    def beta(self, step: int) -> float:
        """Decay used at optimizer step ``step`` (1-based)."""
        return min(self.decay, (1 + step) / (10 + step)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """Blend the model's current parameters in; ``step`` counts optimizer steps from 1."""
        b = self.beta(step)
        for e, p in zip(self.module.parameters(), model.parameters(), strict=True):
            e.lerp_(p.detach().float(), 1 - b)
        for e, p in zip(self.module.buffers(), model.buffers(), strict=True):
            e.copy_(p)


class PowerEMA(EMA):
    """EDM2 power-function EMA: beta_t = (1 - 1/t)^(gamma + 1). Give gamma or sigma_rel."""

    def __init__(self, model: nn.Module, gamma: float | None = None,
                 sigma_rel: float | None = None) -> None:
        super().__init__(model, decay=0.0, warmup=False)
        if (gamma is None) == (sigma_rel is None):
            raise ConfigError("PowerEMA needs exactly one of gamma or sigma_rel")
        self.gamma = gamma if gamma is not None else gamma_from_sigma_rel(sigma_rel)

    def beta(self, step: int) -> float:
        return (1 - 1 / step) ** (self.gamma + 1) if step > 0 else 0.0


def build_ema(model: nn.Module, cfg: dict | None) -> EMA:
    """{"kind": "classic", "decay": 0.999, "warmup": true} or {"kind": "power", "sigma_rel":
    0.05} (or "gamma")."""
    cfg = dict(cfg or {})
    kind = cfg.pop("kind", "classic")
    if kind == "classic":
        return EMA(model, **cfg)
    if kind == "power":
        return PowerEMA(model, **cfg)
    raise ConfigError(f"unknown EMA kind {kind!r}; use 'classic' or 'power'")
