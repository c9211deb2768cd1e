"""The benchmark package (sfumato.bench) and the command line (sfumato compare / samplers)."""

from __future__ import annotations

import dataclasses
import json
import math
import struct
import subprocess
import sys

import pytest
import torch

from sfumato import bench, cli, sigmas
from sfumato.accuracy import CountingDenoiser, rms
from sfumato.bench import diffusers_adapters as peers
from sfumato.samplers import SAMPLERS, STOCHASTIC

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the IHDR chunk, which must come first."""
    assert data[:8] == PNG_SIGNATURE
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # the tensors here are tiny: one thread is faster and immune to a busy machine
    with bench.torch_threads(1):
        yield


@pytest.fixture(scope="module")
def problem(_one_thread):
    return bench.make_problem("gmm2d", "scaled_linear", batch=16, seed=0, ref_steps=200)


# ---------------------------------------------------------------------------------------
# the harness
# ---------------------------------------------------------------------------------------
def test_problem_reference_is_converged_and_starts_from_shared_noise(problem):
    p = problem
    assert p.x_start.dtype == torch.float64 and p.x_start.shape == (16, 2)
    assert torch.allclose(p.latent * math.sqrt(1 + p.sigma_max**2), p.x_start)
    assert p.ref_accuracy < 1e-5
    assert 0 < p.info["final_step_floor"] < 0.05
    # methods starting at sigma_max get exactly x_start; lower starts read the VP latent
    assert bench.start_state(p, p.sigma_max) is p.x_start
    s0 = 3.0
    assert torch.allclose(bench.start_state(p, s0), p.latent * math.sqrt(1 + s0**2))


def test_grids_stay_in_the_trained_range(problem):
    proc = problem.process
    for spec in bench.DEFAULT_GRIDS:
        sig = problem.grid(spec, 7)
        assert sig[-1] == 0 and len(sig) == 8
        pos = sig[:-1]
        assert (pos[1:] < pos[:-1]).all(), spec
        assert pos.max() <= proc.sigma_max * (1 + 1e-9) and pos.min() >= proc.sigma_min * (
            1 - 1e-9), spec


def test_grids_come_from_the_one_registry(problem):
    """Every benchmark grid is a sfumato.sigmas grid by its registry name, with its keywords
    from the spec, over the process's trained range."""
    proc = problem.process
    lo, hi = proc.sigma_min, proc.sigma_max
    assert all(bench.parse_grid(spec)[0] in sigmas.GRIDS for spec in bench.DEFAULT_GRIDS)
    expected = {
        "karras": sigmas.karras(7, lo, hi, rho=7.0),
        "loglinear": sigmas.loglinear(7, lo, hi),
        "polyexponential(rho=2)": sigmas.polyexponential(7, lo, hi, rho=2.0),
        "gaussian_lte": sigmas.gaussian_lte(7, lo, hi, sigma_data=0.5, order=3),
        "uniform_t": sigmas.uniform_t(proc, 7),
        "trailing": sigmas.discrete(proc, 7, spacing="trailing"),
        "linspace": sigmas.discrete(proc, 7, spacing="linspace"),
        "leading": sigmas.discrete(proc, 7, spacing="leading"),
    }
    for spec, sig in expected.items():
        torch.testing.assert_close(problem.grid(spec, 7), sig, rtol=0, atol=0, msg=spec)
    assert bench.parse_grid("polyexponential(rho=2)") == ("polyexponential", {"rho": 2})
    with pytest.raises(ValueError, match="unknown grid 'polyexp2'"):
        problem.grid("polyexp2", 7)
    with pytest.raises(ValueError, match="no parameter"):
        problem.grid("karras(nope=1)", 7)


