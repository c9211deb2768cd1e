"""The project's own user-facing errors.

Everything sfumato raises because of what a user gave it (an argument, a config, a data set, a
run directory, a training run that cannot go on) is a :class:`SfumatoError`, whose message
names the problem and the fix. The command line prints these as one line; any other exception
is a bug (in sfumato, torch or elsewhere) and keeps its traceback.

Each class also derives from the built-in exception that fits it (``ValueError`` for bad
input, ``RuntimeError`` for a run that cannot be used or continued), so ``except ValueError``
code keeps working.

=====================  =================================================================
``UsageError``          a bad argument or option (unknown sampler, NaN guidance, bad shape)
``ConfigError``         a run config that is invalid (unknown key, wrong type)
``DataError``           a data set or input file that cannot be used
``CheckpointError``     a run directory or checkpoint missing, incomplete or corrupt
``RunReferenceError``   a run this run refers to is missing or has changed
``TrainingError``       training cannot go on (e.g. repeated non-finite losses)
=====================  =================================================================
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable

__all__ = ["SfumatoError", "UsageError", "ConfigError", "DataError", "CheckpointError",
           "RunReferenceError", "TrainingError", "check_finite", "did_you_mean"]


class SfumatoError(Exception):
    """Base of the project's user-facing errors (the message says what to change)."""


class UsageError(SfumatoError, ValueError):
    """A bad argument or option."""


class ConfigError(SfumatoError, ValueError):
    """A configuration is invalid (unknown key, wrong type)."""


class DataError(SfumatoError, ValueError):
    """A data set, image or input file cannot be used."""


class CheckpointError(SfumatoError, RuntimeError):
    """A run directory or checkpoint is missing, incomplete or corrupt."""


class RunReferenceError(CheckpointError):
    """A run that this run was built from is missing or no longer holds the same weights."""


class TrainingError(SfumatoError, RuntimeError):
    """Training cannot go on (e.g. repeated non-finite losses)."""


def check_finite(name: str, value: float | Iterable[float] | None, *, low: float | None = None,
                 high: float | None = None) -> None:
    """Raise :class:`UsageError` unless ``value`` (a number, or each of several) is finite and
    in ``[low, high]`` (either bound optional). ``None`` passes (an unset option)."""
    if value is None:
        return
    values = [value] if isinstance(value, (int, float)) else list(value)
    for v in values:
        try:
            ok = math.isfinite(float(v))
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise UsageError(f"{name} must be a finite number; got {value!r}")
        if (low is not None and v < low) or (high is not None and v > high):
            lo = "-inf" if low is None else f"{low:g}"
            hi = "inf" if high is None else f"{high:g}"
            raise UsageError(f"{name} must be in [{lo}, {hi}]; got {value!r}")


def did_you_mean(name: object, choices: Iterable[str]) -> str:
    """``" (did you mean 'x'?)"`` with ``x`` the choice closest to ``name`` (difflib's
    similarity ratio >= 0.6), or ``""`` when none is close: the hint of every unknown-name
    error (sampler, grid, net type, config key, data set, text encoder, control hint),
    appended right after the unknown name."""
    close = difflib.get_close_matches(str(name), list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
