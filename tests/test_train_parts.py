"""Objectives, EMA, LR schedule, checkpoints and config: exact algebra and failure modes."""

import json
import math

import pytest
import torch
from torch import nn

from sfumato.denoiser import Denoiser, target_from_x0
from sfumato.process import VPDiscrete
from sfumato.train.checkpoint import (
    CheckpointError,
    find_checkpoint,
    load_checkpoint,
    optimizer_from_flat,
    optimizer_to_flat,
    save_checkpoint,
)
from sfumato.train.config import ConfigError, load_config
from sfumato.train.ema import EMA, PowerEMA, gamma_from_sigma_rel
from sfumato.train.objective import Objective
from sfumato.train.trainer import lr_at


class Lin(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Linear(3, 3)

    def forward(self, x, c_noise, **_):
        return self.w(x) * (1 + c_noise[:, None])


def _batch():
    g = torch.Generator().manual_seed(0)
    return (torch.randn(16, 3, generator=g), torch.rand(16, generator=g) * 5 + 0.1,
            torch.randn(16, 3, generator=g))


@pytest.mark.parametrize("target", ["eps", "v", "x0"])
def test_uniform_weighting_is_plain_mse_on_the_raw_target(target):
    x0, sigma, noise = _batch()
    den = Denoiser(Lin(), target=target, process=VPDiscrete())
    loss = Objective(weighting="uniform").loss(den, x0, generator=None, sigma=sigma, noise=noise)
    s = sigma[:, None]
    x = x0 + s * noise
    c_in = den.process.scale_from_sigma(s)
    pred = den.net(c_in * x, den.process.t_from_sigma(sigma))
    expect = ((pred - target_from_x0(target, x0, x, sigma)) ** 2).mean(1)
    torch.testing.assert_close(loss, expect, rtol=1e-4, atol=1e-6)


def test_edm_weighting_is_unit_weight_on_F_and_min_snr():
    x0, sigma, noise = _batch()
    den = Denoiser(Lin(), target="edm")
    loss = Objective(weighting="edm").loss(den, x0, generator=None, sigma=sigma, noise=noise)
    F = den.net(den.precondition(sigma[:, None])[2] * (x0 + sigma[:, None] * noise),
                sigma.log() / 4)
    expect = ((F - den.raw_target(x0, noise, sigma)) ** 2).mean(1)
    torch.testing.assert_close(loss, expect, rtol=1e-4, atol=1e-6)
    w = Objective(weighting="min_snr", gamma=5.0).weight(torch.tensor([0.1, 1.0, 10.0]), den)
    torch.testing.assert_close(w, torch.tensor([5.0, 1.0, 0.01]))


def test_sigma_sampling_distributions():
    den = Denoiser(Lin(), target="eps", process=VPDiscrete())
    g = torch.Generator().manual_seed(0)
    s = Objective(sigma_sampling="lognormal").sample_sigma(20000, den, generator=g)
    assert abs(float(s.log().mean()) + 1.2) < 0.03
    s = Objective(sigma_sampling="process").sample_sigma(20000, den, generator=g)
    t = den.process.t_from_sigma(s.double())
    assert torch.allclose(t, t.round(), atol=1e-3) and 450 < float(t.mean()) < 550
    s = Objective(sigma_sampling="logit_normal").sample_sigma(20000, den, generator=g)
    assert abs(float((s / (1 + s)).logit().mean())) < 0.03
    with pytest.raises(ValueError, match="unknown weighting"):
        Objective(weighting="snr+1")


def test_ema_classic_and_power():
    m = nn.Linear(2, 2)
    e = EMA(m, decay=0.9, warmup=False)
    old = e.module.weight.clone()
    with torch.no_grad():
        m.weight.add_(1.0)
    e.update(m, 1)
    torch.testing.assert_close(e.module.weight, 0.9 * old + 0.1 * m.weight)
    g = gamma_from_sigma_rel(0.05)
    assert abs(((g + 1) / ((g + 2) ** 2 * (g + 3))) ** 0.5 - 0.05) < 1e-9
    p = PowerEMA(m, gamma=6.94)
    assert p.beta(1) == 0.0 and abs(p.beta(100) - 0.99 ** 7.94) < 1e-12
    with pytest.raises(ValueError, match="exactly one"):
        PowerEMA(m)


def test_lr_schedule():
    cfg = {"lr": 1.0, "warmup_steps": 10, "steps": 110, "schedule": "cosine", "min_lr_ratio": 0.0}
    assert lr_at(0, cfg) == 0.1 and lr_at(9, cfg) == 1.0
    assert abs(lr_at(60, cfg) - 0.5) < 1e-12 and abs(lr_at(110, cfg)) < 1e-12
    assert lr_at(50, {**cfg, "schedule": "constant"}) == 1.0


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
