"""Autoencoders for latent diffusion: KL-regularised and vector-quantised (Esser et al. 2021,
"Taming Transformers", §3; Rombach et al. 2022, "High-Resolution Image Synthesis with Latent
Diffusion Models", §3 and appendix G), and the patch discriminator they are trained against.

Layout (``L = log2(factor)`` downsamplings; level ``i`` has ``channels * channel_mult[i]``
channels at resolution ``H / 2**i``)::

    encoder: conv_in, per level num_res_blocks x Block, stride-2 conv (not last),
             Block, GN-SiLU-conv_out -> 2 z (KL: mean, log-variance) or z (VQ)
    decoder: conv_in, Block, per level (reversed) (num_res_blocks + 1) x Block,
             nearest 2x upsample + conv (not last), GN-SiLU-conv_out -> C

No attention: at the sizes this project trains (28 x 28 to 64 x 64 images, f = 4 or 8) the
receptive field of the convolutions covers the image. The decoder's ``conv_out`` is the "last
layer" of the adaptive GAN weight (:mod:`sfumato.autoencoder.objective`).

Latents. :meth:`Autoencoder.encode` gives the *unscaled* latent (B, z, H/f, W/f): the
posterior mean for KL (or a sample, given a generator), the quantised vector for VQ.
Scaling latents to unit variance for diffusion is the run's business
(:class:`sfumato.autoencoder.AutoencoderModel`), measured on the data after training.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError

__all__ = ["Autoencoder", "PatchDiscriminator", "VectorQuantizer"]


class Block(nn.Module):
    """Residual block (B, C_in, H, W) -> (B, C_out, H, W): ``GN-SiLU-conv3x3`` twice plus a
    skip (identity, or 1x1 conv when the channel count changes)."""

    def __init__(self, c_in: int, c_out: int, groups: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.GroupNorm(min(groups, c_in), c_in), nn.SiLU(),
                                  nn.Conv2d(c_in, c_out, 3, padding=1),
                                  nn.GroupNorm(min(groups, c_out), c_out), nn.SiLU(),
                                  nn.Conv2d(c_out, c_out, 3, padding=1))
        self.skip = nn.Identity() if c_in == c_out else nn.Conv2d(c_in, c_out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + self.body(x)


def _head(c_in: int, c_out: int, groups: int) -> nn.Sequential:
    return nn.Sequential(nn.GroupNorm(min(groups, c_in), c_in), nn.SiLU(),
                         nn.Conv2d(c_in, c_out, 3, padding=1))


class Encoder(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, widths: Sequence[int],
                 num_res_blocks: int, groups: int) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, widths[0], 3, padding=1)]
        c = widths[0]
        for i, w in enumerate(widths):
            for _ in range(num_res_blocks):
                layers.append(Block(c, w, groups))
                c = w
            if i < len(widths) - 1:
                layers.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
        layers += [Block(c, c, groups), _head(c, out_channels, groups)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Decoder(nn.Module):
    def __init__(self, latent_channels: int, out_channels: int, widths: Sequence[int],
                 num_res_blocks: int, groups: int) -> None:
        super().__init__()
        c = widths[-1]
        layers: list[nn.Module] = [nn.Conv2d(latent_channels, c, 3, padding=1),
                                   Block(c, c, groups)]
        for i, w in reversed(list(enumerate(widths))):
            for _ in range(num_res_blocks + 1):
                layers.append(Block(c, w, groups))
                c = w
            if i > 0:
                layers += [nn.Upsample(scale_factor=2.0, mode="nearest"),
                           nn.Conv2d(c, c, 3, padding=1)]
        self.body = nn.Sequential(*layers, nn.GroupNorm(min(groups, c), c), nn.SiLU())
        self.conv_out = nn.Conv2d(c, out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.conv_out(self.body(z))


class VectorQuantizer(nn.Module):
    """Nearest-code quantisation with a codebook learned by exponential moving averages (van
    den Oord et al. 2017, "Neural Discrete Representation Learning", appendix A.1; eq. 3's
    commitment term) and dead-code restarts (codes unused for a while jump to a random
    encoder output of the batch, as in Dhariwal et al. 2020's Jukebox §3.2).

    ``forward(z)`` for z (B, D, h, w) returns (z_q with straight-through gradients,
    commitment loss (B,), code indices (B, h, w)). In training mode each call also moves the
    codebook (cluster sizes and sums decay by ``decay``; Laplace-smoothed) and restarts codes
    whose smoothed usage fell below ``restart_below`` of a uniform share.
    """

    def __init__(self, size: int, dim: int, decay: float = 0.99, restart_below: float = 0.03,
                 eps: float = 1e-5) -> None:
        super().__init__()
        self.size, self.dim, self.decay, self.eps = size, dim, decay, eps
        self.restart_below = restart_below
        g = torch.Generator().manual_seed(0)
        init = torch.randn(size, dim, generator=g)
        # the codebook is a parameter (the weight EMA averages it) that no optimizer moves
        self.codebook = nn.Parameter(init, requires_grad=False)
        self.register_buffer("cluster_size", torch.ones(size))
        self.register_buffer("cluster_sum", init.clone())
        self.register_buffer("usage", torch.full((size,), 1.0 / size))
        self.generator: torch.Generator | None = None  # for restarts (the trainer sets it)

    def indices(self, flat: torch.Tensor) -> torch.Tensor:
        """Nearest code of each row of flat (N, D) -> (N,)."""
        cb = self.codebook.float()
        d = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ cb.T + cb.pow(2).sum(1)
        return d.argmin(1)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, d, h, w = z.shape
        flat = z.float().permute(0, 2, 3, 1).reshape(-1, d)          # (B h w, D)
        idx = self.indices(flat)
        zq = self.codebook.float()[idx].reshape(b, h, w, d).permute(0, 3, 1, 2)
        if self.training:
            self._update(flat.detach(), idx)
        commit = (z.float() - zq.detach()).pow(2).reshape(b, -1).mean(1)
        zq = z + (zq - z).detach()                                   # straight-through
        return zq, commit, idx.reshape(b, h, w)

    @torch.no_grad()
    def _update(self, flat: torch.Tensor, idx: torch.Tensor) -> None:
        onehot = F.one_hot(idx, self.size).to(flat.dtype)            # (N, K)
        counts, sums = onehot.sum(0), onehot.T @ flat
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.cluster_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        n = self.cluster_size.sum()
        size = (self.cluster_size + self.eps) / (n + self.size * self.eps) * n
        self.codebook.copy_(self.cluster_sum / size[:, None])
        self.usage.mul_(self.decay).add_(counts / counts.sum(), alpha=1 - self.decay)
        dead = self.usage < self.restart_below / self.size
        if dead.any():  # restart dead codes at random encoder outputs of this batch
            pick = torch.randint(0, flat.shape[0], (int(dead.sum()),),
                                 generator=self.generator).to(flat.device)
            self.codebook[dead] = flat[pick]
            self.cluster_sum[dead] = flat[pick]
            self.cluster_size[dead] = 1.0
            self.usage[dead] = 1.0 / self.size

    @staticmethod
    def stats(idx: torch.Tensor, size: int) -> dict[str, float]:
        """Codebook use of code indices: the fraction of codes used and the perplexity
        ``exp(H(p))`` of their histogram (``size`` when all are used equally)."""
        p = torch.bincount(idx.reshape(-1), minlength=size).double()
        p = p / p.sum()
        h = -(p[p > 0] * p[p > 0].log()).sum()
        return {"codes_used": float((p > 0).double().mean()), "perplexity": float(h.exp())}


class Autoencoder(nn.Module):
    """Image (B, C, H, W) in [-1, 1] <-> latent (B, latent_channels, H/f, W/f).

    Args:
        in_channels: image channels.
        kind: ``"kl"`` (diagonal-Gaussian posterior, KL to N(0, I)) or ``"vq"`` (codebook).
        factor: downsampling factor f (a power of 2).
        channels: width of the first level.
        channel_mult: width multipliers per level, ``log2(f) + 1`` of them (default 1, 2, 2, ...).
        num_res_blocks: blocks per level.
        latent_channels: z.
        norm_groups: GroupNorm groups (fewer when a width is smaller).
        codebook_size, codebook_decay: the VQ codebook (VQ only).
        image_size: recorded for messages (unused).
    """

    def __init__(self, in_channels: int = 1, kind: str = "kl", factor: int = 4,
                 channels: int = 32, channel_mult: Sequence[int] | None = None,
                 num_res_blocks: int = 1, latent_channels: int = 4, norm_groups: int = 8,
                 codebook_size: int = 256, codebook_decay: float = 0.99,
                 image_size: int | None = None) -> None:
        super().__init__()
        if kind not in ("kl", "vq"):
            raise ConfigError(f"autoencoder kind must be 'kl' or 'vq'; got {kind!r}")
        levels = math.log2(factor) if factor >= 1 else -1
        if levels < 0 or levels != int(levels):
            raise ConfigError(f"autoencoder factor must be a power of 2 (4, 8); got {factor}")
        mult = list(channel_mult) if channel_mult is not None else \
            [1] + [2] * int(levels)
        if len(mult) != int(levels) + 1:
            raise ConfigError(f"channel_mult needs log2(factor) + 1 = {int(levels) + 1} entries "
                              f"for factor {factor}; got {mult}")
        widths = [channels * m for m in mult]
        self.kind, self.factor, self.latent_channels = kind, factor, latent_channels
        self.in_channels, self.image_size = in_channels, image_size
        z_out = 2 * latent_channels if kind == "kl" else latent_channels
        self.encoder = Encoder(in_channels, z_out, widths, num_res_blocks, norm_groups)
        self.decoder = Decoder(latent_channels, in_channels, widths, num_res_blocks, norm_groups)
        self.quantizer = VectorQuantizer(codebook_size, latent_channels, codebook_decay) \
            if kind == "vq" else None

    def last_layer(self) -> torch.Tensor:
        """The decoder's output weight (the adaptive GAN weight compares gradients here)."""
        return self.decoder.conv_out.weight

    def _check(self, x: torch.Tensor) -> None:
        h, w = x.shape[-2:]
        if x.ndim != 4 or x.shape[1] != self.in_channels or h % self.factor or w % self.factor:
            raise ConfigError(f"the autoencoder takes images (B, {self.in_channels}, H, W) with H "
                              f"and W divisible by {self.factor}; got {tuple(x.shape)}")

    def moments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """KL posterior (mean, log-variance), each (B, z, H/f, W/f); log-variance clamped to
        [-30, 20] as in LDM."""
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def encode(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """The unscaled latent of images x: KL posterior mean (a posterior sample when a
        generator is given), or the quantised vector (VQ)."""
        self._check(x)
        if self.kind == "vq":
            return self.quantizer(self.encoder(x))[0]
        mean, logvar = self.moments(x)
        if generator is None:
            return mean
        eps = torch.randn(mean.shape, generator=generator, device=generator.device)
        return mean + (0.5 * logvar).exp() * eps.to(mean)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Images (B, C, f h, f w) of latents z (B, z, h, w) (unclamped)."""
        return self.decoder(z)

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(reconstruction, aux): aux holds the regulariser per sample, ``kl`` (KL divergence
        to N(0, I), summed over latent elements, eq. (25) of Kingma & Welling 2014) or
        ``commit`` (VQ commitment, mean squared), and ``indices`` for VQ."""
        self._check(x)
        if self.kind == "vq":
            zq, commit, idx = self.quantizer(self.encoder(x))
            return self.decoder(zq), {"commit": commit, "indices": idx}
        mean, logvar = self.moments(x)
        eps = torch.randn(mean.shape, generator=generator,
                          device=generator.device if generator is not None else "cpu")
        z = mean + (0.5 * logvar).exp() * eps.to(mean)
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).reshape(x.shape[0], -1).sum(1)
        return self.decoder(z), {"kl": kl}


class PatchDiscriminator(nn.Module):
    """PatchGAN discriminator (Isola et al. 2017, "Image-to-Image Translation with
    Conditional Adversarial Networks", §3.2.2): stride-2 4x4 convs with LeakyReLU(0.2) and
    GroupNorm, ``layers`` of them, then two stride-1 convs; (B, C, H, W) -> (B, 1, h, w)
    logits, one per overlapping patch."""

    def __init__(self, in_channels: int = 1, channels: int = 32, layers: int = 2) -> None:
        super().__init__()
        mods: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        c = channels
        for _ in range(layers - 1):
            mods += [nn.Conv2d(c, 2 * c, 4, 2, 1), nn.GroupNorm(8, 2 * c), nn.LeakyReLU(0.2)]
            c *= 2
        mods += [nn.Conv2d(c, c, 3, 1, 1), nn.GroupNorm(8, c), nn.LeakyReLU(0.2),
                 nn.Conv2d(c, 1, 3, 1, 1)]
        self.net = nn.Sequential(*mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
