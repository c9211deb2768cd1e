"""Training objectives: prediction target x how sigma is drawn x loss weighting.

Everything is written in σ-space (``x = x0 + sigma * eps``) against the denoiser output
``D = c_skip x + c_out F`` of :class:`sfumato.denoiser.Denoiser`. The loss of one sample is

    L = w(sigma) * || D(x0 + sigma eps, sigma) - x0 ||^2 / dim

so the weighting is always stated as a weight on the x0-error:

=============  ==========================================  ==================================
weighting      w(sigma)                                    reference
=============  ==========================================  ==================================
``uniform``    1 / c_out(sigma)^2                          plain MSE on the network's own
                                                           target (DDPM "simple" loss for eps,
                                                           v-loss, flow-matching loss)
``edm``        (sigma^2 + sd^2) / (sigma sd)^2             Karras et al. 2022, eq. (8), Tab. 1
``min_snr``    min(SNR, gamma), SNR = 1 / sigma^2          Hang et al. 2023, eq. (9)
=============  ==========================================  ==================================

Sigma sampling:

- ``process``: the process's own training-time t (uniform discrete t for DDPM, uniform t for
  continuous VP/VE/flow, log-normal for EDM), mapped through sigma(t);
- ``lognormal``: log sigma ~ N(P_mean, P_std^2) (Karras et al. 2022, Table 1);
- ``logit_normal``: t ~ sigmoid(N(m, s^2)), sigma = t / (1 - t) (Esser et al. 2024, eq. 19).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import torch

from ..denoiser import Denoiser, as_sigma
from ..errors import ConfigError

WEIGHTINGS = ("uniform", "edm", "min_snr")
SIGMA_SAMPLINGS = ("process", "lognormal", "logit_normal")


@dataclass
class Objective:
    """How sigma is drawn and how the per-sample x0-error is weighted.

    Attributes use EDM's names: P_mean, P_std (log-normal), sigma_data (EDM weighting),
    gamma (min-SNR), logit_mean/logit_std (logit-normal). ``sigma_min``/``sigma_max`` clip
    the drawn levels (None: no clipping).
    """

    sigma_sampling: str = "lognormal"
    weighting: str = "edm"
    P_mean: float = -1.2
    P_std: float = 1.2
    logit_mean: float = 0.0
    logit_std: float = 1.0
    sigma_data: float = 0.5
    gamma: float = 5.0
    sigma_min: float | None = None
    sigma_max: float | None = None

    def __post_init__(self) -> None:
        if self.sigma_sampling not in SIGMA_SAMPLINGS:
            raise ConfigError(f"unknown sigma_sampling {self.sigma_sampling!r}; "
                              f"choose one of {SIGMA_SAMPLINGS}")
        if self.weighting not in WEIGHTINGS:
            raise ConfigError(f"unknown weighting {self.weighting!r}; choose one of {WEIGHTINGS}")

    def at_step(self, step: int) -> None:
        """Called before optimizer step ``step``; a fixed objective has nothing to update
        (distillation curricula do, :mod:`sfumato.distill`)."""

    def sample_sigma(self, n: int, denoiser: Denoiser, *, generator: torch.Generator,
                     device: torch.device | str = "cpu") -> torch.Tensor:
        """Draw n training noise levels, shape (n,), float32."""
        if self.sigma_sampling == "lognormal":
            z = torch.randn(n, generator=generator, device=generator.device).to(device)
            sigma = (self.P_mean + self.P_std * z).exp()
        elif self.sigma_sampling == "logit_normal":
            z = torch.randn(n, generator=generator, device=generator.device).to(device)
            t = torch.sigmoid(self.logit_mean + self.logit_std * z).clamp(1e-5, 1 - 1e-5)
            sigma = t / (1 - t)
        else:
            if denoiser.process is None:
                raise ConfigError("sigma_sampling='process' needs a denoiser built with a process")
            t = denoiser.process.sample_t(n, generator=generator, device=generator.device)
            sigma = denoiser.process.sigma(t).to(device)
        if self.sigma_min is not None or self.sigma_max is not None:
            sigma = sigma.clamp(self.sigma_min or 0.0, self.sigma_max or float("inf"))
        return sigma.float()

    def weight(self, sigma: torch.Tensor, denoiser: Denoiser) -> torch.Tensor:
        """w(sigma) on the x0-error, same shape as sigma."""
        if self.weighting == "edm":
            sd = self.sigma_data
            return (sigma**2 + sd**2) / (sigma * sd) ** 2
        if self.weighting == "min_snr":
            return torch.clamp(1 / sigma**2, max=self.gamma)
        _, c_out = denoiser.precondition(sigma)[:2]
        return 1 / c_out**2

    def loss(self, denoiser: Denoiser, x0: torch.Tensor, *, generator: torch.Generator,
             sigma: torch.Tensor | None = None, noise: torch.Tensor | None = None,
             **cond) -> torch.Tensor:
        """Per-sample weighted loss, shape (B,). Draws sigma and noise from ``generator``
        unless given (shapes (B,) and x0's)."""
        x, sigma = self.noisy(denoiser, x0, generator, sigma, noise)
        err = (denoiser(x, sigma, **cond).float() - x0.float()) ** 2
        return self.weight(sigma.float(), denoiser) * err.reshape(x0.shape[0], -1).mean(1)

    def noisy(self, denoiser, x0: torch.Tensor, generator: torch.Generator,
              sigma: torch.Tensor | None = None, noise: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0 + sigma eps, sigma): sigma (B,) and eps drawn from ``generator`` unless given."""
        if sigma is None:
            sigma = self.sample_sigma(x0.shape[0], denoiser, generator=generator,
                                      device=x0.device)
        if noise is None:
            noise = torch.randn(x0.shape, generator=generator, device=generator.device,
                                dtype=x0.dtype).to(x0.device)
        return x0 + as_sigma(sigma, x0) * noise, sigma


@dataclass
class ClassifierObjective(Objective):
    """Cross-entropy of a noise-conditional classifier on noisy data (``target="classifier"``):
    ``L = -log p(y | x0 + sigma eps, sigma)`` with sigma drawn as for the diffusion model
    (Dhariwal & Nichol 2021, §4: the classifier is trained on the same noise distribution it
    will guide at). ``denoiser`` is a :class:`sfumato.guidance.NoisyClassifier`."""

    def loss(self, denoiser, x0: torch.Tensor, *, generator: torch.Generator,
             sigma: torch.Tensor | None = None, noise: torch.Tensor | None = None,
             class_labels: torch.Tensor | None = None, **cond) -> torch.Tensor:
        if class_labels is None:
            raise ConfigError("a classifier objective needs labelled data (class_labels)")
        x, sigma = self.noisy(denoiser, x0, generator, sigma, noise)
        logits = denoiser(x, sigma, **cond)
        return torch.nn.functional.cross_entropy(logits.float(), class_labels.long(),
                                                 reduction="none")


#: The objective's defaults, as the run config's ``objective`` section lists them.
OBJECTIVE_DEFAULTS: dict[str, Any] = {f.name: f.default for f in fields(Objective)}


def build_objective(obj_cfg: Mapping[str, Any]) -> Objective:
    """The objective an ``objective`` config section names (its keys that are fields of
    :class:`Objective`; ``target="classifier"`` gives a :class:`ClassifierObjective`)."""
    cls = ClassifierObjective if obj_cfg["target"] == "classifier" else Objective
    return cls(**{k: obj_cfg[k] for k in OBJECTIVE_DEFAULTS if k in obj_cfg})
