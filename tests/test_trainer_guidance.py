"""Classifier guidance end to end: the trainer fits a noise-conditional classifier, and the CLI
samples with classifier-free guidance, classifier guidance and autoguidance."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from _util import TINY_UNET, train_runs

import sfumato
from sfumato.cli import main
from sfumato.data import get_dataset
from sfumato.train.trainer import Trainer

CLF = {
    "data": {"name": "digits"},
    "model": {"type": "classifier", "image_size": 8, "in_channels": 1, "model_channels": 16,
              "channel_mult": [1, 2], "num_res_blocks": 1},
    "objective": {"target": "classifier", "P_mean": -0.5, "P_std": 1.5},
    "train": {"steps": 150, "batch_size": 64, "lr": 3e-3, "warmup_steps": 10,
              "checkpoint_every": 0, "num_threads": 1},
}
GEN = {
    "data": {"name": "digits"},
    "model": TINY_UNET,
    "objective": {"label_dropout": 0.1},
    "train": {"steps": 4, "batch_size": 16, "checkpoint_every": 2, "keep_last": 3,
              "num_threads": 1},
    "sample": {"sampler": "euler", "steps": 4, "n_grid": 10},
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return train_runs(tmp_path_factory.mktemp("guidance"), clf=CLF, gen=GEN)


def _accuracy(clf, data, sigma: float) -> float:
    g = torch.Generator().manual_seed(0)
    x = data.heldout + sigma * torch.randn(data.heldout.shape, generator=g)
    with torch.no_grad():
        pred = clf.denoiser(x, torch.tensor(sigma)).argmax(1)
    return float((pred == data.heldout_labels).float().mean())


def test_noisy_classifier_learns(runs):
    """Held-out accuracy at low noise far above chance after 150 steps, falling with sigma."""
    clf = sfumato.load(runs / "clf")
    assert clf.is_classifier and clf.num_classes == 10
    data = get_dataset({"name": "digits"})
    low, high = _accuracy(clf, data, 0.05), _accuracy(clf, data, 5.0)
    assert low >= 0.85, low
    assert high < low
    with pytest.raises(ValueError, match="classifier"):
        clf.sample(4)


def test_classifier_objective_errors(tmp_path):
    with pytest.raises(ValueError, match="model.type='classifier'"):
        Trainer({**CLF, "model": {**GEN["model"]}}, tmp_path / "a", progress=False)
    with pytest.raises(ValueError, match="labelled"):
        Trainer({**CLF, "data": {"name": "moons"}}, tmp_path / "b", progress=False)


def _sample(runs, name, *extra):
    out = runs / f"{name}.npz"
    assert main(["sample", str(runs / "gen"), "--n", "10", "--steps", "3", "--out", str(out),
                 *extra]) == 0
    return np.load(out)["images"]


def test_api_guidance_changes_samples(runs):
    model = sfumato.load(runs / "gen")
    early = sfumato.load(sorted((runs / "gen" / "checkpoints").glob("step-*"))[0])
    plain = model.sample(6, steps=3).x
    for kw in ({"guidance": 3.0}, {"guidance": 2.0, "autoguide": early},
               {"guidance": 2.0, "classifier": sfumato.load(runs / "clf")}):
        x = model.sample(6, steps=3, **kw).x
        assert torch.isfinite(x).all() and (x - plain).abs().max() > 1e-6, kw
    assert torch.equal(model.sample(6, steps=3, guidance=2.0, guidance_interval=(90., 100.)).x,
                       plain)


def test_config_guidance_is_the_default_scale(runs):
    """``sample.guidance`` in the run's config is what sample() uses when not told; an
    explicit scale (1 included) overrides it."""
    model = sfumato.load(runs / "gen")
    assert model.config["sample"]["guidance"] == 1.0
    first = model.sample(6, steps=3)
    plain = first.x
    assert first.guidance == 1.0
    model.config["sample"]["guidance"] = 2.0
    default = model.sample(6, steps=3)
    assert torch.equal(default.x, model.sample(6, steps=3, guidance=2.0).x)
    assert default.guidance == 2.0 and first.guidance == 1.0
    assert (default.x - plain).abs().max() > 1e-6
    assert torch.equal(model.sample(6, steps=3, guidance=1.0).x, plain)


def test_cli_guidance_kinds(runs, capsys):
    plain = _sample(runs, "plain")
    assert _sample(runs, "cfg", "--guidance", "3").shape == plain.shape
    # autoguidance by the model itself is the model: D_bad + w (D_good - D_bad) = D
    same = _sample(runs, "ag_self", "--autoguide", str(runs / "gen"), "--guidance", "3")
    assert np.array_equal(plain, same)
    early = sorted((runs / "gen" / "checkpoints").glob("step-*"))[0]
    ag = _sample(runs, "ag", "--autoguide", str(early), "--guidance", "2",
                 "--guidance-interval", "0.1", "10")
    assert not np.array_equal(plain, ag)
    cg = _sample(runs, "cg", "--classifier", str(runs / "clf"), "--guidance", "2",
                 "--class", "4")
    assert cg.shape == (10, 8, 8, 1)
    assert main(["sample", str(runs / "gen"), "--n", "2", "--out", str(runs / "x.npz"),
                 "--classifier", str(runs / "gen")]) == 2
    assert "classifier run" in capsys.readouterr().err
    assert main(["sample", str(runs / "gen"), "--n", "2", "--out", str(runs / "x.npz"),
                 "--guidance-rescale", "3", "--guidance", "2"]) == 2
    assert "rescale" in capsys.readouterr().err
    assert main(["sample", str(runs / "gen"), "--n", "2", "--out", str(runs / "x.npz"),
                 "--class", "12"]) == 2
    assert "class labels must be in [0, 10)" in capsys.readouterr().err


def test_cfg_needs_conditional_model(tmp_path, capsys):
    cfg = json.loads(json.dumps(GEN))
    cfg["model"]["conditional"] = False
    cfg["objective"]["label_dropout"] = 0.0
    cfg["train"]["steps"] = 1
    Trainer(cfg, tmp_path / "u", progress=False).run()
    assert main(["sample", str(tmp_path / "u"), "--n", "2", "--out", str(tmp_path / "x.npz"),
                 "--guidance", "2"]) == 2
    assert "needs a conditional model" in capsys.readouterr().err
