"""Every shipped config loads, names a known data set and builds its network."""

import json
from pathlib import Path

import pytest

from sfumato.demo import DEMO_CONFIG
from sfumato.nets import build_net, count_params
from sfumato.train.config import load_config

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.json"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_is_valid(path):
    cfg = load_config(path)
    model = dict(cfg["model"])
    if model.pop("conditional", False) or model["type"] == "classifier":
        model["num_classes"] = 10  # the trainer fills it in from the data set
    if model["type"] == "controlnet":  # the trainer reads the base run's network config
        assert model["base"] == "runs/demo"
        base = dict(DEMO_CONFIG["model"])
        base.pop("conditional")
        model["base"] = {**base, "num_classes": 10}
    assert count_params(build_net(model)) > 0
    assert cfg["data"]["name"] in {"digits", "mnist", "emoji", "animals", "moons", "swissroll",
                                   "8gaussians", "checkerboard"}


def test_digits_config_is_the_demo_config():
    shipped = json.loads((Path(__file__).parent.parent / "configs" / "digits_unet.json")
                         .read_text())
    assert shipped == json.loads(json.dumps(DEMO_CONFIG))


def test_configs_exist():
    assert len(CONFIGS) >= 6