def test_data_grids_need_the_data_spectrum(problem):
    """gaussian_cov is gaussian_lte on the data's covariance spectrum (with propagation)."""
    proc = problem.process
    stds = problem.data_std
    assert stds.shape == (2,) and (stds > 0).all()
    eig = torch.linalg.eigvalsh(problem.model.covariance())
    torch.testing.assert_close(stds**2, eig)
    assert "gaussian_cov" in sigmas.DATA_GRIDS
    with pytest.raises(ValueError, match="sigma_data"):
        sigmas.get_sigmas("gaussian_cov", 7, process=proc)
    torch.testing.assert_close(
        problem.grid("gaussian_cov", 7),
        sigmas.gaussian_lte(7, proc.sigma_min, proc.sigma_max, sigma_data=stds, order=3,
                            propagate=True))
    r = bench.run_sfumato(problem, "unipc(order=2)", "gaussian_cov", 10)
    assert r.status == "ok" and r.nfe == 10 and r.error < 0.1


def test_counting_denoiser_counts_evaluations_per_sample():
    """One NFE convention: calls on the whole batch count once (``nfe``); ``rows`` adds up
    batch sizes, so code that evaluates subsets reports rows / samples, the same unit."""
    seen = []
    counter = CountingDenoiser(lambda x, sigma, **cond: seen.append(cond) or x)
    counter(torch.zeros(3, 2), torch.ones(3), label=1)
    counter(torch.zeros(5, 2), torch.ones(5))
    assert counter.nfe == 2 and counter.rows == 8 and seen == [{"label": 1}, {}]
    assert counter.per_sample(4) == 2  # e.g. two chunks of 4 draws, each evaluated once


def test_steps_for_nfe_counts_honestly(problem):
    # Heun: 2n - 1 NFE for n steps, so budget 10 -> 5 steps, 9 NFE
    r = bench.run_sfumato(problem, "heun", "karras", 10)
    assert r.status == "ok" and r.steps == 5 and r.nfe == 9
    r = bench.run_sfumato(problem, "euler", "karras", 10)
    assert r.status == "ok" and r.steps == 10 and r.nfe == 10


def test_second_order_error_decreases_with_nfe(problem):
    errs = [bench.run_sfumato(problem, "heun", "karras", k).error for k in (10, 20, 50)]
    assert all(math.isfinite(e) for e in errs)
    assert errs[0] > errs[1] > errs[2], errs
    # well below the first-order sampler at the same budget
    assert errs[2] < bench.run_sfumato(problem, "euler", "karras", 50).error


def test_not_implemented_sampler_is_skipped_with_a_note(problem, monkeypatch, capsys):
    def todo(denoiser, x, sigmas, **kw):
        raise NotImplementedError

    monkeypatch.setitem(SAMPLERS, "todo_sampler", todo)
    out = bench.run_benchmark(problem, samplers=["todo_sampler", "euler"], grids=["karras"],
                              nfes=[5], rk45=False)
    assert out["skipped"] == ["todo_sampler"]
    assert [r.method for r in out["results"]] == ["euler / karras"]
    assert "todo_sampler" in capsys.readouterr().out


def test_sampler_specs_and_order_variants(problem):
    assert bench.parse_sampler("heun") == ("heun", {})
    assert bench.parse_sampler("lms(order=2)") == ("lms", {"order": 2})
    with pytest.raises(ValueError, match="no parameter"):
        bench.parse_sampler("lms(nope=2)")
    with pytest.raises(ValueError, match="malformed"):
        bench.parse_sampler("lms(order=2")
    names = bench.deterministic_samplers()
    assert "lms(order=2)" in names and "lms" in names
    assert not any(bench.parse_sampler(n)[0] in STOCHASTIC or n == "rk45" for n in names)
    r = bench.run_sfumato(problem, "lms(order=2)", "karras", 10)
    assert r.status == "ok" and r.nfe == 10 and r.method == "lms(order=2) / karras"


def test_identical_samplers_share_a_row(problem):
    out = bench.run_benchmark(problem, samplers=["euler", "ddim", "heun"], grids=["karras"],
                              nfes=[5, 10], rk45=False, log=None)
    assert sorted({r.method for r in out["results"]}) == ["euler=ddim / karras", "heun / karras"]
    assert any("euler=ddim" in n for n in out["notes"])


def test_benchmark_rejects_bad_input(problem):
    with pytest.raises(ValueError, match="positive"):
        bench.run_benchmark(problem, samplers=["euler"], grids=["karras"], nfes=[0])
    with pytest.raises(ValueError, match="unknown sampler"):
        bench.run_benchmark(problem, samplers=["nope"], nfes=[5])
    stochastic = sorted(STOCHASTIC)[0]
    with pytest.raises(ValueError, match="stochastic"):
        bench.run_benchmark(problem, samplers=[stochastic], nfes=[5])


