"""Cascades (Ho et al. 2022): the low-resolution conditioning and its noise augmentation, the
network told the level, super-resolution runs, and cascades made, loaded, sampled, refused
when a stage changed or the shapes do not chain, and driven from the CLI."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from _util import gen, perturb_, train_runs

import sfumato
from sfumato.cascade import CascadeModel, make_cascade
from sfumato.cli import main
from sfumato.data import get_dataset
from sfumato.errors import ConfigError, RunReferenceError, UsageError
from sfumato.lowres import LowResConditioning, augment, downsample, upsample
from sfumato.nets import build_net
from sfumato.superres import SuperResModel
from sfumato.train.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread_module")

UNET = {"type": "unet", "image_size": 8, "in_channels": 1, "model_channels": 8,
        "channel_mult": [1, 2], "num_res_blocks": 1, "attention_resolutions": [],
        "mid_attention": False, "norm_groups": 4}
TRAIN = {"steps": 20, "batch_size": 16, "lr": 3e-3, "warmup_steps": 2, "checkpoint_every": 0,
         "num_threads": 1, "precision": "fp32"}
SAMPLE = {"sampler": "euler", "steps": 3, "n_grid": 4}
#: a class-conditional base on 4x4 digits and a 4 -> 8 super-resolution run
BASE = {"data": {"name": "digits", "size": 4},
        "model": {**UNET, "image_size": 4, "conditional": True},
        "objective": {"label_dropout": 0.1}, "train": TRAIN, "sample": SAMPLE}
SR = {"data": {"name": "digits"},
      "model": {"type": "image_conditioned", "base": UNET, "aug_level": True,
                "conditional": True},
      "objective": {"label_dropout": 0.1}, "superres": {"low_size": 4, "aug_sigma": 0.2},
      "train": TRAIN, "sample": SAMPLE}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return train_runs(tmp_path_factory.mktemp("cascade"), base=BASE, sr=SR)


@pytest.fixture(scope="module")
def digits():
    return get_dataset({"name": "digits"}).heldout[:64]


# -- the conditioning ------------------------------------------------------------------------
def test_down_and_up_sampling_shapes_and_level_zero_is_the_clean_image(digits):
    low = downsample(digits, 4)
    assert low.shape == (64, 1, 4, 4) and low.min() >= -1 and low.max() <= 1
    up = upsample(low, 8)
    assert up.shape == digits.shape
    # the base's data set at size 4 is the same downsampling
    assert torch.equal(get_dataset({"name": "digits", "size": 4}).heldout[:64], low)
    pipe = LowResConditioning(4, aug_sigma_max=1.0, aug_zero_p=0.1)
    cond = pipe.conditioning(low, (8, 8), 0.0, gen(0))
    assert torch.equal(cond["image"], up) and torch.equal(cond["aug_sigma"], torch.zeros(64))
    assert torch.equal(pipe.examples(digits)["image"], up)
    s = torch.tensor([0.0, 0.5] * 32)
    mixed = augment(up, s, gen(1))
    assert torch.equal(mixed[::2], up[::2]) and not torch.equal(mixed[1::2], up[1::2])


def test_augmentation_levels_and_noise_have_the_stated_law():
    pipe = LowResConditioning(4, aug_sigma_max=0.8, aug_zero_p=0.25)
    s = pipe.draw_levels(40_000, gen(0))
    assert torch.equal(s, pipe.draw_levels(40_000, gen(0)))  # seeded
    zero = s == 0
    assert float(zero.float().mean()) == pytest.approx(0.25, abs=0.01)
    rest = s[~zero]
    assert float(rest.min()) > 0 and float(rest.max()) <= 0.8
    assert float(rest.mean()) == pytest.approx(0.4, abs=0.01)   # U[0, 0.8]
    assert float(rest.std()) == pytest.approx(0.8 / 12 ** 0.5, abs=0.01)
    up = torch.zeros(2000, 1, 8, 8)
    noisy = augment(up, 0.3, gen(2))
    assert float(noisy.std()) == pytest.approx(0.3, rel=0.02)
    assert float(noisy.mean()) == pytest.approx(0.0, abs=0.01)


def test_training_batch_is_made_from_the_clean_images(digits):
    pipe = LowResConditioning(4, aug_sigma_max=1.0, aug_zero_p=0.5)
    cond = pipe.batch(digits, gen(3))
    assert cond["image"].shape == digits.shape and cond["aug_sigma"].shape == (64,)
    clean = cond["aug_sigma"] == 0
    assert 0 < int(clean.sum()) < 64
    up = upsample(downsample(digits, 4), 8)
    assert torch.equal(cond["image"][clean], up[clean])
    again = pipe.batch(digits, gen(3))
    assert all(torch.equal(cond[k], again[k]) for k in cond)
    # no augmentation: no level for a network that takes none
    plain = LowResConditioning(4, aug_sigma_max=0.0, aug_level=False).batch(digits, gen(3))
    assert set(plain) == {"image"} and torch.equal(plain["image"], up)


# -- the network -----------------------------------------------------------------------------
def test_network_is_told_the_level_and_stays_compatible():
    cfg = {"type": "image_conditioned", "base": UNET, "num_classes": 10}
    old = build_net(cfg)
    assert not any(k.startswith("aug_") for k in old.state_dict())  # instruct checkpoints
    with pytest.raises(UsageError, match="aug_level"):
        old(torch.zeros(2, 1, 8, 8), 0.0, image=torch.zeros(2, 1, 8, 8), aug_sigma=0.1)
    torch.manual_seed(0)
    net = build_net({**cfg, "aug_level": True})
    x, img = torch.randn(3, 1, 8, 8, generator=gen(0)), torch.randn(3, 1, 8, 8, generator=gen(1))
    y = torch.tensor([1, 2, 3])

    def f(s):
        return net(x, torch.zeros(3), y, image=img, aug_sigma=s)

    assert torch.equal(f(torch.zeros(3)), f(torch.ones(3)))  # fresh: zero-initialised
    perturb_(net)
    a, b = f(torch.zeros(3)), f(torch.full((3,), 0.5))
    assert (a - b).abs().max() > 1e-3
    assert torch.equal(f(None), a) and torch.equal(f(0.5), b)  # None = 0; scalars broadcast
    with pytest.raises(ConfigError, match="aug_levl"):
        build_net({**cfg, "aug_levl": True})


def test_superres_configs_are_checked(tmp_path):
    def trainer(**over):
        return Trainer({**SR, **over}, tmp_path / "x", progress=False)

    with pytest.raises(ConfigError, match="image_conditioned"):
        trainer(model={**UNET, "conditional": True})
    with pytest.raises(ConfigError, match="aug_level"):
        trainer(model={**SR["model"], "aug_level": False})
    with pytest.raises(ConfigError, match="smaller than the images"):
        trainer(superres={"low_size": 8})
    with pytest.raises(ConfigError, match="aug_zero_p"):
        trainer(superres={"low_size": 4, "aug_zero_p": 2})
    tr = trainer()
    x0, cond, _, _ = tr._global_batch()
    assert set(cond) == {"class_labels", "image", "aug_sigma"}
    assert cond["image"].shape == x0.shape and cond["aug_sigma"].max() <= 1.0


# -- a super-resolution run ------------------------------------------------------------------
def test_superres_model_samples_from_low_resolution_input(runs):
    sr = sfumato.load(runs / "sr")
    assert isinstance(sr, SuperResModel) and sr.kind == "superres"
    assert sr.low_shape == (1, 4, 4) and sr.aug_sigma == 0.2
    low = downsample(get_dataset({"name": "digits"}).heldout[:5], 4)
    out = sr.upsample(low, seed=1)
    assert out.x.shape == (5, 1, 8, 8) and out.aug_sigma == 0.2 and out.labels is None
    assert torch.equal(sr.upsample(low, seed=1).x, out.x)
    # sample i depends on the seed and i only (up to the batch's float rounding)
    torch.testing.assert_close(sr.upsample(low[:2], seed=1).x, out.x[:2])
    assert not torch.equal(sr.upsample(low, seed=1, aug_sigma=0.0).x, out.x)
    labelled = sr.upsample(low, seed=1, class_labels=torch.arange(5))
    assert labelled.labels.tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(UsageError, match="low="):
        sr.sample(3)
    with pytest.raises(UsageError, match=r"\(1 or 3, 1, 4, 4\)"):
        sr.sample(3, low=torch.zeros(3, 1, 8, 8))
    with pytest.raises(UsageError, match="aug_sigma"):
        sr.upsample(low, aug_sigma=-0.1)
    with pytest.raises(UsageError, match="low-resolution input"):
        sr.edit(torch.zeros(2, 1, 8, 8), 0.5)


# -- cascades --------------------------------------------------------------------------------
def test_make_load_and_sample_a_cascade(runs, tmp_path):
    path = make_cascade([runs / "base", runs / "sr"], tmp_path / "c", aug_sigma=0.1,
                        sample={"steps": 2})
    record = json.loads(path.read_text())
    assert [s["kind"] for s in record["stages"]] == ["diffusion", "superres"]
    assert record["stages"][0]["path"].endswith("base") and record["aug_sigma"] == 0.1
    cascade = sfumato.load(tmp_path / "c")
    assert isinstance(cascade, CascadeModel)
    assert cascade.shapes == [(1, 4, 4), (1, 8, 8)] and cascade.num_classes == 10
    out = cascade.sample(6, seed=4)
    assert out.x.shape == (6, 1, 8, 8) and [tuple(x.shape) for x in out.stages] == \
        [(6, 1, 4, 4), (6, 1, 8, 8)]
    assert out.labels.tolist() == [0, 1, 2, 3, 4, 5] and out.aug_sigma == [0.1]
    base = sfumato.load(runs / "base").sample(6, seed=4, steps=2)
    assert torch.equal(out.stages[0], base.x)  # the base draws what it draws alone
    again = cascade.upsample(base.x, class_labels=base.labels, seed=4)
    assert torch.equal(again.x, out.x)
    torch.testing.assert_close(cascade.sample(2, seed=4).x, out.x[:2])
    assert not torch.equal(cascade.sample(6, seed=4, aug_sigma=0.6).x, out.x)
    assert cascade.aug_levels() == [0.1] and cascade.aug_levels([0.3]) == [0.3]
    with pytest.raises(UsageError, match="one per super-resolution stage"):
        cascade.sample(2, aug_sigma=[0.1, 0.2])


def test_a_changed_or_missing_stage_is_refused(runs, tmp_path):
    for name in ("base", "sr"):
        shutil.copytree(runs / name, tmp_path / name)
    make_cascade([tmp_path / "base", tmp_path / "sr"], tmp_path / "c")
    moved = tmp_path / "moved"
    shutil.copytree(tmp_path, moved)  # moved together: still resolves
    assert isinstance(sfumato.load(moved / "c"), CascadeModel)
    from safetensors.torch import load_file, save_file

    ema = tmp_path / "sr" / "checkpoint" / "ema.safetensors"
    weights = load_file(str(ema))
    save_file({k: v + 0.01 for k, v in weights.items()}, str(ema))  # "retrained"
    with pytest.raises(RunReferenceError, match="stage 1 .* has changed"):
        sfumato.load(tmp_path / "c")
    shutil.rmtree(tmp_path / "base")
    with pytest.raises(RunReferenceError, match="stage 0 .*cannot be read"):
        sfumato.load(tmp_path / "c")


def test_stages_must_chain(runs, tmp_path):
    base, sr = runs / "base", runs / "sr"
    with pytest.raises(UsageError, match="super-resolution run"):
        make_cascade([base, base], tmp_path / "c")
    with pytest.raises(UsageError, match="stage 0 .* must sample images"):
        make_cascade([sr, sr], tmp_path / "c")
    with pytest.raises(UsageError, match=r"do not chain: stage 2 .* upsamples 1x4x4 .* "
                                         r"makes 1x8x8"):
        make_cascade([base, sr, sr], tmp_path / "c")
    with pytest.raises(UsageError, match="at least one"):
        make_cascade([base], tmp_path / "c")
    with pytest.raises(UsageError, match="holds a training run"):
        make_cascade([base, sr], sr)
    assert not (tmp_path / "c").exists()


def test_cli_cascade_sample_info_evaluate(runs, tmp_path, capsys):
    c = str(tmp_path / "c")
    assert main(["cascade", str(runs / "base"), str(runs / "sr"), "--out", c,
                 "--aug-sigma", "0.3", "--steps", "2"]) == 0
    assert "1x4x4 -> 1x8x8" in capsys.readouterr().out
    assert main(["sample", c, "--out", str(tmp_path / "x.png"), "--n", "4"]) == 0
    assert (tmp_path / "x.png").is_file()
    assert main(["sample", c, "--out", str(tmp_path / "x.npz"), "--n", "4", "--aug-sigma",
                 "0.1", "--class", "3"]) == 0
    arrays = np.load(tmp_path / "x.npz")
    assert arrays["images"].shape == (4, 8, 8, 1) and arrays["stage0_images"].shape == \
        (4, 4, 4, 1) and arrays["labels"].tolist() == [3, 3, 3, 3]
    capsys.readouterr()
    assert main(["info", c]) == 0
    info = capsys.readouterr().out
    assert "stage 1:" in info and "(ok)" in info and "1x4x4 -> 1x8x8" in info
    assert main(["evaluate", c, "--n", "20"]) == 0
    assert json.loads((tmp_path / "c" / "evaluation.json").read_text())["rows"][0]["fd"] > 0
    assert main(["sample", c, "--out", str(tmp_path / "y.png"), "--prompt", "a 3"]) == 2
    assert main(["sample", str(runs / "base"), "--out", str(tmp_path / "y.png"),
                 "--aug-sigma", "0.1"]) == 2
    assert main(["sample", str(runs / "sr"), "--out", str(tmp_path / "y.png")]) == 2
    assert "low-resolution" in capsys.readouterr().err
