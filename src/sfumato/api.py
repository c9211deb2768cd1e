"""The high-level API: load a trained run and sample from it.

    model = sfumato.load("runs/digits")              # config + EMA weights
    x = model.sample(16, sampler="heun", steps=18, seed=0)   # (16, 1, 8, 8) in [-1, 1]
    images = model.to_uint8(x)                       # (16, 8, 8, 1) uint8

The CLI (``sfumato sample``) is a thin layer over this.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from .calibrate import OptimizedSigmas, TunedSolver, optimize_sigmas, tune_coefficients
from .data.base import to_uint8 as data_to_uint8
from .samplers._api import sample_from


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) floats in [-1, 1] -> (N, H, W, C) uint8 numpy (``sfumato.data.to_uint8``)."""
    return data_to_uint8(x).numpy()


class Model:
    """A trained run: its config and EMA network wrapped as a σ-space denoiser (for a
    classifier run, ``denoiser`` is the :class:`~sfumato.guidance.NoisyClassifier`)."""

    def __init__(self, config: dict, denoiser, state: dict, device: torch.device) -> None:
        self.config, self.denoiser, self.state, self.device = config, denoiser, state, device
        self.num_classes = state.get("num_classes")
        self.shape = tuple(state["data_shape"]) if state.get("data_shape") else None
        self.is_classifier = config["objective"]["target"] == "classifier"
        #: the hint a ControlNet run was trained with ("edges", "mask"), else None
        self.hint = config["model"].get("hint") if config["model"]["type"] == "controlnet" \
            else None
        self._text = None
        #: labels and guidance scale of the last :meth:`sample` call
        self.last_labels: torch.Tensor | None = None
        self.last_guidance: float | None = None

    @property
    def text(self):
        """The run's :class:`~sfumato.text.conditioner.TextConditioner` (encodes prompts), or
        None for a model without text conditioning."""
        tcfg = self.config.get("text") or {}
        if self._text is None and tcfg.get("encoder"):
            from .text.conditioner import TextConditioner

            self._text = TextConditioner(tcfg)
        return self._text

    def guided(self, guidance: float = 1.0, *, classifier: Model | None = None,
               autoguide: Model | None = None, interval: tuple[float, float] | None = None,
               rescale: float = 0.0):
        """The denoiser to sample with: plain (guidance 1, no classifier), classifier-free
        guidance (class-conditional model), classifier guidance (``classifier``: a classifier
        run) or autoguidance (``autoguide``: a weaker model, e.g. an earlier checkpoint of this
        run). See :mod:`sfumato.guidance`."""
        from . import guidance as G

        if self.is_classifier:
            raise ValueError("this run is a classifier; sample from a diffusion model run")
        if classifier is not None and autoguide is not None:
            raise ValueError("choose one of classifier guidance and autoguidance")
        if classifier is not None:
            if not classifier.is_classifier:
                raise ValueError("classifier= must be a classifier run (objective.target = "
                                 "'classifier')")
            return G.ClassifierGuidance(self.denoiser, classifier.denoiser, guidance,
                                        condition_denoiser=bool(self.num_classes),
                                        sigma_interval=interval)
        if autoguide is not None:
            if autoguide.shape != self.shape or autoguide.num_classes != self.num_classes:
                raise ValueError("the autoguide model must produce the same data shape and "
                                 "take the same conditioning as this one")
            return G.AutoGuidance(self.denoiser, autoguide.denoiser, guidance,
                                  sigma_interval=interval)
        if guidance == 1.0:
            return self.denoiser
        if not (self.num_classes or self.text):
            raise ValueError("classifier-free guidance needs a conditional model; for an "
                             "unconditional one use classifier guidance or autoguidance")
        uncond = {"class_labels": self.num_classes} if self.num_classes else {}
        if self.text:
            uncond.update(self.text.null())
        return G.ClassifierFreeGuidance(self.denoiser, guidance, uncond=uncond,
                                        rescale=rescale, sigma_interval=interval)

    @torch.no_grad()
    def sample(self, n: int, *, sampler: str | None = None, steps: int | None = None,
               seed: int = 0, class_labels: torch.Tensor | int | None = None,
               grid: str | None = None, guidance: float | None = None,
               classifier: Model | None = None, autoguide: Model | None = None,
               guidance_interval: tuple[float, float] | None = None,
               guidance_rescale: float = 0.0, hint: torch.Tensor | None = None,
               control_scale: float = 1.0, prompt: str | Sequence[str] | None = None,
               sigmas: torch.Tensor | Sequence[float] | None = None,
               **sampler_kwargs) -> torch.Tensor:
        """n samples as a float tensor (n, *data_shape) in the data range.

        A class-conditional model (or any model guided by a classifier) with
        ``class_labels=None`` samples the classes evenly (labels ``arange(n) % num_classes``,
        available as ``self.last_labels``). Guidance arguments: see :meth:`guided`;
        ``guidance=None`` uses the run's default scale, ``config["sample"]["guidance"]`` (1 =
        no guidance unless the config says otherwise).
        ``hint`` (n or 1, C, H, W) in [-1, 1] steers a ControlNet run (see
        :mod:`sfumato.control` for making one from images); without it a ControlNet run
        samples its base model. ``prompt`` (one string, or n) conditions a text model; without
        it a text model samples "the digit k" for k = 0, 1, ... in turn. ``sigmas``: an
        explicit grid (e.g. :meth:`optimize_sigmas`' ``.sigmas``) instead of steps and grid.
        """
        cfg = dict(self.config["sample"])
        cfg.update({k: v for k, v in (("sampler", sampler), ("steps", steps), ("grid", grid))
                    if v is not None})
        if sampler_kwargs:
            cfg["kwargs"] = sampler_kwargs
        if sigmas is not None:
            cfg["sigmas"] = sigmas
        den, class_labels, cond = self._conditioning(
            n, class_labels, guidance, classifier=classifier, autoguide=autoguide,
            interval=guidance_interval, rescale=guidance_rescale, hint=hint,
            control_scale=control_scale, prompt=prompt)
        return sample_from(den, (n, *self.shape), cfg, seed=seed, device=self.device,
                           class_labels=class_labels, **cond)

    def optimize_sigmas(self, steps: int, *, sampler: str | None = None, samples: int = 1024,
                        seed: int = 1, guidance: float | None = None, ref_steps: int = 200,
                        batch_size: int | None = None, **sampler_kwargs) -> OptimizedSigmas:
        """A ``steps``-step grid for ``sampler`` (default: the run's) fitted to this model by
        :func:`sfumato.calibrate.optimize_sigmas` over the run's noise range, on ``samples``
        calibration draws from ``seed`` (conditioned as :meth:`sample` would: classes evenly,
        the run's guidance scale unless ``guidance`` is given). Use the result with
        ``sample(..., sigmas=fit.sigmas)``. Costs ``4 ref_steps + 1`` denoiser calls per draw
        for the targets plus ``steps`` per draw per trial grid (see the module)."""
        cfg = self.config["sample"]
        den, cond = self._calibration_conditioning(samples, guidance)
        return optimize_sigmas(
            den, sampler or cfg.get("sampler", "heun"), steps,
            sigma_min=float(cfg.get("sigma_min", 0.002)),
            sigma_max=float(cfg.get("sigma_max", 80.0)), shape=self.shape,
            generator=torch.Generator().manual_seed(seed), samples=samples,
            ref_steps=ref_steps, batch_size=batch_size, device=self.device,
            sampler_kwargs=sampler_kwargs or cfg.get("kwargs"), cond=cond)

    def tune_solver(self, steps: int, *, variant: str = "bh1", order: int = 3,
                    samples: int = 1024, seed: int = 2, guidance: float | None = None,
                    sigmas: torch.Tensor | Sequence[float] | None = None,
                    grid_samples: int = 1024, iters: int = 200, minibatch: int = 256,
                    ref_steps: int = 100) -> TunedSolver:
        """UniPC with its ``steps``-step coefficients tuned to this model
        (:func:`sfumato.calibrate.tune_coefficients`, ``samples`` draws from ``seed``, half
        held out, conditioned as :meth:`sample` would), on ``sigmas`` or else on the grid
        :meth:`optimize_sigmas` fits for ``unipc_{variant}`` (``grid_samples`` draws, seed
        ``seed + 1``). Sample with ``sample(n, sampler="tabulated", sigmas=fit.sigmas,
        table=fit.table)``. The denoiser is differentiated through the whole solver: memory
        and time grow with ``minibatch`` times ``steps`` (a network costs far more per call
        than the benchmark's mixture, hence the smaller defaults: ``iters`` Adam steps on
        ``minibatch`` draws, targets from ``ref_steps`` RK4 steps)."""
        if sigmas is None:
            sigmas = self.optimize_sigmas(steps, sampler=f"unipc_{variant}",
                                          samples=grid_samples, seed=seed + 1,
                                          guidance=guidance, order=order).sigmas
        den, cond = self._calibration_conditioning(samples, guidance)
        return tune_coefficients(
            den, torch.as_tensor(sigmas, dtype=torch.float64), shape=self.shape,
            generator=torch.Generator().manual_seed(seed), order=order, variant=variant,
            samples=samples, iters=iters, minibatch=min(minibatch, samples // 2),
            ref_steps=ref_steps, device=self.device, cond=cond)

    def _calibration_conditioning(self, n: int, guidance: float | None) -> tuple:
        """(denoiser, conditioning tensors with n rows) for calibration draws, as
        :meth:`sample` would condition n samples (classes evenly)."""
        den, labels, cond = self._conditioning(n, None, guidance)
        if labels is not None:
            cond["class_labels"] = labels.to(self.device)
        return den, cond

    def _conditioning(self, n: int, class_labels: torch.Tensor | int | None,
                      guidance: float | None, *, classifier: Model | None = None,
                      autoguide: Model | None = None,
                      interval: tuple[float, float] | None = None, rescale: float = 0.0,
                      hint: torch.Tensor | None = None, control_scale: float = 1.0,
                      prompt: str | Sequence[str] | None = None) -> tuple:
        """(denoiser, class labels or None, other conditioning) for n samples, as
        :meth:`sample` describes; sets ``last_guidance`` and ``last_labels``."""
        if guidance is None:
            guidance = float(self.config["sample"].get("guidance", 1.0))
        self.last_guidance = guidance
        den = self.guided(guidance, classifier=classifier, autoguide=autoguide,
                          interval=interval, rescale=rescale)
        nc = self.num_classes or (classifier.num_classes if classifier is not None else None)
        if isinstance(class_labels, int):
            class_labels = torch.full((n,), class_labels, dtype=torch.long)
        if class_labels is not None and (not nc or not 0 <= int(class_labels.min()) <= int(
                class_labels.max()) < nc):
            raise ValueError(f"class labels must be in [0, {nc}) for this model" if nc else
                             "class labels need a class-conditional model or a classifier")
        if class_labels is None and nc:
            class_labels = torch.arange(n) % nc
        self.last_labels = class_labels
        cond = {**self._hint_cond(n, hint, control_scale), **self._text_cond(n, prompt)}
        if self.text and not self.num_classes:
            class_labels = None
        return den, class_labels, cond

    def _hint_cond(self, n: int, hint: torch.Tensor | None, scale: float) -> dict:
        if hint is None:
            return {}
        if not self.hint:
            raise ValueError("hint= needs a ControlNet run (model.type 'controlnet')")
        if hint.ndim != 4 or hint.shape[0] not in (1, n) or hint.shape[2:] != self.shape[1:]:
            raise ValueError(f"hint must have shape (1 or {n}, C, {self.shape[1]}, "
                             f"{self.shape[2]}); got {tuple(hint.shape)}")
        cond = {"hint": hint.to(self.device).expand(n, *hint.shape[1:])}
        return {**cond, "control_scale": scale} if scale != 1.0 else cond

    def _text_cond(self, n: int, prompt: str | Sequence[str] | None) -> dict:
        """Encoded prompts; the digits they name become ``last_labels`` (unless the model
        also takes class labels)."""
        from .text import parse_prompt

        if prompt is not None and not self.text:
            raise ValueError("prompt= needs a text-conditioned run (config section 'text')")
        if not self.text:
            return {}
        if prompt is None:
            prompt = [f"the digit {i % 10}" for i in range(n)]
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if len(prompts) not in (1, n):
            raise ValueError(f"give one prompt or n = {n}; got {len(prompts)}")
        named = [parse_prompt(p)[0] for p in prompts]
        if self.last_labels is None and None not in named:
            self.last_labels = torch.tensor(named).expand(n).clone()
        enc = self.text.prompts(prompts)
        return {k: v.to(self.device).expand(n, *v.shape[1:]) for k, v in enc.items()}

    def to_uint8(self, x: torch.Tensor) -> np.ndarray:
        return to_uint8(x)


def load(run_dir: str | os.PathLike, *, device: torch.device | str = "cpu",
         dtype: torch.dtype = torch.float32) -> Model:
    """Load a run directory (or a checkpoint directory): config + EMA weights."""
    from .nets import build_net
    from .train.checkpoint import load_checkpoint
    from .train.trainer import build_denoiser

    tensors, state, config = load_checkpoint(Path(run_dir), stems=("ema",))
    model_cfg = dict(config["model"])
    model_cfg.pop("conditional", None)
    if state.get("num_classes"):
        model_cfg["num_classes"] = state["num_classes"]
    net = build_net(model_cfg)
    net.load_state_dict(tensors["ema"])
    net = net.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return Model(config, build_denoiser(net, config["objective"]), state, torch.device(device))