def test_summary_and_table():
    R = bench.Result
    res = [R("a / karras", "sfumato", 5, nfe=5, error=0.1),
           R("b / karras", "sfumato", 5, nfe=5, error=0.05),
           R("X", "diffusers", 5, nfe=5, error=0.2),
           R("Y", "diffusers", 5, nfe=5, error=float("nan"), status="nan"),
           R("rk45 (adaptive)", "sfumato-adaptive", 5, nfe=5, error=1e-9)]
    s = bench.summarize(res, [5])[5]
    assert s["sfumato"] == "b / karras" and s["diffusers"] == "X"
    assert s["ratio"] == pytest.approx(0.25)
    assert s["ratio_ci"] is None  # no per-sample errors given
    table = bench.format_table(res, [5])
    assert "NaN" in table and "5.00e-02" in table


def test_best_methods_per_group_for_the_plot():
    R = bench.Result
    res = [R(f"s{i} / karras", "sfumato", k, nfe=k, error=(i + 1) * 0.1 / k)
           for i in range(4) for k in (5, 10)]
    res += [R("u / optimized grid", "sfumato", 5, nfe=5, error=1.0, calibration="optimized"),
            R("d0", "diffusers", 5, error=0.2), R("d2", "diffusers", 5, error=0.3),
            R("d1", "diffusers", 5, error=float("nan"), status="nan")]
    # per kind: the two lowest geometric-mean errors; a fitted row does not push out a generic
    # one, and a failed cell ranks last
    assert bench.best_methods(res, 2) == {"s0 / karras", "s1 / karras", "u / optimized grid",
                                          "d0", "d2"}


def test_ratio_interval_is_a_paired_bootstrap():
    g = torch.Generator().manual_seed(0)
    b = torch.rand(512, generator=g, dtype=torch.float64) ** (-1 / 1.5) * 1e-4  # Pareto tails
    lo, hi = bench.ratio_interval(0.25 * b, b)  # same samples, 4x smaller squared errors
    assert lo == pytest.approx(0.5) and hi == pytest.approx(0.5)
    a = torch.rand(512, generator=g, dtype=torch.float64) * b  # a < b sample by sample
    lo, hi = bench.ratio_interval(a, b)
    ratio = float((a.mean() / b.mean()).sqrt())
    assert lo < ratio < hi < 1.0 and hi - lo > 0.01
    # a larger level widens it; the same seed repeats it
    lo9, hi9 = bench.ratio_interval(a, b, level=0.99)
    assert lo9 <= lo and hi9 >= hi and bench.ratio_interval(a, b) == (lo, hi)
    with pytest.raises(ValueError, match="per-sample"):
        bench.ratio_interval(a, b[:10])


def test_summary_interval_comes_from_the_two_best_methods(problem):
    res = [bench.run_sfumato(problem, "unipc", "karras", 10),
           bench.run_sfumato(problem, "euler", "karras", 10)]
    res[1] = dataclasses.replace(res[1], family="diffusers")  # stands in for diffusers
    s = bench.summarize(res, [10])[10]
    assert res[0].sample_mse.shape == (problem.x_start.shape[0],)
    assert float(res[0].sample_mse.mean().sqrt()) == pytest.approx(res[0].error)
    lo, hi = s["ratio_ci"]
    assert lo <= s["ratio"] <= hi
    assert "bootstrap interval" in bench.format_summary({10: s})
    assert "sample_mse" not in res[0].to_dict()


