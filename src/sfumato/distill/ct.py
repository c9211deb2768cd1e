"""Consistency training without a teacher: iCT (Song & Dhariwal 2023, "Improved techniques
for training consistency models") from scratch, or ECT (Geng et al. 2024, "Consistency models
made easy") fine-tuning that starts from the teacher's weights.

Both use the consistency loss of :mod:`sfumato.distill.consistency`, with the lower point of
a pair on the *same* noise instead of a teacher ODE step (Song et al. 2023, Alg. 3: the
one-sample estimate of the score)::

    x_t = x0 + t z,   x_r = x0 + r z,   L = d(f(x_t, t), sg f(x_r, r)) / (t - r)

Pairs. ``init = "scratch"``: iCT's Karras discretisation, doubling from ``n_start`` = 10 to
``n_end`` = 1280 levels (iCT eq. 5) with log-normal pair probabilities. ``init = "teacher"``:
ECT's continuous schedule: t ~ log-normal(P_mean, P_std), and r = t - t n(t) / q^a with
n(t) = 1 + 8 sigmoid(-t) and a = floor(stages * step / steps), so the gap shrinks from a
denoising loss (r = sigma_min) at the start to a fine consistency condition (ECT §3, eq. 11
and "mapping function"). The teacher is used for nothing but the initial weights.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from ..denoiser import as_sigma
from .consistency import ConsistencyObjective


class ShrinkingPairs:
    """ECT's pairs: ``draw`` t log-normally in [sigma_min, sigma_max]; ``lower(t)`` =
    max(sigma_min, t - t n(t) / q^a), a the stage of the current step."""

    def __init__(self, sigma_min: float, sigma_max: float, p_mean: float, p_std: float,
                 q: float, stages: int) -> None:
        self.sigma_min, self.sigma_max = sigma_min, sigma_max
        self.p_mean, self.p_std, self.q, self.stages = p_mean, p_std, q, stages
        self.stage = 0

    def at_step(self, step: int, total: int) -> None:
        self.stage = min(self.stages - 1, self.stages * step // max(total, 1))

    def draw(self, n: int, generator: torch.Generator) -> torch.Tensor:
        z = torch.randn(n, generator=generator, dtype=torch.float64)
        t = (self.p_mean + self.p_std * z).exp()
        return t.clamp(self.sigma_min * 1.01, self.sigma_max).float()

    def lower(self, t: torch.Tensor) -> torch.Tensor:
        gap = t * (1 + 8 * torch.sigmoid(-t)) / self.q ** (self.stage + 1)
        return (t - gap).clamp_min(self.sigma_min)


class ConsistencyTraining(ConsistencyObjective):
    """CT: the lower point is the same data point on the same noise at the lower level."""

    SETTINGS: ClassVar[dict[str, Any]] = {
        "init": "teacher",             # "teacher" (ECT) or "scratch" (iCT)
        "n_start": 10, "n_end": 1280,  # iCT curriculum (init = "scratch")
        "q": 2.0, "stages": 8,         # ECT gap schedule (init = "teacher")
        "p_mean": -1.1, "p_std": 2.0,  # log-normal levels
        "huber_c": None,
    }
    TRAIN: ClassVar[dict[str, Any]] = {"lr": 2e-4, "warmup_steps": 0, "schedule": "constant",
                                       "steps": 1200, "ema": {"kind": "classic",
                                                              "decay": 0.999}}
    SAMPLE: ClassVar[dict[str, Any]] = {"sampler": "consistency", "steps": 1, "grid": "karras",
                                        "sigma_min": 2.5, "sigma_max": 80.0}

    @property
    def init_from_teacher(self) -> bool:
        return self.s["init"] == "teacher"

    def make_pairs(self):
        s = self.s
        if s["init"] == "teacher":
            return ShrinkingPairs(self.sigma_min, self.sigma_max, s["p_mean"], s["p_std"],
                                  s["q"], s["stages"])
        return super().make_pairs()

    def lower_point(self, x0, xt, t, r, noise, cond):
        return x0 + as_sigma(r, x0) * noise
