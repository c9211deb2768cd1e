"""Small helpers for clear configuration errors."""

from __future__ import annotations

from collections.abc import Iterable

from ..errors import DataError, did_you_mean


def unknown(kind: str, name: object, valid: Iterable[str]) -> DataError:
    """A :class:`DataError` naming the bad ``name``, the closest valid one and all valid
    ones."""
    valid = sorted(valid)
    return DataError(f"unknown {kind} {name!r}{did_you_mean(name, valid)}; valid: "
                     f"{', '.join(valid)}")


def check_keys(where: str, cfg: dict, allowed: Iterable[str]) -> None:
    """Raise if ``cfg`` holds a key outside ``allowed``."""
    allowed = set(allowed)
    for key in cfg:
        if key not in allowed:
            raise unknown(f"key for {where}", key, allowed)
