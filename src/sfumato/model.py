"""A trained run, ready to sample: :class:`Model` (made by :func:`sfumato.load`).

    model = sfumato.load("runs/digits")                  # config + EMA weights
    out = model.sample(16, sampler="heun", steps=18, seed=0)
    out.x                                                # (16, 1, 8, 8) in [-1, 1]
    out.labels, out.guidance, out.sigmas                 # what was sampled, and how
    images = out.to_uint8()                              # (16, 8, 8, 1) uint8

The run itself (config, state, kind, references, weights) is a :class:`sfumato.run.Run`;
:func:`load` makes a :class:`Model` of one, :func:`evaluate` scores its checkpoints. The CLI
(``sfumato sample``, ``sfumato evaluate``) is a thin layer over this.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .calibrate import OptimizedSigmas, TunedSolver, optimize_sigmas, tune_coefficients
from .data.base import to_uint8
from .errors import UsageError, check_finite
from .run import Run
from .samplers import TABLE_SAMPLERS
from .samplers._api import sample_from

#: ``class_labels`` default: classes evenly (``arange(n) % num_classes``), or unconditional
#: (the null label) when a hint fixes the content.
AUTO = "auto"

ClassLabels = torch.Tensor | int | str | None

#: the run kinds :func:`evaluate` scores (they sample images)
IMAGE_KINDS = ("diffusion", "text", "controlnet", "student", "latent")


@dataclass
class Samples:
    """What :meth:`Model.sample` drew, and how.

    Attributes:
        x: (n, *data_shape) float samples in the data range ([-1, 1] for images).
        labels: (n,) class labels the samples were conditioned on (or, for a text run, the
            digit each prompt names), None when unconditional.
        prompts: the n prompts of a text run, else None.
        guidance: the guidance scale used (1 = none).
        sampler: the sampler's name.
        sigmas: the noise-level grid used, (steps + 1,) float64 ending in 0.
    """

    x: torch.Tensor
    labels: torch.Tensor | None = None
    prompts: list[str] | None = None
    guidance: float = 1.0
    sampler: str = ""
    sigmas: torch.Tensor | None = field(default=None, repr=False)

    def to_uint8(self) -> np.ndarray:
        """Images as (n, H, W, C) uint8 numpy (``sfumato.data.to_uint8``)."""
        return to_uint8(self.x).numpy()


class Model:
    """A trained run: its :class:`~sfumato.run.Run` and its EMA network wrapped as a σ-space
    denoiser (for a classifier run, ``denoiser`` is the
    :class:`~sfumato.guidance.NoisyClassifier`)."""

    def __init__(self, run: Run, denoiser, device: torch.device) -> None:
        self.run, self.denoiser, self.device = run, denoiser, device
        self._text = None

    # what the run is (read from it, not copied)
    config = property(lambda self: self.run.config)
    state = property(lambda self: self.run.state)
    kind = property(lambda self: self.run.kind)
    num_classes = property(lambda self: self.run.num_classes)
    shape = property(lambda self: self.run.data_shape)
    is_classifier = property(lambda self: self.kind == "classifier")
    #: the shape of the images it takes and gives (a latent run's differs from ``shape``)
    image_shape = property(lambda self: self.shape)

    @property
    def takes_guidance(self) -> bool:
        """Whether the network takes the guidance scale as an input (a guided student,
        :mod:`sfumato.distill.guided`)."""
        return self.config["model"].get("type") == "guidance_embedded"

    @property
    def hint(self) -> str | None:
        """The hint a ControlNet run was trained with ("edges", "mask"), else None."""
        return self.config["model"].get("hint") if self.kind == "controlnet" else None

    def __repr__(self) -> str:
        s = self.run.sampling
        params = sum(p.numel() for p in self.denoiser.parameters())
        cls = f", classes={self.num_classes}" if self.num_classes else ""
        return (f"Model(kind={self.kind!r}, run={str(self.run.path)!r}, step={self.run.step}, "
                f"data_shape={self.shape}{cls}, params={params:,}, "
                f"sampling={s['sampler']} {s['steps']} steps on {s['grid']} "
                f"[{s['sigma_min']:g}, {s['sigma_max']:g}], guidance={s.get('guidance', 1.0):g})")

    @property
    def text(self):
        """The run's :class:`~sfumato.text.conditioner.TextConditioner` (encodes prompts), or
        None for a model without text conditioning."""
        tcfg = self.config.get("text") or {}
        if self._text is None and tcfg.get("encoder"):
            from .text.conditioner import TextConditioner

            token = getattr(getattr(self.denoiser, "net", None), "token_embedding", None)
            if token is not None:  # textual inversion: the run's learned word
                from .personalize.textual_inversion import TokenTextConditioner

                self._text = TokenTextConditioner(tcfg, token)
            else:
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

        check_finite("guidance", guidance)
        check_finite("guidance rescale (phi)", rescale, low=0.0, high=1.0)
        check_finite("guidance interval", interval, low=0.0)
        if interval is not None and not interval[0] < interval[1]:
            raise UsageError(f"guidance interval must be (lo, hi) with lo < hi; got {interval}")
        if self.is_classifier:
            raise UsageError("this run is a classifier; sample from a diffusion model run")
        if classifier is not None and autoguide is not None:
            raise UsageError("choose one of classifier guidance and autoguidance")
        if classifier is not None:
            if not classifier.is_classifier:
                raise UsageError("classifier= must be a classifier run (objective.target = "
                                 "'classifier')")
            return G.ClassifierGuidance(self.denoiser, classifier.denoiser, guidance,
                                        condition_denoiser=bool(self.num_classes),
                                        sigma_interval=interval)
        if autoguide is not None:
            if autoguide.shape != self.shape or autoguide.num_classes != self.num_classes:
                raise UsageError("the autoguide model must produce the same data shape and "
                                 "take the same conditioning as this one")
            return G.AutoGuidance(self.denoiser, autoguide.denoiser, guidance,
                                  sigma_interval=interval)
        if self.takes_guidance:  # a guided student: w is an input, one pass
            return G.GuidanceInput(self.denoiser, guidance)
        if guidance == 1.0:
            return self.denoiser
        if not (self.num_classes or self.text):
            raise UsageError("classifier-free guidance needs a conditional model; for an "
                             "unconditional one use classifier guidance or autoguidance")
        uncond = {"class_labels": self.num_classes} if self.num_classes else {}
        if self.text:
            uncond.update(self.text.null())
        return G.ClassifierFreeGuidance(self.denoiser, guidance, uncond=uncond,
                                        rescale=rescale, sigma_interval=interval)

    @torch.no_grad()
    def sample(self, n: int, *, sampler: str | None = None, steps: int | None = None,
               seed: int = 0, class_labels: ClassLabels = AUTO,
               grid: str | None = None, guidance: float | None = None,
               classifier: Model | None = None, autoguide: Model | None = None,
               guidance_interval: tuple[float, float] | None = None,
               guidance_rescale: float = 0.0, hint: torch.Tensor | None = None,
               control_scale: float = 1.0, prompt: str | Sequence[str] | None = None,
               sigmas: torch.Tensor | Sequence[float] | None = None,
               noise: torch.Tensor | None = None, null_offsets: torch.Tensor | None = None,
               extra_cond: dict[str, torch.Tensor] | None = None,
               **sampler_kwargs) -> Samples:
        """n samples (sample i depends only on ``seed`` and i), as :class:`Samples`.

        ``class_labels``: an int or (n,) tensor of classes for a class-conditional model (or
        for classifier guidance); ``None`` samples unconditionally (the null label the run
        was trained with by label dropout); the default ``"auto"`` samples the classes evenly
        (``arange(n) % num_classes``), or unconditionally when a ``hint`` fixes the content.
        Guidance arguments: see :meth:`guided`; ``guidance=None`` uses the run's default
        scale, ``config["sample"]["guidance"]``. ``hint`` (n or 1, C, H, W) in [-1, 1] steers
        a ControlNet run (see :mod:`sfumato.control` for making one from images); without it
        a ControlNet run samples its base model. ``prompt`` (one string, or n) conditions a
        text model; without it a text model samples the plain prompt of each class in turn
        (:func:`sfumato.text.captions.default_prompts`). ``sigmas``: an explicit grid (e.g.
        :meth:`optimize_sigmas`' ``.sigmas``) instead of steps and grid. ``noise``: (n,
        *data_shape) unit starting noise instead of the seed's (e.g. from :meth:`invert`; with
        the same sampler, steps and conditioning it reproduces the inverted images).
        ``null_offsets``: (steps, n, E) from :meth:`null_text_invert`, for the Euler sampler.
        ``extra_cond``: further conditioning tensors with n rows for the denoiser (a
        super-resolution run's ``image`` and ``aug_sigma``, :mod:`sfumato.superres`).
        """
        from .sigmas import get_sigmas

        check_finite("control scale", control_scale)
        cfg = dict(self.run.sampling)
        cfg.update({k: v for k, v in (("sampler", sampler), ("steps", steps), ("grid", grid))
                    if v is not None})
        if sampler_kwargs:
            cfg["kwargs"] = sampler_kwargs
        if cfg["sampler"] in TABLE_SAMPLERS and "table" not in sampler_kwargs:
            raise UsageError(f"sampler {cfg['sampler']!r} runs a tuned coefficient table: pass "
                             "table= and its sigmas= (the CLI: --sigmas FILE from 'sfumato "
                             "optimize-grid --tune')")
        if sigmas is not None:  # checked (decreasing, finite, ending in 0) by samplers.sample
            cfg["sigmas"] = torch.as_tensor(sigmas, dtype=torch.float64)
        else:
            cfg["sigmas"] = get_sigmas(cfg["grid"], int(cfg["steps"]),
                                       sigma_min=cfg["sigma_min"], sigma_max=cfg["sigma_max"])
        den, out, cond = self._conditioning(
            n, class_labels, guidance, classifier=classifier, autoguide=autoguide,
            interval=guidance_interval, rescale=guidance_rescale, hint=hint,
            control_scale=control_scale, prompt=prompt)
        cond.update({k: v.to(self.device) for k, v in (extra_cond or {}).items()})
        if null_offsets is not None:
            from .edit import NullOffsetGuidance

            if cfg["sampler"] not in ("euler", "ddim") or sampler_kwargs:
                raise UsageError("null-text offsets were fitted for the deterministic DDIM "
                                 "(euler) sampler: sample with sampler='euler'")
            den = NullOffsetGuidance(den, cfg["sigmas"].to(self.device),
                                     torch.as_tensor(null_offsets).to(self.device))
        out.x = sample_from(den, (n, *self.shape), cfg, seed=seed, device=self.device,
                            noise=noise, **cond)
        out.sampler, out.sigmas = cfg["sampler"], cfg["sigmas"]
        return out

    def _edit_setup(self, x: torch.Tensor, class_labels: ClassLabels, prompt, guidance
                    ) -> tuple[Any, dict, torch.Tensor]:
        """(denoiser, conditioning, x on the device) for editing images x (B, *data_shape):
        unconditional by default (the null label / empty prompt), as :meth:`restore`."""
        self._check_images(x)
        n = x.shape[0]
        den, _, cond = self._conditioning(n, class_labels, guidance, prompt=prompt)
        if self.text and prompt is None:
            cond.update({k: v.to(self.device).expand(n, *v.shape[1:])
                         for k, v in self.text.null().items()})
        return den, cond, x.to(self.device)

    def _check_images(self, x: torch.Tensor) -> None:
        if tuple(x.shape[1:]) != tuple(self.shape):
            raise UsageError(f"images must have this run's shape (batch, "
                             f"{', '.join(map(str, self.shape))}); got {tuple(x.shape)}")

    def _scale(self, guidance: float | None) -> float:
        """The guidance scale to use: ``guidance``, or the run's default."""
        return float(self.run.sampling.get("guidance", 1.0) if guidance is None else guidance)

    def _grid(self, steps: int | None) -> torch.Tensor:
        from .sigmas import get_sigmas

        s = self.run.sampling
        return get_sigmas(s["grid"], int(steps or s["steps"]), sigma_min=s["sigma_min"],
                          sigma_max=s["sigma_max"])

    @torch.no_grad()
    def invert(self, x: torch.Tensor, *, sampler: str | None = None, steps: int | None = None,
               class_labels: ClassLabels = None, prompt: str | Sequence[str] | None = None,
               guidance: float | None = None, iters: int = 20) -> torch.Tensor:
        """The unit noise (B, *data_shape) from which ``sample(noise=...)`` with the same
        sampler, steps and conditioning reproduces images x (:func:`sfumato.edit.invert`;
        sampler: :meth:`inversion_sampler`)."""
        from .edit import invert

        den, cond, x = self._edit_setup(x, class_labels, prompt, guidance)
        sigmas = self._grid(steps)
        return invert(den, x, sigmas, sampler=self.inversion_sampler(sampler), iters=iters,
                      **cond) / float(sigmas[0])

    def null_text_invert(self, x: torch.Tensor, *, guidance: float, steps: int | None = None,
                         class_labels: ClassLabels = None,
                         prompt: str | Sequence[str] | None = None, iters: int = 10,
                         lr: float = 3e-2):
        """Null-text inversion of images x (B, *data_shape) for sampling with ``guidance``
        w > 1 and the given class or prompt, on the Euler (DDIM) grid of ``steps``
        (:func:`sfumato.edit.null_text_invert`). Returns its :class:`NullTextInversion`;
        ``sample(noise=inv.x_T / inv.sigmas[0], null_offsets=inv.offsets, sampler="euler",
        steps=steps, guidance=guidance, ...)`` reproduces x."""
        from .edit import embedding_width, null_text_invert

        den, cond, x = self._edit_setup(x, class_labels, prompt, guidance)
        return null_text_invert(den, x, self._grid(steps).to(self.device),
                                width=embedding_width(self.denoiser), iters=iters, lr=lr, **cond)

    def inversion_sampler(self, sampler: str | None = None) -> str:
        """The sampler :meth:`invert` runs: ``sampler`` if given, else the run's if it is
        invertible (:data:`sfumato.edit.INVERTIBLE`), else Heun."""
        from .edit import INVERTIBLE

        run_sampler = self.run.sampling["sampler"]
        return sampler or (run_sampler if run_sampler in INVERTIBLE else "heun")

    @torch.no_grad()
    def edit(self, x: torch.Tensor, strength: float, *, steps: int | None = None,
             sampler: str | None = None, seed: int = 0, class_labels: ClassLabels = None,
             prompt: str | Sequence[str] | None = None, guidance: float | None = None
             ) -> torch.Tensor:
        """SDEdit images x (B, *data_shape) with ``strength`` in [0, 1]
        (:func:`sfumato.edit.sdedit`: ``steps`` steps of the run's grid from the level the
        strength picks, whatever the strength); a class or prompt steers the edit. Image i
        depends only on ``seed`` and i."""
        from .edit import sdedit
        from .samplers._api import per_sample_generators

        den, cond, x = self._edit_setup(x, class_labels, prompt, guidance)
        s = self.run.sampling
        return sdedit(den, x, strength, steps=int(steps or s["steps"]),
                      sigma_min=s["sigma_min"], sigma_max=s["sigma_max"], grid=s["grid"],
                      sampler=sampler or s["sampler"],
                      generator=per_sample_generators(seed, x.shape[0]), **cond)

    @torch.no_grad()
    def instruct(self, x: torch.Tensor, instruction: str | Sequence[str], *,
                 image_guidance: float = 1.5, guidance: float | None = None,
                 steps: int | None = None, sampler: str | None = None, seed: int = 0
                 ) -> torch.Tensor:
        """Edit images x (B, *data_shape) by a text ``instruction`` (one, or B) with an
        instruct run (InstructPix2Pix, :mod:`sfumato.edit.instruct`): ``image_guidance`` s_I
        (closeness to the input), ``guidance`` s_T (strength of the instruction; default
        the run's). Image i depends only on ``seed`` and i."""
        from .edit.instruct import InstructGuidance
        from .samplers._api import sample_from

        if self.kind != "instruct":
            raise UsageError("instruction editing needs an instruct run (config section "
                             "'instruct', e.g. configs/digits_instruct.json)")
        self._check_images(x)
        n = x.shape[0]
        text = self._text_cond(n, instruction, Samples(x=torch.empty(0)))
        guided = InstructGuidance(self.denoiser, image_guidance, self._scale(guidance),
                                  null_text=self.text.null())
        cfg = dict(self.run.sampling)
        cfg.update({k: v for k, v in (("sampler", sampler), ("steps", steps)) if v is not None})
        return sample_from(guided, (n, *self.shape), cfg, seed=seed, device=self.device,
                           image=x.to(self.device), **text)

    @torch.no_grad()
    def prompt_to_prompt(self, source: str, target: str, *, x: torch.Tensor | None = None,
                         n: int = 1, seed: int = 0, mode: str = "replace",
                         cross_replace: float = 0.6, reweight: tuple[str, float] | None = None,
                         guidance: float | None = None, steps: int | None = None,
                         null_text: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt-to-Prompt (:mod:`sfumato.edit.p2p`) on a text run: (source images, target
        images), sampled together with the Euler (DDIM) sampler while the target's
        cross-attention maps follow the source's for the first ``cross_replace`` of the steps.

        ``mode``: "replace" (word swap, prompts of equal token count) or "refine" (added or
        removed words); ``reweight=(word, c)`` also scales the target's attention to ``word``
        by c. Without ``x``, n images from ``seed``; with images x (B, *data_shape), their
        inversion under ``source`` (null-text inversion at guidance > 1 unless ``null_text``
        is False, then the exact guided inversion), so the source images reproduce x."""
        from .edit import NullOffsetGuidance, embedding_width, invert, null_text_invert
        from .edit import p2p as P
        from .samplers._api import initial_noise, per_sample_generators

        if not self.text:
            raise UsageError(f"Prompt-to-Prompt needs a text-conditioned run (cross-attention "
                             f"on a prompt); this is a {self.kind} run")
        w = self._scale(guidance)
        sigmas = self._grid(steps).to(self.device)
        if x is None:
            den = self.guided(w)
            x_T = initial_noise((n, *self.shape), float(sigmas[0]),
                                per_sample_generators(seed, n)).to(self.device)
        else:
            den, cond, x = self._edit_setup(x, None, source, w)
            if w > 1 and null_text:
                inv = null_text_invert(den, x, sigmas, width=embedding_width(self.denoiser),
                                       **cond)
                den, x_T = NullOffsetGuidance(den, sigmas, inv.offsets), inv.x_T
            else:
                x_T = invert(den, x, sigmas, sampler="euler", **cond)
        enc, length = self.text.kind, self.text.max_length
        tokens = [P.prompt_tokens(p, enc, length) for p in (source, target)]
        controls = {"replace": P.AttentionReplace, "refine": P.AttentionRefine}
        if mode not in controls:
            raise UsageError(f"Prompt-to-Prompt mode must be one of {sorted(controls)}; got "
                             f"{mode!r}")
        ctl = controls[mode](*tokens, P.fraction_to_sigma(sigmas, cross_replace))
        if reweight is not None:
            ctl = P.AttentionReweight(P.word_positions(target, reweight[0], enc, length),
                                      reweight[1], base=ctl)
        src, tgt = ({k: v.to(self.device) for k, v in self.text.prompts([p]).items()}
                    for p in (source, target))
        return P.prompt_to_prompt(den, x_T, sigmas, src, tgt, ctl, sampler="euler")

    @torch.no_grad()
    def diffedit(self, x: torch.Tensor, source: int | str | torch.Tensor | None,
                 target: int | str | torch.Tensor, *,
                 strength: float = 0.5, steps: int | None = None, sampler: str = "ddim",
                 seed: int = 0, threshold: float = 0.5, mask_draws: int = 10,
                 guidance: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """DiffEdit images x (B, *data_shape) from ``source`` to ``target`` (a class index,
        (B,) classes or a prompt; source None = unconditional) (:mod:`sfumato.edit.diffedit`):
        the mask where the two disagree at the level ``strength`` picks (as SDEdit's), then
        masked inversion and decoding in ``steps`` steps of the run's grid. Returns (edited
        images, masks (B, 1, H, W))."""
        from .edit import diffedit, diffedit_mask, partial_grid
        from .samplers._api import per_sample_generators

        def cond(what):
            if isinstance(what, str):
                return self._edit_setup(x, None, what, guidance)
            return self._edit_setup(x, what, None, guidance)

        den, src, x = cond(source)
        _, tgt, _ = cond(target)
        s = self.run.sampling
        sigmas = partial_grid(strength, int(steps or s["steps"]), s["sigma_min"],
                              s["sigma_max"], s["grid"])
        mask = diffedit_mask(den, x, float(sigmas[0]), src, tgt, n=mask_draws,
                             threshold=threshold,
                             generator=per_sample_generators(seed, x.shape[0]))
        return diffedit(den, x, mask, sigmas, src, tgt, sampler=sampler), mask

    @torch.no_grad()
    def restore(self, y: torch.Tensor, operator, *, method: str = "pigdm",
                sigma_y: float = 0.0, seed: int = 0, steps: int | None = None,
                sampler: str | None = None, samples: int = 4,
                class_labels: ClassLabels = None, prompt: str | Sequence[str] | None = None,
                guidance: float | None = None, **options):
        """Restore images from measurements y (B, *operator.out_shape) in the data range
        (:func:`sfumato.inverse.restore`; returns its :class:`~sfumato.inverse.Restoration`).

        ``samples`` = K > 1 (default 4) returns the mean of K posterior samples per
        measurement (towards the posterior mean as K grows: the better estimate by PSNR and by
        class accuracy, blurrier where the posterior is wide); ``samples=1`` one posterior
        sample. Unconditional by default (the null label / empty prompt); ``class_labels``
        (one, or one per measurement) or ``prompt`` (likewise) condition it, with
        ``guidance`` as in :meth:`sample`. ``steps``: levels of the run's grid (default
        :data:`sfumato.inverse.DEFAULT_STEPS`); ``sampler``: the method's default if None.
        Restoration i depends only on ``seed``, i and ``samples``. ``options``: the method's
        own parameters (``zeta``, ``prior_std``, ...)."""
        from .inverse import DEFAULT_STEPS, Inpaint, Restoration, restore
        from .samplers._api import per_sample_generators

        if samples < 1:
            raise UsageError(f"samples must be >= 1; got {samples}")
        n = y.shape[0] * samples
        if torch.is_tensor(class_labels) and class_labels.numel() == y.shape[0] > 1:
            class_labels = class_labels.reshape(-1).repeat_interleave(samples)  # per image
        if isinstance(prompt, (list, tuple)) and len(prompt) == y.shape[0] > 1:
            prompt = [p for p in prompt for _ in range(samples)]
        den, cond, _ = self._edit_setup(torch.empty(n, *self.shape), class_labels, prompt,
                                        guidance)
        sigmas = self._grid(steps or DEFAULT_STEPS)
        y = y.to(self.device)
        out = restore(den, y.repeat_interleave(samples, 0), operator, method=method,
                      sigmas=sigmas, sigma_y=sigma_y, sampler=sampler,
                      generator=per_sample_generators(seed, n), options=options, **cond)
        if samples == 1:
            return out
        x = out.x.reshape(-1, samples, *out.x.shape[1:]).mean(1)
        if isinstance(operator, Inpaint):  # the mean of equal values can round: paste again
            x = operator.paste(x, y)
        return Restoration(x=x, residual=operator.residual(x, y.to(x.dtype)))

    def optimize_sigmas(self, steps: int, *, sampler: str | None = None, samples: int = 1024,
                        seed: int = 1, guidance: float | None = None, ref_steps: int = 200,
                        batch_size: int | None = None, **sampler_kwargs) -> OptimizedSigmas:
        """A ``steps``-step grid for ``sampler`` (default: the run's) fitted to this model by
        :func:`sfumato.calibrate.optimize_sigmas` over the run's noise range, on ``samples``
        calibration draws from ``seed`` (conditioned as :meth:`sample` would: classes evenly,
        the run's guidance scale unless ``guidance`` is given). Use the result with
        ``sample(..., sigmas=fit.sigmas)``. Costs ``4 ref_steps + 1`` denoiser calls per draw
        for the targets plus ``steps`` per draw per trial grid (see the module)."""
        cfg = self.run.sampling
        den, cond = self._calibration_conditioning(samples, guidance)
        return optimize_sigmas(
            den, sampler or cfg["sampler"], steps, sigma_min=float(cfg["sigma_min"]),
            sigma_max=float(cfg["sigma_max"]), shape=self.shape,
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
        den, _, cond = self._conditioning(n, AUTO, guidance)
        return den, cond

    def _conditioning(self, n: int, class_labels: ClassLabels, guidance: float | None, *,
                      classifier: Model | None = None, autoguide: Model | None = None,
                      interval: tuple[float, float] | None = None, rescale: float = 0.0,
                      hint: torch.Tensor | None = None, control_scale: float = 1.0,
                      prompt: str | Sequence[str] | None = None
                      ) -> tuple[Any, Samples, dict[str, torch.Tensor]]:
        """(denoiser, a :class:`Samples` with labels/prompts/guidance filled in, conditioning
        tensors on the device with n rows) for n samples, as :meth:`sample` describes."""
        guidance = self._scale(guidance)
        den = self.guided(guidance, classifier=classifier, autoguide=autoguide,
                          interval=interval, rescale=rescale)
        out = Samples(x=torch.empty(0), guidance=guidance)
        labels = self._labels(n, class_labels, hint is not None, classifier)
        cond = {**self._hint_cond(n, hint, control_scale), **self._text_cond(n, prompt, out)}
        if labels is not None:
            cond["class_labels"] = labels.to(self.device)
            # the null label is "no label" to the caller
            null = self.num_classes is not None and bool((labels == self.num_classes).all())
            out.labels = None if null else labels
        return den, out, cond

    def _labels(self, n: int, class_labels: ClassLabels, hinted: bool,
                classifier: Model | None) -> torch.Tensor | None:
        """The (n,) labels to condition on (the null label for unconditional), or None for a
        model that takes no labels."""
        nc = self.num_classes or (classifier.num_classes if classifier is not None else None)
        auto = isinstance(class_labels, str) and class_labels == AUTO
        if isinstance(class_labels, str) and not auto:
            raise UsageError(f"class_labels must be an int, a tensor, None (unconditional) or "
                             f"{AUTO!r}; got {class_labels!r}")
        if class_labels is None or (auto and hinted and self.num_classes):
            if not self.num_classes:
                if classifier is not None:
                    raise UsageError("classifier guidance needs class labels to guide towards")
                return None
            # a ControlNet's null label is its frozen base's (its own dropout may be 0)
            if not self.config["objective"].get("label_dropout") and self.kind != "controlnet":
                raise UsageError("this run was trained without label dropout "
                                 "(objective.label_dropout = 0): it has no unconditional mode; "
                                 "give class labels")
            return torch.full((n,), self.num_classes, dtype=torch.long)
        if auto:
            return torch.arange(n) % nc if nc else None
        if isinstance(class_labels, int):
            class_labels = torch.full((n,), class_labels, dtype=torch.long)
        if not nc:
            raise UsageError("class labels need a class-conditional model or a classifier")
        labels = torch.as_tensor(class_labels, dtype=torch.long).reshape(-1)
        if labels.numel() == 1:
            labels = labels.expand(n).clone()
        if labels.numel() != n or not 0 <= int(labels.min()) <= int(labels.max()) < nc:
            raise UsageError(f"class labels must be in [0, {nc}) for this model, one label or "
                             f"{n}; got {labels.tolist()}")
        return labels

    def _hint_cond(self, n: int, hint: torch.Tensor | None, scale: float) -> dict:
        if hint is None:
            return {}
        if not self.hint:
            raise UsageError("hint= needs a ControlNet run (model.type 'controlnet')")
        if hint.ndim != 4 or hint.shape[0] not in (1, n) or hint.shape[2:] != self.shape[1:]:
            raise UsageError(f"hint must have shape (1 or {n}, C, {self.shape[1]}, "
                             f"{self.shape[2]}); got {tuple(hint.shape)}")
        cond = {"hint": hint.to(self.device).expand(n, *hint.shape[1:])}
        return {**cond, "control_scale": scale} if scale != 1.0 else cond

    def _text_cond(self, n: int, prompt: str | Sequence[str] | None, out: Samples) -> dict:
        """Encoded prompts; records them in ``out``, and the digits they name as its labels
        (a class-conditional text model's labels replace them later)."""
        from .text.captions import default_prompts, parse_prompt

        if prompt is not None and not self.text:
            raise UsageError("prompt= needs a text-conditioned run (config section 'text')")
        if not self.text:
            return {}
        # a run captioned by its data set's texts names its classes "a CATEGORY image"
        classes = self.state.get("class_prompts")
        if prompt is None:
            prompt = [classes[i % len(classes)] for i in range(n)] if classes else \
                default_prompts(n)
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if len(prompts) not in (1, n):
            raise UsageError(f"give one prompt or n = {n}; got {len(prompts)}")
        out.prompts = prompts * n if len(prompts) == 1 else prompts
        named = [(classes.index(p) if p in classes else None) if classes else
                 parse_prompt(p)[0] for p in out.prompts]
        if None not in named:
            out.labels = torch.tensor(named)
        enc = self.text.prompts(prompts)
        return {k: v.to(self.device).expand(n, *v.shape[1:]) for k, v in enc.items()}


def load(path: str | os.PathLike | Run, *, device: torch.device | str = "cpu",
         dtype: torch.dtype = torch.float32) -> Model:
    """Load a run directory (or one of its checkpoint folders, or a :class:`Run` already read)
    as a :class:`~sfumato.model.Model`: config + EMA weights, ready to sample. A latent run
    gives a :class:`~sfumato.latent.LatentModel` (images in and out, through its autoencoder
    run), an autoencoder run an :class:`~sfumato.autoencoder.AutoencoderModel`, a
    super-resolution run a :class:`~sfumato.superres.SuperResModel`, and a folder holding a
    ``cascade.json`` (``sfumato cascade``) a :class:`~sfumato.cascade.CascadeModel`."""
    from .cascade import is_cascade

    if not isinstance(path, Run) and is_cascade(path):  # stages, each an ordinary run
        from .cascade import CascadeModel

        return CascadeModel.load(path, device=device, dtype=dtype)
    run = path if isinstance(path, Run) else Run(path)
    if run.kind == "autoencoder":
        from .autoencoder import AutoencoderModel

        return AutoencoderModel(run, device)
    den = run.denoiser(device=device, dtype=dtype)
    if run.config.get("autoencoder"):  # a latent run, or a student of one
        from .autoencoder import AutoencoderModel
        from .latent import LatentModel

        ae = AutoencoderModel(run.resolve("autoencoder"), device)
        return LatentModel(run, den, torch.device(device), ae)
    if run.kind == "superres":
        from .superres import SuperResModel

        return SuperResModel(run, den, torch.device(device))
    return Model(run, den, torch.device(device))


def evaluate(path: str | os.PathLike, *, n: int = 1000, every: bool = False,
             seed: int = 12345, ref_seed: int = 0, sampler: str | None = None,
             steps: int | None = None, guidance: float | None = None,
             on_row: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Score a run's samples: Fréchet distance in its data set's classifier features next to
    the real-vs-real floor, and class accuracy for a class-conditional run
    (:func:`sfumato.metrics.evaluate_images`), for the latest checkpoint or (``every``) each
    kept one. ``n`` samples from ``seed``; the reference is the held-out subset drawn with
    ``ref_seed``. Returns ``{"n", "guidance", "seed", "ref_seed", "rows": [...]}``, one row
    per checkpoint (step, train CPU minutes, fd, fd_floor, fd_ratio, accuracy, ...);
    ``on_row`` sees each row as soon as it is measured. A cascade (``cascade.json``) is
    scored by its final samples (:func:`sfumato.cascade.evaluate_cascade`), one row."""
    from .cascade import evaluate_cascade, is_cascade
    from .data import get_dataset
    from .metrics import evaluate_images

    if is_cascade(path):
        if every:
            raise UsageError("a cascade has no checkpoints of its own: evaluate it without "
                             "--all (or each stage's run on its own)")
        return evaluate_cascade(path, n=n, seed=seed, ref_seed=ref_seed, sampler=sampler,
                                steps=steps, guidance=guidance, on_row=on_row)
    rows, data, used_guidance = [], None, None
    for ck in Run(path).checkpoints(every):
        run = Run(ck)
        if run.kind not in IMAGE_KINDS or len(run.data_shape or ()) != 3:
            raise UsageError(f"evaluate scores image models (FD in a classifier's features); "
                             f"{path} is a {run.kind} run of data shape {run.data_shape}")
        result = load(run).sample(n, seed=seed, sampler=sampler, steps=steps,
                                    guidance=guidance)
        if data is None:  # once: the run's checkpoints share their data set
            data = get_dataset(run.config["data"])
        m = evaluate_images(result.x, data, labels=result.labels, seed=ref_seed)
        cpu = run.train_cpu_seconds
        row = {"step": run.step, "train_cpu_minutes": cpu and cpu / 60,
               **{k: m.get(k) for k in ("fd", "fd_floor", "fd_ratio", "accuracy",
                                        "class_entropy", "n")}}
        used_guidance = result.guidance
        rows.append(row)
        if on_row is not None:
            on_row(row)
    return {"n": n, "guidance": used_guidance, "seed": seed, "ref_seed": ref_seed,
            "rows": rows}
