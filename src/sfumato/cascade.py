"""Cascades: a base run at low resolution followed by super-resolution runs, each an ordinary
run, joined by one small file (Ho et al. 2022, "Cascaded Diffusion Models for High Fidelity
Image Generation", §3; the stages of growing resolution of their Fig. 1).

    sfumato cascade runs/cascade-base runs/cascade-sr --out runs/cascade [--aug-sigma 0.1]
    sfumato sample runs/cascade --out x.png --n 16
    cascade = sfumato.load("runs/cascade")               # CascadeModel
    out = cascade.sample(16, seed=0, aug_sigma=0.1)      # out.x (16, 1, 28, 28)
    out.stages                                           # [(16, 1, 14, 14), (16, 1, 28, 28)]

A cascade folder holds ``cascade.json`` (:func:`make_cascade` writes it atomically)::

    {"format": "sfumato-cascade", "version": 1,
     "stages": [{"path": "../cascade-base", "sha256": "...", "kind": "diffusion", "step": 2000},
                {"path": "../cascade-sr", "sha256": "...", "kind": "superres", "step": 1500}],
     "aug_sigma": 0.1,                       # null: each stage's superres.aug_sigma
     "sample": {"sampler": "heun", "steps": 18}}   # over each stage's own defaults

Each stage is a reference of :mod:`sfumato.run` (path relative to the cascade folder plus the
SHA-256 of the stage's EMA weights), so a cascade moved together with its stages still loads,
and a stage that was retrained or removed is refused (:class:`~sfumato.errors.RunReferenceError`)
rather than silently sampled. The stages must chain: stage 0 samples images (a diffusion,
student, latent, text or ControlNet run) and every later stage is a super-resolution run
(:mod:`sfumato.superres`) whose low-resolution input is the previous stage's output shape,
with the same classes when both are class-conditional; :func:`check_chain` checks this when a
cascade is made and when it is loaded.

Sampling (:meth:`CascadeModel.sample`): the base draws n images (sample i from ``seed`` and
i, exactly what ``sfumato sample BASE --seed S`` draws); each super-resolution stage then
upsamples the previous stage's output, noised to the fixed augmentation level ``aug_sigma``
the network is told (Ho et al. 2022, §3; :mod:`sfumato.lowres`), conditioned on the base's
class labels, with its own seed derived from (seed, stage).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError, RunReferenceError, UsageError, check_finite
from .files import write_json_atomic
from .lowres import SUPERRES_DEFAULTS, low_hw
from .model import AUTO, IMAGE_KINDS, ClassLabels, Samples
from .run import KINDS, Run, RunRef, ref_status, resolve_ref
from .train.checkpoint import find_checkpoint, is_checkpoint

__all__ = ["CASCADE_FILE", "CascadeModel", "CascadeSamples", "make_cascade", "is_cascade",
           "read_cascade", "check_chain", "describe_cascade", "evaluate_cascade"]

CASCADE_FILE = "cascade.json"
FORMAT = "sfumato-cascade"
#: the sampling settings a cascade may fix for all its stages (``sample`` in cascade.json)
SAMPLE_KEYS = ("sampler", "steps", "grid")


@dataclass
class CascadeSamples(Samples):
    """What :meth:`CascadeModel.sample` drew: :class:`~sfumato.model.Samples` of the final
    stage (``x`` (n, C, H, W) at the final resolution, ``labels`` the base's classes), plus
    ``stages``, each stage's output (the last is ``x``), and ``aug_sigma``, the level used at
    each super-resolution stage."""

    stages: list[torch.Tensor] = field(default_factory=list, repr=False)
    aug_sigma: list[float] = field(default_factory=list)


def is_cascade(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a cascade folder (holds ``cascade.json``)."""
    return (Path(path) / CASCADE_FILE).is_file()


def _low_shape(run: Run) -> tuple[int, ...]:
    """The low-resolution input shape (C, h, w) of a super-resolution run."""
    sec = {**SUPERRES_DEFAULTS, **(run.config.get("superres") or {})}
    return (run.image_shape[0], *low_hw(sec["low_size"]))


def check_chain(runs: Sequence[Run]) -> None:
    """:class:`~sfumato.errors.UsageError` unless ``runs`` form a cascade: at least two; the
    first samples images on its own; each later one is a super-resolution run taking the
    previous one's output shape; class-conditional stages share the base's classes."""
    if len(runs) < 2:
        raise UsageError(f"a cascade needs a base run and at least one super-resolution run; "
                         f"got {len(runs)} stage(s)")
    base = runs[0]
    if base.kind not in IMAGE_KINDS or len(base.image_shape) != 3:
        hint = " (a super-resolution run needs a stage below it)" \
            if base.kind == "superres" else ""
        raise UsageError(f"stage 0 ({base.path}) must sample images on its own (a "
                         f"{', '.join(IMAGE_KINDS)} run); it is a {base.kind} run{hint}")
    shape = base.image_shape
    for k, run in enumerate(runs[1:], 1):
        if run.kind != "superres":
            raise UsageError(f"stage {k} ({run.path}) is a {run.kind} run; every stage after "
                             "the first must be a super-resolution run (config section "
                             "superres.low_size, e.g. configs/mnist_superres.json)")
        low = _low_shape(run)
        if low != shape:
            raise UsageError(
                f"the stages do not chain: stage {k} ({run.path}) upsamples "
                f"{'x'.join(map(str, low))} (C x h x w) images, but stage {k - 1} "
                f"({runs[k - 1].path}) makes {'x'.join(map(str, shape))}: train the "
                f"super-resolution run with superres.low_size {shape[1]} and the same channels")
        if run.num_classes and base.num_classes and run.num_classes != base.num_classes:
            raise UsageError(f"stage {k} ({run.path}) is conditioned on {run.num_classes} "
                             f"classes, the base ({base.path}) on {base.num_classes}: train "
                             "them on the same data set's labels")
        shape = run.image_shape


def _check_aug(aug_sigma: float | Sequence[float] | None, n_sr: int) -> Any:
    """``aug_sigma`` as cascade.json stores it: None, a level, or one level per SR stage."""
    if aug_sigma is None:
        return None
    if isinstance(aug_sigma, (int, float)):
        check_finite("aug_sigma", aug_sigma, low=0.0)
        return float(aug_sigma)
    levels = [float(v) for v in aug_sigma]
    if len(levels) != n_sr:
        raise UsageError(f"aug_sigma must be one level, or one per super-resolution stage "
                         f"({n_sr}); got {levels}")
    check_finite("aug_sigma", levels, low=0.0)
    return levels


def _check_sample(sample: Mapping[str, Any] | None) -> dict[str, Any]:
    from .samplers import SAMPLERS

    sample = dict(sample or {})
    unknown = sorted(set(sample) - set(SAMPLE_KEYS))
    if unknown:
        raise UsageError(f"a cascade's sample settings take {', '.join(SAMPLE_KEYS)}; got "
                         f"{unknown}")
    if "sampler" in sample and sample["sampler"] not in SAMPLERS:
        raise UsageError(f"unknown sampler {sample['sampler']!r}; see 'sfumato samplers'")
    if "steps" in sample and (not isinstance(sample["steps"], int) or sample["steps"] < 1):
        raise UsageError(f"steps must be a positive integer; got {sample['steps']!r}")
    return sample


def make_cascade(stages: Sequence[str | os.PathLike], out: str | os.PathLike, *,
                 aug_sigma: float | Sequence[float] | None = None,
                 sample: Mapping[str, Any] | None = None) -> Path:
    """Join run directories ``stages`` (base first, then super-resolution runs of growing
    resolution) into a cascade in folder ``out``: writes ``out/cascade.json`` (atomically)
    with a reference to each stage (path relative to ``out`` + weights SHA-256). ``aug_sigma``:
    the sampling-time augmentation level of every SR stage, or one per SR stage (None: each
    stage's own ``superres.aug_sigma``). ``sample``: sampler settings (``sampler``,
    ``steps``, ``grid``) for every stage over its own defaults.
    Returns the path of cascade.json. The stages must chain (:func:`check_chain`)."""
    runs = [Run(p) for p in stages]
    check_chain(runs)
    out = Path(out)
    if out.is_dir() and (is_checkpoint(out) or find_checkpoint(out) is not None):
        raise UsageError(f"{out} holds a training run; make the cascade in a folder of its own "
                         "(e.g. runs/cascade)")
    record = {"format": FORMAT, "version": 1,
              "stages": [r.reference_from(out).to_dict() for r in runs],
              "aug_sigma": _check_aug(aug_sigma, len(runs) - 1),
              "sample": _check_sample(sample)}
    path = out / CASCADE_FILE
    write_json_atomic(path, record)
    return path


def read_cascade(path: str | os.PathLike) -> dict[str, Any]:
    """The record of a cascade folder's cascade.json, checked for form (not its stages)."""
    f = Path(path) / CASCADE_FILE
    try:
        record = json.loads(f.read_text())
        stages = [RunRef.from_dict(d) for d in record["stages"]]
    except FileNotFoundError:
        raise CheckpointError(f"{path} is not a cascade (no {CASCADE_FILE}); make one with "
                              "'sfumato cascade BASE SR --out DIR'") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{f} is not a cascade file ({type(e).__name__}: {e}); make it "
                              "again with 'sfumato cascade BASE SR --out DIR'") from None
    if record.get("format") != FORMAT or len(stages) < 2:
        raise CheckpointError(f"{f} is not a cascade file (format {record.get('format')!r}, "
                              f"{len(stages)} stage(s)); make it again with 'sfumato cascade'")
    record.setdefault("aug_sigma", None)
    record.setdefault("sample", {})
    return record


