"""Small helpers shared by the networks."""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn


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
        raise ValueError(f"{name} has no cross-attention: `context` is not supported "
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
    msgs = []
    for k in bad:
        close = difflib.get_close_matches(str(k), valid, n=1, cutoff=0.6)
        msgs.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    raise ValueError(f"unknown {what} key{'s' if len(bad) > 1 else ''} {', '.join(msgs)}; "
                     f"valid keys: {', '.join(valid)}")
