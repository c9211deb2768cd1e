"""2-D toy distributions: two moons, swiss roll, 8 Gaussians, checkerboard.

Each is a function ``sample(n, generator) -> (n, 2)`` float32 tensor, standardised so that
every coordinate has mean 0 and standard deviation 1 (the constants are exact or from a fine
quadrature, not from the sample). Ground truth is unlimited: draw a fresh sample whenever a
metric needs one (:func:`sample_toy`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

__all__ = ["TOYS", "sample_toy", "moons", "swissroll", "gaussians8", "checkerboard"]


def _std(x: torch.Tensor, mean: tuple[float, float], std: tuple[float, float]) -> torch.Tensor:
    return ((x - torch.tensor(mean, dtype=x.dtype)) / torch.tensor(std, dtype=x.dtype)).float()


def moons(n: int, generator: torch.Generator | None = None, *, noise: float = 0.1) -> torch.Tensor:
    """Two interleaved half circles (as sklearn's ``make_moons``) with Gaussian noise."""
    t = torch.rand(n, generator=generator, dtype=torch.float64) * math.pi
    upper = torch.rand(n, generator=generator) < 0.5
    x = torch.where(upper, torch.cos(t), 1 - torch.cos(t))
    y = torch.where(upper, torch.sin(t), 0.5 - torch.sin(t))
    p = torch.stack([x, y], 1) + noise * torch.randn(n, 2, generator=generator,
                                                     dtype=torch.float64)
    # exact moments: var x = 1/2 + 1/4 + noise^2; var y = 1/2 - 4/pi^2 + (2/pi - 1/4)^2 + noise^2
    vy = 0.5 - 4 / math.pi**2 + (2 / math.pi - 0.25) ** 2
    return _std(p, (0.5, 0.25), (math.sqrt(0.75 + noise**2), math.sqrt(vy + noise**2)))


def swissroll(n: int, generator: torch.Generator | None = None, *,
              noise: float = 0.5) -> torch.Tensor:
    """The 2-D swiss roll (spiral ``t (cos t, sin t)``, t in [1.5 pi, 4.5 pi]) plus noise."""
    t = 1.5 * math.pi * (1 + 2 * torch.rand(n, generator=generator, dtype=torch.float64))
    p = torch.stack([t * torch.cos(t), t * torch.sin(t)], 1)
    p = p + noise * torch.randn(n, 2, generator=generator, dtype=torch.float64)
    # moments of the noiseless spiral from a 1e7-point midpoint quadrature
    vx, vy = 6.641861294494965**2 - 0.25, 6.96916708209354**2 - 0.25
    return _std(p, (2.0, 0.21220659078918508),
                (math.sqrt(vx + noise**2), math.sqrt(vy + noise**2)))


def gaussians8(n: int, generator: torch.Generator | None = None, *,
               std: float = 0.1) -> torch.Tensor:
    """Eight isotropic Gaussians (per-axis ``std`` before scaling) evenly spaced on a circle."""
    k = torch.randint(0, 8, (n,), generator=generator)
    ang = k.double() * (2 * math.pi / 8)
    r = math.sqrt(2 * (1 - std**2))  # per-coordinate variance r^2 / 2 + std^2 = 1
    centers = torch.stack([r * torch.cos(ang), r * torch.sin(ang)], 1)
    return (centers + std * torch.randn(n, 2, generator=generator, dtype=torch.float64)).float()


def checkerboard(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Uniform on the 8 dark squares of a 4 x 4 checkerboard."""
    x1 = torch.rand(n, generator=generator, dtype=torch.float64) * 4 - 2
    row = torch.randint(0, 2, (n,), generator=generator).double() * 2
    x2 = torch.rand(n, generator=generator, dtype=torch.float64) - row + torch.floor(x1) % 2
    # both coordinates are uniform on [-2, 2]: std 4 / sqrt(12)
    return (torch.stack([x1, x2], 1) / (4 / math.sqrt(12))).float()


TOYS: dict[str, Callable[..., torch.Tensor]] = {
    "moons": moons,
    "swissroll": swissroll,
    "8gaussians": gaussians8,
    "checkerboard": checkerboard,
}


def sample_toy(name: str, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """A fresh ``(n, 2)`` sample of the toy called ``name`` (one of :data:`TOYS`)."""
    if name not in TOYS:
        from ._config import unknown

        raise unknown("toy", name, TOYS)
    return TOYS[name](n, generator)
