"""What every distillation method shares: the objective interface the trainer calls, the
method's settings (the run config's ``distill`` section), the frozen teacher, the consistency
pair schedules, the teacher's ODE step and the pseudo-Huber distance."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch

from ..denoiser import as_sigma
from ..errors import ConfigError, did_you_mean


class DistillObjective:
    """A distillation method as the trainer sees it (the interface of
    :class:`sfumato.train.objective.Objective`):

    - ``sample_sigma(n, denoiser, generator=, device=)`` -> (n,) noise levels of a batch;
    - ``loss(student, x0, generator=, sigma=, noise=, **cond)`` -> (B,) per-sample loss, where
      ``student`` is the student's σ-space denoiser (gradients flow through it) and ``x0``,
      ``sigma``, ``noise`` are the batch's data, levels and N(0, I) draws;
    - ``at_step(step)``: called before every optimizer step (curricula, teacher rounds).

    Subclasses declare ``SETTINGS`` (the ``distill`` keys and their defaults), ``TRAIN`` (train
    section defaults), ``SAMPLE`` (sampling defaults of the student) and ``NEEDS`` (what the
    teacher must have: ``"classes"`` for a conditional teacher).
    """

    SETTINGS: ClassVar[dict[str, Any]] = {}
    TRAIN: ClassVar[dict[str, Any]] = {}
    SAMPLE: ClassVar[dict[str, Any]] = {}
    NEEDS: ClassVar[tuple[str, ...]] = ()
    #: how the student's output is parameterised (the run's ``objective.target``; None: the
    #: teacher's)
    TARGET: ClassVar[str | None] = "consistency"

    def __init__(self, settings: Mapping[str, Any], teacher: Callable | None,
                 total_steps: int, objective: Mapping[str, Any] | None = None,
                 num_classes: int | None = None) -> None:
        obj = objective or {}
        self.s = dict(settings)
        self.teacher = teacher
        self.total_steps = max(1, int(total_steps))
        self.sigma_data = float(obj.get("sigma_data", 0.5))
        self.sigma_min = float(obj.get("sigma_min") or 0.002)
        self.sigma_max = float(obj.get("sigma_max") or 80.0)
        self.num_classes = num_classes
        self.step = 0

    @classmethod
    def student_model(cls, teacher_model: Mapping[str, Any]) -> dict[str, Any]:
        """The student's ``model`` config section: the teacher's network by default."""
        return dict(teacher_model)

    @staticmethod
    def init_module(net):
        """The part of the student's network that starts from the teacher's weights."""
        return net

    init_from_teacher = True

    @classmethod
    def adjust(cls, cfg: dict[str, Any]) -> None:
        """Last changes to a full student config (after overrides and ``--steps``)."""

    def bind(self, trainer) -> None:
        """Give the objective the trainer's student network, run directory and objective
        config (methods that turn the student into a teacher need them)."""
        self.student_net, self.out = trainer.net, trainer.out
        self.objective_cfg = trainer.cfg["objective"]

    def make_denoiser(self, net):
        """A σ-space denoiser of a copy of the student's network, frozen."""
        from ..run import build_denoiser

        return build_denoiser(net.eval(), self.objective_cfg)

    @classmethod
    def settings(cls, given: Mapping[str, Any]) -> dict[str, Any]:
        """The method's settings: its defaults with ``given`` applied; an unknown key is a
        :class:`ConfigError` that names the valid ones."""
        for k in given:
            if k not in cls.SETTINGS and k != "method":
                raise ConfigError(f"unknown setting 'distill.{k}'{did_you_mean(k, cls.SETTINGS)} "
                                  f"for this method; its settings are {sorted(cls.SETTINGS)}")
        return {**cls.SETTINGS, **{k: v for k, v in given.items() if k != "method"}}

    def at_step(self, step: int) -> None:
        self.step = int(step)

    def sample_sigma(self, n: int, denoiser, *, generator: torch.Generator,
                     device: torch.device | str = "cpu") -> torch.Tensor:
        raise NotImplementedError

    def loss(self, student, x0: torch.Tensor, *, generator: torch.Generator,
             sigma: torch.Tensor | None = None, noise: torch.Tensor | None = None,
             **cond) -> torch.Tensor:
        raise NotImplementedError


