"""The low-resolution conditioning of a super-resolution run, with noise-conditioning
augmentation (Ho et al. 2022, "Cascaded Diffusion Models for High Fidelity Image Generation",
§3-4).

A super-resolution stage models p(x | z): full-resolution images x given a low-resolution
image z, fed to the network upsampled to x's size as extra input channels
(:class:`sfumato.nets.ImageConditioned`, as SR3 does, Saharia et al. 2022). In a cascade z is a
*sample* of the stage below, not a real downsampled image, and that mismatch compounds.
Conditioning augmentation closes it (their §3, Gaussian noise in the "non-truncated
conditioning augmentation" form): in training the upsampled image is corrupted with Gaussian
noise of a random level s that the network is told,

    up      = upsample(downsample(x0, low), full)           (N, C, H, W)
    z_s     = up + s * eps,   eps ~ N(0, I)                  s per sample, given to the net

and at sampling time one fixed level s is chosen (a hyperparameter their §4 sweeps; 0 uses
the stage below's output as it is). Here s is drawn uniformly from ``[0, aug_sigma_max]``
except that with probability ``aug_zero_p`` it is exactly 0: the point mass trains the net on
the clean conditioning it sees at ``aug_sigma = 0``, where a continuous draw would only come
close. The corruption is the variance-exploding form (no shrinking of ``up``), so at s = 0 the
network sees exactly the clean upsampled image, and data in [-1, 1] stays comparable to the
noise level.

Resampling is :func:`sfumato.data.base.resize` both ways (bilinear, antialiased when
shrinking), the same function the data sets use for ``size``, so a base stage trained on
``{"name": "mnist", "size": 14}`` produces what ``downsample(x0, 14)`` gives the SR stage in
training.

A run is a super-resolution run when its config section ``superres`` sets ``low_size``
(:data:`SUPERRES_DEFAULTS`); the trainer makes the conditioning on the fly from each clean
batch (:class:`LowResConditioning`), and :class:`sfumato.superres.SuperResModel` samples it.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .data.base import resize
from .errors import ConfigError, UsageError

__all__ = ["SUPERRES_DEFAULTS", "LowResConditioning", "downsample", "upsample", "augment",
           "aug_generators", "low_hw", "check_superres_config"]

SUPERRES_DEFAULTS: dict[str, Any] = {
    "low_size": None,       # side (or [h, w]) of the low-resolution input; set: an SR run
    "aug_sigma_max": 1.0,   # training: augmentation level s ~ U[0, aug_sigma_max] ...
    "aug_zero_p": 0.1,      # ... except s = 0 exactly with this probability
    "aug_sigma": 0.0,       # sampling: the fixed level by default (Model.sample, cascades)
}


def low_hw(low_size: int | Sequence[int]) -> tuple[int, int]:
    """(h, w) of a ``low_size`` config value (an int side, or [h, w])."""
    hw = (low_size, low_size) if isinstance(low_size, int) else tuple(low_size)
    if len(hw) != 2 or not all(isinstance(v, int) and v >= 1 for v in hw):
        raise ConfigError(f"superres.low_size must be a positive int or [height, width]; got "
                          f"{low_size!r}")
    return (int(hw[0]), int(hw[1]))


def downsample(x: torch.Tensor, size: int | Sequence[int]) -> torch.Tensor:
    """(N, C, H, W) images -> (N, C, h, w): antialiased bilinear (``resize``), clamped to
    [-1, 1]."""
    return resize(x, low_hw(size))


def upsample(low: torch.Tensor, size: int | Sequence[int]) -> torch.Tensor:
    """(N, C, h, w) low-resolution images -> (N, C, H, W): bilinear (``resize``), clamped to
    [-1, 1] (a base stage's samples may overshoot the data range slightly)."""
    return resize(low, low_hw(size))


def aug_generators(seed: int, n: int, stream: str = "aug") -> list[torch.Generator]:
    """One generator per sample for the conditioning noise of sample i, seeded from (seed,
    i, ``stream``) by hashing: independent of the sampler's own per-sample streams
    (:func:`sfumato.samplers._api.per_sample_generators`) and of n."""
    def one(i: int) -> torch.Generator:
        digest = hashlib.sha256(f"{stream} {seed} {i}".encode()).digest()
        return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)

    return [one(i) for i in range(n)]


def augment(up: torch.Tensor, aug_sigma: torch.Tensor | float,
            generator: torch.Generator | Sequence[torch.Generator]) -> torch.Tensor:
    """``up + s * eps`` (Ho et al. 2022, §3, Gaussian augmentation in variance-exploding
    form): up (N, C, H, W), s a float or (N,), eps drawn from ``generator`` (one, or one per
    row). Rows with s = 0 are ``up`` exactly."""
    s = torch.as_tensor(aug_sigma, dtype=up.dtype, device=up.device).reshape(-1)
    s = s.expand(up.shape[0]) if s.numel() == 1 else s
    if s.shape != (up.shape[0],):
        raise UsageError(f"aug_sigma must be a number or one level per image ({up.shape[0]}); "
                         f"got shape {tuple(s.shape)}")
    if isinstance(generator, torch.Generator):
        eps = torch.randn(up.shape, generator=generator, dtype=up.dtype)
    else:
        eps = torch.stack([torch.randn(up.shape[1:], generator=g, dtype=up.dtype)
                           for g in generator])
    s4 = s.reshape(-1, 1, 1, 1)
    return torch.where(s4 == 0, up, up + s4 * eps.to(up.device))


