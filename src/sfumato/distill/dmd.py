"""Distribution matching distillation (Yin et al. 2024, "One-step diffusion with distribution
matching distillation", DMD; and "Improved distribution matching distillation", DMD2).

A one-step generator ``G(z) = f(sigma_max z, sigma_max)`` (the student, in the consistency
parameterisation) is moved so that its samples' distribution matches the data's as the teacher
sees it. For multistep sampling (re-noise and map again, as for a consistency model) the
generator is also trained at the re-noising levels of the 1-, 2- and 4-step grids, its input
there a data point noised to that level (DMD2 §4.5, without its backward simulation).

At a level t drawn at random, with x_t = G(z) + t eps, the KL gradient is the difference of
two scores
(DMD eq. 7), written with x0 predictions since ``score = (D - x) / t^2``::

    grad_G = (D_fake(x_t, t) - D_real(x_t, t)) / mean|G(z) - D_real(x_t, t)|    (eq. 8 weight)

D_real is the frozen teacher (optionally classifier-free guided at ``real_guidance``); D_fake
is a second denoiser trained online on the generator's samples with the teacher's own
denoising loss, ``fake_updates`` times per generator step (DMD2 §4.1, the two time-scale
update rule). Both start from the teacher's weights. ``reg_weight`` > 0 adds DMD's regression
loss (§3.3): ``n_pairs`` noise -> teacher-ODE-sample pairs made once (the run's sampler),
the generator's output on a pair's noise pulled to its sample (pseudo-Huber here, LPIPS in
the paper). DMD2 drops it (``reg_weight = 0``).

The fake denoiser and its optimizer are part of the checkpoint (``objective.safetensors``), so
a killed run resumes exactly. Under DDP the fake denoiser's gradients are averaged across ranks.
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar

import torch

from ..denoiser import as_sigma
from ..guidance import ClassifierFreeGuidance
from ..sigmas import get_sigmas
from ..train.objective import Objective
from ._common import DistillObjective, pseudo_huber


class DistributionMatching(DistillObjective):
    """DMD / DMD2 for a one-step (or few-step, re-noised) generator."""

    SETTINGS: ClassVar[dict[str, Any]] = {
        "fake_updates": 1,        # fake-denoiser steps per generator step (DMD2: 5)
        "fake_lr": None,          # None: the generator's train.lr
        "real_guidance": 1.0,     # CFG scale of the real score (conditional teachers)
        "t_min": 0.02, "t_max": 80.0,   # the levels the scores are compared at
        "reg_weight": 0.25,       # DMD's regression loss; 0 = DMD2
        "n_pairs": 2048,          # noise/sample pairs for it
        "levels": None,           # generator input levels; None: those of 1, 2, 4 steps
    }
    TRAIN: ClassVar[dict[str, Any]] = {"lr": 1e-4, "warmup_steps": 0, "schedule": "constant",
                                       "steps": 1500, "betas": [0.0, 0.99],
                                       "ema": {"kind": "classic", "decay": 0.99}}
    SAMPLE: ClassVar[dict[str, Any]] = {"sampler": "consistency", "steps": 1, "grid": "karras",
                                        "sigma_min": 2.5, "sigma_max": 80.0}

    def bind(self, trainer) -> None:
        super().bind(trainer)
        tc = trainer.cfg["train"]
        self.fake = copy.deepcopy(self.teacher).requires_grad_(True).train()
        self.fake_net = self.fake.net
        self.fake_opt = torch.optim.AdamW(self.fake_net.parameters(),
                                          lr=self.s["fake_lr"] or tc["lr"],
                                          betas=tuple(tc["betas"]))
        self.fake_loss = Objective(sigma_data=self.sigma_data)  # EDM log-normal + weighting
        self.world, self.device = trainer.world, trainer.device
        self.shape = tuple(trainer.x_train.shape[1:])
        self.pairs = None
        sc = trainer.cfg["sample"]
        levels = self.s["levels"] or sorted({round(float(v), 6) for k in (1, 2, 4) for v in
                                             get_sigmas(sc["grid"], k, sigma_min=sc["sigma_min"],
                                                        sigma_max=sc["sigma_max"])[:-1]})
        self.levels = torch.tensor(levels, dtype=torch.float32)

    # -- checkpointed state --------------------------------------------------------------
    def extra_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        from ..train.checkpoint import optimizer_to_flat

        opt_t, meta = optimizer_to_flat(self.fake_opt.state_dict())
        tensors = {f"net.{k}": v for k, v in self.fake_net.state_dict().items()}
        tensors.update({f"opt.{k}": v for k, v in opt_t.items()})
        return tensors, {"fake_optimizer": meta}

    def load_extra_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        from ..train.checkpoint import optimizer_from_flat

        self.fake_net.load_state_dict({k[4:]: v for k, v in tensors.items()
                                       if k.startswith("net.")})
        self.fake_opt.load_state_dict(optimizer_from_flat(
            {k[4:]: v for k, v in tensors.items() if k.startswith("opt.")},
            meta["fake_optimizer"]))

    # -- one step --------------------------------------------------------------------------
    def sample_sigma(self, n, denoiser, *, generator, device="cpu") -> torch.Tensor:
        u = torch.rand(n, generator=generator, dtype=torch.float64)
        lo, hi = torch.tensor([self.s["t_min"], self.s["t_max"]], dtype=torch.float64).log()
        return (lo + (hi - lo) * u).exp().float().to(device)  # log-uniform comparison levels

    def real(self, x, t, cond):
        """The teacher's x0, classifier-free guided at ``real_guidance`` when it has classes."""
        w = float(self.s["real_guidance"])
        if w == 1.0 or "class_labels" not in cond:
            return self.teacher(x, t, **cond)
        return ClassifierFreeGuidance(self.teacher, w,
                                      uncond={"class_labels": self.num_classes})(x, t, **cond)

    def loss(self, student, x0, *, generator, sigma=None, noise=None, **cond) -> torch.Tensor:
        b, t = x0.shape[0], sigma.to(x0.device)
        z = torch.randn(x0.shape, generator=generator, device=generator.device).to(x0.device)
        pick = torch.randint(0, len(self.levels), (b,), generator=generator)
        s_in = self.levels[pick].to(x0.device)
        x_g = student(x0 + as_sigma(s_in, x0) * z, s_in, **cond)
        self.update_fake(x_g.detach(), cond, generator)
        with torch.no_grad():
            x_t = x_g + as_sigma(t, x_g) * noise
            real, fake = self.real(x_t, t, cond), self.fake(x_t, t, **cond)
            scale = (x_g - real).abs().reshape(b, -1).mean(1).clamp_min(1e-5)
            grad = (fake - real) / as_sigma(scale, x_g)
            target = (x_g - grad).detach()
        loss = 0.5 * ((x_g.float() - target.float()) ** 2).reshape(b, -1).sum(1)
        if self.s["reg_weight"]:
            loss = loss + self.s["reg_weight"] * self.regression(student, b, generator, cond)
        return loss

    def update_fake(self, x: torch.Tensor, cond: dict, generator: torch.Generator) -> None:
        """``fake_updates`` steps of the fake denoiser's denoising loss on generator samples."""
        with torch.enable_grad():
            for _ in range(int(self.s["fake_updates"])):
                self.fake_opt.zero_grad(set_to_none=True)
                loss = self.fake_loss.loss(self.fake, x, generator=generator, **cond).mean()
                loss.backward()
                if self.world > 1:
                    for p in self.fake_net.parameters():
                        torch.distributed.all_reduce(p.grad)
                        p.grad /= self.world
                self.fake_opt.step()

    def regression(self, student, b: int, generator: torch.Generator, cond: dict
                   ) -> torch.Tensor:
        """DMD's regression loss on ``b`` of the pairs (made on first use)."""
        if self.pairs is None:
            self.pairs = self.make_pairs()
        z, x, y = self.pairs
        idx = torch.randint(0, len(z), (b,), generator=generator)
        pc = {"class_labels": y[idx]} if y is not None else {}
        smax = torch.full((b,), self.sigma_max, device=z.device)
        return pseudo_huber(student(self.sigma_max * z[idx], smax, **pc), x[idx])

    @torch.no_grad()
    def make_pairs(self):
        """(noise, teacher ODE sample, labels) for ``n_pairs`` draws from a fixed seed: the
        teacher's PF-ODE by DPM-Solver++(2M), 16 steps on the Karras grid."""
        from ..samplers import sample_dpmpp_2m
        from ..sigmas import karras

        n = int(self.s["n_pairs"])
        z = torch.randn((n, *self.shape), generator=torch.Generator().manual_seed(2024))
        z = z.to(self.device)
        y = (torch.arange(n) % self.num_classes).to(self.device) if self.num_classes else None
        sig = karras(16, self.sigma_min, self.sigma_max)
        xs = [sample_dpmpp_2m(self.teacher, self.sigma_max * z[i:i + 256], sig,
                              **({"class_labels": y[i:i + 256]} if y is not None else {}))
              for i in range(0, n, 256)]
        return z, torch.cat(xs), y
