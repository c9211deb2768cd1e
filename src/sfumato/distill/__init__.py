"""Distillation: few-step students of a trained diffusion run.

A student is an ordinary run (kind ``student``) that ``sfumato sample``, :func:`sfumato.load`,
``sfumato info`` and the benchmarks use like any other. Its config records the method and
its settings (section ``distill``) and the teacher (``refs.teacher``: path + weights hash,
:mod:`sfumato.run`), and it is trained by the same :class:`~sfumato.train.trainer.Trainer`
(progress bar, EMA, checkpoints, exact kill-and-resume, DDP, NaN guard, loss plot)::

    sfumato distill runs/demo --method consistency --out runs/cd     # CLI
    sfumato.distill("runs/demo", method="consistency", out="runs/cd")  # Python
    sfumato.load("runs/cd").sample(16, steps=1)

Methods (one module each; :data:`METHODS`):

- ``consistency``: consistency distillation (Song et al. 2023) with iCT's loss and curriculum;
- ``ct``: consistency training, ECT fine-tuning from the teacher's weights or iCT from scratch;
- ``progressive``: progressive distillation (Salimans & Ho 2022), halving the steps per round;
- ``guided``: a student that takes the guidance scale as an input and reproduces the teacher's
  classifier-free-guided ODE in 1-2 steps (Meng et al. 2023; LCM-style consistency distillation,
  Luo et al. 2023);
- ``dmd``: distribution matching distillation (Yin et al. 2024), a one-step generator.
"""

from __future__ import annotations

import copy
import os
import sys
import types
from collections.abc import Mapping
from typing import Any

from ..errors import ConfigError, UsageError, did_you_mean
from ..run import Run
from ._common import DistillObjective
from .consistency import ConsistencyDistillation
from .ct import ConsistencyTraining
from .dmd import DistributionMatching
from .guided import GuidedDistillation
from .progressive import ProgressiveDistillation

METHODS: dict[str, type[DistillObjective]] = {
    "consistency": ConsistencyDistillation,
    "ct": ConsistencyTraining,
    "guided": GuidedDistillation,
    "progressive": ProgressiveDistillation,
    "dmd": DistributionMatching,
}

#: the method that measures best on the demo teacher within 15 CPU-minutes (docs/distillation.md)
DEFAULT_METHOD = "ct"

__all__ = ["METHODS", "DEFAULT_METHOD", "distill", "student_config", "build_objective"]


def get_method(name: str) -> type[DistillObjective]:
    if name not in METHODS:
        raise UsageError(f"unknown distillation method {name!r}{did_you_mean(name, METHODS)}; "
                         f"choose one of {sorted(METHODS)}")
    return METHODS[name]


def _check_teacher(teacher: Run, cls: type[DistillObjective], method: str) -> None:
    if teacher.kind not in ("diffusion", "text", "latent"):
        raise UsageError(f"the teacher {teacher.path} is a {teacher.kind} run; distil a "
                         "diffusion run (sfumato train CONFIG --out DIR)")
    if "classes" in cls.NEEDS and not teacher.num_classes:
        raise UsageError(f"method {method!r} needs a class-conditional teacher (with label "
                         f"dropout, for classifier-free guidance); {teacher.path} has no "
                         "classes")
    if "classes" in cls.NEEDS and not teacher.config["objective"].get("label_dropout"):
        raise UsageError(f"method {method!r} distils classifier-free guidance: the teacher "
                         f"{teacher.path} was trained without label dropout, so it has no "
                         "unconditional mode")


