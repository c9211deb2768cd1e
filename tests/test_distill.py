"""Distillation (sfumato.distill): the algebra of each method exactly, consistency
distillation against the known consistency function of an exact Gaussian mixture, and
students as ordinary runs (sample, info, exact resume, clear errors)."""

import json

import pytest
import torch
from _util import TINY_TEACHER
from safetensors.torch import load_file

import sfumato
from sfumato import cli
from sfumato import sigmas as S
from sfumato.accuracy import reference_ode, rms, sliced_wasserstein
from sfumato.denoiser import ConsistencyDenoiser, consistency_precond, edm_precond
from sfumato.distill import DEFAULT_METHOD, METHODS, distill, student_config
from sfumato.distill._common import ict_levels, karras_levels, lognormal_pair_probs
from sfumato.distill.consistency import ConsistencyDistillation
from sfumato.distill.guided import guided_teacher
from sfumato.distill.progressive import ddim_step, two_to_one_target
from sfumato.errors import ConfigError, RunReferenceError, UsageError
from sfumato.guidance import ClassifierFreeGuidance
from sfumato.nets import build_net
from sfumato.nets.mlp import MLP
from sfumato.run import Run
from sfumato.samplers import sample_consistency
from sfumato.train.trainer import train

pytestmark = pytest.mark.usefixtures("one_thread_module")


# -- exact algebra ----------------------------------------------------------------------------
def test_boundary_condition_is_exact_and_edm_is_the_limit():
    net = MLP(2, hidden=16, num_blocks=1)
    torch.nn.init.normal_(net.fc_out.weight)  # a network that is not the zero function
    f = ConsistencyDenoiser(net, sigma_min=0.002).double()
    x = torch.randn(7, 2, dtype=torch.float64)
    assert torch.equal(f(x, 0.002), x)  # f(x, sigma_min) = x for any weights
    assert not torch.allclose(f(x, 0.5), x)
    s = torch.tensor([0.01, 0.3, 2.0, 80.0], dtype=torch.float64)
    for a, b in zip(consistency_precond(s, 0.0), edm_precond(s), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)


def test_progressive_two_to_one_target_lands_where_the_teacher_does(gm):
    g = torch.Generator().manual_seed(3)
    fine = S.nested(8, 0.002, 80.0)
    assert torch.equal(fine[::2], S.nested(4, 0.002, 80.0))  # grids nest for the rounds
    x = 5 * torch.randn(6, 2, generator=g, dtype=torch.float64)
    for j in (0, 2, 6):  # ..., the last pair ends at sigma = 0
        t, t1, t2 = (torch.full((6,), float(fine[j + k]), dtype=torch.float64)
                     for k in range(3))
        x2 = ddim_step(gm, ddim_step(gm, x, t, t1), t1, t2)
        x0 = two_to_one_target(x, x2, t, t2)
        student_step = ddim_step(lambda *a, x0=x0: x0, x, t, t2)  # one DDIM step to x0
        torch.testing.assert_close(student_step, x2, rtol=1e-12, atol=1e-12)


def test_guided_teacher_is_cfg_and_w1_is_the_conditional_teacher():
    nc = 3

    def teacher(x, sigma, class_labels):  # a class-dependent denoiser; label nc = none
        return x * (1 + class_labels[:, None].double()) / (1 + sigma[:, None] ** 2)

    den = guided_teacher(teacher, nc)
    x = torch.randn(5, 2, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 1, 0])
    sig = torch.full((5,), 0.7, dtype=torch.float64)
    torch.testing.assert_close(den(x, sig, class_labels=y, guidance_scale=torch.ones(5)),
                               teacher(x, sig, y))
    w = torch.tensor([0.0, 1.5, 3.0, 2.0, 4.0], dtype=torch.float64)
    cfg = [ClassifierFreeGuidance(teacher, float(wi), uncond={"class_labels": nc})(
        x[i:i + 1], sig[i:i + 1], class_labels=y[i:i + 1]) for i, wi in enumerate(w)]
    torch.testing.assert_close(den(x, sig, class_labels=y, guidance_scale=w), torch.cat(cfg))


