"""The autoencoder's training objective, run by the ordinary trainer (run kind
``autoencoder``; config section ``reconstruction``, :data:`RECONSTRUCTION_DEFAULTS`).

Per image (Esser et al. 2021, "Taming Transformers", eqs. 4-7; Rombach et al. 2022, LDM
appendix G)::

    L = |x - x_hat|_1 + w_p d_p(x, x_hat)                       reconstruction L_rec
        + lambda * w_gan * (-D(x_hat))          after gan_start    hinge generator loss
        + w_kl KL(q(z|x) | N(0, I))     (KL)   or   w_c |z - sg(z_q)|^2   (VQ commitment)

    lambda = |grad_{G_L} L_rec| / (|grad_{G_L} L_gan| + 1e-4)    (eq. 7, clamped to [0, 1e4])

where G_L is the decoder's last layer and d_p the perceptual distance of
:mod:`sfumato.autoencoder.perceptual`. The patch discriminator D takes one hinge step per
generator step from ``gan_start`` on: ``mean relu(1 - D(x)) + mean relu(1 + D(x_hat))``. The
discriminator and its optimizer are the objective's checkpointed extra state, so runs resume
exactly. The autoencoder's arithmetic stays in float32 whatever ``train.precision`` says
(bf16 VAEs are a known source of NaNs elsewhere).
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..nets.autoencoder import PatchDiscriminator

__all__ = ["RECONSTRUCTION_DEFAULTS", "AutoencoderObjective"]

RECONSTRUCTION_DEFAULTS: dict[str, Any] = {
    "l1": 1.0,              # pixel L1 weight
    "perceptual": 1.0,      # perceptual distance weight (0: off)
    "gan": 0.5,             # adversarial weight w_gan (0: off); times the adaptive lambda
    "gan_start": 1000,      # step at which the discriminator and the GAN term start
    "disc_channels": 32,    # patch discriminator width
    "disc_layers": 2,       # its stride-2 layers (receptive field grows with them)
    "disc_lr": None,        # None: train.lr
    "kl": 1e-6,             # KL weight (kind "kl")
    "commitment": 0.25,     # VQ commitment weight beta
    "scale_images": 2048,   # training images the latent scale is measured on
}


class AutoencoderObjective:
    """Built by the trainer for ``objective.target = "autoencoder"`` (see the module
    docstring). ``loss(net, x0, generator=...)`` returns the per-image loss (B,)."""

    def __init__(self, trainer) -> None:
        c0 = time.process_time()
        self.s = {**RECONSTRUCTION_DEFAULTS, **trainer.cfg["reconstruction"]}
        net = trainer.net
        self.net, self.device, self.step = net, trainer.device, 0
        if net.quantizer is not None:
            net.quantizer.generator = torch.Generator().manual_seed(
                trainer.cfg["train"]["seed"] + 11)
        self.perceptual = None
        if self.s["perceptual"]:
            from .perceptual import PerceptualLoss

            self.perceptual = PerceptualLoss.for_data(trainer.data).to(self.device)
        self.disc = self.disc_opt = None
        if self.s["gan"]:
            tc = trainer.cfg["train"]
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(tc["seed"] + 13)
                self.disc = PatchDiscriminator(net.in_channels, self.s["disc_channels"],
                                               self.s["disc_layers"]).to(self.device)
            self.disc_opt = torch.optim.Adam(self.disc.parameters(),
                                             lr=self.s["disc_lr"] or tc["lr"], betas=(0.5, 0.9))
        self.setup_cpu_seconds = time.process_time() - c0

    # -- the trainer's objective protocol ---------------------------------------------------
    def at_step(self, step: int) -> None:
        self.step = step

    def sample_sigma(self, n: int, denoiser, *, generator: torch.Generator,
                     device: str | torch.device = "cpu") -> torch.Tensor:
        return torch.zeros(n, device=device)  # no noise levels: a plain reconstruction loss

    def extra_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        from ..train.checkpoint import optimizer_to_flat

        if self.disc is None:
            return {}, {}
        opt_t, meta = optimizer_to_flat(self.disc_opt.state_dict())
        tensors = {f"disc.{k}": v for k, v in self.disc.state_dict().items()}
        tensors.update({f"opt.{k}": v for k, v in opt_t.items()})
        return tensors, {"disc_optimizer": meta}

    def load_extra_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        from ..train.checkpoint import optimizer_from_flat

        if self.disc is None:
            return
        self.disc.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("disc.")})
        self.disc_opt.load_state_dict(optimizer_from_flat(
            {k[4:]: v for k, v in tensors.items() if k.startswith("opt.")},
            meta["disc_optimizer"]))

    # -- the loss ----------------------------------------------------------------------------
    def gan_active(self) -> bool:
        return self.disc is not None and self.step >= self.s["gan_start"]

    def loss(self, net, x0: torch.Tensor, *, generator: torch.Generator,
             sigma: torch.Tensor | None = None, noise: torch.Tensor | None = None,
             **cond) -> torch.Tensor:
        if cond:
            raise ConfigError(f"an autoencoder takes no conditioning; got {sorted(cond)} "
                              "(set model.conditional false and no text encoder)")
        with torch.autocast(x0.device.type, enabled=False):  # float32 whatever the precision
            x = x0.float()
            recon, aux = net(x, generator)
            rec = self.s["l1"] * (recon - x).abs().mean((1, 2, 3))
            if self.perceptual is not None:
                rec = rec + self.s["perceptual"] * self.perceptual(recon, x)
            reg = self.s["kl"] * aux["kl"] if "kl" in aux else \
                self.s["commitment"] * aux["commit"]
            total = rec + reg
            if self.gan_active():
                self._disc_step(x, recon.detach())
                g_loss = -self.disc(recon).mean((1, 2, 3))
                lam = self._adaptive_weight(rec.mean(), g_loss.mean())
                total = total + self.s["gan"] * lam * g_loss
        return total

    def _adaptive_weight(self, rec: torch.Tensor, g_loss: torch.Tensor) -> torch.Tensor:
        """Eq. (7) of Taming Transformers: balance the GAN gradient against the
        reconstruction gradient at the decoder's last layer."""
        last = self.net.last_layer()
        g_rec = torch.autograd.grad(rec, last, retain_graph=True)[0]
        g_gan = torch.autograd.grad(g_loss, last, retain_graph=True)[0]
        return (g_rec.norm() / (g_gan.norm() + 1e-4)).clamp(0.0, 1e4).detach()

    def _disc_step(self, real: torch.Tensor, fake: torch.Tensor) -> None:
        with torch.enable_grad():
            d_loss = F.relu(1.0 - self.disc(real)).mean() + F.relu(1.0 + self.disc(fake)).mean()
            self.disc_opt.zero_grad(set_to_none=True)
            d_loss.backward()
            self.disc_opt.step()
