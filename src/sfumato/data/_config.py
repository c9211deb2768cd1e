"""Small helpers for clear configuration errors."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def unknown(kind: str, name: object, valid: Iterable[str]) -> ValueError:
    """A ValueError naming the bad ``name``, the closest valid one and all valid ones."""
    valid = sorted(valid)
    close = difflib.get_close_matches(str(name), valid, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return ValueError(f"unknown {kind} {name!r}.{hint} Valid: {', '.join(valid)}")


def check_keys(where: str, cfg: dict, allowed: Iterable[str]) -> None:
    """Raise if ``cfg`` holds a key outside ``allowed``."""
    allowed = set(allowed)
    for key in cfg:
        if key not in allowed:
            raise unknown(f"key for {where}", key, allowed)