def test_guidance_embedding_starts_as_its_base_at_every_w():
    cfg = {"type": "unet", "image_size": 8, "in_channels": 1, "model_channels": 8,
           "channel_mult": [1, 2], "num_res_blocks": 1, "norm_groups": 4, "num_classes": 10,
           "mid_attention": False}
    base = build_net(cfg)
    wrapped = build_net({"type": "guidance_embedded", "base": {k: v for k, v in cfg.items()
                                                               if k != "num_classes"},
                         "num_classes": 10})
    wrapped.base.load_state_dict(base.state_dict())
    torch.nn.init.normal_(base.conv_out.weight)
    wrapped.base.conv_out.weight.data.copy_(base.conv_out.weight)
    x, y = torch.randn(4, 1, 8, 8), torch.tensor([1, 2, 3, 10])
    for w in (1.0, 3.0):
        torch.testing.assert_close(wrapped(x, torch.zeros(4), y, guidance_scale=w),
                                   base(x, torch.zeros(4), y))


def test_ict_curriculum_and_pair_probabilities():
    assert ict_levels(0, 1000, 10, 1280) == 11
    assert ict_levels(999, 1000, 10, 1280) == 1281
    lv = karras_levels(41, 0.002, 80.0)
    assert lv[0] == pytest.approx(0.002) and lv[-1] == pytest.approx(80.0)
    assert (lv.diff() > 0).all()
    p = lognormal_pair_probs(lv, -1.1, 2.0)
    assert p.shape == (40,) and p.sum() == pytest.approx(1.0)
    # log-normal mass: pairs around exp(-1.1) = 0.33 are likelier than the extremes
    mid = int((lv - 0.33).abs().argmin())
    assert p[mid] > 5 * p[-1] and p[mid] > p[0]


