"""The command line over a tiny trained run: train, resume, sample (.png/.npz), info, errors."""

import json

import numpy as np
import pytest
from _util import TINY_UNET

from sfumato.cli import main

CFG = {
    "data": {"name": "digits"},
    "model": TINY_UNET,
    "objective": {"label_dropout": 0.1},
    "train": {"steps": 3, "batch_size": 16, "checkpoint_every": 0, "num_threads": 1},
    "sample": {"sampler": "euler", "steps": 4, "n_grid": 10},
}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    cfg = d / "cfg.json"
    cfg.write_text(json.dumps(CFG))
    assert main(["train", str(cfg), "--out", str(d / "run"), "--no-progress"]) == 0
    return d


def test_train_sample_info(run, capsys):
    out = run / "s.npz"
    assert main(["sample", str(run / "run"), "--n", "12", "--out", str(out),
                 "--sampler", "heun", "--steps", "3", "--seed", "1"]) == 0
    z = np.load(out, allow_pickle=False)
    assert z["images"].shape == (12, 8, 8, 1) and z["images"].dtype == np.uint8
    assert z["labels"].tolist() == [i % 10 for i in range(12)]  # classes sampled evenly
    png = run / "g.png"
    assert main(["sample", str(run / "run"), "--n", "10", "--class", "3", "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["info", str(run / "run")]) == 0
    assert "step:        3 of 3" in capsys.readouterr().out


def test_same_seed_same_sample_whatever_n(run):
    a, b = run / "a.npz", run / "b.npz"
    main(["sample", str(run / "run"), "--n", "3", "--out", str(a), "--steps", "3"])
    main(["sample", str(run / "run"), "--n", "7", "--out", str(b), "--steps", "3"])
    assert np.array_equal(np.load(a)["images"], np.load(b)["images"][:3])


def test_clear_errors(run, capsys, tmp_path):
    assert main(["sample", str(run / "run"), "--out", str(run / "x.jpg")]) == 2
    assert ".png" in capsys.readouterr().err
    assert main(["sample", str(tmp_path), "--out", str(run / "x.png")]) == 2
    assert "no complete checkpoint" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"train": {"stepz": 3}}))
    assert main(["train", str(bad), "--out", str(tmp_path / "r")]) == 2
    assert "did you mean 'steps'" in capsys.readouterr().err
    assert main(["train", str(tmp_path / "missing.json"), "--out", str(tmp_path / "r")]) == 2


def test_own_errors_are_one_line_and_bugs_keep_their_traceback(run, capsys, monkeypatch):
    """A SfumatoError (bad input) is one line, exit 2; --debug shows its traceback. Any other
    exception is a bug (in sfumato or torch), not a usage mistake: it propagates."""
    from sfumato import model as model_module
    from sfumato.errors import UsageError

    args = ["sample", str(run / "run"), "--n", "2", "--out", str(run / "e.png")]
    assert main([*args, "--sampler", "tabulated"]) == 2  # argparse takes it; the API refuses
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "sfumato sample: error:" in err and "table" in err
    with pytest.raises(UsageError):
        main(["--debug", *args, "--guidance", "nan"])

    def broken(*a, **k):
        raise RuntimeError("an internal failure")

    monkeypatch.setattr(model_module, "sample_from", broken)
    with pytest.raises(RuntimeError, match="an internal failure"):
        main(args)


