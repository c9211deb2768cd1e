"""sfumato.run: a run directory read as objects (kind, shape, sampling defaults, network,
denoiser), references between runs checked by content hash, evaluation."""

from __future__ import annotations

import shutil

import pytest
import torch
from _util import TINY_UNET

import sfumato
from sfumato.errors import CheckpointError, RunReferenceError
from sfumato.run import Run, RunRef, build_denoiser, build_network, resolve_ref, run_kind
from sfumato.samplers import SAMPLING_DEFAULTS
from sfumato.train.checkpoint import checkpoint_name, load_checkpoint
from sfumato.train.config import DEFAULTS
from sfumato.train.objective import OBJECTIVE_DEFAULTS, Objective
from sfumato.train.trainer import Trainer

BASE = {"data": {"name": "digits"}, "model": TINY_UNET, "objective": {"label_dropout": 0.1},
        "train": {"steps": 4, "batch_size": 16, "checkpoint_every": 2, "keep_last": 3,
                  "num_threads": 1},
        "sample": {"sampler": "euler", "steps": 3, "n_grid": 10}}


def control(base: str) -> dict:
    return {"data": {"name": "digits"},
            "model": {"type": "controlnet", "base": base, "hint": "edges"},
            "train": {"steps": 2, "batch_size": 16, "checkpoint_every": 0, "num_threads": 1},
            "sample": {"sampler": "euler", "steps": 3, "n_grid": 10}}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("runs")
    Trainer(BASE, d / "base", progress=False).run()
    Trainer(control(str(d / "base")), d / "ctrl", progress=False).run()
    return d


def test_a_run_reads_itself(runs):
    run = Run(runs / "base")
    assert run.kind == "diffusion" and run.step == 4 and run.data_shape == (1, 8, 8)
    assert run.num_classes == 10 and run.dir == runs / "base"
    assert run.sampling == {**SAMPLING_DEFAULTS, **BASE["sample"], "guidance": 1.0}
    # the network and denoiser are the trainer's: EMA weights, bitwise
    tensors, _, _ = load_checkpoint(runs / "base", stems=("ema",))
    net = run.network()
    assert all(torch.equal(net.state_dict()[k], v) for k, v in tensors["ema"].items())
    rebuilt = build_denoiser(build_network(run.config["model"], 10), run.config["objective"])
    rebuilt.net.load_state_dict(tensors["ema"])
    x, s = torch.randn(3, 1, 8, 8), torch.tensor([0.1, 1.0, 10.0])
    y = torch.tensor([1, 2, 10])
    assert torch.equal(run.denoiser()(x, s, class_labels=y), rebuilt(x, s, class_labels=y))


def test_checkpoint_folders_and_their_run(runs):
    kept = Run(runs / "base").checkpoints(every=True)
    assert [c.name for c in kept] == [checkpoint_name(2), checkpoint_name(4)]
    early = Run(kept[0])
    assert early.step == 2 and early.dir == runs / "base"
    assert Run(runs / "base").checkpoints() == [runs / "base" / "checkpoint"]
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        Run(runs)
    with pytest.raises(CheckpointError, match="not a run directory"):
        Run(runs / "nowhere")


def test_kinds():
    cfg = {"objective": {"target": "edm"}, "model": {"type": "unet"}, "text": {}}
    assert run_kind(cfg) == "diffusion"
    assert run_kind({**cfg, "text": {"encoder": "tiny"}}) == "text"
    assert run_kind({**cfg, "model": {"type": "controlnet"}}) == "controlnet"
    assert run_kind({**cfg, "objective": {"target": "classifier"}}) == "classifier"
    assert run_kind({**cfg, "distill": {"method": "consistency"}}) == "student"
    assert run_kind({**cfg, "distill": {}}) == "diffusion"


def test_defaults_live_in_one_place():
    assert {k: DEFAULTS["sample"][k] for k in SAMPLING_DEFAULTS} == SAMPLING_DEFAULTS
    assert {k: DEFAULTS["objective"][k] for k in OBJECTIVE_DEFAULTS} == OBJECTIVE_DEFAULTS
    assert OBJECTIVE_DEFAULTS["P_mean"] == Objective().P_mean == -1.2


def test_controlnet_records_its_base_by_hash(runs, tmp_path):
    ctrl = Run(runs / "ctrl")
    assert ctrl.kind == "controlnet"
    ref = ctrl.refs["base"]
    assert ref.path == "../base" and ref.kind == "diffusion" and ref.step == 4
    assert ctrl.resolve("base").dir.resolve() == (runs / "base").resolve()
    assert ("base", "../base (ok)") in ctrl.describe()
    # a hint fixes the content: by default the ControlNet samples unconditionally
    model, hint = sfumato.load(ctrl.path), -torch.ones(1, 1, 8, 8)
    hinted = model.sample(3, hint=hint)
    assert hinted.labels is None
    assert torch.equal(hinted.x, model.sample(3, hint=hint, class_labels=None).x)
    assert model.sample(3).labels.tolist() == [0, 1, 2]  # no hint: classes in turn
    # moved together, the pair still resolves (the path is relative)
    moved = tmp_path / "moved"
    shutil.copytree(runs, moved)
    assert Run(moved / "ctrl").resolve("base").step == 4
    # a retrained base is refused, by sampling-independent content: its weights' hash
    Trainer({**BASE, "train": {**BASE["train"], "steps": 6}}, moved / "base",
            progress=False).run()
    with pytest.raises(RunReferenceError, match="has changed since"):
        Run(moved / "ctrl").resolve("base")
    assert ("base", "../base (changed)") in Run(moved / "ctrl").describe()
    # ... and resuming the ControlNet on it is refused too, naming the base
    cfg = control(str(moved / "base"))
    with pytest.raises(RunReferenceError, match="base run"):
        Trainer({**cfg, "train": {**cfg["train"], "steps": 3}}, moved / "ctrl", progress=False)
    shutil.rmtree(moved / "base")
    with pytest.raises(RunReferenceError, match="cannot be read"):
        Run(moved / "ctrl").resolve("base")
    with pytest.raises(RunReferenceError, match="records no 'teacher'"):
        Run(moved / "ctrl").resolve("teacher")


def test_ref_round_trip(runs):
    ref = Run(runs / "base").reference_from(runs / "ctrl")
    assert RunRef.from_dict(ref.to_dict()) == ref
    assert resolve_ref(runs / "ctrl", ref).step == 4
    bad = RunRef(ref.path, "0" * 64, ref.kind, ref.step)
    with pytest.raises(RunReferenceError, match="000000000000"):
        resolve_ref(runs / "ctrl", bad)


def test_evaluate_reports_each_kept_checkpoint(runs, monkeypatch, tmp_path):
    monkeypatch.setenv("SFUMATO_CACHE", str(tmp_path / "cache"))
    seen = []
    result = sfumato.evaluate(runs / "base", n=50, every=True, steps=2, on_row=seen.append)
    assert [r["step"] for r in result["rows"]] == [2, 4] and seen == result["rows"]
    for r in result["rows"]:
        assert r["fd"] > r["fd_floor"] > 0 and r["fd_ratio"] == pytest.approx(
            r["fd"] / r["fd_floor"]) and 0 <= r["accuracy"] <= 1
    assert result["guidance"] == 1.0 and result["n"] == 50
