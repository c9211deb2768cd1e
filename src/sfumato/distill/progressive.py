"""Progressive distillation (Salimans & Ho 2022, "Progressive distillation for fast sampling
of diffusion models", Alg. 2).

Rounds. The student starts as the teacher; in round k it learns to take with one DDIM step
what its teacher takes with two, on the nested grid (:func:`sfumato.sigmas.nested`) of
N_k = start_steps / 2^(k+1) student steps; at the end of the round it becomes the next round's
teacher, so the steps halve down to ``end_steps``. The round boundaries are checkpoints
that the run keeps (``DIR/checkpoints/step-N``), and a resumed run reloads its round's teacher
from the last one.

The 2-to-1 target (§3, in σ-space, where deterministic DDIM is Euler's method:
``x_next = D + (s_next / s) (x - D)``). From x at level t the teacher takes two DDIM steps,
t -> t' -> t'', to x''. The student's one step t -> t'' lands there exactly when its x0
prediction is::

    x0_target = (x'' - (t'' / t) x) / (1 - t'' / t)

(t'' = 0 gives x0_target = x''). Loss: ``max(1 / t^2, 1) ||D_student(x, t) - x0_target||^2``,
the truncated-SNR weighting of §4 (SNR = 1 / sigma^2 in σ-space).
"""

from __future__ import annotations

import copy
import math
from typing import Any, ClassVar

import torch

from ..denoiser import as_sigma
from ..errors import ConfigError
from ..sigmas import nested
from ._common import DistillObjective


def ddim_step(den, x: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor, **cond
              ) -> torch.Tensor:
    """One deterministic DDIM (= σ-space Euler) step per sample, t, t_next (B,):
    ``D + (t_next / t) (x - D)``."""
    d = den(x, t, **cond)
    return d + as_sigma(t_next / t, x) * (x - d)


def two_to_one_target(x: torch.Tensor, x2: torch.Tensor, t: torch.Tensor,
                      t2: torch.Tensor) -> torch.Tensor:
    """The x0 prediction whose one DDIM step from (x, t) to t2 gives x2 (Salimans & Ho 2022,
    Alg. 2, in σ-space); x, x2 (B, ...), t, t2 (B,)."""
    ratio = as_sigma(t2 / t, x)
    return (x2 - ratio * x) / (1 - ratio)


