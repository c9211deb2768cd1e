"""Checkpoints: optimizer state round trip through safetensors, keep-last and corruption."""

import json

import pytest
import torch
from torch import nn

from sfumato.train.checkpoint import (
    CheckpointError,
    find_checkpoint,
    load_checkpoint,
    optimizer_from_flat,
    optimizer_to_flat,
    save_checkpoint,
)


def test_optimizer_state_round_trip_through_safetensors(tmp_path):
    m = nn.Linear(3, 2)
    opt = torch.optim.AdamW(m.parameters(), lr=0.1)
    m(torch.randn(4, 3)).sum().backward()
    opt.step()
    t, meta = optimizer_to_flat(opt.state_dict())
    save_checkpoint(tmp_path, tensors={"model": m.state_dict(), "optimizer": t},
                    state={"step": 1, "optimizer": meta}, config={"a": 1})
    tensors, state, cfg = load_checkpoint(tmp_path, stems=("model", "optimizer"))
    opt2 = torch.optim.AdamW(m.parameters(), lr=0.1)
    opt2.load_state_dict(optimizer_from_flat(tensors["optimizer"], state["optimizer"]))
    for a, b in zip(opt.state_dict()["state"].values(), opt2.state_dict()["state"].values(),
                    strict=True):
        for k in a:
            torch.testing.assert_close(a[k], b[k])
    assert cfg == {"a": 1}


def test_checkpoint_keep_last_and_corruption(tmp_path):
    m = nn.Linear(2, 2)
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, tensors={"model": m.state_dict()}, state={"step": step},
                        config={}, keep_last=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == \
        ["step-00000002", "step-00000003"]
    assert json.loads((tmp_path / "checkpoint" / "state.json").read_text())["step"] == 3
    # an interrupted swap (only checkpoint.old left) is still found
    (tmp_path / "checkpoint").rename(tmp_path / "checkpoint.old")
    assert find_checkpoint(tmp_path).name == "checkpoint.old"
    (tmp_path / "checkpoint.old" / "model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(tmp_path, stems=("model",))
