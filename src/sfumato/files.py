"""Writing files so that a kill never leaves half a file, and hashing them.

Every file sfumato writes (checkpoints, JSON, images, arrays, caches) goes through
:func:`atomic_write`: the content is written to a temporary file beside the target, flushed
to disk, and renamed over the target in one step, so a reader sees the old file or the new
one, never a mix.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["atomic_write", "cache_dir", "read_safetensors", "write_json_atomic", "sha256_file"]

_UMASK = os.umask(0)
os.umask(_UMASK)


def cache_dir() -> Path:
    """Where sfumato keeps what it makes once and reuses (classifiers, text embeddings, the
    emoji data): ``$SFUMATO_CACHE``, else ``$XDG_CACHE_HOME/sfumato``, else
    ``~/.cache/sfumato``."""
    env = os.environ.get("SFUMATO_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "sfumato"


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (same suffix, so writers that pick a format by
    extension work); when the block ends without error, the file written there is flushed and
    renamed over ``path``. On an error it is removed and ``path`` is left as it was. Creates
    the parent folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # as open() would create it (mkstemp makes it 0600)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON (sorted keys) to ``path`` with :func:`atomic_write`."""
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))


def write_results(out: str | os.PathLike, rows: Any, lines: list[str]) -> None:
    """A benchmark's output folder: ``out/results.json`` (``rows``) and ``out/table.md`` (the
    markdown ``lines``), both written atomically; prints where."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "results.json", rows)
    with atomic_write(out / "table.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    print(f"wrote {out / 'results.json'} and {out / 'table.md'}")


def sha256_file(path: str | os.PathLike) -> str:
    """The SHA-256 hex digest of a file's bytes (read in 1 MiB chunks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_safetensors(path: str | os.PathLike, what: str, fix: str = ""
                     ) -> tuple[dict[str, Any], dict[str, str]]:
    """(tensors, header metadata) of the safetensors file ``path``, nothing unpickled.
    :class:`~sfumato.errors.CheckpointError` naming ``what`` (e.g. "LoRA file") for a missing
    or unreadable file, with ``fix`` appended (e.g. "; delete it and it is made again")."""
    from safetensors import safe_open

    from .errors import CheckpointError

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} {path} does not exist{fix}")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"{what} {path} is not a readable safetensors file ({e}){fix}"
                              ) from None