# -- pieces ----------------------------------------------------------------------------------
def pseudo_huber(a: torch.Tensor, b: torch.Tensor, c: float | None = None) -> torch.Tensor:
    """Pseudo-Huber distance per sample, ``sqrt(||a - b||^2 + c^2) - c`` (Song & Dhariwal 2023,
    "Improved techniques for training consistency models", eq. 10), (B, ...) -> (B,). Default
    ``c = 0.00054 sqrt(d)`` for d dimensions per sample (their §3.3)."""
    d = a[0].numel()
    c = 0.00054 * math.sqrt(d) if c is None else c
    sq = ((a.float() - b.float()) ** 2).reshape(a.shape[0], -1).sum(1)
    return (sq + c * c).sqrt() - c


def karras_levels(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0
                  ) -> torch.Tensor:
    """The n noise levels of a consistency discretisation, ascending (Karras et al. 2022,
    eq. 5; Song et al. 2023, §5): ``(smin^(1/rho) + i/(n-1) (smax^(1/rho) - smin^(1/rho)))^rho``,
    float64 (n,)."""
    i = torch.arange(n, dtype=torch.float64) / max(n - 1, 1)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (lo + i * (hi - lo)) ** rho


def ict_levels(step: int, total: int, s0: int, s1: int) -> int:
    """Levels of the iCT curriculum at ``step`` of ``total`` (Song & Dhariwal 2023, eq. 5):
    ``min(s0 2^floor(step / K'), s1) + 1`` with ``K' = floor(total / (log2(s1/s0) + 1))``."""
    kp = max(1, math.floor(total / (math.log2(s1 / s0) + 1)))
    return min(s0 * 2 ** (step // kp), s1) + 1


def lognormal_pair_probs(levels: torch.Tensor, p_mean: float, p_std: float) -> torch.Tensor:
    """Probabilities of the adjacent pairs (levels[i], levels[i+1]) under log-normal noise
    (Song & Dhariwal 2023, eq. 8): ``erf((log s_{i+1} - P_mean) / (sqrt(2) P_std)) -
    erf((log s_i - P_mean) / (sqrt(2) P_std))``, normalised, (n - 1,)."""
    z = torch.special.erf((levels.log() - p_mean) / (math.sqrt(2) * p_std))
    p = (z[1:] - z[:-1]).clamp_min(0)
    return p / p.sum()


class DiscretePairs:
    """Adjacent levels of a Karras discretisation whose size follows the iCT curriculum,
    drawn with log-normal pair probabilities: ``draw`` gives the upper level t, ``lower(t)``
    the level below it (a pure function of t and the step)."""

    def __init__(self, sigma_min: float, sigma_max: float, n_start: int, n_end: int,
                 p_mean: float, p_std: float) -> None:
        self.args = (sigma_min, sigma_max)
        self.n_start, self.n_end, self.p = n_start, n_end, (p_mean, p_std)
        self.set_levels(n_start + 1)

    def set_levels(self, n: int) -> None:
        """n levels and their pair probabilities (recomputed only when the curriculum moves)."""
        self.levels = karras_levels(n, *self.args)
        self.probs = lognormal_pair_probs(self.levels, *self.p)

    def at_step(self, step: int, total: int) -> None:
        n = ict_levels(step, total, self.n_start, self.n_end)
        if n != len(self.levels):
            self.set_levels(n)

    def draw(self, n: int, generator: torch.Generator) -> torch.Tensor:
        i = torch.multinomial(self.probs, n, replacement=True, generator=generator)
        return self.levels[i + 1].float()

    def lower(self, t: torch.Tensor) -> torch.Tensor:
        lv = self.levels.to(t.device)
        i = (lv[None, :] - t.double()[:, None]).abs().argmin(1)
        return lv[(i - 1).clamp_min(0)].to(t.dtype)


def heun_step(den: Callable, x: torch.Tensor, t: torch.Tensor, r: torch.Tensor,
              **cond) -> torch.Tensor:
    """One step of Heun's method on the PF-ODE ``dx/dsigma = (x - D(x, sigma)) / sigma`` from
    sigma = t to r (Karras et al. 2022, Alg. 1), per sample: t, r (B,), x (B, ...). Where r is 0
    the step is Euler's (its end is D)."""
    tb, rb = as_sigma(t, x), as_sigma(r, x)
    d0 = (x - den(x, t, **cond)) / tb
    x1 = x + (rb - tb) * d0
    safe = torch.where(r > 0, r, torch.ones_like(r))
    d1 = (x1 - den(x1, safe, **cond)) / as_sigma(safe, x)
    return torch.where(rb > 0, x + (rb - tb) * (d0 + d1) / 2, x1)
