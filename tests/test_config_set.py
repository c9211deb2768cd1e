"""``--set KEY=VALUE``: parsing and applying (sfumato.train.config.apply_overrides), and the
``train`` / ``distill`` commands with it (a tiny toy run; resume; typos)."""

import json
import sys
from pathlib import Path

import pytest

from sfumato.cli import main
from sfumato.errors import ConfigError
from sfumato.train.config import apply_overrides

TOY = Path(__file__).resolve().parents[1] / "configs" / "toy_moons.json"
#: a few steps of a narrow MLP on the moons, no intermediate checkpoints
QUICK = ["--set", "train.steps=2", "--set", "train.batch_size=16", "--set",
         "train.checkpoint_every=0", "--set", "train.num_threads=1", "--set",
         "model.hidden=16", "--set", "model.num_blocks=1", "--set", "data.n=256",
         "--set", "sample.n_grid=4", "--no-progress"]


# -- apply_overrides -----------------------------------------------------------------------------

def test_values_are_json_when_they_parse_else_plain_strings():
    got = apply_overrides({}, ["train.steps=100", "train.lr=1e-3", "train.ema={\"decay\": 0.9}",
                               "model.channels=[32,64]", "model.conditional=true",
                               "objective.process=null", "data.name=mnist",
                               'sample.sampler="heun"', "data.tag=\"7\"", "data.path=a=b",
                               "data.empty="])
    assert got == {"train": {"steps": 100, "lr": 1e-3, "ema": {"decay": 0.9}},
                   "model": {"channels": [32, 64], "conditional": True},
                   "objective": {"process": None},
                   "data": {"name": "mnist", "tag": "7", "path": "a=b", "empty": ""},
                   "sample": {"sampler": "heun"}}


def test_nested_keys_are_created_and_the_input_is_left_alone():
    cfg = {"train": {"steps": 5, "ema": {"kind": "classic"}}, "model": {"type": "mlp"}}
    got = apply_overrides(cfg, ["train.ema.decay=0.9", "model.base.channels=[8]",
                                "objective.process.name=vp_discrete", "train.steps=7"])
    assert got["train"] == {"steps": 7, "ema": {"kind": "classic", "decay": 0.9}}
    assert got["model"] == {"type": "mlp", "base": {"channels": [8]}}
    assert got["objective"] == {"process": {"name": "vp_discrete"}}
    assert cfg == {"train": {"steps": 5, "ema": {"kind": "classic"}}, "model": {"type": "mlp"}}
    # null counts as missing; later items win and see earlier ones
    assert apply_overrides({"objective": {"process": None}}, ["objective.process.name=vp"]) \
        == {"objective": {"process": {"name": "vp"}}}
    assert apply_overrides({}, ["train={}", "train.steps=1", "train.steps=2"]) \
        == {"train": {"steps": 2}}
    assert apply_overrides({"train": {"steps": 3}}, []) == {"train": {"steps": 3}}


def test_a_top_level_key_without_a_dot():
    assert apply_overrides({"train": {}}, ["autoencoder=runs/ae"]) \
        == {"train": {}, "autoencoder": "runs/ae"}
    assert apply_overrides({}, [" autoencoder = null"]) == {"autoencoder": None}


@pytest.mark.parametrize("item", ["train.steps", "=5", "train.=5", ".steps=5", "train..lr=1",
                                  " =1", ""])
def test_malformed_items_show_the_expected_form(item):
    with pytest.raises(ConfigError, match="KEY=VALUE.*train.steps=100"):
        apply_overrides({}, [item])


def test_a_key_below_a_value_that_is_not_an_object():
    with pytest.raises(ConfigError, match=r"'train.steps' is 5, not an object.*'x'"):
        apply_overrides({"train": {"steps": 5}}, ["train.steps.x=1"])
    with pytest.raises(ConfigError, match="'autoencoder' is \"runs/ae\""):
        apply_overrides({}, ["autoencoder=runs/ae", "autoencoder.path=x"])
    with pytest.raises(ConfigError, match="JSON object"):
        apply_overrides([1, 2], ["train.steps=1"])


# -- the command line ----------------------------------------------------------------------------

def _config(out: Path) -> dict:
    return json.loads((out / "checkpoint" / "config.json").read_text())


def test_train_with_set_resumes_with_the_same_sets(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", str(TOY), "--out", str(out), *QUICK]) == 0
    assert "trained to step 2" in capsys.readouterr().out
    cfg = _config(out)
    assert cfg["train"]["steps"] == 2 and cfg["train"]["lr"] == 2e-3  # the file's, kept
    assert cfg["model"] == {"type": "mlp", "dim": 2, "hidden": 16, "num_blocks": 1}
    assert cfg["data"] == {"name": "moons", "n": 256}
    # the same sets, more steps: an ordinary resume
    assert main(["train", str(TOY), "--out", str(out), *QUICK, "--set", "train.steps=3"]) == 0
    assert "trained to step 3" in capsys.readouterr().out
    assert _config(out)["train"]["steps"] == 3
    # another network is another run
    assert main(["train", str(TOY), "--out", str(out), *QUICK, "--set", "train.steps=4",
                 "--set", "model.hidden=32"]) == 2
    assert "different 'model' config" in capsys.readouterr().err


def test_train_set_typos_and_bad_items_are_one_line_errors(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert main(["train", str(TOY), "--out", out, "--set", "train.stpes=5"]) == 2
    err = capsys.readouterr().err
    assert "sfumato train: error:" in err and "'train.stpes'" in err and "'steps'" in err
    assert main(["train", str(TOY), "--out", out, "--set", "trian.steps=5"]) == 2
    assert "unknown config section 'trian' (did you mean 'train'?)" in capsys.readouterr().err
    assert main(["train", str(TOY), "--out", out, "--set", "train.steps"]) == 2
    assert "--set takes KEY=VALUE" in capsys.readouterr().err
    assert not (tmp_path / "run" / "checkpoint").exists()


def test_distill_set_applies_to_the_overrides(tmp_path, monkeypatch, capsys):
    seen = []

    def fake(teacher, method, *, out, config, steps, progress):
        seen.append(config)
        return {"steps": 1, "seconds": 0.0, "train_cpu_seconds": 0.0}

    monkeypatch.setattr(sys.modules["sfumato.distill"], "distill", fake)
    base = ["distill", str(tmp_path / "teacher"), "--out", str(tmp_path / "s")]
    assert main([*base, "--set", "distill.init=scratch", "--set", "train.lr=1e-4"]) == 0
    conf = tmp_path / "over.json"
    conf.write_text(json.dumps({"train": {"batch_size": 16, "lr": 1.0}}))
    assert main([*base, "--config", str(conf), "--set", "train.lr=1e-4"]) == 0
    assert main([*base, "--config", str(conf)]) == 0
    assert seen == [{"distill": {"init": "scratch"}, "train": {"lr": 1e-4}},
                    {"train": {"batch_size": 16, "lr": 1e-4}}, str(conf)]
    capsys.readouterr()
    assert main([*base, "--set", "nodot"]) == 2
    assert "--set takes KEY=VALUE" in capsys.readouterr().err