def student_config(teacher: Run, method: str, out: str | os.PathLike,
                   config: Mapping[str, Any] | None = None, steps: int | None = None
                   ) -> dict[str, Any]:
    """The full run config of a ``method`` student of ``teacher`` written to ``out``: the
    teacher's data, network and conditioning; the method's parameterisation, training and
    sampling defaults; ``config`` (a dict of overrides, sections as in a run config) on top;
    ``steps`` for ``train.steps``; ``refs.teacher``."""
    from ..train.config import PATH_KEYS, load_config

    cls = get_method(method)
    _check_teacher(teacher, cls, method)
    over = copy.deepcopy(dict(config or {}))
    tc = teacher.config
    given = over.pop("distill", {})
    if given.get("method", method) != method:
        raise ConfigError(f"the config names method {given['method']!r} but --method is "
                          f"{method!r}")
    settings = cls.settings(given)
    obj = {**tc["objective"], "target": cls.TARGET or tc["objective"]["target"]}
    if cls.TARGET == "consistency":
        obj.update(sigma_min=0.002, sigma_max=80.0)
    train = {**tc["train"], "checkpoint_every": 500, "sample_every": 0, **cls.TRAIN}
    cfg = {"data": tc["data"], "model": cls.student_model(tc["model"]),
           "objective": obj, "train": train, "text": tc.get("text", {}),
           "sample": {**tc["sample"], "guidance": 1.0, **cls.SAMPLE},
           "distill": {"method": method, **settings},
           "refs": {"teacher": teacher.reference_from(out).to_dict()}}
    if teacher.kind == "latent":  # the student learns in the teacher's latent space
        cfg["autoencoder"] = str(teacher.resolve("autoencoder").path)
    for sec, val in over.items():  # overrides: section by section, checked by load_config
        if sec in PATH_KEYS:
            cfg[sec] = val
            continue
        if not isinstance(val, dict):
            raise ConfigError(f"config section {sec!r} must be an object; got {val!r}")
        cfg[sec] = {**cfg.get(sec, {}), **val} if sec not in ("data", "model") else val
    if steps is not None:
        cfg["train"]["steps"] = int(steps)
    cfg = load_config(cfg)
    cls.adjust(cfg)
    return cfg


def build_objective(trainer) -> DistillObjective:
    """The trainer's objective for a student run (its config has a ``distill`` section):
    resolves the teacher from ``refs.teacher`` (refusing a changed one), checks its data
    shape, and loads its weights into the student where the method starts from them."""
    cfg = trainer.cfg
    cls = get_method(cfg["distill"]["method"])
    settings = cls.settings(cfg["distill"])
    if "teacher" not in cfg["refs"]:
        raise ConfigError("a student run's config needs refs.teacher (made by sfumato.distill)")
    from ..run import RunRef, resolve_ref

    teacher = resolve_ref(trainer.out, RunRef.from_dict(cfg["refs"]["teacher"]), "teacher")
    shape = list(trainer.x_train.shape[1:])
    if list(teacher.data_shape or []) != shape:
        raise ConfigError(f"the teacher {teacher.path} was trained on data of shape "
                          f"{list(teacher.data_shape or [])}; the student's data is {shape}")
    objective = cls(settings, teacher.denoiser(device=trainer.device), cfg["train"]["steps"],
                    cfg["objective"], teacher.num_classes)
    objective.bind(trainer)
    if objective.init_from_teacher:
        target = teacher.config["objective"]["target"]
        if target != cfg["objective"]["target"] and {target, cls.TARGET} != {"edm",
                                                                             "consistency"}:
            raise ConfigError(f"the student starts from the teacher's weights, but "
                              f"{teacher.path} predicts {target!r}, not {cls.TARGET!r}; use "
                              "method 'ct' with distill.init = 'scratch'")
        cls.init_module(trainer.net).load_state_dict(teacher.weights())
    return objective


def distill(teacher: str | os.PathLike | Run, method: str = DEFAULT_METHOD, *,
            out: str | os.PathLike, config: str | os.PathLike | Mapping | None = None,
            steps: int | None = None, **trainer_kwargs) -> dict[str, Any]:
    """Distil ``teacher`` (a run directory) into a few-step student in ``out`` with
    ``method`` (a key of :data:`METHODS`), or resume it there: running the same call again
    continues a killed run exactly. ``config``: a JSON file or dict of overrides (any run
    config section; the method's settings in ``distill``); ``steps``: train.steps. Returns
    the trainer's summary."""
    from ..train.config import read_config_file
    from ..train.trainer import Trainer

    if isinstance(config, (str, os.PathLike)):
        config = read_config_file(config)
    if config is not None and not isinstance(config, Mapping):
        raise ConfigError("a distillation config must be a JSON object of config sections")
    run = teacher if isinstance(teacher, Run) else Run(teacher)
    cfg = student_config(run, method, out, config, steps)
    return Trainer(cfg, out, **trainer_kwargs).run()


class _CallableModule(types.ModuleType):
    """``sfumato.distill`` is this package and, called, :func:`distill`: both
    ``sfumato.distill(teacher, method, out=...)`` and ``sfumato.distill.METHODS`` work."""

    def __call__(self, *args, **kwargs) -> dict[str, Any]:
        return distill(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
