"""Training configs: typos and bad files fail with clear messages."""

import math

import pytest

from sfumato.train.config import ConfigError, load_config


def test_config_typos_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'steps'"):
        load_config({"train": {"step": 3}})
    with pytest.raises(ConfigError, match="unknown config section 'trian'.*'train'"):
        load_config({"trian": {}})
    bad = tmp_path / "c.json"
    bad.write_text("{nope")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(bad)
    assert load_config(None)["train"]["steps"] > 0
    assert math.isfinite(load_config({"train": {"lr": 0.5}})["train"]["lr"])
