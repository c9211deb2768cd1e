"""Checkpoints: safetensors for tensors, JSON for everything else; atomic; keep-last-N.

Layout of a run directory::

    DIR/checkpoint/            the latest complete checkpoint
        model.safetensors      raw network weights
        ema.safetensors        EMA weights (what sampling uses)
        optimizer.safetensors  optimizer tensors (Adam moments, step counts)
        rng.safetensors        generator states (data order, noise, torch default)
        state.json             step, optimizer hyper-parameters, LR schedule, counters
        config.json            the run's full configuration
    DIR/checkpoints/step-NNNNNNNN/   the last ``keep_last`` checkpoints (hard links, no copies)

A checkpoint is written into ``DIR/checkpoint.tmp`` and swapped in with renames, so a kill at
any moment leaves either the previous or the new checkpoint complete (``checkpoint.old`` is
used if the kill fell between the two renames). Nothing is ever unpickled.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..errors import CheckpointError
from ..files import write_json_atomic

LATEST, TMP, OLD, HISTORY = "checkpoint", "checkpoint.tmp", "checkpoint.old", "checkpoints"


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def checkpoint_name(step: int) -> str:
    """The folder name of the archived checkpoint of ``step``: ``step-NNNNNNNN``."""
    return f"step-{int(step):08d}"


def archived_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """The kept checkpoints ``DIR/checkpoints/step-*`` of a run, oldest first."""
    return sorted((Path(run_dir) / HISTORY).glob("step-*"))


def is_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a complete checkpoint folder (not a run directory)."""
    return (Path(path) / "state.json").is_file()


def _tensors_for_disk(d: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in d.items()}


def optimizer_to_flat(opt_state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split ``optimizer.state_dict()`` into tensors (for safetensors) and JSON metadata."""
    tensors, scalars = {}, {}
    for idx, st in opt_state["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"state.{idx}.{k}"] = v
            else:
                scalars[f"{idx}.{k}"] = v
    return tensors, {"param_groups": opt_state["param_groups"], "scalars": scalars}


def optimizer_from_flat(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    """Inverse of :func:`optimizer_to_flat`."""
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        _, idx, k = key.split(".", 2)
        state.setdefault(int(idx), {})[k] = v
    for key, v in meta.get("scalars", {}).items():
        idx, k = key.split(".", 1)
        state.setdefault(int(idx), {})[k] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(run_dir: str | os.PathLike, *, tensors: dict[str, dict[str, torch.Tensor]],
                    state: dict, config: dict, keep_last: int = 2) -> Path:
    """Write ``tensors`` (file stem -> state dict) and ``state``/``config`` atomically.

    Returns the path of the new latest checkpoint (``DIR/checkpoint``).
    """
    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    tmp, latest, old = run / TMP, run / LATEST, run / OLD
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    for stem, d in tensors.items():
        save_file(_tensors_for_disk(d), str(tmp / f"{stem}.safetensors"))
        _fsync_file(tmp / f"{stem}.safetensors")
    write_json_atomic(tmp / "config.json", config)
    write_json_atomic(tmp / "state.json", state)  # written last: marks the checkpoint complete
    if old.exists():
        shutil.rmtree(old)
    if latest.exists():
        os.replace(latest, old)
    os.replace(tmp, latest)
    if old.exists():
        shutil.rmtree(old)
    if keep_last > 0:
        _archive(run, latest, int(state["step"]), keep_last)
    return latest


def _archive(run: Path, latest: Path, step: int, keep_last: int) -> None:
    hist = run / HISTORY
    hist.mkdir(exist_ok=True)
    dst = hist / checkpoint_name(step)
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir()
    for f in latest.iterdir():
        try:
            os.link(f, dst / f.name)
        except OSError:
            shutil.copy2(f, dst / f.name)
    for d in archived_checkpoints(run)[:-keep_last]:
        shutil.rmtree(d)


def find_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The latest complete checkpoint dir of a run, or None if the run has none yet."""
    run = Path(run_dir)
    for name in (LATEST, OLD):
        if is_checkpoint(run / name):
            return run / name
    return None


def load_checkpoint(ckpt_dir: str | os.PathLike, stems: tuple[str, ...] = ("model", "ema")
                    ) -> tuple[dict[str, dict[str, torch.Tensor]], dict, dict]:
    """Read (tensors by stem, state, config) from a checkpoint directory."""
    ck = Path(ckpt_dir)
    if not ck.is_dir():
        raise CheckpointError(f"{ck} does not exist")
    if not is_checkpoint(ck):  # a run dir was given
        found = find_checkpoint(ck)
        if found is None:
            raise CheckpointError(f"{ck} has no complete checkpoint yet")
        ck = found
    try:
        state = json.loads((ck / "state.json").read_text())
        config = json.loads((ck / "config.json").read_text())
    except FileNotFoundError as e:
        raise CheckpointError(f"checkpoint {ck} is incomplete: missing {Path(e.filename).name}"
                              ) from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"checkpoint {ck} has a corrupt JSON file: {e}") from None
    tensors = {}
    for stem in stems:
        f = ck / f"{stem}.safetensors"
        if not f.is_file():
            raise CheckpointError(f"checkpoint {ck} is incomplete: missing {f.name}")
        try:
            tensors[stem] = load_file(str(f))
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"checkpoint file {f} is corrupt: {e}") from None
    return tensors, state, config
