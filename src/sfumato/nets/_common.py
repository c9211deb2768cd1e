"""Small helpers shared by the networks."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, did_you_mean


def zero_(module: nn.Module) -> nn.Module:
    """Set every parameter of ``module`` to zero in place; returns the module."""
    with torch.no_grad():
        for p in module.parameters():
            p.zero_()
    return module


def no_context(name: str, context: torch.Tensor | None) -> None:
    """Refuse text/sequence conditioning in a network that has no cross-attention yet, rather
    than silently ignoring it."""
    if context is not None:
        raise ConfigError(f"{name} has no cross-attention: `context` is not supported "
                          "(pass context=None)")


def check_kwargs(what: str, fn: Callable, kwargs: Mapping[str, Any],
                 skip: tuple[str, ...] = ("self",)) -> None:
    """Raise ValueError naming every key of ``kwargs`` that ``fn`` does not accept, with the
    closest valid name as a suggestion and the list of valid names."""
    valid = [n for n, p in inspect.signature(fn).parameters.items()
             if n not in skip and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    bad = [k for k in kwargs if k not in valid]
    if not bad:
        return
    msgs = [f"{k!r}{did_you_mean(k, valid)}" for k in bad]
    raise ConfigError(f"unknown {what} key{'s' if len(bad) > 1 else ''} {', '.join(msgs)}; "
                      f"valid keys: {', '.join(valid)}")


def check_heads(width: int, num_heads: int, what: str) -> None:
    """ConfigError unless ``width`` splits into ``num_heads`` equal heads."""
    if width % num_heads:
        raise ConfigError(f"{what} {width} not divisible by num_heads {num_heads}")


def split_base(kwargs: Mapping[str, Any], kind: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """A wrapper's net config (without "type") -> (its base network's config, the wrapper's
    own kwargs). ``num_classes``, as :func:`sfumato.run.network_config` adds it, goes to the
    base; the base's ``conditional`` flag is dropped (the run resolved it)."""
    kw = dict(kwargs)
    base_cfg = kw.pop("base", None)
    if not isinstance(base_cfg, Mapping):
        raise ConfigError(f"a {kind!r} net config needs 'base': the network's config")
    base_cfg = {k: v for k, v in base_cfg.items() if k != "conditional"}
    if kw.get("num_classes"):
        base_cfg["num_classes"] = kw["num_classes"]
    kw.pop("num_classes", None)
    return base_cfg, kw
