"""A super-resolution run, ready to sample: :class:`SuperResModel` (made by
:func:`sfumato.load` for a run of kind ``"superres"``).

    sr = sfumato.load("runs/cascade-sr")                 # 14 -> 28 MNIST, say
    out = sr.upsample(low, aug_sigma=0.1, seed=0)        # low (n, 1, 14, 14) in [-1, 1]
    out.x                                                # (n, 1, 28, 28)
    sr.sample(n, low=low, aug_sigma=0.1, class_labels=labels, sampler="heun", steps=18)

A super-resolution run is an ordinary training config with a ``superres`` section that sets
``low_size`` and an ``image_conditioned`` network built with ``aug_level``
(configs/mnist_superres.json). Training makes the conditioning from each clean batch, noised
to a random level the network is told (noise-conditioning augmentation, Ho et al. 2022,
§3; :mod:`sfumato.lowres`). Sampling noises the upsampled low-resolution input to one fixed
level ``aug_sigma`` (the run's ``superres.aug_sigma`` unless given; 0 = the input as it is)
with its own per-sample generators, tells the network that level, and samples as any run
does (samplers, steps, class labels, guidance). :mod:`sfumato.cascade` chains such runs
behind a base run.
"""

from __future__ import annotations

from typing import Any

import torch

from .errors import UsageError, check_finite
from .lowres import SUPERRES_DEFAULTS, LowResConditioning, aug_generators, low_hw
from .model import AUTO, ClassLabels, Model, Samples

__all__ = ["SuperResModel"]


class SuperResModel(Model):
    """A super-resolution diffusion run: samples of :attr:`shape` (C, H, W) conditioned on
    low-resolution images of :attr:`low_shape` (C, h, w)."""

    @property
    def superres(self) -> dict[str, Any]:
        """The run's ``superres`` section over :data:`~sfumato.lowres.SUPERRES_DEFAULTS`."""
        return {**SUPERRES_DEFAULTS, **(self.config.get("superres") or {})}

    @property
    def low_shape(self) -> tuple[int, int, int]:
        """The shape (C, h, w) of the low-resolution images it takes."""
        return (self.shape[0], *low_hw(self.superres["low_size"]))

    @property
    def aug_sigma(self) -> float:
        """The default sampling-time augmentation level (``superres.aug_sigma``)."""
        return float(self.superres["aug_sigma"])

    @property
    def takes_level(self) -> bool:
        """Whether the network is told the augmentation level (``model.aug_level``)."""
        return bool(self.config["model"].get("aug_level"))

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f", low_shape={self.low_shape}, " \
            f"aug_sigma={self.aug_sigma:g})"

    def _check_low(self, low: torch.Tensor | None, n: int) -> torch.Tensor:
        h, w = self.low_shape[1:]
        if low is None:
            raise UsageError(f"a super-resolution run samples from low-resolution images: pass "
                             f"low= (n, {self.low_shape[0]}, {h}, {w}) in [-1, 1] (or sample "
                             "it in a cascade behind a base run: 'sfumato cascade BASE SR "
                             "--out DIR')")
        low = torch.as_tensor(low)
        if low.ndim != 4 or tuple(low.shape[1:]) != self.low_shape or low.shape[0] not in (1, n):
            raise UsageError(f"low must have shape (1 or {n}, {self.low_shape[0]}, {h}, {w}) "
                             f"(this run upsamples {h}x{w} to {self.shape[1]}x"
                             f"{self.shape[2]}); got {tuple(low.shape)}")
        if not torch.isfinite(low).all():
            raise UsageError("low contains NaN or inf")
        return low.float().cpu().expand(n, *self.low_shape)

    def conditioning(self, low: torch.Tensor, aug_sigma: float | None = None, seed: int = 0
                     ) -> dict[str, torch.Tensor]:
        """The network's conditioning for low-resolution images (n, C, h, w): upsampled,
        noised to ``aug_sigma`` (default :attr:`aug_sigma`) with one generator per image from
        ``seed`` (:func:`~sfumato.lowres.aug_generators`), and the level itself."""
        s = self.aug_sigma if aug_sigma is None else aug_sigma
        check_finite("aug_sigma", s, low=0.0)
        if s > 0 and not self.takes_level:
            raise UsageError(f"aug_sigma {s:g} > 0, but this run's network was trained without "
                             "augmentation (model.aug_level false): use aug_sigma=0")
        pipe = LowResConditioning(self.low_shape[1:], aug_level=self.takes_level)
        return pipe.conditioning(low, self.shape[1:], float(s),
                                 aug_generators(seed, low.shape[0]))

    @torch.no_grad()
    def sample(self, n: int, *, low: torch.Tensor | None = None, aug_sigma: float | None = None,
               seed: int = 0, class_labels: ClassLabels = AUTO, **kwargs: Any) -> Samples:
        """n full-resolution samples given low-resolution images ``low`` (n or 1, C, h, w) in
        [-1, 1], their conditioning noised to ``aug_sigma`` (default: the run's
        ``superres.aug_sigma``); sample i depends only on ``seed``, i and ``low[i]``.
        ``class_labels``: as :meth:`Model.sample`, except that the default ``"auto"`` samples
        unconditionally (the null label; the low-resolution image fixes the content) and needs
        a run trained with label dropout; a cascade passes its base stage's labels. Other
        keywords (sampler, steps, guidance, ...) as :meth:`Model.sample`. The result also holds
        ``.low`` and ``.aug_sigma``."""
        low = self._check_low(low, n)
        if isinstance(class_labels, str) and class_labels == AUTO:
            class_labels = None
        s = self.aug_sigma if aug_sigma is None else aug_sigma
        cond = self.conditioning(low, s, seed)
        out = super().sample(n, seed=seed, class_labels=class_labels, extra_cond=cond,
                             **kwargs)
        out.low, out.aug_sigma = low, float(s)
        return out

    def upsample(self, low: torch.Tensor, *, aug_sigma: float | None = None, seed: int = 0,
                 class_labels: ClassLabels = AUTO, **kwargs: Any) -> Samples:
        """:meth:`sample` with one sample per low-resolution image (B, C, h, w)."""
        low = None if low is None else torch.as_tensor(low)
        n = low.shape[0] if low is not None and low.ndim == 4 else 1
        return self.sample(n, low=low, aug_sigma=aug_sigma, seed=seed,
                           class_labels=class_labels, **kwargs)

    # the editing and calibration methods would condition on no input image: refused
    def _edit_setup(self, *args: Any, **kwargs: Any):
        raise UsageError("editing, inversion and restoration need a run that samples on its "
                         "own; a super-resolution run needs low-resolution input (use "
                         "upsample(low, ...))")

    def _calibration_conditioning(self, *args: Any, **kwargs: Any):
        raise UsageError("grid optimisation and solver tuning are not supported for "
                         "super-resolution runs yet (they draw without low-resolution input)")