def _resolve_stages(path: str | os.PathLike, record: Mapping[str, Any]) -> list[Run]:
    runs = []
    for k, d in enumerate(record["stages"]):
        try:
            runs.append(resolve_ref(path, RunRef.from_dict(d), f"stage {k}"))
        except RunReferenceError as e:
            raise RunReferenceError(f"{e}. To use the stages as they are now, make the cascade "
                                    f"again: 'sfumato cascade STAGE... --out {path}'") from None
    check_chain(runs)
    return runs


def _stage_seed(seed: int, k: int) -> int:
    """The seed of stage k > 0 of a cascade sampled with ``seed`` (stage 0 uses ``seed``)."""
    if k == 0:
        return seed
    return int.from_bytes(hashlib.sha256(f"cascade {seed} stage {k}".encode()).digest()[:5],
                          "little")


class CascadeModel:
    """A loaded cascade: its base and super-resolution stages as models (``stages``: a
    :class:`~sfumato.model.Model` and :class:`~sfumato.superres.SuperResModel` s). Made by
    :func:`sfumato.load` for a cascade folder, or :meth:`load`."""

    kind = "cascade"

    def __init__(self, path: str | os.PathLike, record: Mapping[str, Any], stages: list,
                 device: torch.device | str = "cpu") -> None:
        self.path, self.dir = Path(path), Path(path)
        self.record, self.stages, self.device = dict(record), list(stages), torch.device(device)

    @classmethod
    def load(cls, path: str | os.PathLike, *, device: torch.device | str = "cpu",
             dtype: torch.dtype = torch.float32) -> CascadeModel:
        """Read ``path``/cascade.json and load its stages, refusing a stage that is missing or
        changed since the cascade was made (RunReferenceError) and stages that do not chain."""
        from .model import load

        record = read_cascade(path)
        runs = _resolve_stages(path, record)
        return cls(path, record, [load(r, device=device, dtype=dtype) for r in runs], device)

    # what it is
    shape = property(lambda self: tuple(self.stages[-1].image_shape))
    image_shape = property(lambda self: tuple(self.stages[-1].image_shape))
    num_classes = property(lambda self: self.stages[0].num_classes)
    shapes = property(lambda self: [tuple(s.image_shape) for s in self.stages])

    @property
    def train_cpu_seconds(self) -> float | None:
        """The stages' training CPU time together (None if one did not record it)."""
        cpu = [s.run.train_cpu_seconds for s in self.stages]
        return None if None in cpu else float(sum(cpu))

    def __repr__(self) -> str:
        chain = " -> ".join("x".join(map(str, s)) for s in self.shapes)
        cls = f", classes={self.num_classes}" if self.num_classes else ""
        return (f"CascadeModel(path={str(self.path)!r}, {chain}{cls}, "
                f"aug_sigma={self.record['aug_sigma']}, sample={self.record['sample']})")

    def aug_levels(self, aug_sigma: float | Sequence[float] | None = None) -> list[float]:
        """The level of each SR stage: ``aug_sigma`` (one, or one per SR stage), else the
        cascade's, else each stage's own default (``superres.aug_sigma``)."""
        n_sr = len(self.stages) - 1
        given = _check_aug(aug_sigma if aug_sigma is not None else self.record["aug_sigma"],
                           n_sr)
        if given is None:
            return [float(s.aug_sigma) for s in self.stages[1:]]
        return [float(given)] * n_sr if isinstance(given, float) else list(given)

    def _settings(self, sampler: str | None, steps: int | None,
                  stage_kwargs: Sequence[Mapping[str, Any]] | None) -> list[dict[str, Any]]:
        """Per-stage keyword arguments of ``Model.sample``: the cascade's settings, then
        ``sampler``/``steps``, then that stage's entry of ``stage_kwargs``."""
        if stage_kwargs is not None and len(stage_kwargs) != len(self.stages):
            raise UsageError(f"stage_kwargs must hold one dict per stage ({len(self.stages)}); "
                             f"got {len(stage_kwargs)}")
        common = {**_check_sample(self.record["sample"]),
                  **{k: v for k, v in (("sampler", sampler), ("steps", steps)) if v is not None}}
        return [{**common, **(dict(stage_kwargs[k]) if stage_kwargs is not None else {})}
                for k in range(len(self.stages))]

    @torch.no_grad()
    def sample(self, n: int, *, seed: int = 0, class_labels: ClassLabels = AUTO,
               aug_sigma: float | Sequence[float] | None = None, sampler: str | None = None,
               steps: int | None = None, guidance: float | None = None,
               stage_kwargs: Sequence[Mapping[str, Any]] | None = None) -> CascadeSamples:
        """n samples through all stages (sample i depends only on ``seed`` and i).

        ``class_labels``, ``guidance``: the base stage's (as :meth:`Model.sample`; the
        super-resolution stages are conditioned on the base's labels and use their own
        default guidance). ``aug_sigma``: the fixed augmentation level of every SR stage, or
        one per SR stage (default: the cascade's, else each stage's own). ``sampler``,
        ``steps``: for every stage (default: the cascade's ``sample`` settings, else each
        run's). ``stage_kwargs``: one dict of further ``sample`` keywords per stage."""
        settings = self._settings(sampler, steps, stage_kwargs)
        base = self.stages[0].sample(n, seed=seed, class_labels=class_labels,
                                     guidance=guidance, **settings[0])
        out = self._upsample(base.x, base.labels, seed=seed, aug_sigma=aug_sigma,
                             settings=settings)
        out.prompts, out.guidance = base.prompts, base.guidance
        return out

    @torch.no_grad()
    def upsample(self, x: torch.Tensor, *, class_labels: torch.Tensor | None = None,
                 seed: int = 0, aug_sigma: float | Sequence[float] | None = None,
                 sampler: str | None = None, steps: int | None = None,
                 stage_kwargs: Sequence[Mapping[str, Any]] | None = None) -> CascadeSamples:
        """Run the super-resolution stages on images x (n, *base image shape), e.g. base
        samples drawn once and upsampled at several levels; with the base's ``labels`` and
        ``seed`` it gives what :meth:`sample` gives. ``stage_kwargs``: one dict per stage
        (the first, the base's, is not used)."""
        settings = self._settings(sampler, steps, stage_kwargs)
        labels = None if class_labels is None else torch.as_tensor(class_labels).reshape(-1)
        return self._upsample(x, labels, seed=seed, aug_sigma=aug_sigma, settings=settings)

    def _upsample(self, x: torch.Tensor, labels: torch.Tensor | None, *, seed: int,
                  aug_sigma: float | Sequence[float] | None,
                  settings: list[dict[str, Any]]) -> CascadeSamples:
        levels = self.aug_levels(aug_sigma)
        xs, last = [x], None
        for k, (stage, level) in enumerate(zip(self.stages[1:], levels, strict=True), 1):
            cond = labels if stage.num_classes else None
            last = stage.sample(xs[-1].shape[0], low=xs[-1], aug_sigma=level,
                                seed=_stage_seed(seed, k), class_labels=cond, **settings[k])
            xs.append(last.x)
        return CascadeSamples(x=xs[-1], labels=labels, sampler=last.sampler, sigmas=last.sigmas,
                              stages=xs, aug_sigma=levels)


