"""Method specs: ``'name(key=value, ...)'`` strings naming a sampler or a grid with options.

The benchmark, ``sfumato compare`` and ``benchmarks/samplers.py`` take samplers and grids as
such specs, e.g. ``'unipc(order=2)'`` (:data:`sfumato.samplers.SAMPLERS`) or
``'polyexponential(rho=2)'`` (:data:`sfumato.sigmas.GRIDS`). A spec is also the method's name
in tables and JSON, so it is kept as written.
"""

from __future__ import annotations

import ast
import inspect
from collections.abc import Callable, Mapping
from typing import Any

from .. import sigmas
from ..errors import UsageError
from ..samplers import get_sampler

__all__ = ["parse_spec", "parse_sampler", "parse_grid", "spec_name"]


def spec_name(spec: str) -> str:
    """The name part of a spec: ``'unipc(order=2)'`` -> ``'unipc'``."""
    return spec.partition("(")[0].strip()


def parse_spec(spec: str, registry: Mapping[str, Callable] | None = None,
               kind: str = "method") -> tuple[str, dict[str, Any]]:
    """``'name(key=value, ...)'`` -> ``(name, {key: value})``; a plain name has no keywords.

    Values are Python literals (``2``, ``0.5``, ``'pie'``, ``True``); anything else is kept as
    a string. With ``registry`` (name -> function), the name must be a key and the keywords
    parameters of its function. Raises :class:`~sfumato.errors.UsageError` (a ValueError) for a
    malformed spec, an unknown name or an
    unknown keyword (``kind`` names the thing in the message).
    """
    spec = spec.strip()
    name, _, rest = spec.partition("(")
    name = name.strip()
    if registry is not None and name not in registry:
        raise UsageError(f"unknown {kind} {name!r}; choose one of {', '.join(registry)}")
    kwargs: dict[str, Any] = {}
    if not rest:
        return name, kwargs
    if not rest.endswith(")"):
        raise UsageError(f"malformed {kind} spec {spec!r}; use name(key=value, ...)")
    for item in filter(None, (x.strip() for x in rest[:-1].split(","))):
        key, eq, val = item.partition("=")
        if not eq or not key.strip().isidentifier():
            raise UsageError(f"malformed {kind} spec {spec!r}; use name(key=value, ...)")
        try:
            kwargs[key.strip()] = ast.literal_eval(val.strip())
        except (ValueError, SyntaxError):
            kwargs[key.strip()] = val.strip()
    if registry is not None:
        params = inspect.signature(registry[name]).parameters
        unknown = [k for k in kwargs if k not in params]
        if unknown:
            raise UsageError(f"{kind} {name!r} has no parameter(s) {unknown}")
    return name, kwargs


def parse_sampler(spec: str) -> tuple[str, dict[str, Any]]:
    """A sampler spec, e.g. ``'unipc(order=2)'`` -> ``('unipc', {'order': 2})``, checked
    against the sampler registry (:func:`sfumato.samplers.get_sampler`'s error for unknown
    names)."""
    name = spec_name(spec)
    return parse_spec(spec, {name: get_sampler(name)}, kind="sampler")


def parse_grid(spec: str) -> tuple[str, dict[str, Any]]:
    """A grid spec, e.g. ``'polyexponential(rho=2)'`` -> ``('polyexponential', {'rho': 2})``,
    checked against :data:`sfumato.sigmas.GRIDS`."""
    return parse_spec(spec, sigmas.GRIDS, kind="grid")
