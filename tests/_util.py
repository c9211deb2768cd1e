"""Helpers shared by the tests (imported as ``from _util import ...``; pytest puts this folder
on sys.path)."""

from __future__ import annotations

import torch

#: a tiny class-conditional U-Net for 8x8 digits (a model config section)
TINY_UNET = {"type": "unet", "image_size": 8, "in_channels": 1, "model_channels": 16,
             "channel_mult": [1, 2], "num_res_blocks": 1, "mid_attention": False,
             "norm_groups": 8, "conditional": True}


def perturb_(net: torch.nn.Module, scale: float = 0.05, seed: int = 1) -> torch.nn.Module:
    """Add small noise to every parameter in place (un-zeroes zero-initialised layers, so a
    fresh network is not the zero function); returns the network."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return net


def gen(seed: int = 0) -> torch.Generator:
    """A CPU generator seeded with ``seed``."""
    return torch.Generator().manual_seed(seed)