def describe_cascade(path: str | os.PathLike) -> list[tuple[str, str]]:
    """(label, value) lines that describe a cascade, for ``sfumato info`` (without loading
    weights; a missing or changed stage is reported, not raised)."""
    record = read_cascade(path)
    lines = [("cascade", str(path)), ("kind", f"cascade ({KINDS['cascade']})")]
    cpu: list[float | None] = []
    for k, d in enumerate(record["stages"]):
        ref = RunRef.from_dict(d)
        status = ref_status(path, ref)
        text = f"{ref.path} ({status}): {ref.kind} run, step {ref.step}"
        if status == "ok":
            run = resolve_ref(path, ref, f"stage {k}")
            shape = "x".join(map(str, run.image_shape))
            if run.kind == "superres":
                text += f", {'x'.join(map(str, _low_shape(run)))} -> {shape}"
            else:
                text += f", makes {shape}"
            if run.num_classes:
                text += f", {run.num_classes} classes"
            cpu.append(run.train_cpu_seconds)
        else:
            cpu.append(None)
        lines.append((f"stage {k}", text))
    aug = record["aug_sigma"]
    lines.append(("aug sigma", "each stage's own (superres.aug_sigma)" if aug is None
                  else str(aug)))
    lines.append(("sampling", str(record["sample"] or "each stage's own")))
    if None not in cpu:
        lines.append(("train CPU", f"{sum(cpu) / 60:.1f} minutes (stages together)"))
    return lines


