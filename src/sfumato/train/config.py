"""Run configuration: defaults, loading (JSON files or dicts), command-line overrides
(``--set KEY=VALUE``), and validation with clear errors for typos."""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..autoencoder.objective import RECONSTRUCTION_DEFAULTS
from ..errors import ConfigError, did_you_mean
from ..lowres import SUPERRES_DEFAULTS
from ..samplers._api import SAMPLING_DEFAULTS
from .objective import OBJECTIVE_DEFAULTS

DEFAULTS: dict[str, Any] = {
    "data": {"name": "digits"},
    "model": {"type": "unet"},
    "objective": {
        "target": "edm",            # eps | x0 | v | flow | edm | classifier | autoencoder
        "process": None,            # e.g. {"name": "vp_discrete", "schedule": "linear"}
        "t_scale": 1.0,             # c_noise = t(sigma) * t_scale for non-EDM targets
        **OBJECTIVE_DEFAULTS,       # sigma sampling and loss weighting (sfumato.train.objective)
        "label_dropout": 0.0,       # probability of replacing a label by the null class
    },
    "train": {
        "steps": 2000,
        "batch_size": 128,
        "lr": 1e-3,
        "betas": [0.9, 0.99],
        "weight_decay": 0.0,
        "warmup_steps": 100,
        "schedule": "cosine",       # cosine | constant
        "min_lr_ratio": 0.05,
        "grad_clip": 1.0,
        "grad_accum": 1,
        "ema": {"kind": "classic", "decay": 0.999},
        "precision": "auto",        # auto | fp32 | bf16
        "seed": 0,
        "checkpoint_every": 500,
        "keep_last": 2,
        "sample_every": 0,          # 0: only at the end
        "max_bad_steps": 5,         # consecutive non-finite losses before stopping
        "log_every": 10,
        "num_threads": 0,           # torch CPU threads; 0 keeps torch's default
    },
    "text": {
        "encoder": None,            # None | "minilm" (frozen, cached) | "tiny" (trainable)
        "max_length": 32,           # tokens per caption
        "n_variants": 4,            # captions per training image
        "drop": 0.1,                # probability of the null text (classifier-free guidance)
        "keep": 0.7,                # probability of keeping each attribute word
    },
    "instruct": {                   # InstructPix2Pix pairs (sfumato.edit.instruct)
        "edits": [],                # names of sfumato.edit.attributes.EDITS; [] = off
        "drop": 0.05,               # probability of dropping the image, the text, both (each)
    },
    "superres": dict(SUPERRES_DEFAULTS),  # a super-resolution run: low_size and the noise
                                    # augmentation of its conditioning (sfumato.lowres)
    "sample": {
        **SAMPLING_DEFAULTS,        # sampler, steps, grid, sigma range (sfumato.samplers)
        "n_grid": 64,
        "guidance": 1.0,            # default guidance scale of 'sfumato sample' / Model.sample
    },
    "reconstruction": dict(RECONSTRUCTION_DEFAULTS),  # an autoencoder's loss (target
                                    # "autoencoder"; sfumato.autoencoder.objective)
    "autoencoder": None,            # a latent run: the autoencoder run directory it models
    "refs": {},                     # runs this one is built from (written by the trainer)
    "distill": {},                  # a student's method and its settings (sfumato.distill)
    "finetune": {},                 # a personalised run's method and settings
                                    # (sfumato.personalize.finetune)
}

#: sections checked by the data and network builders, sfumato.run and sfumato.distill
FREE_SECTIONS = ("data", "model", "refs", "distill", "finetune")
#: top-level keys holding a path (or None), not a section
PATH_KEYS = ("autoencoder",)


