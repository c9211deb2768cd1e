"""Latent diffusion as composition: a diffusion run trained on an autoencoder run's latents.

A latent run is an ordinary diffusion (or text) config plus one key naming the autoencoder
run (``"autoencoder": "runs/mnist_ae"``, or ``--set autoencoder=DIR`` on the command line).
The trainer (:meth:`~sfumato.train.trainer.Trainer._setup_latent`) records it in
``refs.autoencoder`` (relative path + weights hash, :mod:`sfumato.run`), encodes the training
images once into ``DIR/latents.safetensors`` (:func:`cached_latents`, checked against the
autoencoder's weights and the data on every start) and trains the denoiser on them exactly as
on pixels: the sampler, guidance, text conditioning and distillation never know.

:class:`LatentModel` (what :func:`sfumato.load` gives for such a run) is a
:class:`~sfumato.model.Model` whose inputs and outputs are images: it encodes images given to
it (inversion, SDEdit, DiffEdit, Prompt-to-Prompt) and decodes what it samples. Its
:attr:`~LatentModel.shape` is the latent shape the denoiser works in;
:attr:`~LatentModel.image_shape` the images'.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .autoencoder import AutoencoderModel
from .errors import CheckpointError, ConfigError, DataError, RunReferenceError, UsageError
from .files import atomic_write
from .model import Model, Samples
from .run import Run

__all__ = ["LatentModel", "cached_latents", "open_autoencoder", "CACHE_NAME"]

CACHE_NAME = "latents.safetensors"


def open_autoencoder(path: str | os.PathLike, image_shape: Sequence[int],
                     device: torch.device | str = "cpu") -> AutoencoderModel:
    """The autoencoder run a latent config names, checked: it exists, is an autoencoder run,
    and was trained on images of ``image_shape`` (C, H, W)."""
    try:
        run = Run(path)
    except CheckpointError as e:
        raise RunReferenceError(f"the config's autoencoder run {str(path)!r} cannot be read: "
                                f"{e}. Train it first (sfumato train "
                                "configs/<data>_autoencoder.json --out DIR) or fix the path "
                                "(--set autoencoder=DIR)") from None
    if run.kind != "autoencoder":
        raise ConfigError(f"the config's autoencoder {str(path)!r} is a {run.kind} run; name an "
                          "autoencoder run (trained with objective.target 'autoencoder')")
    if list(run.data_shape or []) != list(image_shape):
        raise ConfigError(f"the autoencoder {str(path)!r} was trained on images of shape "
                          f"{list(run.data_shape or [])}; this data set's are "
                          f"{list(image_shape)}: use the same data and size")
    return AutoencoderModel(run, device)


def cached_latents(out: str | os.PathLike, ae: AutoencoderModel, data, data_cfg: dict,
                   write: bool = True, ae_sha256: str | None = None) -> torch.Tensor:
    """Scaled latents (N, z, h, w) of ``data.train``: read from ``out/latents.safetensors``
    when it was made by this autoencoder (weights SHA-256) from this data (fingerprint),
    else encoded and written there (atomically; only when ``write``). A cache from another
    autoencoder or other data, or one that cannot be read, is a clear error and is left as it
    is. ``ae_sha256``: the autoencoder's weights hash when the caller has it already (its
    run reference), so the weights file is not hashed again."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = Path(out) / CACHE_NAME
    want = {"autoencoder_sha256": ae_sha256 or ae.run.weights_sha256(),
            "data": data.fingerprint()}
    if path.exists():
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                z = f.get_tensor("train")
        except Exception as e:  # noqa: BLE001 - any failure to read means a damaged file
            raise DataError(f"the latent cache {path} cannot be read ({type(e).__name__}: "
                            f"{e}); delete it and run again to re-encode the data") from None
        if meta.get("autoencoder_sha256") != want["autoencoder_sha256"]:
            raise RunReferenceError(
                f"the latent cache {path} was encoded by another autoencoder (weights SHA-256 "
                f"{str(meta.get('autoencoder_sha256'))[:12]}..., the config's is "
                f"{want['autoencoder_sha256'][:12]}...): use a new --out directory for this "
                "autoencoder, or restore the old one")
        if meta.get("data") != want["data"]:
            raise ConfigError(f"the latent cache {path} holds other data than {data_cfg}: use "
                              "a new --out directory, or the data config it was made with")
        if tuple(z.shape) != (data.train.shape[0], *ae.latent_shape):
            raise DataError(f"the latent cache {path} holds latents of shape "
                            f"{tuple(z.shape)}, expected {(data.train.shape[0], *ae.latent_shape)}"
                            "; delete it and run again to re-encode the data")
        return z
    z = ae.encode(data.train).float().contiguous()
    if write:
        with atomic_write(path) as tmp:
            save_file({"train": z}, str(tmp),
                      metadata={**want, "data_config": json.dumps(data_cfg, sort_keys=True)})
    return z


