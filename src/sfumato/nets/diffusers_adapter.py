"""A diffusers ``UNet2DModel`` behind sfumato's raw-network signature.

``DiffusersUNet(config)`` builds ``diffusers.UNet2DModel(**config)`` locally (random weights,
nothing downloaded) and is called as ``net(x, c_noise, class_labels=None, context=None)``,
so it trains with sfumato's trainer and samples with sfumato's samplers behind a
:class:`sfumato.denoiser.Denoiser`. ``c_noise`` is passed as UNet2DModel's ``timestep``
(float, shape (B,)): ``log(sigma)/4`` for the EDM target, the (fractional) step for a
``VPDiscrete`` process, as the Denoiser produces it.

diffusers is an optional dependency (``pip install sfumato[bench]``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import UsageError
from ._common import check_kwargs, no_context

__all__ = ["DiffusersUNet"]


def _unet2d_class() -> type:
    try:
        from diffusers import UNet2DModel
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "DiffusersUNet needs the optional dependency diffusers: "
            "pip install 'sfumato[bench]' (or pip install diffusers)"
        ) from e
    return UNet2DModel


class DiffusersUNet(nn.Module):
    """``diffusers.UNet2DModel(**config)`` with the signature
    ``forward(x, c_noise, class_labels=None, context=None) -> y``.

    Args:
        config: keyword arguments of ``UNet2DModel`` (checked by name; a typo raises
            ValueError with a suggestion). ``time_embedding_type="fourier"`` is refused: that
            mode takes ``log(timestep)`` and divides the output by the timestep (NCSN++'s
            score convention), which does not fit sfumato's c_noise / prediction-target
            contract; use ``"positional"``.

    Class conditioning: with ``num_class_embeds`` set, ``class_labels`` (B,) long go to
    UNet2DModel's class embedding (reserve the last index as a null class if the trainer drops
    labels, e.g. ``num_class_embeds = num_classes + 1``); they are required then, as diffusers
    requires them. Without it, passing class_labels raises.

    Shapes: x (B, in_channels, H, W), c_noise scalar or (B,); returns (B, out_channels, H, W).
    """

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        cls = _unet2d_class()
        config = dict(config)
        check_kwargs("UNet2DModel config", cls.__init__, config)
        if config.get("time_embedding_type", "positional") == "fourier":
            raise UsageError(
                "time_embedding_type='fourier' is not supported by DiffusersUNet: UNet2DModel "
                "then takes log(timestep) and divides its output by the timestep (NCSN++ score "
                "convention); use 'positional' (c_noise is passed as the timestep)"
            )
        self.config = config
        self.model = cls(**config)
        self.in_channels = self.model.config.in_channels
        self.out_channels = self.model.config.out_channels
        self.num_classes = self.model.config.num_class_embeds

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor | float,
                class_labels: torch.Tensor | None = None,
                context: torch.Tensor | None = None) -> torch.Tensor:
        no_context("DiffusersUNet (UNet2DModel)", context)
        c = torch.as_tensor(c_noise, device=x.device).to(torch.float32)
        if c.ndim == 0:
            c = c.expand(x.shape[0])
        if self.model.class_embedding is None:
            if class_labels is not None:
                raise UsageError("class_labels given, but the UNet2DModel config has no "
                                 "num_class_embeds (unconditional)")
        elif class_labels is None:
            raise UsageError("this UNet2DModel is class-conditional (num_class_embeds="
                             f"{self.num_classes}); pass class_labels (B,)")
        else:
            class_labels = class_labels.long()
        return self.model(x, c, class_labels=class_labels).sample
