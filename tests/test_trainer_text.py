"""Text conditioning through the trainer, the API and the CLI: captions name each image's
label, a drop rate gives the null text, MiniLM and the tiny trainable encoder both train."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import sfumato
from sfumato.cli import main
from sfumato.data import get_dataset
from sfumato.text import parse_prompt
from sfumato.text.conditioner import TextConditioner
from sfumato.train.trainer import Trainer

UNET = {"type": "unet", "image_size": 8, "in_channels": 1, "model_channels": 16,
        "channel_mult": [1, 2], "num_res_blocks": 1, "attention_resolutions": [4],
        "mid_attention": False, "norm_groups": 8}
TRAIN = {"steps": 3, "batch_size": 16, "checkpoint_every": 0, "num_threads": 1}
SAMPLE = {"sampler": "euler", "steps": 3, "n_grid": 10}
TINY = {"data": {"name": "digits"},
        "model": {"type": "text_conditioned", "backbone": {**UNET, "context_dim": 32},
                  "encoder": {"depth": 1}},
        "text": {"encoder": "tiny"}, "train": TRAIN, "sample": SAMPLE}
# one caption per image without attribute words: ~140 distinct captions to encode, not ~5000
MINILM = {"data": {"name": "digits"}, "model": {**UNET, "context_dim": 384},
          "text": {"encoder": "minilm", "n_variants": 1, "keep": 0.0}, "train": TRAIN,
          "sample": SAMPLE}


def test_captions_name_the_label_and_drop_rate():
    data = get_dataset({"name": "digits"})
    tc = TextConditioner({"encoder": "tiny", "max_length": 32, "n_variants": 3, "drop": 0.25,
                          "keep": 0.7})
    tc.fit(data.train, data.labels, 10, torch.Generator().manual_seed(0))
    assert tc.rows.shape == (len(data.train), 3)
    for i in range(0, len(data.train), 7):
        for r in tc.rows[i].tolist():
            assert parse_prompt(tc.captions[r])[0] == int(data.labels[i]), tc.captions[r]
    cond = tc.batch(torch.arange(4000) % len(data.train), torch.Generator().manual_seed(1))
    dropped = (~cond["text_mask"].any(1)).float().mean()
    assert abs(float(dropped) - 0.25) < 0.03
    assert set(tc.null()) == {"text_mask"} and not tc.null()["text_mask"].any()
    words = [w for c in tc.captions for w in parse_prompt(c)[1].values()]
    assert {"thick", "thin", "left", "right", "small", "large"} <= set(words)


@pytest.mark.parametrize("cfg", [TINY, MINILM], ids=["tiny", "minilm"])
def test_text_run_trains_and_samples_from_prompts(cfg, tmp_path, capsys, monkeypatch):
    if cfg is MINILM:
        pytest.importorskip("transformers", reason="the 'text' extra is not installed")
    monkeypatch.setenv("SFUMATO_CACHE", str(tmp_path / "cache"))
    Trainer(cfg, tmp_path / "run", progress=False).run()
    model = sfumato.load(tmp_path / "run")
    a = model.sample(4, prompt="a thick 7", guidance=3.0, steps=3).x
    b = model.sample(4, prompt="the digit one", guidance=3.0, steps=3)
    assert a.shape == (4, 1, 8, 8) and torch.isfinite(a).all()
    assert not torch.equal(a, b.x)  # the prompt reaches the network
    assert b.labels.tolist() == [1] * 4 and b.prompts == ["the digit one"] * 4
    out = tmp_path / "p.npz"
    assert main(["sample", str(tmp_path / "run"), "--n", "3", "--steps", "2", "--prompt",
                 "a small 4, slanted to the left", "--guidance", "2", "--out", str(out)]) == 0
    z = np.load(out)
    assert z["images"].shape == (3, 8, 8, 1) and z["labels"].tolist() == [4, 4, 4]
    assert main(["sample", str(tmp_path / "run"), "--n", "2", "--prompt", "x", "--out",
                 str(out), "--class", "3"]) == 2
    capsys.readouterr()
    if cfg is MINILM:  # the per-caption table was kept on disk and is reused, not re-encoded
        table = model.text.cache_path()
        assert table.is_file()
        stamp = table.stat().st_mtime_ns
        Trainer(cfg, tmp_path / "run2", progress=False).run()
        assert table.stat().st_mtime_ns == stamp


def test_text_config_errors(tmp_path):
    with pytest.raises(ValueError, match="text_conditioned"):
        Trainer({**TINY, "model": {**UNET, "context_dim": 32}}, tmp_path / "a", progress=False)
    with pytest.raises(ValueError, match="context_dim = 384"):
        Trainer({**MINILM, "model": UNET}, tmp_path / "b", progress=False)
    with pytest.raises(ValueError, match="no labels"):
        Trainer({**TINY, "data": {"name": "moons"}}, tmp_path / "c", progress=False)
    with pytest.raises(ValueError, match="minilm"):
        TextConditioner({"encoder": "bert", "max_length": 8})


def test_prompt_needs_text_model(tmp_path):
    cfg = {**TINY, "model": UNET, "text": {"encoder": None}}
    Trainer(cfg, tmp_path / "u", progress=False).run()
    with pytest.raises(ValueError, match="text-conditioned"):
        sfumato.load(tmp_path / "u").sample(2, prompt="a 3")
