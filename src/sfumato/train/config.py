"""Run configuration: defaults, loading (JSON files or dicts), and validation with clear
errors for typos."""

from __future__ import annotations

import copy
import difflib
import json
import os
from pathlib import Path
from typing import Any

DEFAULTS: dict[str, Any] = {
    "data": {"name": "digits"},
    "model": {"type": "unet"},
    "objective": {
        "target": "edm",            # eps | x0 | v | flow | edm
        "process": None,            # e.g. {"name": "vp_discrete", "schedule": "linear"}
        "t_scale": 1.0,             # c_noise = t(sigma) * t_scale for non-EDM targets
        "sigma_data": 0.5,
        "sigma_sampling": "lognormal",  # process | lognormal | logit_normal
        "weighting": "edm",             # uniform | edm | min_snr
        "P_mean": -1.2,
        "P_std": 1.2,
        "logit_mean": 0.0,
        "logit_std": 1.0,
        "gamma": 5.0,
        "sigma_min": None,
        "sigma_max": None,
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
    "sample": {
        "sampler": "heun",
        "steps": 18,
        "grid": "karras",
        "sigma_min": 0.002,
        "sigma_max": 80.0,
        "n_grid": 64,
        "guidance": 1.0,            # default guidance scale of 'sfumato sample' / Model.sample
    },
}

FREE_SECTIONS = ("data", "model")  # keys checked by the data / network builders


class ConfigError(ValueError):
    """A configuration is invalid (unknown key, wrong type)."""


def _suggest(key: str, valid) -> str:
    close = difflib.get_close_matches(key, list(valid), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


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
            raise ConfigError(f"unknown config section {sec!r}{_suggest(sec, base)}; "
                              f"sections are {sorted(base)}")
        if not isinstance(val, dict):
            raise ConfigError(f"config section {sec!r} must be an object; got {val!r}")
        if sec in FREE_SECTIONS:
            out[sec] = copy.deepcopy(val)
            continue
        for k, v in val.items():
            if k not in base[sec]:
                raise ConfigError(f"unknown config key '{sec}.{k}'{_suggest(k, base[sec])}; "
                                  f"valid keys in {sec!r}: {sorted(base[sec])}")
            out[sec][k] = copy.deepcopy(v)
    return out


def load_config(cfg: str | os.PathLike | dict | None) -> dict:
    """A full config from a JSON file path, a dict of overrides, or None (all defaults)."""
    if cfg is None:
        return copy.deepcopy(DEFAULTS)
    if isinstance(cfg, (str, os.PathLike)):
        p = Path(cfg)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} not found")
        try:
            cfg = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"config file {str(p)!r} is not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise ConfigError("a config must be a JSON object / dict")
    return merge(DEFAULTS, cfg)