class ProgressiveDistillation(DistillObjective):
    """Salimans & Ho's rounds; the student keeps the teacher's parameterisation."""

    SETTINGS: ClassVar[dict[str, Any]] = {"start_steps": 64, "end_steps": 1}
    TRAIN: ClassVar[dict[str, Any]] = {"lr": 2e-4, "warmup_steps": 0, "schedule": "constant",
                                       "steps": 3000, "ema": {"kind": "classic",
                                                              "decay": 0.99}}
    SAMPLE: ClassVar[dict[str, Any]] = {"sampler": "euler", "grid": "nested",
                                        "sigma_min": 0.002, "sigma_max": 80.0}
    TARGET = None

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.rounds = self.count_rounds(self.s)
        self.round_len = max(1, self.total_steps // self.rounds)
        self.round, self.first_teacher = -1, self.teacher

    @staticmethod
    def count_rounds(s: dict) -> int:
        """The rounds from ``start_steps`` (the first teacher's steps) to ``end_steps``; a
        :class:`ConfigError` unless their ratio is a power of two > 1."""
        start, end = int(s["start_steps"]), int(s["end_steps"])
        if end < 1 or start <= end or math.log2(start / end) % 1:
            raise ConfigError(f"progressive distillation halves the steps each round: "
                              f"distill.start_steps / end_steps must be a power of two > 1; "
                              f"got {start} / {end}")
        return int(math.log2(start / end))

    @classmethod
    def adjust(cls, cfg: dict) -> None:
        """Sample with the last round's step count; keep every round's checkpoint."""
        s = cfg["distill"]
        rounds = cls.count_rounds(s)
        tc = cfg["train"]
        cfg["sample"]["steps"] = s["end_steps"]
        round_len = max(1, tc["steps"] // rounds)  # boundaries must be kept checkpoints
        tc["checkpoint_every"] = math.gcd(tc["checkpoint_every"] or round_len, round_len)
        tc["keep_last"] = tc["steps"] // tc["checkpoint_every"] + 1

    @staticmethod
    def round_checkpoint(run, steps: int):
        """The kept checkpoint of a progressive ``run`` (a :class:`~sfumato.run.Run`) that
        samples in ``steps`` steps: the end of the round whose student takes that many."""
        from ..train.checkpoint import checkpoint_name

        s, total = run.config["distill"], run.config["train"]["steps"]
        rounds = ProgressiveDistillation.count_rounds(s)
        k = int(math.log2(s["start_steps"] // steps)) - 1  # the round that ends there
        if not 0 <= k < rounds or s["start_steps"] // 2 ** (k + 1) != steps:
            raise ConfigError(f"{run.dir} has students for "
                              f"{[s['start_steps'] // 2 ** (r + 1) for r in range(rounds)]} "
                              f"steps, not {steps}")
        step = total if k == rounds - 1 else (k + 1) * max(1, total // rounds)
        return run.dir / "checkpoints" / checkpoint_name(step)

    def checkpointed(self, step: int) -> dict[str, torch.Tensor]:
        """The student's weights at ``step`` (a round boundary) from the run's kept
        checkpoint."""
        from ..train.checkpoint import checkpoint_name, load_checkpoint

        ck = self.out / "checkpoints" / checkpoint_name(step)
        if not ck.is_dir():
            raise ConfigError(f"resuming round {step // self.round_len + 1} needs the student "
                              f"at its start, {ck}, which is gone; distil again into a new "
                              "--out directory")
        return load_checkpoint(ck, stems=("model",))[0]["model"]

    def steps_in_round(self, k: int) -> int:
        """The student's steps in round k (its teacher takes twice as many)."""
        return int(self.s["start_steps"]) // 2 ** (k + 1)

    def at_step(self, step: int) -> None:
        super().at_step(step)
        k = min(step // self.round_len, self.rounds - 1)
        if k == self.round:
            return
        if k > 0:  # the student at the end of round k-1 becomes the teacher
            boundary = k * self.round_len
            weights = None if step == boundary else self.checkpointed(boundary)
            net = copy.deepcopy(self.student_net).requires_grad_(False)
            if weights is not None:
                net.load_state_dict(weights)
            self.teacher = self.make_denoiser(net)
        self.round = k
        self.grid = nested(self.steps_in_round(k), self.sigma_min, self.sigma_max)
        self.fine = nested(2 * self.steps_in_round(k), self.sigma_min, self.sigma_max)

    def sample_sigma(self, n, denoiser, *, generator, device="cpu") -> torch.Tensor:
        i = torch.randint(0, len(self.grid) - 1, (n,), generator=generator)
        return self.grid[i].float().to(device)

    def loss(self, student, x0, *, generator, sigma=None, noise=None, **cond) -> torch.Tensor:
        t = sigma.to(x0.device)
        fine = self.fine.to(x0.device)
        j = 2 * (fine[None, :] - t.double()[:, None]).abs().argmin(1) // 2  # even index
        t1, t2 = fine[j + 1].to(t.dtype), fine[j + 2].to(t.dtype)
        x = x0 + as_sigma(t, x0) * noise
        with torch.no_grad():
            x1 = ddim_step(self.teacher, x, t, t1, **cond)
            x2 = ddim_step(self.teacher, x1, t1, t2, **cond)
            target = two_to_one_target(x, x2, t, t2)
        err = ((student(x, t, **cond).float() - target.float()) ** 2).reshape(len(x), -1).mean(1)
        return (1 / t**2).clamp_min(1.0) * err