def test_evaluate(run, capsys):
    assert main(["evaluate", str(run / "run"), "--n", "30", "--steps", "2", "--all"]) == 0
    out = capsys.readouterr().out
    assert "| step | train CPU min | FD |" in out
    rows = json.loads((run / "run" / "evaluation.json").read_text())["rows"]
    assert len(rows) == 1 and rows[0]["step"] == 3 and rows[0]["fd"] > 0
    assert rows[0]["train_cpu_minutes"] > 0 and 0 <= rows[0]["accuracy"] <= 1
    ck = run / "run" / "checkpoint"  # a checkpoint folder works too
    assert main(["evaluate", str(ck), "--n", "30", "--steps", "2", "--guidance", "2"]) == 0
    assert json.loads((ck / "evaluation.json").read_text())["guidance"] == 2.0
    # another held-out reference subset: same samples, another FD (the floor moves too)
    assert main(["evaluate", str(ck), "--n", "30", "--steps", "2", "--ref-seed", "1"]) == 0
    other = json.loads((ck / "evaluation.json").read_text())
    assert other["ref_seed"] == 1 and other["guidance"] == 1.0
    assert other["rows"][0]["fd_floor"] != rows[0]["fd_floor"]


def test_optimize_grid_then_sample_with_it(run, capsys):
    grid = run / "grid.json"
    assert main(["optimize-grid", str(run / "run"), "--steps", "3", "--sampler", "unipc_bh1",
                 "--samples", "48", "--batch-size", "32", "--out", str(grid)]) == 0
    data = json.loads(grid.read_text())
    s = data["sigmas"]
    assert data["sampler"] == "unipc_bh1" and len(s) == 4 and s[-1] == 0
    assert all(a > b for a, b in zip(s, s[1:], strict=False))
    # the fit has to improve on its start (on a 3-step model, by orders of magnitude)
    assert data["error"] < 0.1 * data["init_error"] and data["nfe"] > 801
    assert "calibration error" in capsys.readouterr().out
    out = run / "opt.npz"
    assert main(["sample", str(run / "run"), "--n", "4", "--sigmas", str(grid),
                 "--out", str(out)]) == 0
    # the same as passing the grid and its sampler to the API
    from sfumato.model import load

    model = load(run / "run")
    drawn = model.sample(4, sampler="unipc_bh1", sigmas=s)
    assert (np.load(out)["images"] == drawn.to_uint8()).all()
    bad = run / "bad.json"
    bad.write_text('{"levels": [1, 0]}')
    assert main(["sample", str(run / "run"), "--sigmas", str(bad), "--out", str(out)]) == 2
    assert "not a grid file" in capsys.readouterr().err
    with pytest.raises(ValueError, match="decreasing"):
        model.sample(2, sigmas=[1.0, 2.0, 0.0])


def test_optimize_grid_tune_then_sample_with_it(run, capsys):
    """--tune writes a tabulated solver; sample --sigmas runs it, as the API does."""
    grid = run / "tuned.json"
    assert main(["optimize-grid", str(run / "run"), "--steps", "3", "--sampler", "unipc_bh1",
                 "--samples", "32", "--tune", "--out", str(grid)]) == 0
    data = json.loads(grid.read_text())
    assert data["sampler"] == "tabulated" and data["table"]["sigmas"] == data["sigmas"]
    assert data["tuning"]["error"] < 0.5 * data["tuning"]["init_error"]  # held-out draws
    assert "tuned coefficients" in capsys.readouterr().out
    out = run / "tuned.npz"
    assert main(["sample", str(run / "run"), "--n", "4", "--sigmas", str(grid),
                 "--out", str(out)]) == 0
    from sfumato.model import load
    from sfumato.samplers.tuned import StepTable

    model = load(run / "run")
    drawn = model.sample(4, sampler="tabulated", sigmas=data["sigmas"],
                         table=StepTable.from_dict(data["table"]))
    assert (np.load(out)["images"] == drawn.to_uint8()).all()
    # a tuned file with another sampler named is refused, not silently mixed
    assert main(["sample", str(run / "run"), "--sigmas", str(grid), "--sampler", "heun",
                 "--out", str(out)]) == 2
    assert "tuned solver" in capsys.readouterr().err
    # --tune needs UniPC
    assert main(["optimize-grid", str(run / "run"), "--steps", "3", "--sampler", "heun",
                 "--tune", "--out", str(grid)]) == 2