def evaluate_cascade(path: str | os.PathLike, *, n: int = 1000, seed: int = 12345,
                     ref_seed: int = 0, sampler: str | None = None, steps: int | None = None,
                     guidance: float | None = None,
                     aug_sigma: float | Sequence[float] | None = None,
                     model: CascadeModel | None = None,
                     on_row=None) -> dict[str, Any]:
    """Score a cascade's final samples as :func:`sfumato.model.evaluate` scores a run (FD in
    the final stage's data set's classifier features next to the real-vs-real floor, class
    accuracy against the base's labels): one row, whose ``step`` lists the stages' steps and
    ``train_cpu_minutes`` sums their training CPU time."""
    from .data import get_dataset
    from .metrics import evaluate_images

    model = model if model is not None else CascadeModel.load(path)
    out = model.sample(n, seed=seed, sampler=sampler, steps=steps, guidance=guidance,
                       aug_sigma=aug_sigma)
    data = get_dataset(model.stages[-1].run.config["data"])
    m = evaluate_images(out.x, data, labels=out.labels, seed=ref_seed)
    cpu = model.train_cpu_seconds
    row = {"step": "+".join(str(s.run.step) for s in model.stages),
           "train_cpu_minutes": cpu and cpu / 60, "aug_sigma": out.aug_sigma,
           **{k: m.get(k) for k in ("fd", "fd_floor", "fd_ratio", "accuracy", "class_entropy",
                                    "n")}}
    if on_row is not None:
        on_row(row)
    return {"n": n, "guidance": out.guidance, "seed": seed, "ref_seed": ref_seed,
            "aug_sigma": out.aug_sigma, "rows": [row]}
