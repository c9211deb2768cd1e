"""Guided distillation: a student that takes the guidance scale w as an input and reproduces
the teacher's classifier-free-guided ODE in one or two steps, without the second
(unconditional) pass.

Meng et al. 2023 ("On distillation of guided diffusion models") distil the guided teacher
``D_w = D(x|∅) + w (D(x|c) - D(x|∅))`` (Ho & Salimans 2022, eq. 6) into a w-conditioned
student (§4.1, stage one), then make it few-step (stage two). Here both stages are one, as in
latent consistency models (Luo et al. 2023, "LCM", Alg. 1): consistency distillation
(:mod:`sfumato.distill.consistency`) whose teacher ODE step follows the *guided* teacher at a
w drawn per sample, uniform in [w_min, w_max], and whose student is given that w
(:class:`~sfumato.nets.guidance_embedded.GuidanceEmbedded`, starting as the teacher at every
w). w = 1 is the plain conditional teacher (no guidance).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from ..denoiser import as_sigma
from ..guidance import ClassifierFreeGuidance
from .consistency import ConsistencyDistillation


def guided_teacher(teacher, num_classes: int):
    """``D_w(x, sigma, class_labels, guidance_scale=w)``: the teacher under classifier-free
    guidance with a per-sample scale w (B,), both branches in one batched call
    (:meth:`sfumato.guidance.ClassifierFreeGuidance.branches`)."""
    cfg = ClassifierFreeGuidance(teacher, 1.0, uncond={"class_labels": num_classes})

    def den(x: torch.Tensor, sigma: torch.Tensor, *, guidance_scale: torch.Tensor,
            **cond) -> torch.Tensor:
        cond_x0, uncond_x0 = cfg.branches(x, sigma, **cond)
        return uncond_x0 + as_sigma(guidance_scale, x) * (cond_x0 - uncond_x0)

    return den


class GuidedDistillation(ConsistencyDistillation):
    """LCM-style consistency distillation of the classifier-free-guided teacher ODE, w drawn
    per sample; the student takes ``guidance_scale=w``."""

    SETTINGS: ClassVar[dict[str, Any]] = {**ConsistencyDistillation.SETTINGS,
                                          "w_min": 1.0, "w_max": 4.0}
    NEEDS: ClassVar[tuple[str, ...]] = ("classes",)

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.teacher = guided_teacher(self.teacher, int(self.num_classes))

    @classmethod
    def student_model(cls, teacher_model):
        base = {k: v for k, v in teacher_model.items() if k != "conditional"}
        wrapped = {"type": "guidance_embedded", "base": base}
        if teacher_model.get("conditional"):  # the trainer adds the data set's classes
            wrapped["conditional"] = True
        return wrapped

    @staticmethod
    def init_module(net):
        return net.base

    def student_cond(self, cond: dict, generator: torch.Generator) -> tuple[dict, dict]:
        y = cond["class_labels"]
        u = torch.rand(y.shape[0], generator=generator, device=generator.device)
        w = (self.s["w_min"] + (self.s["w_max"] - self.s["w_min"]) * u).to(y.device)
        with_w = {**cond, "guidance_scale": w}
        return with_w, with_w