def merge(base: dict, override: dict) -> dict:
    """Apply ``override`` to a copy of ``base``.

    Sections ``data`` and ``model`` are replaced whole when given (their keys are checked by
    the data set and network builders). In the other sections every key must exist in the
    defaults (a typo is an error that suggests the right key); nested dicts (``ema``,
    ``process``) are replaced whole.
    """
    out = copy.deepcopy(base)
    for sec, val in override.items():
        if sec not in base:
            raise ConfigError(f"unknown config section {sec!r}{did_you_mean(sec, base)}; "
                              f"sections are {sorted(base)}")
        if sec in PATH_KEYS:
            if val is not None and not isinstance(val, str):
                raise ConfigError(f"config key {sec!r} must be a run directory path (a "
                                  f"string) or null; got {val!r}")
            out[sec] = val
            continue
        if not isinstance(val, dict):
            raise ConfigError(f"config section {sec!r} must be an object; got {val!r}")
        if sec in FREE_SECTIONS:
            out[sec] = copy.deepcopy(val)
            continue
        for k, v in val.items():
            if k not in base[sec]:
                raise ConfigError(f"unknown config key '{sec}.{k}'{did_you_mean(k, base[sec])}; "
                                  f"valid keys in {sec!r}: {sorted(base[sec])}")
            out[sec][k] = copy.deepcopy(v)
    return out


def read_config_file(path: str | os.PathLike) -> Any:
    """The JSON in a config file; a clear error when it is missing or not JSON."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} not found")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"config file {str(p)!r} is not valid JSON: {e}") from None


def apply_overrides(cfg: Mapping[str, Any], sets: Sequence[str]) -> dict[str, Any]:
    """A copy of the config dict ``cfg`` with each ``KEY=VALUE`` of ``sets`` applied in turn
    (the ``--set`` option of ``sfumato train`` and ``sfumato distill``).

    ``KEY`` is a dotted path into the config (``train.lr``, ``model.base.channels``, or a
    top-level key without a dot); dicts on the way are created when missing (or null).
    ``VALUE`` is parsed as JSON when it parses (``100``, ``1e-3``, ``true``, ``null``,
    ``[32,64]``, ``{"kind":"power"}``, ``"7"``) and taken as a plain string otherwise
    (``data.name=mnist``). A nested dict given as a whole replaces the one there, as in a
    config file. Key names are not checked here: :func:`load_config` does that (with the
    closest valid key). Raises :class:`ConfigError` for an item without ``=`` or with an
    empty key, and for a key below a value that is not an object.
    """
    if not isinstance(cfg, Mapping):
        raise ConfigError(f"a config must be a JSON object / dict; got {type(cfg).__name__}")
    out = copy.deepcopy(dict(cfg))
    for item in sets:
        key, sep, text = item.partition("=")
        path = [part.strip() for part in key.split(".")]
        if not sep or not all(path):
            raise ConfigError(f"--set takes KEY=VALUE with KEY a dotted config key, e.g. "
                              f"train.steps=100 or data.name=mnist; got {item!r}")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text  # a plain string: data.name=mnist
        node = out
        for depth, part in enumerate(path[:-1]):
            if node.get(part) is None:
                node[part] = {}
            elif not isinstance(node[part], dict):
                where, now = ".".join(path[:depth + 1]), json.dumps(node[part], default=str)
                raise ConfigError(f"--set {item!r}: {where!r} is {now}, not an object, so it "
                                  f"has no key {path[depth + 1]!r}; set {where!r} itself "
                                  f"(e.g. --set {where}=VALUE)")
            node = node[part]
        node[path[-1]] = value
    return out


def load_config(cfg: str | os.PathLike | dict | None) -> dict:
    """A full config from a JSON file path, a dict of overrides, or None (all defaults)."""
    if cfg is None:
        return copy.deepcopy(DEFAULTS)
    if isinstance(cfg, (str, os.PathLike)):
        cfg = read_config_file(cfg)
    if not isinstance(cfg, dict):
        raise ConfigError("a config must be a JSON object / dict")
    return merge(DEFAULTS, cfg)
