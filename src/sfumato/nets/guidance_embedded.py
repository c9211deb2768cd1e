"""A network that takes the classifier-free guidance scale as an input (Meng et al. 2023, "On
distillation of guided diffusion models", §4.1: w is embedded and added to the time
embedding), so one forward pass gives what a guided teacher needs two for.

``GuidanceEmbedded(base)`` wraps any sfumato network whose forward takes ``extra_embedding``
(U-Net, DiT, MLP): ``forward(x, c_noise, ..., guidance_scale=w)`` embeds w (B,) with sinusoidal
features and an MLP whose last layer starts at zero, and adds it to the base network's
conditioning vector. A fresh wrapper is therefore exactly its base network at every w, and a
student starts as its teacher.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import UsageError
from ._common import zero_
from .embedding import PositionalEmbedding, as_batch


class GuidanceEmbedded(nn.Module):
    """``base`` plus a guidance-scale embedding; shapes as the base network's, with
    ``guidance_scale`` a float or (B,) (None: 1, the plain conditional model)."""

    def __init__(self, base: nn.Module, features: int = 32) -> None:
        super().__init__()
        emb_dim = getattr(base, "emb_dim", None)
        if not emb_dim:
            raise UsageError(f"a guidance-embedded network needs a base network with a "
                             f"conditioning embedding (emb_dim); got {type(base).__name__}")
        self.base = base
        self.w_features = PositionalEmbedding(features, max_period=100.0)
        self.w_mlp = nn.Sequential(nn.Linear(features, emb_dim), nn.SiLU(),
                                   zero_(nn.Linear(emb_dim, emb_dim)))

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor | float, *args,
                guidance_scale: torch.Tensor | float | None = None, **kwargs) -> torch.Tensor:
        w = as_batch(1.0 if guidance_scale is None else guidance_scale, x.shape[0], x.device)
        e = self.w_mlp(self.w_features(w).to(self.w_mlp[0].weight.dtype))
        if kwargs.get("extra_embedding") is not None:
            e = e + kwargs.pop("extra_embedding")
        kwargs["extra_embedding"] = e
        return self.base(x, c_noise, *args, **kwargs)