def check_superres_config(sec: Mapping[str, Any], image_shape: Sequence[int],
                          model_cfg: Mapping[str, Any]) -> tuple[int, int]:
    """Check a run's ``superres`` section against its data's image shape (C, H, W) and its
    ``model`` section; returns the low-resolution (h, w). ConfigError naming the fix."""
    hw = low_hw(sec["low_size"])
    if len(image_shape) != 3:
        raise ConfigError(f"superres needs image data (C, H, W); this data set's samples have "
                          f"shape {list(image_shape)}")
    if hw[0] >= image_shape[1] or hw[1] >= image_shape[2]:
        raise ConfigError(f"superres.low_size {list(hw)} must be smaller than the images "
                          f"{list(image_shape[1:])} (set data.size to the high resolution)")
    for key in ("aug_sigma_max", "aug_sigma"):
        v = sec[key]
        if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ConfigError(f"superres.{key} must be a finite number >= 0; got {v!r}")
    p = sec["aug_zero_p"]
    if not isinstance(p, (int, float)) or not 0 <= p <= 1:
        raise ConfigError(f"superres.aug_zero_p must be a probability in [0, 1]; got {p!r}")
    if model_cfg.get("type") != "image_conditioned":
        raise ConfigError("a super-resolution run (superres.low_size) takes the upsampled "
                          "low-resolution image as extra channels: use model.type "
                          "'image_conditioned' with the network in model.base (see "
                          f"configs/mnist_superres.json); got {model_cfg.get('type')!r}")
    if sec["aug_sigma_max"] > 0 and not model_cfg.get("aug_level"):
        raise ConfigError("superres.aug_sigma_max > 0 noises the conditioning image, and the "
                          "network must be told the level: set model.aug_level true (or "
                          "superres.aug_sigma_max 0 for no augmentation)")
    return hw


class LowResConditioning:
    """The conditioning of a super-resolution run, made from clean full-resolution images.

    Args:
        low_size: side (or (h, w)) of the low-resolution image.
        aug_sigma_max: training levels s ~ U[0, aug_sigma_max] (0: no augmentation).
        aug_zero_p: probability that s = 0 exactly.
        aug_level: whether the network takes the level (``aug_sigma`` kwarg, see
            :class:`sfumato.nets.ImageConditioned`); without it no level is passed.

    ``batch(x0, generator)`` -> ``{"image": z_s (B, C, H, W), "aug_sigma": s (B,)}`` for
    clean images x0 (B, C, H, W), levels and noise drawn from ``generator``;
    ``conditioning(low, full_hw, s, generators)`` the same for given low-resolution images.
    """

    def __init__(self, low_size: int | Sequence[int], aug_sigma_max: float = 1.0,
                 aug_zero_p: float = 0.1, aug_level: bool = True) -> None:
        self.low_hw = low_hw(low_size)
        self.aug_sigma_max, self.aug_zero_p = float(aug_sigma_max), float(aug_zero_p)
        self.aug_level = bool(aug_level)

    def draw_levels(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """(n,) levels: U[0, aug_sigma_max], set to 0 with probability ``aug_zero_p``."""
        s = torch.rand(n, generator=generator) * self.aug_sigma_max
        zero = torch.rand(n, generator=generator) < self.aug_zero_p
        return torch.where(zero, torch.zeros_like(s), s)

    def conditioning(self, low: torch.Tensor, full_hw: Sequence[int],
                     aug_sigma: torch.Tensor | float,
                     generator: torch.Generator | Sequence[torch.Generator]
                     ) -> dict[str, torch.Tensor]:
        """The network's conditioning kwargs for low-resolution images (B, C, h, w) at level(s)
        ``aug_sigma``: the upsampled, augmented ``image`` and (when the net takes it) the
        (B,) ``aug_sigma``."""
        up = augment(upsample(low, full_hw), aug_sigma, generator)
        cond = {"image": up}
        if self.aug_level:
            s = torch.as_tensor(aug_sigma, dtype=torch.float32).reshape(-1)
            cond["aug_sigma"] = s.expand(low.shape[0]).clone() if s.numel() == 1 else s
        return cond

    def batch(self, x0: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Training conditioning for clean images x0 (B, C, H, W): downsample, upsample,
        augment at random levels (Ho et al. 2022, §3)."""
        s = self.draw_levels(x0.shape[0], generator) if self.aug_sigma_max > 0 \
            else torch.zeros(x0.shape[0])
        return self.conditioning(downsample(x0, self.low_hw), x0.shape[-2:], s, generator)

    def examples(self, x0: torch.Tensor) -> dict[str, torch.Tensor]:
        """Clean (level 0) conditioning from real images x0 (a run's sample grid)."""
        return self.conditioning(downsample(x0, self.low_hw), x0.shape[-2:], 0.0,
                                 torch.Generator().manual_seed(0))
