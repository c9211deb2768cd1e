"""The trainer: it learns (2-D toy vs its sample floor), resumes exactly after SIGKILL,
2-process DDP equals 1 process, a NaN loss stops cleanly with the checkpoint intact; the LR
schedule."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from sfumato.train.trainer import Trainer, TrainingError, lr_at, train

TOY = {
    "data": {"name": "moons", "n": 4000},
    "model": {"type": "mlp", "dim": 2, "hidden": 64, "num_blocks": 2},
    "objective": {"sigma_data": 1.0},
    "train": {"steps": 40, "batch_size": 64, "lr": 2e-3, "warmup_steps": 5,
              "checkpoint_every": 4, "log_every": 1, "num_threads": 1},
    "sample": {"sampler": "heun", "steps": 10},
}


def _run_cli(cfg, out, extra_env=None, launcher=()):
    code = ("import json, sys; from sfumato.train.trainer import train; "
            "train(json.loads(sys.argv[1]), out=sys.argv[2], progress=False)")
    cmd = [*launcher, "-c", code, json.dumps(cfg), str(out)] if launcher else \
        [sys.executable, "-c", code, json.dumps(cfg), str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(extra_env or {})}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _tensors(out):
    return {stem: load_file(str(out / "checkpoint" / f"{stem}.safetensors"))
            for stem in ("model", "ema", "optimizer")}


def test_sigkill_and_resume_is_bitwise_exact(tmp_path):
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    p = _run_cli(TOY, ref)
    assert p.wait(timeout=300) == 0, p.stdout.read().decode()
    p = _run_cli(TOY, cut)
    deadline = time.time() + 240
    while time.time() < deadline:  # kill it somewhere in the middle of training
        st = cut / "checkpoint" / "state.json"
        if st.is_file() and json.loads(st.read_text())["step"] >= 12:
            break
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.wait()
    killed_at = json.loads((cut / "checkpoint" / "state.json").read_text())["step"]
    assert killed_at < TOY["train"]["steps"], "the run finished before it could be killed"
    p = _run_cli(TOY, cut)  # the same command again resumes
    assert p.wait(timeout=300) == 0, p.stdout.read().decode()
    a, b = _tensors(ref), _tensors(cut)
    for stem in a:
        assert a[stem].keys() == b[stem].keys()
        for k in a[stem]:
            assert torch.equal(a[stem][k], b[stem][k]), f"{stem}/{k} differs after resume"
    sa = json.loads((ref / "checkpoint" / "state.json").read_text())
    sb = json.loads((cut / "checkpoint" / "state.json").read_text())
    assert sa["step"] == sb["step"] == 40 and sa["losses"] == sb["losses"]


def test_two_process_ddp_equals_one_process(tmp_path):
    cfg = {**TOY, "train": {**TOY["train"], "steps": 6, "checkpoint_every": 0}}
    one, two = tmp_path / "one", tmp_path / "two"
    p = _run_cli(cfg, one)
    assert p.wait(timeout=300) == 0, p.stdout.read().decode()
    launcher = (sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_port", "29517", "--no-python", sys.executable)
    p = _run_cli(cfg, two, launcher=launcher)
    out = p.communicate(timeout=300)[0].decode()
    assert p.returncode == 0, out
    a, b = _tensors(one)["model"], _tensors(two)["model"]
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6)
    assert json.loads((two / "checkpoint" / "state.json").read_text())["world_size"] == 2


def test_learns_moons_near_the_floor(tmp_path):
    from sfumato.metrics.two_d import evaluate_2d
    from sfumato.model import load

    cfg = {**TOY, "train": {**TOY["train"], "steps": 600, "batch_size": 256,
                            "checkpoint_every": 0, "log_every": 10}}
    train({**cfg, "train": {**cfg["train"], "steps": 1}}, out=tmp_path / "early", progress=False)
    train(cfg, out=tmp_path, progress=False)
    early = evaluate_2d(load(tmp_path / "early").sample(2000, seed=0, steps=20).x, "moons")
    r = evaluate_2d(load(tmp_path).sample(2000, seed=0, steps=20).x, "moons")
    assert early["sw"] > 5 * r["sw"], (early, r)  # it learned
    assert r["sw"] < 1.5 * r["sw_floor"], r
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_nan_loss_stops_with_the_checkpoint_intact(tmp_path):
    cfg = {**TOY, "train": {**TOY["train"], "steps": 8, "checkpoint_every": 4}}
    t = Trainer(cfg, tmp_path, progress=False)
    t.run()
    before = _tensors(tmp_path)["model"]
    cfg2 = {**cfg, "train": {**cfg["train"], "steps": 20}}
    t2 = Trainer(cfg2, tmp_path, progress=False)
    t2.x_train = t2.x_train.clone()
    t2.x_train[:] = float("nan")
    with pytest.raises(TrainingError, match="non-finite") as stopped:
        t2.run()
    assert "The last good checkpoint, step 8, in" in str(stopped.value)
    after = _tensors(tmp_path)["model"]
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert json.loads((tmp_path / "checkpoint" / "state.json").read_text())["step"] == 8


def test_nan_loss_before_any_checkpoint_says_so(tmp_path):
    """Stopped at step 0, there is no checkpoint to call intact: the message says what is."""
    t = Trainer({**TOY, "train": {**TOY["train"], "steps": 20, "checkpoint_every": 10}},
                tmp_path / "r", progress=False)
    t.x_train = t.x_train.clone()
    t.x_train[:] = float("nan")
    with pytest.raises(TrainingError, match="No checkpoint was written yet") as stopped:
        t.run()
    assert "intact" not in str(stopped.value) and "due at step 10" in str(stopped.value)
    assert not (tmp_path / "r" / "checkpoint").exists()


def test_resume_with_another_config_is_refused(tmp_path):
    cfg = {**TOY, "train": {**TOY["train"], "steps": 2}}
    train(cfg, out=tmp_path, progress=False)
    other = {**cfg, "model": {**cfg["model"], "hidden": 32}}
    with pytest.raises(ValueError, match="different 'model' config"):
        Trainer(other, tmp_path, progress=False)


def test_lr_schedule():
    cfg = {"lr": 1.0, "warmup_steps": 10, "steps": 110, "schedule": "cosine", "min_lr_ratio": 0.0}
    assert lr_at(0, cfg) == 0.1 and lr_at(9, cfg) == 1.0
    assert abs(lr_at(60, cfg) - 0.5) < 1e-12 and abs(lr_at(110, cfg)) < 1e-12
    assert lr_at(50, {**cfg, "schedule": "constant"}) == 1.0