# -- truth on an exact mixture ----------------------------------------------------------------
def test_consistency_distillation_learns_the_mixture_consistency_function(gm):
    """Teacher: the exact mixture denoiser. The consistency function is known: the end of the
    PF-ODE from the same point. The student's one-step map must approach it (far below the
    one-step Euler map's error) and its 1-2 step samples must match the data."""
    teacher = lambda x, s, **c: gm(x.double(), s.double()).float()  # noqa: E731
    torch.manual_seed(0)
    net = MLP(2, hidden=128, num_blocks=3)
    student = ConsistencyDenoiser(net, 0.002, 0.5)
    steps = 800
    obj = ConsistencyDistillation(ConsistencyDistillation.settings({}), teacher, steps,
                                  {"sigma_data": 0.5})
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    for k in range(steps):
        obj.at_step(k)
        x0 = gm.sample(256, generator=g).float()
        sig = obj.sample_sigma(256, student, generator=g)
        loss = obj.loss(student, x0, generator=g, sigma=sig,
                        noise=torch.randn(256, 2, generator=g)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        for group in opt.param_groups:
            group["lr"] = 1e-3 * (1 - k / steps) + 1e-5
    xT = 80 * torch.randn(2000, 2, generator=torch.Generator().manual_seed(5),
                          dtype=torch.float64)
    ref = reference_ode(gm, xT, 80.0, 0.002, steps=400)
    with torch.no_grad():
        one = student(xT.float(), 80.0).double()
    euler = gm(xT, torch.full((2000,), 80.0, dtype=torch.float64))
    assert rms(one, ref) < 0.25 * rms(euler, ref)
    data = gm.sample(2000, generator=torch.Generator().manual_seed(9))
    floor = sliced_wasserstein(gm.sample(2000, generator=torch.Generator().manual_seed(10)),
                               data)
    for sig in ([80.0, 0.0], [80.0, 1.0, 0.0]):
        with torch.no_grad():
            x = sample_consistency(student, xT.float(), torch.tensor(sig),
                                   generator=torch.Generator().manual_seed(3))
        assert sliced_wasserstein(x.double(), data) < 2 * floor, sig


# -- students are ordinary runs ---------------------------------------------------------------
#: a few steps of each method, checkpoints every 2 (settings that keep them cheap)
QUICK = {"train": {"batch_size": 16, "checkpoint_every": 2, "keep_last": 10},
         "sample": {"n_grid": 4}}
SETTINGS = {"dmd": {"n_pairs": 64}, "progressive": {"start_steps": 4}}


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher") / "demo"
    train(TINY_TEACHER, out=out, progress=False)
    return out


def _quick(method, **extra):
    return {**QUICK, "distill": SETTINGS.get(method, {}), **extra}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_makes_a_student_run_that_samples(teacher, tmp_path, method):
    out = tmp_path / method
    summary = distill(teacher, method, out=out, steps=4, config=_quick(method), progress=False)
    assert summary["steps"] == 4
    run = Run(out)
    assert run.kind == "student" and run.config["distill"]["method"] == method
    assert run.resolve("teacher").dir.resolve() == teacher.resolve()
    model = sfumato.load(out)
    for k in (1, 2):
        drawn = model.sample(6, steps=k, seed=1)
        assert drawn.x.shape == (6, 1, 8, 8) and torch.isfinite(drawn.x).all()
        assert len(drawn.sigmas) == k + 1
    again = model.sample(6, steps=2, seed=1).x  # deterministic given the seed
    assert torch.equal(again, model.sample(6, steps=2, seed=1).x)
    torch.testing.assert_close(model.sample(3, steps=2, seed=1).x, again[:3])  # per-sample
    lines = dict(run.describe())
    assert "ok" in lines["teacher"] and method in lines["distilled"]
    if method == "guided":  # the scale is an input: different w, different samples, 1 pass
        a, b = model.sample(4, guidance=1.0).x, model.sample(4, guidance=3.0).x
        assert a.shape == b.shape
    if method == "progressive":  # every round's checkpoint is kept
        assert {p.name for p in (out / "checkpoints").iterdir()} >= {"step-00000002",
                                                                     "step-00000004"}
        pick = METHODS[method].round_checkpoint  # start_steps 4: a 2-step, then 1-step student
        assert pick(run, 2).name == "step-00000002" and pick(run, 1).name == "step-00000004"
        with pytest.raises(ConfigError, match="not 4"):
            pick(run, 4)


class _Killed(Exception):
    pass


@pytest.mark.parametrize("method", ["consistency", "progressive", "dmd", "guided"])
def test_killed_and_resumed_student_is_bitwise_the_uninterrupted_one(teacher, tmp_path,
                                                                     monkeypatch, method):
    cfg = _quick(method)
    distill(teacher, method, out=tmp_path / "ref", steps=6, config=cfg, progress=False)
    cls = METHODS[method]
    original = cls.at_step

    def killing(self, step):  # dies after the step-4 checkpoint (mid-round for progressive)
        if step == 5:
            raise _Killed
        original(self, step)

    monkeypatch.setattr(cls, "at_step", killing)
    with pytest.raises(_Killed):
        distill(teacher, method, out=tmp_path / "cut", steps=6, config=cfg, progress=False)
    monkeypatch.setattr(cls, "at_step", original)
    if method == "progressive":  # killed mid-round: round 2 (from step 3) reloads its teacher
        assert json.loads((tmp_path / "cut" / "checkpoint" / "state.json").read_text())[
            "step"] == 5
        assert (tmp_path / "cut" / "checkpoints" / "step-00000003").is_dir()
    distill(teacher, method, out=tmp_path / "cut", steps=6, config=cfg, progress=False)
    for stem in ("model", "ema", "optimizer") + (("objective",) if method == "dmd" else ()):
        a = load_file(str(tmp_path / "ref" / "checkpoint" / f"{stem}.safetensors"))
        b = load_file(str(tmp_path / "cut" / "checkpoint" / f"{stem}.safetensors"))
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), f"{stem}/{k} differs after resume"


def test_clear_errors(teacher, tmp_path):
    with pytest.raises(UsageError, match="did you mean 'consistency'"):
        distill(teacher, "consistensy", out=tmp_path / "a")
    with pytest.raises(ConfigError, match="distill.n_ed"):
        distill(teacher, "consistency", out=tmp_path / "b", config={"distill": {"n_ed": 3}})
    with pytest.raises(sfumato.SfumatoError, match="not a run directory"):
        distill(tmp_path / "nowhere", out=tmp_path / "c")
    uncond = tmp_path / "uncond"
    train({**TINY_TEACHER, "model": {**TINY_TEACHER["model"], "conditional": False},
           "objective": {}, "train": {**TINY_TEACHER["train"], "steps": 2}},
          out=uncond, progress=False)
    with pytest.raises(UsageError, match="class-conditional teacher"):
        distill(uncond, "guided", out=tmp_path / "d")
    with pytest.raises(ConfigError, match="power of two"):
        distill(teacher, "progressive", out=tmp_path / "e", steps=2,
                config={"distill": {"start_steps": 6}})
    # a student of a different-shaped teacher config is refused at the data set
    cfg = student_config(Run(teacher), "consistency", tmp_path / "f")
    assert cfg["refs"]["teacher"]["path"] == "../../teacher0/demo" or \
        cfg["refs"]["teacher"]["sha256"] == Run(teacher).weights_sha256()


