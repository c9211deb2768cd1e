"""Helpers shared by the tests (imported as ``from _util import ...``; pytest puts this folder
on sys.path)."""

from __future__ import annotations

import torch

from sfumato import sigmas as S

#: a tiny class-conditional U-Net for 8x8 digits (a model config section)
TINY_UNET = {"type": "unet", "image_size": 8, "in_channels": 1, "model_channels": 16,
             "channel_mult": [1, 2], "num_res_blocks": 1, "mid_attention": False,
             "norm_groups": 8, "conditional": True}

#: a tiny KL autoencoder run config on 8x8 digits (f = 2: latents 2x4x4), no perceptual
#: loss and no GAN (tests switch them on); update sections with :func:`tiny_autoencoder`
TINY_AE = {
    "data": {"name": "digits"},
    "model": {"type": "autoencoder", "in_channels": 1, "kind": "kl", "factor": 2,
              "channels": 8, "latent_channels": 2, "norm_groups": 4},
    "objective": {"target": "autoencoder"},
    "reconstruction": {"perceptual": 0.0, "gan": 0.0, "scale_images": 256},
    "train": {"steps": 6, "batch_size": 16, "lr": 3e-3, "warmup_steps": 0,
              "checkpoint_every": 3, "num_threads": 1, "ema": {"kind": "classic", "decay": 0.9}},
    "sample": {"n_grid": 8},
}


def tiny_autoencoder(**sections: dict) -> dict:
    """:data:`TINY_AE` with each given section updated key by key (a new dict)."""
    import copy

    out = copy.deepcopy(TINY_AE)
    for k, v in sections.items():
        out[k] = {**out[k], **v}
    return out


def train_runs(root, **configs: dict):
    """Train each config (tiny, no progress bar) into ``root / name``; returns ``root``."""
    from sfumato.train.trainer import Trainer

    for name, cfg in configs.items():
        Trainer(cfg, root / name, progress=False).run()
    return root


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


#: the sigma range of the 2-D ODE truth tests (the ``ode_case`` fixture and its users)
SMAX, SMIN = 20.0, 0.05


def check_options_finite_deterministic_no_inplace(gm, sampler, kw: dict) -> None:
    """A sampler with non-default options ``kw`` is finite at 1..10 steps, deterministic, keeps
    its inputs and, with per-sample generators, gives a sample independent of its batch."""
    x = 80.0 * torch.randn(5, 2, generator=torch.Generator().manual_seed(3))
    gens = lambda idx: [torch.Generator().manual_seed(100 + i) for i in idx]  # noqa: E731
    for n in range(1, 11):
        sig = S.karras(n, 0.002, 80.0)
        x_copy, sig_copy = x.clone(), sig.clone()
        a = sampler(gm, x, sig, generator=gens(range(5)), **kw)
        b = sampler(gm, x, sig, generator=gens(range(5)), **kw)
        assert torch.isfinite(a).all() and a.dtype == x.dtype
        assert torch.equal(a, b)
        assert torch.equal(x, x_copy) and torch.equal(sig, sig_copy)
    alone = sampler(gm, x[3:4], sig, generator=gens([3]), **kw)
    torch.testing.assert_close(alone[0], a[3])


#: a tiny class-conditional U-Net run on the digits (30 steps, seconds): a teacher, a prior
TINY_TEACHER = {
    "data": {"name": "digits"},
    "model": {"type": "unet", "image_size": 8, "in_channels": 1, "model_channels": 8,
              "channel_mult": [1, 2], "num_res_blocks": 1, "attention_resolutions": [],
              "mid_attention": False, "norm_groups": 4, "conditional": True},
    "objective": {"label_dropout": 0.1},
    "train": {"steps": 30, "batch_size": 32, "lr": 2e-3, "warmup_steps": 2,
              "checkpoint_every": 0, "num_threads": 1, "precision": "fp32"},
    "sample": {"sampler": "euler", "steps": 4, "n_grid": 4},
}


def write_bars(folder, n: int, size: tuple[int, int], rows: tuple[int, int], col: int,
               width: int):
    """``n`` PNG images ``0.png`` ... in ``folder`` (made): a white vertical bar (rows
    ``rows``, columns ``col + i`` to ``col + i + width``) on black, shifted by one pixel per
    image i. Returns the folder."""
    from pathlib import Path

    import numpy as np
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        a = np.zeros(size, np.uint8)
        a[rows[0]:rows[1], col + i:col + i + width] = 255
        Image.fromarray(a).save(folder / f"{i}.png")
    return folder
