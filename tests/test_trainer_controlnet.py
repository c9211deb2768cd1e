"""ControlNet training end to end: a frozen base run, a ControlNet trained on its loss with
edge hints, which then denoises better than the base where the hint carries information."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from _util import TINY_UNET
from PIL import Image

import sfumato
from sfumato.cli import main
from sfumato.control import make_hint
from sfumato.data import get_dataset
from sfumato.train.checkpoint import load_checkpoint
from sfumato.train.trainer import Trainer

BASE = {
    "data": {"name": "digits"},
    "model": TINY_UNET,
    "objective": {"label_dropout": 0.1},
    "train": {"steps": 150, "batch_size": 64, "lr": 3e-3, "warmup_steps": 10,
              "checkpoint_every": 0, "num_threads": 1},
    "sample": {"sampler": "euler", "steps": 4, "n_grid": 10},
}


def control_cfg(base_dir, steps=150):
    return {"data": {"name": "digits"},
            "model": {"type": "controlnet", "base": str(base_dir), "hint": "edges"},
            "train": {"steps": steps, "batch_size": 64, "lr": 3e-3, "warmup_steps": 10,
                      "checkpoint_every": 0, "num_threads": 1},
            "sample": {"sampler": "euler", "steps": 4, "n_grid": 10}}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("control")
    Trainer(BASE, d / "base", progress=False).run()
    Trainer(control_cfg(d / "base"), d / "ctrl", progress=False).run()
    return d


def _heldout_loss(model, data, sigma: float, hint: bool) -> float:
    g = torch.Generator().manual_seed(0)
    x0, y = data.heldout, data.heldout_labels
    x = x0 + sigma * torch.randn(x0.shape, generator=g)
    cond = {"hint": make_hint("edges", x0)} if hint else {}
    with torch.no_grad():
        d = model.denoiser(x, torch.tensor(sigma), class_labels=y, **cond)
    return float(((d - x0) ** 2).mean())


def test_controlnet_keeps_base_and_uses_the_hint(runs):
    base, ctrl = sfumato.load(runs / "base"), sfumato.load(runs / "ctrl")
    assert ctrl.hint == "edges" and ctrl.num_classes == 10
    t_base, _, _ = load_checkpoint(runs / "base", stems=("ema",))
    t_ctrl, _, cfg = load_checkpoint(runs / "ctrl", stems=("ema", "model"))
    for k, v in t_base["ema"].items():  # the base is frozen: bitwise the base run's weights
        assert torch.equal(t_ctrl["model"]["base." + k], v), k
    assert cfg["model"]["base"]["type"] == "unet"  # self-contained: rebuilds without base dir
    assert cfg["objective"]["target"] == "edm"
    data = get_dataset({"name": "digits"})
    for sigma in (1.0, 3.0):  # where the edges say much about the digit
        with_hint = _heldout_loss(ctrl, data, sigma, hint=True)
        without = _heldout_loss(base, data, sigma, hint=False)
        print(f"sigma {sigma}: held-out MSE with hint {with_hint:.4f}, base {without:.4f}")
        assert with_hint < 0.8 * without, (sigma, with_hint, without)
    # no hint: the base model, exactly
    assert torch.equal(ctrl.sample(4, steps=3).x, base.sample(4, steps=3).x)


def test_cli_control(runs, capsys):
    data = get_dataset({"name": "digits"})
    edges = make_hint("edges", data.heldout[:1])
    png = runs / "hint.png"
    Image.fromarray(((edges[0, 0].numpy() > 0) * 255).astype(np.uint8)).save(png)
    out = runs / "c.npz"
    assert main(["sample", str(runs / "ctrl"), "--n", "4", "--steps", "3", "--control",
                 str(png), "--out", str(out), "--guidance", "2"]) == 0
    assert np.load(out)["images"].shape == (4, 8, 8, 1)
    assert main(["sample", str(runs / "base"), "--n", "2", "--control", str(png), "--out",
                 str(out)]) == 2
    assert "ControlNet" in capsys.readouterr().err
    bad = runs / "bad.png"
    bad.write_bytes(b"not a png")
    assert main(["sample", str(runs / "ctrl"), "--n", "2", "--control", str(bad), "--out",
                 str(out)]) == 2
    assert "not a readable image" in capsys.readouterr().err


def test_controlnet_config_errors(runs, tmp_path):
    cfg = control_cfg(runs / "base", steps=1)
    cfg["data"] = {"name": "moons"}
    with pytest.raises(ValueError, match="shape"):
        Trainer(cfg, tmp_path / "x", progress=False)
    cfg = json.loads(json.dumps(control_cfg(runs / "base", steps=1)))
    cfg["model"]["hint"] = "edgez"
    with pytest.raises(ValueError, match="edges"):
        Trainer(cfg, tmp_path / "y", progress=False)


def test_hint_defaults_to_edges_and_is_saved(runs, tmp_path):
    cfg = control_cfg(runs / "base", steps=1)
    del cfg["model"]["hint"]
    Trainer(cfg, tmp_path / "c", progress=False).run()
    _, _, saved = load_checkpoint(tmp_path / "c", stems=("ema",))
    assert saved["model"]["hint"] == "edges"
    assert sfumato.load(tmp_path / "c").hint == "edges"  # still known as a ControlNet run