def test_a_changed_teacher_is_refused_on_resume(teacher, tmp_path):
    import shutil

    mine = tmp_path / "teacher"
    shutil.copytree(teacher, mine)
    out = tmp_path / "student"
    distill(mine, out=out, steps=2, config=QUICK, progress=False)
    train({**TINY_TEACHER, "train": {**TINY_TEACHER["train"], "steps": 32}}, out=mine,
          progress=False)  # the teacher trains on: other weights
    with pytest.raises(RunReferenceError, match="teacher"):
        sfumato.load(out).run.resolve("teacher")
    with pytest.raises(RunReferenceError, match="teacher"):
        distill(mine, out=out, steps=4, config=QUICK, progress=False)


def test_cli_distill_sample_info(teacher, tmp_path, capsys):
    out = tmp_path / "cd"
    conf = tmp_path / "quick.json"
    conf.write_text(json.dumps(QUICK))
    assert cli.main(["distill", str(teacher), "--out", str(out), "--steps", "2", "--config",
                     str(conf), "--no-progress"]) == 0  # the default method
    assert "distilled to step 2" in capsys.readouterr().out
    assert cli.main(["sample", str(out), "--steps", "2", "--n", "4", "--class", "3", "--out",
                     str(tmp_path / "s.npz")]) == 0
    import numpy as np

    saved = np.load(tmp_path / "s.npz")
    assert saved["images"].shape == (4, 8, 8, 1) and (saved["labels"] == 3).all()
    assert cli.main(["info", str(out)]) == 0
    info = capsys.readouterr().out
    assert "student" in info and "teacher:" in info and "(ok)" in info
    assert f"method {DEFAULT_METHOD}" in info and "1 step(s) of consistency" in info
    assert cli.main(["distill", str(teacher), "--method", "guided", "--out", str(out),
                     "--steps", "2"]) == 2  # another method into the same run: refused
    assert "different" in capsys.readouterr().err


def test_two_process_ddp_distillation_equals_one_process(teacher, tmp_path):
    """torchrun: 2 processes with the global batch split give the 1-process student."""
    import os
    import subprocess
    import sys

    code = ("import json, sys; import sfumato; sfumato.distill(sys.argv[1], 'consistency', "
            "out=sys.argv[2], steps=3, config=json.loads(sys.argv[3]), progress=False)")
    cfg = json.dumps({**QUICK, "train": {**QUICK["train"], "checkpoint_every": 0}})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run([sys.executable, "-c", code, str(teacher), str(one), cfg], env=env,
                   check=True, timeout=300, capture_output=True)
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_port", "29519", "--no-python", sys.executable, "-c", code,
                        str(teacher), str(two), cfg],
                       env=env, timeout=300, capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
    a = load_file(str(one / "checkpoint" / "model.safetensors"))
    b = load_file(str(two / "checkpoint" / "model.safetensors"))
    moved = False
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6)
        moved |= not torch.equal(a[k], Run(teacher).weights()[k])
    assert moved, "the student did not train"


def test_runs_saved_before_the_distill_section_still_resume(tmp_path):
    cfg = {**TINY_TEACHER, "train": {**TINY_TEACHER["train"], "steps": 2}}
    train(cfg, out=tmp_path, progress=False)
    saved = tmp_path / "checkpoint" / "config.json"
    old = json.loads(saved.read_text())
    del old["distill"]  # as written by earlier versions
    saved.write_text(json.dumps(old))
    summary = train({**cfg, "train": {**cfg["train"], "steps": 3}}, out=tmp_path,
                    progress=False)
    assert summary["steps"] == 3
