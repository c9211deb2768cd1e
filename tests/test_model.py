"""sfumato.model: sampling a loaded run returns what was drawn and how; class labels
(evenly, given, unconditional); bad numbers refused; a readable repr."""

from __future__ import annotations

import math

import pytest
import torch
from _util import TINY_UNET

import sfumato
from sfumato.cli import main
from sfumato.errors import UsageError
from sfumato.sigmas import karras
from sfumato.train.trainer import Trainer

CFG = {"data": {"name": "digits"}, "model": TINY_UNET, "objective": {"label_dropout": 0.1},
       "train": {"steps": 3, "batch_size": 16, "checkpoint_every": 0, "num_threads": 1},
       "sample": {"sampler": "euler", "steps": 3, "n_grid": 10}}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    d = tmp_path_factory.mktemp("model") / "run"
    Trainer(CFG, d, progress=False).run()
    return d


def test_sample_returns_what_was_drawn_and_how(run):
    model = sfumato.load(run)
    out = model.sample(12, seed=3)
    assert out.x.shape == (12, 1, 8, 8) and out.labels.tolist() == [i % 10 for i in range(12)]
    assert out.guidance == 1.0 and out.sampler == "euler" and out.prompts is None
    assert torch.equal(out.sigmas, karras(3, 0.002, 80.0))
    assert out.to_uint8().shape == (12, 8, 8, 1)
    # sample i depends only on the seed and i; nothing is left on the model
    assert torch.equal(model.sample(5, seed=3).x, out.x[:5])
    assert not hasattr(model, "last_labels") and not hasattr(model, "last_guidance")


def test_unconditional_is_the_null_label(run):
    model = sfumato.load(run)
    uncond = model.sample(4, class_labels=None)
    assert uncond.labels is None
    # CFG at scale 0 is its unconditional branch: the label-dropout class
    assert torch.allclose(uncond.x, model.sample(4, guidance=0.0).x, atol=1e-5)
    assert not torch.equal(uncond.x, model.sample(4).x)
    assert torch.equal(model.sample(4, class_labels=7).x,
                       model.sample(4, class_labels=torch.tensor([7])).x)
    with pytest.raises(UsageError, match=r"in \[0, 10\)"):
        model.sample(2, class_labels=10)
    with pytest.raises(UsageError, match="'auto'"):
        model.sample(2, class_labels="all")


def test_unconditional_needs_label_dropout(tmp_path):
    Trainer({**CFG, "objective": {"label_dropout": 0.0}}, tmp_path / "r", progress=False).run()
    with pytest.raises(UsageError, match="label dropout"):
        sfumato.load(tmp_path / "r").sample(2, class_labels=None)


@pytest.mark.parametrize("kw, match", [
    ({"guidance": math.nan}, "guidance must be a finite number"),
    ({"guidance": math.inf}, "guidance must be a finite number"),
    ({"guidance": 2.0, "guidance_rescale": math.nan}, "rescale"),
    ({"guidance": 2.0, "guidance_rescale": 1.5}, r"rescale \(phi\) must be in \[0, 1\]"),
    ({"guidance": 2.0, "guidance_interval": (0.5, math.nan)}, "interval"),
    ({"guidance": 2.0, "guidance_interval": (5.0, 1.0)}, "lo < hi"),
    ({"control_scale": math.nan}, "control scale"),
    ({"sigmas": [80.0, math.nan, 0.0]}, "sigmas"),
])
def test_non_finite_and_out_of_range_numbers_are_refused(run, kw, match):
    with pytest.raises(UsageError, match=match):
        sfumato.load(run).sample(2, **kw)


def test_cli_refuses_nan_and_writes_nothing(run, tmp_path, capsys):
    out = tmp_path / "x.png"
    for flag in (["--guidance", "nan"], ["--guidance-rescale", "inf"],
                 ["--guidance-interval", "0", "nan"]):
        assert main(["sample", str(run), "--n", "2", "--out", str(out), *flag]) == 2
        assert "finite" in capsys.readouterr().err
    assert not out.exists()
    assert main(["sample", str(run), "--n", "3", "--class", "none", "--out",
                 str(tmp_path / "u.npz")]) == 0


def test_repr_says_what_the_run_is(run):
    r = repr(sfumato.load(run))
    for part in ("kind='diffusion'", "step=3", "data_shape=(1, 8, 8)", "classes=10",
                 "params=", "euler 3 steps on karras", "guidance=1"):
        assert part in r, r
