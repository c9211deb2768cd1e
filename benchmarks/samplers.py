"""Sampler benchmark: every deterministic sfumato sampler x sigma grid and every diffusers
scheduler configuration, driven by the same exact model, at NFE 5, 10, 20, 50.

    python benchmarks/samplers.py                 # the full table (~7-8 min, 1024 samples)
    python benchmarks/samplers.py --quick         # smaller: fewer samples, fewer configs
    python benchmarks/samplers.py --mixture gmm2d --schedule linear --json out.json

The model is a Gaussian mixture with a closed-form denoiser, so the only error left is the
solver's. Each method starts from the same noise and is scored by the RMS distance of its
output to the exact probability-flow ODE solution (a fine RK4 reference in float64); NFE is
counted by wrapping the model. diffusers schedulers see the mixture as an eps-prediction
network in VP coordinates. Setting and conventions: see the docstrings of the modules of
``sfumato.bench`` (problem, runner, calibrated, diffusers_adapters).

Prints the table (rows = method, columns = NFE, values = RMS error), then per NFE the best
sfumato configuration, the best diffusers configuration and their ratio with its 90 % paired
bootstrap interval over the samples. The target is a ratio <= 0.5 at NFE 5, 10 and 20; the
exit status is 0 either way.

diffusers is optional (``pip install 'sfumato[bench]'``); without it only sfumato runs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from sfumato import bench, sigmas
from sfumato.samplers import STOCHASTIC

BAR_NFES = (5, 10, 20)
BAR_RATIO = 0.5


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    # 1024 samples: the RMS error is heavy-tailed in the samples (a few trajectories that
    # cross between modes late carry most of it), so 128 left the NFE-5 ratio to luck
    bench.add_problem_arguments(p, mixture="img3", batch=1024)
    p.add_argument("--seed", type=int, default=0, help="mixture and noise seed")
    p.add_argument("--nfe", type=int, nargs="+", default=list(bench.DEFAULT_NFES),
                   help="NFE budgets (default: 5 10 20 50)")
    p.add_argument("--samplers", nargs="+", default=None,
                   help="sfumato samplers (default: every deterministic one)")
    p.add_argument("--grids", nargs="+", default=None, metavar="SPEC",
                   help="sigma grids by sfumato.sigmas name, optionally with keywords (default: "
                        f"{' '.join(bench.DEFAULT_GRIDS)}; names: {', '.join(sigmas.GRIDS)})")
    p.add_argument("--optimize", nargs="*", default=["unipc_bh1"], metavar="SAMPLER",
                   help="samplers that also run on a grid optimised for this model "
                        "(sfumato.calibrate; default: %(default)s; none: --optimize)")
    p.add_argument("--optimize-nfe", type=int, nargs="+", default=[5, 10, 20],
                   help="NFEs at which to optimise those grids (default: 5 10 20; each costs "
                        "~10 s to ~6 min at 4096 calibration draws)")
    p.add_argument("--tune", nargs="*", default=["unipc_bh1", "unipc_bh1(order=4)"],
                   metavar="SAMPLER",
                   help="UniPC samplers that also run with coefficients tuned to this model "
                        "(sfumato.calibrate.tune_coefficients; default: %(default)s; none: "
                        "--tune)")
    p.add_argument("--tune-nfe", type=int, nargs="+", default=[5, 10, 20],
                   help="NFEs at which to tune them (default: 5 10 20; each costs ~10-150 s)")
    p.add_argument("--calibration-samples", type=int, default=bench.CALIBRATION_SAMPLES,
                   help="calibration draws per optimised grid (default: %(default)s)")
    p.add_argument("--ref-steps", type=int, default=400,
                   help="RK4 steps of the reference solution (default: %(default)s)")
    p.add_argument("--quick", action="store_true",
                   help="32 samples, 4 grids, a coarser reference, a few diffusers configs, "
                        "512 calibration draws")
    p.add_argument("--no-diffusers", action="store_true", help="sfumato only")
    p.add_argument("--no-rk45", action="store_true", help="leave out the adaptive rk45 row")
    p.add_argument("--sigma-source", default="scheduler", choices=["scheduler", "timestep"],
                   help="which sigma the diffusers eps model is evaluated at: the one the "
                        "scheduler assumes (its best case, default) or sigma(t) of the "
                        "timestep passed, as an integer-t network sees it")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: the tensors are small)")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    p.add_argument("--plot", type=Path, default=None,
                   help="write an error-vs-NFE PNG of the best few methods here")
    p.add_argument("--progress", action="store_true", help="show a progress bar")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    try:
        nfes = bench.check_nfes(args.nfe)
        for spec in args.grids or ():
            bench.parse_grid(spec)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    batch, ref_steps, grids, level = args.batch, args.ref_steps, args.grids, "full"
    cal = args.calibration_samples
    if args.quick:
        batch, ref_steps, level = min(batch, 32), min(ref_steps, 200), "small"
        cal = min(cal, 512)
        grids = grids or ["karras", "loglinear", "uniform_t", "trailing"]
    cfgs = []
    notes = []
    stochastic_peers: tuple[str, ...] = ()
    if args.no_diffusers:
        notes.append("diffusers left out on request")
    elif bench.diffusers_available():
        import diffusers

        from sfumato.bench.diffusers_adapters import DIFFUSERS_STOCHASTIC, diffusers_configs

        cfgs, stochastic_peers = diffusers_configs(level), DIFFUSERS_STOCHASTIC
        notes.append(f"diffusers {diffusers.__version__}: {len(cfgs)} configurations "
                     f"before de-duplication; eps model evaluated at the "
                     f"{'sigma the scheduler assumes' if args.sigma_source == 'scheduler' else 'sigma(t) of the timestep passed'}")  # noqa: E501
    else:
        notes.append("diffusers is not installed (pip install 'sfumato[bench]'): sfumato only")

    with bench.torch_threads(args.threads):
        problem = bench.make_problem(args.mixture, args.schedule, batch=batch, seed=args.seed,
                                     ref_steps=ref_steps)
        info = problem.info
        print(f"problem: {info['mixture']} mixture ({info['mixture_desc']})")
        print(f"         VP {info['schedule']}, 1000 steps, sigma in "
              f"[{info['sigma_min']:.4g}, {info['sigma_max']:.4g}]; {info['batch']} samples, "
              f"seed {info['seed']}")
        print(f"reference: RK4 in log sigma, {ref_steps} steps, float64, to sigma=1e-4 then D; "
              f"accuracy ~{info['ref_accuracy']:.1e} (vs half the steps)")
        print(f"final-step floor: the exact ODE down to sigma_min, then the first-order step "
              f"D(x, sigma_min) into 0, is {info['final_step_floor']:.2e} from the reference "
              "(where first-order last steps level off)")
        print(f"setup {time.perf_counter() - t0:.1f} s\n", flush=True)
        bench_out = bench.run_benchmark(
            problem, samplers=args.samplers, grids=grids, diffusers=cfgs, nfes=nfes,
            rk45=not args.no_rk45, sigma_source=args.sigma_source, progress=args.progress,
            log=lambda m: print(m, flush=True), optimize=args.optimize,
            optimize_nfes=args.optimize_nfe, calibration_samples=cal, tune=args.tune,
            tune_nfes=args.tune_nfe)
    results = bench_out["results"]
    notes += bench_out["notes"]
    notes.append("stochastic samplers are left out (they do not converge to the ODE "
                 f"solution): sfumato {', '.join(sorted(STOCHASTIC))}"
                 + (f"; diffusers {', '.join(stochastic_peers)}" if stochastic_peers else ""))
    notes.append("rk45 (adaptive) picks, per NFE, the tolerance with the least error within "
                 "the budget; it is not in the best-of")
    notes.append("each cell uses the most steps whose counted NFE fits the budget "
                 "(e.g. Heun: 2n-1 per n steps, PLMS: n+1)")

    print("RMS error vs the exact PF-ODE solution (NaN = non-finite output, error = raised, "
          "n/a = budget too small)\n")
    print(bench.format_table(results, nfes))
    summary = bench.summarize(results, nfes)
    print("\nbest per NFE (fixed-grid sfumato samplers vs every diffusers configuration):")
    print(bench.format_summary(summary))
    bar_rows = [summary[k] for k in BAR_NFES if k in summary]
    if bar_rows and all(r["ratio"] is not None for r in bar_rows):
        ok = all(r["ratio"] <= BAR_RATIO for r in bar_rows)
        shown = ", ".join(f"{k}: {summary[k]['ratio']:.2f}" for k in BAR_NFES if k in summary)
        print(f"bar (ratio <= {BAR_RATIO} at NFE {', '.join(map(str, BAR_NFES))}): "
              f"{'met' if ok else 'NOT met'} ({shown})")
        if any(r.get("ratio_generic") is not None for r in bar_rows):
            shown = ", ".join(f"{k}: {summary[k].get('ratio_generic', summary[k]['ratio']):.2f}"
                              for k in BAR_NFES if k in summary)
            print(f"  without the methods fitted to the model: {shown}")
    print()
    for n in notes:
        print(f"note: {n}")
    elapsed = time.perf_counter() - t0
    print(f"\nruntime {elapsed:.1f} s wall, {bench_out['cpu_s']:.1f} s CPU in the runs "
          f"({len(results)} cells, {bench_out['diffusers_configs']} diffusers configurations)")

    if args.json:
        payload = bench.results_payload(problem, results, nfes, notes)
        payload["runtime_s"] = round(elapsed, 1)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2, default=str))
        print(f"wrote {args.json}")
    if args.plot:
        best = bench.best_methods(results, per_group=5)
        bench.plot_errors([r for r in results if r.method in best], nfes, args.plot,
                          title=f"{args.mixture} mixture, VP {args.schedule}: best methods")
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