def test_fitted_methods_are_their_own_axis(problem):
    out = bench.run_benchmark(problem, samplers=["euler"], grids=["karras"], nfes=[5],
                              rk45=False, log=None, optimize=["unipc_bh1"],
                              calibration_samples=32)
    rows = {r.method: r for r in out["results"]}
    fit, plain = rows["unipc_bh1 / optimized grid"], rows["euler / karras"]
    assert fit.calibration == bench.OPTIMIZED and "grid" not in fit.config
    assert plain.calibration is None and plain.config["grid"] == "karras"
    # the row's error is the sampler's on the fitted grid it records
    sig = torch.tensor(fit.config["fit"]["sigmas"], dtype=torch.float64)
    x = SAMPLERS["unipc_bh1"](problem.model, problem.x_start, sig)
    assert rms(x, problem.reference) == pytest.approx(fit.error, rel=1e-12)
    lines = bench.format_table(out["results"], [5]).splitlines()
    assert any(ln.startswith("fitted") and "unipc_bh1 / optimized grid" in ln for ln in lines)
    assert any(ln.startswith("sfumato") and "euler / karras" in ln for ln in lines)


def test_imports_stay_light():
    """Building the CLI parser imports no benchmark code; importing the benchmark imports no
    diffusers (a diffusers release cannot break ``import sfumato`` or ``sfumato sample``)."""
    code = ("import sys, sfumato.cli as c; c.build_parser()\n"
            "print([m for m in sys.modules if m.startswith(('sfumato.bench', 'diffusers'))])\n"
            "import sfumato.bench\n"
            "print([m for m in sys.modules if m.startswith(('diffusers', 'sfumato.bench.diff'))])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["[]", "[]"]


# ---------------------------------------------------------------------------------------
# diffusers
# ---------------------------------------------------------------------------------------
def test_eps_wrapper_is_exact_algebra(problem):
    p = problem
    model = peers.EpsModel(p.model, p.process)
    g = torch.Generator().manual_seed(3)
    for t in (0, 17, 500.5, 999):
        sigma = float(p.process.sigma(torch.tensor(float(t), dtype=torch.float64)))
        ab = 1 / (1 + sigma**2)  # alpha_bar at t
        x = p.model.sample(8, generator=g) + sigma * torch.randn(8, 2, generator=g,
                                                                 dtype=torch.float64)
        x_t = math.sqrt(ab) * x  # VP coordinates
        eps = model(x_t, torch.tensor(t))
        x0 = (x_t - math.sqrt(1 - ab) * eps) / math.sqrt(ab)  # DDPM's x0 from eps
        torch.testing.assert_close(x0, p.model(x, torch.full((8,), sigma, dtype=torch.float64)),
                                   rtol=1e-10, atol=1e-10)
        # an explicit sigma overrides sigma(t)
        eps2 = model(x_t, torch.tensor(t), sigma)
        torch.testing.assert_close(eps, eps2)
    assert model.nfe == 8


def test_diffusers_euler_matches_sfumato_euler(problem):
    pytest.importorskip("diffusers", reason="diffusers not installed (the optional bench "
                                            "extra): diffusers checks skipped")
    cfg = peers.DiffusersConfig("Euler karras", "EulerDiscreteScheduler",
                                {"use_karras_sigmas": True})
    d = peers.run_diffusers(problem, cfg, 10)
    s = bench.run_sfumato(problem, "euler", "karras", 10)
    assert d.status == "ok" and d.nfe == 10
    # same grid (Karras rho 7 on [sigma(0), sigma(T-1)]), same update; diffusers runs float32
    assert d.error == pytest.approx(s.error, rel=1e-3)


def test_diffusers_nan_is_recorded_not_raised(problem):
    pytest.importorskip("diffusers", reason="diffusers not installed (the optional bench "
                                            "extra): diffusers checks skipped")
    cfg = peers.DiffusersConfig("UniPC-bh1 o2", "UniPCMultistepScheduler",
                                {"solver_order": 2, "solver_type": "bh1"})
    r = peers.run_diffusers(problem, cfg, 10)
    assert r.status in ("ok", "nan")  # diffusers 0.3x-0.4x: NaN on the step into sigma = 0
    if r.status == "nan":
        assert math.isnan(r.error) and not r.valid


def test_diffusers_configs_all_build():
    diffusers = pytest.importorskip("diffusers", reason="diffusers not installed (the "
                                                        "optional bench extra)")
    cfgs = peers.diffusers_configs("full")
    assert len({c.name for c in cfgs}) == len(cfgs)
    for c in cfgs:
        assert hasattr(diffusers, c.cls), c.cls


# ---------------------------------------------------------------------------------------
# sfumato compare
# ---------------------------------------------------------------------------------------
def test_compare_writes_png_and_json(tmp_path, capsys):
    # a bare --tune tunes the recommended sampler (unipc_bh1)
    rc = cli.main(["compare", "--quick", "--out", str(tmp_path), "--nfe", "5", "10", "20",
                   "--samplers", "euler", "heun", "--grids", "karras", "--mixture", "gmm2d",
                   "--no-progress", "--optimize", "unipc_bh1", "--tune"])
    assert rc == 0
    png = (tmp_path / "compare.png").read_bytes()
    w, h = _png_size(png)
    assert w >= 400 and h >= 300 and len(png) > 5000
    data = json.loads((tmp_path / "compare.json").read_text())
    for key in ("problem", "nfe", "methods", "best", "notes", "diffusers", "runtime_s"):
        assert key in data, key
    assert data["nfe"] == [5, 10, 20]
    heun = data["methods"]["heun / karras"]
    assert heun["family"] == "sfumato" and heun["nfe_used"] == [5, 9, 19]
    # a deterministic 2nd-order sampler converges
    e = heun["errors"]
    assert e[0] > e[1] > e[2]
    opt = data["methods"]["unipc_bh1 / optimized grid"]
    assert opt["calibration"] == bench.OPTIMIZED and opt["family"] == "sfumato"
    assert opt["nfe_used"] == [5, 10, 20] and opt["config"]["fit"]["samples"] == 64
    tuned = data["methods"]["unipc_bh1 / tuned coefficients"]
    assert tuned["calibration"] == bench.TUNED and heun["calibration"] is None
    assert tuned["nfe_used"] == [5, 10, 20] and all(map(math.isfinite, tuned["errors"]))
    for k in ("5", "10", "20"):
        assert set(data["best"][k]) >= {"sfumato", "sfumato_error", "diffusers", "ratio"}
    out = capsys.readouterr().out
    assert "heun / karras" in out and "compare.png" in out
    assert any(line.startswith("fitted") and "unipc_bh1 / optimized grid" in line
               for line in out.splitlines())
    if data["diffusers"]:
        assert any(m["family"] == "diffusers" for m in data["methods"].values())
        assert data["best"]["20"]["ratio"] is not None


def test_compare_without_diffusers(tmp_path):
    payload = bench.compare(tmp_path, nfes=[5, 10], samplers=["euler"], grids=["karras"],
                            mixture="gmm2d", use_diffusers=False, quick=True, progress=False,
                            log=None)
    assert not payload["diffusers"]
    assert all(m["family"] == "sfumato" for m in payload["methods"].values())
    assert (tmp_path / "compare.png").exists()


@pytest.mark.parametrize("argv, message", [
    (["compare", "--samplers", "eulr"], "unknown sampler 'eulr'"),
    (["compare", "--nfe", "0"], "positive integer"),
    (["compare", "--nfe", "-3"], "positive integer"),
    (["compare", "--samplers", sorted(STOCHASTIC)[0]], "stochastic"),
    (["compare", "--grids", "nope"], "unknown grid 'nope'"),
    (["compare", "--grids", "karras(nope=1)"], "no parameter"),
    (["compare", "--mixture", "img9"], "unknown mixture 'img9'"),
    (["compare", "--samplers", "lms(nope=1)"], "no parameter"),
    (["compare", "--tune", "dpmpp_2m"], "only UniPC"),
])
def test_bad_input_exits_2_with_a_clear_message(argv, message, tmp_path, capsys):
    argv = argv + ["--out", str(tmp_path)]
    try:
        rc = cli.main(argv)
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    assert rc == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "compare.png").exists()


def test_samplers_command_lists_registry(capsys):
    assert cli.main(["samplers"]) == 0
    out = capsys.readouterr().out
    for name in SAMPLERS:
        assert name in out


def test_python_dash_m_help():
    r = subprocess.run([sys.executable, "-m", "sfumato", "--help"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0
    assert "compare" in r.stdout and "samplers" in r.stdout


def test_no_command_prints_help_and_exits_2(capsys):
    assert cli.main([]) == 2
    assert "usage" in capsys.readouterr().err
