"""Autoencoders for latent diffusion: an autoencoder run and what a latent run reads of it.

    sfumato train configs/mnist_autoencoder.json --out runs/mnist_ae      # kind "autoencoder"
    ae = sfumato.load("runs/mnist_ae")                                   # AutoencoderModel
    z = ae.encode(images)          # (B, z, H/f, W/f) latents scaled to unit variance
    x = ae.decode(z)               # (B, C, H, W) in [-1, 1]
    ae.evaluate()                  # PSNR, rFD (with its floor), codebook use on held-out images

The network is :class:`sfumato.nets.autoencoder.Autoencoder` (KL or VQ; ``model.type =
"autoencoder"``), trained by the ordinary trainer with ``objective.target = "autoencoder"``
and the loss of :mod:`sfumato.autoencoder.objective` (L1 + perceptual + patch-GAN with the
adaptive weight, KL or commitment). When the run is saved the trainer measures the latent
statistics on the training images (:func:`latent_stats`) and stores them in the run's state
under ``"latent"``: ``scale = 1 / std`` of the latents (Rombach et al. 2022, §4.3.2's
"rescale the latents to unit standard deviation") and their mean. :meth:`AutoencoderModel.encode`
returns ``(z - mean) * scale`` and :meth:`~AutoencoderModel.decode` inverts it, so a latent
diffusion run sees data of unit scale and never needs to know the autoencoder's units.

Encode and decode always run in float32, outside any autocast, on the run's device.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..errors import CheckpointError, UsageError
from .objective import RECONSTRUCTION_DEFAULTS, AutoencoderObjective

__all__ = ["AutoencoderModel", "AutoencoderObjective", "RECONSTRUCTION_DEFAULTS",
           "latent_stats"]


def _fp32(device: torch.device):
    return torch.autocast(device.type, enabled=False)


@torch.no_grad()
def latent_stats(net, images: torch.Tensor, batch_size: int = 256) -> dict[str, Any]:
    """Statistics of the unscaled latents of ``images`` (N, C, H, W) under ``net``: global
    ``mean`` and ``std``, ``scale = 1 / std``, per-channel ``channel_std`` and the latent
    ``shape`` (z, h, w)."""
    device = next(net.parameters()).device
    was = net.training
    net.eval()
    with _fp32(device):
        zs = [net.encode(images[i:i + batch_size].to(device).float()).cpu()
              for i in range(0, images.shape[0], batch_size)]
    net.train(was)
    z = torch.cat(zs).double()
    std = float(z.std())
    return {"mean": float(z.mean()), "std": std, "scale": 1.0 / max(std, 1e-8),
            "channel_std": [float(s) for s in z.transpose(0, 1).reshape(z.shape[1], -1).std(1)],
            "shape": list(z.shape[1:]), "images": int(images.shape[0])}


class AutoencoderModel:
    """A trained autoencoder run (made by :func:`sfumato.load` for a run of kind
    ``autoencoder``): its :class:`~sfumato.run.Run`, the EMA network (eval, float32, no
    gradients) and the latent statistics stored with it."""

    def __init__(self, run, device: torch.device | str = "cpu") -> None:
        if run.kind != "autoencoder":
            raise UsageError(f"{run.path} is a {run.kind} run, not an autoencoder run")
        stats = run.state.get("latent")
        if not stats:
            raise CheckpointError(f"{run.checkpoint} has no latent statistics (state.json "
                                  "'latent'); it was not written by this version's trainer")
        self.run, self.device = run, torch.device(device)
        self.net = run.network(device=self.device)
        self.stats: Mapping[str, Any] = stats
        self.scale, self.mean = float(stats["scale"]), float(stats["mean"])

    kind = property(lambda self: self.run.kind)
    image_shape = property(lambda self: self.run.data_shape)
    latent_shape = property(lambda self: tuple(self.stats["shape"]))

    def __repr__(self) -> str:
        n = sum(p.numel() for p in self.net.parameters())
        return (f"AutoencoderModel({self.net.kind}, run={str(self.run.path)!r}, "
                f"f={self.net.factor}, image {tuple(self.image_shape)} -> latent "
                f"{self.latent_shape}, scale={self.scale:.4g}, params={n:,})")

    def _check(self, x: torch.Tensor, shape: tuple, what: str) -> None:
        if x.ndim != 4 or tuple(x.shape[1:]) != tuple(shape):
            raise UsageError(f"{what} must have shape (batch, {', '.join(map(str, shape))}) "
                             f"for this autoencoder; got {tuple(x.shape)}")

    @torch.no_grad()
    def encode(self, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        """Scaled latents (B, z, h, w) of images x (B, C, H, W) in [-1, 1], on x's device."""
        self._check(x, self.image_shape, "images")
        with _fp32(self.device):
            z = torch.cat([self.net.encode(x[i:i + batch_size].to(self.device).float())
                           for i in range(0, x.shape[0], batch_size)]) if len(x) else \
                x.new_zeros((0, *self.latent_shape))
        return ((z - self.mean) * self.scale).to(x.device)

    @torch.no_grad()
    def decode(self, z: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        """Images (B, C, H, W) in [-1, 1] (clamped) of scaled latents z (B, z, h, w)."""
        self._check(z, self.latent_shape, "latents")
        with _fp32(self.device):
            u = z.to(self.device).float() / self.scale + self.mean
            x = torch.cat([self.net.decode(u[i:i + batch_size])
                           for i in range(0, u.shape[0], batch_size)])
        return x.clamp(-1.0, 1.0).to(z.device)

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """decode(encode(x)): images (B, C, H, W) in [-1, 1]."""
        return self.decode(self.encode(x))

    @torch.no_grad()
    def evaluate(self, n: int = 1000, seed: int = 0, classifier=None) -> dict[str, Any]:
        """Reconstruction quality on ``n`` held-out images of the run's data set (train
        images when it has no held-out split): mean PSNR (dB), the Fréchet distance of
        reconstructions vs the real images in the data set's classifier features (rFD) next to
        the real-vs-real floor (:func:`sfumato.metrics.evaluate_images`), and for VQ the
        fraction of codes used and the code perplexity. ``classifier``: another feature space
        (a :class:`~sfumato.metrics.classifier.Classifier`) for the rFD."""
        from ..data import get_dataset
        from ..metrics import evaluate_images, psnr

        data = get_dataset(self.run.config["data"])
        real = data.heldout if data.heldout is not None else data.train
        g = torch.Generator().manual_seed(seed)
        x = real[torch.randperm(real.shape[0], generator=g)[:n]]
        rec = self.reconstruct(x)
        m = evaluate_images(rec, data, seed=seed, classifier=classifier)
        out = {"n": int(x.shape[0]), "psnr": float(psnr(rec, x).mean()), "rfd": m["fd"],
               "fd_floor": m["fd_floor"], "rfd_ratio": m["fd_ratio"]}
        if self.net.quantizer is not None:
            from ..nets.autoencoder import VectorQuantizer

            with _fp32(self.device):
                idx = self.net.quantizer(self.net.encoder(x.to(self.device).float()))[2]
            out.update(VectorQuantizer.stats(idx, self.net.quantizer.size))
        return out
