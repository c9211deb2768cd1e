"""Consistency distillation (Song et al. 2023, "Consistency Models", Alg. 2), with the
improvements of Song & Dhariwal 2023 ("Improved techniques for training consistency models",
iCT) where they help.

The student ``f(x, sigma)`` (a :class:`~sfumato.denoiser.ConsistencyDenoiser`: f(x, sigma_min)
= x by construction) is trained so that two points of one teacher PF-ODE trajectory map to
the same endpoint. For adjacent levels r < t of the discretisation::

    x_t   = x0 + t z                                  (a data point, noised)
    x_r   = Heun step of the teacher's PF-ODE from (x_t, t) to r       (Alg. 2, line 5)
    L     = d(f(x_t, t), sg f(x_r, r)) / (t - r)

- target network: the student itself under stop-gradient (iCT §3.2: the EMA target of CD's
  Alg. 2 with mu = 0; the sampling EMA is kept separately by the trainer);
- d: pseudo-Huber (iCT eq. 10), weight 1 / (t - r) (iCT §3.1);
- levels: a Karras discretisation whose size doubles from ``n_start`` to ``n_end`` over
  training (iCT eq. 5), pairs drawn with log-normal probabilities (iCT eq. 8).

The student starts from the teacher's weights (Song et al. 2023, §6.1) when the teacher is an
EDM-parameterised run (its preconditioning then differs only by sigma_min).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from ..denoiser import as_sigma
from ._common import DiscretePairs, DistillObjective, heun_step, pseudo_huber


class ConsistencyObjective(DistillObjective):
    """The consistency loss around a pair schedule; subclasses say where the lower point of a
    pair comes from (:meth:`lower_point`)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.pairs = self.make_pairs()

    def make_pairs(self):
        s = self.s
        return DiscretePairs(self.sigma_min, self.sigma_max, s["n_start"], s["n_end"],
                             s["p_mean"], s["p_std"])

    def at_step(self, step: int) -> None:
        super().at_step(step)
        self.pairs.at_step(step, self.total_steps)

    def sample_sigma(self, n, denoiser, *, generator, device="cpu") -> torch.Tensor:
        return self.pairs.draw(n, generator).to(device)

    def lower_point(self, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor,
                    r: torch.Tensor, noise: torch.Tensor, cond: dict) -> torch.Tensor:
        raise NotImplementedError

    def student_cond(self, cond: dict, generator: torch.Generator) -> tuple[dict, dict]:
        """(the student's conditioning, the teacher's) for a batch: the same by default."""
        return cond, cond

    def loss(self, student, x0, *, generator, sigma=None, noise=None, **cond) -> torch.Tensor:
        t = sigma.to(x0.device)
        r = self.pairs.lower(t)
        xt = x0 + as_sigma(t, x0) * noise
        s_cond, t_cond = self.student_cond(cond, generator)
        with torch.no_grad():
            xr = self.lower_point(x0, xt, t, r, noise, t_cond)
            target = student(xr, r, **s_cond)
        pred = student(xt, t, **s_cond)
        return pseudo_huber(pred, target, self.s["huber_c"]) / (t - r)


class ConsistencyDistillation(ConsistencyObjective):
    """CD: the lower point is one Heun step of the teacher's PF-ODE (Song et al. 2023,
    Alg. 2)."""

    SETTINGS: ClassVar[dict[str, Any]] = {
        "n_start": 10, "n_end": 40,     # levels of the discretisation (doubling curriculum)
        "p_mean": -1.1, "p_std": 2.0,   # log-normal pair probabilities (iCT)
        "huber_c": None,                # pseudo-Huber c; None: 0.00054 sqrt(dim)
    }
    TRAIN: ClassVar[dict[str, Any]] = {"lr": 2e-4, "warmup_steps": 0, "schedule": "constant",
                                       "steps": 3300, "ema": {"kind": "classic",
                                                              "decay": 0.999}}
    SAMPLE: ClassVar[dict[str, Any]] = {"sampler": "consistency", "steps": 1, "grid": "karras",
                                        "sigma_min": 2.5, "sigma_max": 80.0}

    def lower_point(self, x0, xt, t, r, noise, cond):
        return heun_step(self.teacher, xt, t, r, **cond)