class LatentModel(Model):
    """A latent diffusion run: the denoiser works on latents (:attr:`shape`), the user on
    images (:attr:`image_shape`) through :attr:`autoencoder`."""

    def __init__(self, run: Run, denoiser, device: torch.device,
                 autoencoder: AutoencoderModel) -> None:
        super().__init__(run, denoiser, device)
        self.autoencoder = autoencoder

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(self.run.state.get("image_shape") or self.autoencoder.image_shape)

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f", image_shape={self.image_shape}, " \
            f"autoencoder={self.autoencoder.run.path!s})"

    def _enc(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or tuple(x.shape[1:]) != self.image_shape:
            raise UsageError(f"images must have this run's image shape (batch, "
                             f"{', '.join(map(str, self.image_shape))}); got {tuple(x.shape)}")
        return self.autoencoder.encode(x.to(self.device))

    def sample(self, n: int, **kwargs: Any) -> Samples:
        """:meth:`Model.sample` in latent space, decoded: ``.x`` holds the images and
        ``.latents`` the latents sampled."""
        out = super().sample(n, **kwargs)
        out.latents = out.x
        out.x = self.autoencoder.decode(out.x)
        return out

    def invert(self, x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """The unit latent noise (B, *shape) that ``sample(noise=...)`` maps to images x'
        latents (decoding them gives x up to the autoencoder's reconstruction error)."""
        return super().invert(self._enc(x), **kwargs)

    def null_text_invert(self, x: torch.Tensor, **kwargs: Any):
        return super().null_text_invert(self._enc(x), **kwargs)

    def edit(self, x: torch.Tensor, strength: float, **kwargs: Any) -> torch.Tensor:
        """SDEdit of images x in latent space; returns images."""
        return self.autoencoder.decode(super().edit(self._enc(x), strength, **kwargs))

    def prompt_to_prompt(self, source: str, target: str, *, x: torch.Tensor | None = None,
                         **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        src, tgt = super().prompt_to_prompt(source, target,
                                            x=None if x is None else self._enc(x), **kwargs)
        return self.autoencoder.decode(src), self.autoencoder.decode(tgt)

    def diffedit(self, x: torch.Tensor, *args: Any, **kwargs: Any
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """DiffEdit in latent space; returns (images, mask upsampled to the image size)."""
        edited, mask = super().diffedit(self._enc(x), *args, **kwargs)
        up = F.interpolate(mask.float(), size=self.image_shape[1:], mode="nearest")
        return self.autoencoder.decode(edited), up.to(mask.dtype)

    def instruct(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        raise UsageError("InstructPix2Pix runs are trained in pixel space; this is a latent run")

    def restore(self, *args: Any, **kwargs: Any):
        raise UsageError("inverse problems (restore) need the measurement in the denoiser's "
                         "space; a latent run's denoiser works on latents. Use a pixel run")
