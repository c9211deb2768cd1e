"""The high-level API: load a trained run and sample from it.

    model = sfumato.load("runs/digits")              # config + EMA weights
    x = model.sample(16, sampler="heun", steps=18, seed=0)   # (16, 1, 8, 8) in [-1, 1]
    images = model.to_uint8(x)                       # (16, 8, 8, 1) uint8

The CLI (``sfumato sample``) is a thin layer over this.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from .data.base import to_uint8 as data_to_uint8
from .samplers import sample


def per_sample_generators(seed: int, n: int, start: int = 0,
                          device: torch.device | str = "cpu") -> list[torch.Generator]:
    """One generator per sample, seeded from (seed, index): sample i does not depend on how
    many samples are drawn together."""
    return [torch.Generator(device).manual_seed(seed * 1_000_003 + start + i) for i in range(n)]


@torch.no_grad()
def sample_from(denoiser, shape: tuple[int, ...], sample_cfg: dict, *, seed: int = 0,
                device: torch.device | str = "cpu", class_labels: torch.Tensor | None = None,
                callback=None) -> torch.Tensor:
    """Sample with a config dict {sampler, steps, grid, sigma_min, sigma_max, kwargs}, one
    generator per sample (see :func:`sfumato.samplers.sample`)."""
    cond = {"class_labels": class_labels.to(device)} if class_labels is not None else {}
    return sample(denoiser, shape, sampler=sample_cfg.get("sampler", "heun"),
                  steps=int(sample_cfg.get("steps", 18)), grid=sample_cfg.get("grid", "karras"),
                  sigma_min=sample_cfg.get("sigma_min", 0.002),
                  sigma_max=sample_cfg.get("sigma_max", 80.0),
                  generator=per_sample_generators(seed, shape[0]), device=device,
                  callback=callback, sampler_kwargs=sample_cfg.get("kwargs"), **cond)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) floats in [-1, 1] -> (N, H, W, C) uint8 numpy (``sfumato.data.to_uint8``)."""
    return data_to_uint8(x).numpy()


class Model:
    """A trained run: its config and EMA network wrapped as a σ-space denoiser."""

    def __init__(self, config: dict, denoiser, state: dict, device: torch.device) -> None:
        self.config, self.denoiser, self.state, self.device = config, denoiser, state, device
        self.num_classes = state.get("num_classes")
        self.shape = tuple(state["data_shape"]) if state.get("data_shape") else None

    @torch.no_grad()
    def sample(self, n: int, *, sampler: str | None = None, steps: int | None = None,
               seed: int = 0, class_labels: torch.Tensor | int | None = None,
               grid: str | None = None, **sampler_kwargs) -> torch.Tensor:
        """n samples as a float tensor (n, *data_shape) in the data range.

        A class-conditional model with ``class_labels=None`` samples the classes evenly
        (labels ``arange(n) % num_classes``, available as ``self.last_labels``).
        """
        cfg = dict(self.config["sample"])
        cfg.update({k: v for k, v in (("sampler", sampler), ("steps", steps), ("grid", grid))
                    if v is not None})
        if sampler_kwargs:
            cfg["kwargs"] = sampler_kwargs
        if isinstance(class_labels, int):
            class_labels = torch.full((n,), class_labels, dtype=torch.long)
        if class_labels is None and self.num_classes:
            class_labels = torch.arange(n) % self.num_classes
        self.last_labels = class_labels
        return sample_from(self.denoiser, (n, *self.shape), cfg, seed=seed, device=self.device,
                           class_labels=class_labels)

    def to_uint8(self, x: torch.Tensor) -> np.ndarray:
        return to_uint8(x)


def load(run_dir: str | os.PathLike, *, device: torch.device | str = "cpu",
         dtype: torch.dtype = torch.float32) -> Model:
    """Load a run directory (or a checkpoint directory): config + EMA weights."""
    from .nets import build_net
    from .train.checkpoint import load_checkpoint
    from .train.trainer import build_denoiser

    tensors, state, config = load_checkpoint(Path(run_dir), stems=("ema",))
    model_cfg = dict(config["model"])
    model_cfg.pop("conditional", None)
    if state.get("num_classes"):
        model_cfg["num_classes"] = state["num_classes"]
    net = build_net(model_cfg)
    net.load_state_dict(tensors["ema"])
    net = net.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return Model(config, build_denoiser(net, config["objective"]), state, torch.device(device))
