"""The ``sfumato`` command line: a thin argparse layer over library functions.

    sfumato samplers                 list the registered samplers
    sfumato compare [--out DIR] ...  sfumato vs diffusers: error vs NFE table, PNG and JSON
    sfumato train CONFIG --out DIR   train (or resume) a run
    sfumato sample DIR --out FILE    sample a trained run (.png grid or .npz arrays)
    sfumato optimize-grid DIR --steps N --out GRID.json
                                     fit a sampler's noise levels to the run
    sfumato info DIR                 describe a run
    sfumato demo [--out DIR]         train the default digits model, sample, score

Each subcommand is a ``_cmd_<name>(args) -> int`` that calls into the library; bad input is
reported as ``sfumato <cmd>: error: ...`` with exit status 2 and no traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main", "build_parser"]


class UsageError(Exception):
    """Bad user input found after parsing (exit status 2)."""


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def _cmd_samplers(args: argparse.Namespace) -> int:
    from .samplers import SAMPLERS, STOCHASTIC

    width = max(len(n) for n in SAMPLERS)
    print(f"{'name':<{width}}  stochastic  summary")
    for name, fn in SAMPLERS.items():
        doc = (fn.__doc__ or "").strip().splitlines()
        first = doc[0] if doc else ""
        print(f"{name:<{width}}  {'yes' if name in STOCHASTIC else 'no':<10}  {first}")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from . import bench

    # bench.compare validates names, keywords and stochastic samplers (ValueError -> exit 2)
    payload = bench.compare(
        args.out, nfes=args.nfe, seed=args.seed, samplers=args.samplers, grids_=args.grids,
        mixture=args.mixture, schedule=args.schedule, batch=args.batch,
        use_diffusers=not args.no_diffusers, quick=args.quick,
        progress=not args.no_progress, optimize=args.optimize, tune=args.tune,
    )
    info = payload["problem"]
    print(f"problem: {info['mixture']} ({info['mixture_desc']}), VP {info['schedule']} "
          f"(sigma {info['sigma_min']:.3g}..{info['sigma_max']:.3g}), {info['batch']} samples, "
          f"seed {info['seed']}")
    print("RMS error vs the exact PF-ODE solution from the same noise "
          f"(reference accuracy ~{info['ref_accuracy']:.1e}; final-step floor at "
          f"sigma_min {info['final_step_floor']:.2e})\n")
    print(payload["table"])
    print()
    print(payload["summary"])
    for note in payload["notes"]:
        print(f"note: {note}")
    print(f"\nwrote {payload['png']} and {payload['json']} ({payload['runtime_s']:.1f} s)")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from .train.trainer import Trainer

    if not Path(args.config).is_file():
        raise UsageError(f"config file {args.config!r} not found (see configs/ for examples)")
    summary = Trainer(args.config, args.out, progress=not args.no_progress).run()
    print(f"trained to step {summary['steps']} in {summary['seconds']:.0f} s; "
          f"checkpoint in {Path(args.out) / 'checkpoint'}")
    return 0


def _cmd_sample(args: argparse.Namespace) -> int:
    import numpy as np

    from .api import load
    from .imageio import save_grid
    from .train.checkpoint import CheckpointError

    out = Path(args.out)
    if out.suffix not in (".png", ".npz"):
        raise UsageError(f"--out must end in .png (a grid) or .npz (arrays); got {str(out)!r}")
    try:
        model = load(args.run)
        guides = {k: load(getattr(args, k)) for k in ("classifier", "autoguide")
                  if getattr(args, k)}
    except CheckpointError as e:
        raise UsageError(str(e)) from None
    if args.class_label is not None and not (model.num_classes or "classifier" in guides):
        raise UsageError("--class needs a class-conditional model (or --classifier); this one "
                         "is unconditional")
    sampler, sigmas, tabled = args.sampler, None, {}
    if args.sigmas:
        sigmas, grid_sampler, tabled = _read_grid(args.sigmas)
        sampler = sampler or grid_sampler
        if tabled and sampler != "tabulated":
            raise UsageError(f"{args.sigmas} holds a tuned solver: leave out --sampler (or "
                             "use --sampler tabulated)")
    kw = {**tabled, "sampler": sampler, "steps": args.steps, "guidance": args.guidance,
          "sigmas": sigmas,
          "guidance_interval": tuple(args.guidance_interval) if args.guidance_interval else None,
          "guidance_rescale": args.guidance_rescale, **guides}
    if args.control:
        if not model.hint:
            raise UsageError("--control needs a ControlNet run (trained with model.type "
                             "'controlnet'); this one has no ControlNet")
        from .control import load_hint

        try:
            kw["hint"] = load_hint(args.control, model.shape[1:],
                                   channels=model.config["model"].get("hint_channels", 1),
                                   threshold=0.0)
        except (OSError, ValueError) as e:
            raise UsageError(str(e)) from None
        kw["control_scale"] = args.control_scale
    if args.prompt is not None:
        kw["prompt"] = args.prompt
    try:
        x = model.sample(args.n, seed=args.seed, class_labels=args.class_label, **kw)
    except ValueError as e:
        raise UsageError(str(e)) from None
    out.parent.mkdir(parents=True, exist_ok=True)
    if len(model.shape) != 3:  # vector data
        if out.suffix == ".png":
            raise UsageError("this model makes vectors, not images: use an .npz output")
        np.savez(out, samples=x.cpu().numpy())
    else:
        images = model.to_uint8(x)
        if out.suffix == ".png":
            save_grid(images, out, nrow=model.num_classes or None)
        else:
            arrays = {"images": images}
            if model.last_labels is not None:
                arrays["labels"] = model.last_labels.cpu().numpy().astype(np.int64)
            tmp = out.with_name(out.name + ".tmp.npz")
            np.savez(tmp, **arrays)
            os.replace(tmp, out)
    print(f"wrote {args.n} samples to {out}")
    return 0


def _read_grid(path: str) -> tuple[list[float], str | None, dict]:
    """(sigmas, sampler, {"table": ...} or {}) from a GRID.json written by
    ``sfumato optimize-grid`` (``--tune`` adds the solver table)."""
    import json

    from .samplers.tuned import StepTable

    try:
        data = json.loads(Path(path).read_text())
        sigmas = [float(v) for v in data["sigmas"]]
        table = {"table": StepTable.from_dict(data["table"])} if "table" in data else {}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UsageError(f"--sigmas {path!r} is not a grid file from 'sfumato optimize-grid' "
                         f"(JSON with a 'sigmas' list): {e}") from None
    return sigmas, data.get("sampler"), table


def _cmd_optimize_grid(args: argparse.Namespace) -> int:
    import json

    from .api import load
    from .train.checkpoint import CheckpointError

    out = Path(args.out)
    if out.suffix != ".json":
        raise UsageError(f"--out must end in .json; got {str(out)!r}")
    try:
        model = load(args.run)
    except CheckpointError as e:
        raise UsageError(str(e)) from None
    from .samplers.tuned import UNIPC_VARIANTS

    sampler = args.sampler or model.config["sample"].get("sampler", "heun")
    if args.tune and sampler not in UNIPC_VARIANTS:
        raise UsageError("--tune tunes UniPC's coefficients: use --sampler unipc_bh1 (or "
                         f"{', '.join(v for v in UNIPC_VARIANTS if v != 'unipc_bh1')}); "
                         f"got {sampler!r}")
    try:
        fit = model.optimize_sigmas(args.steps, sampler=sampler, samples=args.samples,
                                    seed=args.seed, batch_size=args.batch_size)
        record = {"sampler": sampler, "steps": args.steps, "run": str(args.run),
                  "samples": args.samples, "seed": args.seed, **fit.to_dict()}
        print(f"calibration error {fit.init_error:.3e} -> {fit.error:.3e} ({sampler}, "
              f"{args.steps} steps, {args.samples} draws, {fit.nfe} calls per draw)")
        if args.tune:
            tuned = model.tune_solver(args.steps, variant=UNIPC_VARIANTS[sampler],
                                      sigmas=fit.sigmas,
                                      samples=args.samples, seed=args.seed + 1)
            record.update({"sampler": "tabulated", "table": tuned.table.to_dict(),
                           "tuning": {k: v for k, v in tuned.to_dict().items()
                                      if k not in ("table", "init_table")}})
            print(f"tuned coefficients: held-out error {tuned.init_error:.3e} -> "
                  f"{tuned.error:.3e} ({args.samples} other draws, half held out)")
    except ValueError as e:
        raise UsageError(str(e)) from None
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2))
    os.replace(tmp, out)
    print(f"wrote {out}")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    import json

    from .train.checkpoint import find_checkpoint

    ck = find_checkpoint(args.run)
    if ck is None:
        raise UsageError(f"{args.run} has no checkpoint (train it with 'sfumato train')")
    state = json.loads((ck / "state.json").read_text())
    config = json.loads((ck / "config.json").read_text())
    print(f"run:         {args.run}")
    print(f"step:        {state['step']} of {config['train']['steps']}")
    print(f"data:        {config['data']}  shape {state.get('data_shape')}")
    print(f"model:       {config['model']}")
    print(f"objective:   target {config['objective']['target']}, sigma "
          f"{config['objective']['sigma_sampling']}, weighting {config['objective']['weighting']}")
    print(f"classes:     {state.get('num_classes')}")
    print(f"sampling:    {config['sample']}")
    if state.get("losses"):
        print(f"last loss:   {state['losses'][-1][1]:.4f}")
    metrics = Path(args.run) / "metrics.json"
    if metrics.is_file():
        print(f"metrics:     {metrics.read_text().strip()}")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    import json

    from .api import load
    from .data import get_dataset
    from .metrics import evaluate_images
    from .train.checkpoint import CheckpointError, find_checkpoint, write_json_atomic

    run = Path(args.run)
    latest = run if (run / "state.json").is_file() else find_checkpoint(run)  # or a ckpt dir
    if latest is None:
        raise UsageError(f"{run} has no checkpoint (train it with 'sfumato train')")
    ckpts = sorted((run / "checkpoints").glob("step-*")) if args.all else []
    step = json.loads((latest / "state.json").read_text())["step"]
    if f"step-{step:08d}" not in [c.name for c in ckpts]:  # the latest is not archived yet
        ckpts.append(latest)
    rows, data = [], None
    print("| step | train CPU min | FD | FD floor | FD / floor | class accuracy |\n"
          "|---|---|---|---|---|---|")
    for ck in ckpts:
        try:
            model = load(ck)
        except CheckpointError as e:
            raise UsageError(str(e)) from None
        if model.is_classifier or not model.shape or len(model.shape) != 3:
            raise UsageError("evaluate scores image models (FD in a classifier's features)")
        try:
            x = model.sample(args.n, seed=args.seed, sampler=args.sampler, steps=args.steps,
                             guidance=args.guidance)
        except ValueError as e:
            raise UsageError(str(e)) from None
        if data is None:  # once: the run's checkpoints share their data set
            data = get_dataset(model.config["data"])
        m = evaluate_images(x, data, labels=model.last_labels, seed=args.ref_seed)
        cpu = model.state.get("train_cpu_seconds")
        rows.append({"step": model.state["step"], "train_cpu_minutes": cpu and cpu / 60,
                     **{k: m.get(k) for k in ("fd", "fd_floor", "fd_ratio", "accuracy",
                                              "class_entropy", "n")}})
        r = rows[-1]
        acc = "" if r["accuracy"] is None else f"{r['accuracy']:.3f}"
        cpu_s = "?" if cpu is None else f"{cpu / 60:.1f}"
        print(f"| {r['step']} | {cpu_s} | {r['fd']:.2f} | {r['fd_floor']:.2f} | "
              f"{r['fd_ratio']:.2f} | {acc} |", flush=True)
    write_json_atomic(run / "evaluation.json", {"n": args.n, "guidance": model.last_guidance,
                                                "seed": args.seed, "ref_seed": args.ref_seed,
                                                "rows": rows})
    print(f"wrote {run / 'evaluation.json'}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(args.out, progress=not args.no_progress)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="sfumato",
        description="sfumato: diffusion models in one sigma-space.",
    )
    parser.add_argument("--version", action="version", version=f"sfumato {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("samplers", help="list the registered samplers",
                       description="List the registered samplers and whether they draw noise.")
    p.set_defaults(func=_cmd_samplers)

    from .bench import COMPARE_GRIDS, COMPARE_SAMPLERS, GRIDS, add_problem_arguments

    p = sub.add_parser(
        "compare", help="sfumato vs diffusers samplers: error vs NFE (table, PNG, JSON)",
        description=(
            "Run a few sfumato samplers and, if installed, diffusers schedulers on one exact "
            "Gaussian-mixture model under a 1000-step VP process, and report each one's RMS "
            "error against the exact probability-flow ODE solution from the same noise, at "
            "each NFE. Writes DIR/compare.png (log-log error vs NFE) and DIR/compare.json. "
            "The full benchmark is benchmarks/samplers.py."),
    )
    p.add_argument("--out", default="sfumato-compare", metavar="DIR",
                   help="output directory (default: %(default)s)")
    p.add_argument("--nfe", type=_positive_int, nargs="+", default=[5, 10, 20], metavar="N",
                   help="denoiser-call budgets (default: 5 10 20)")
    p.add_argument("--seed", type=int, default=0, help="seed of the mixture and the noise")
    p.add_argument("--samplers", nargs="+", metavar="NAME", default=None,
                   help=f"sfumato samplers, optionally with keywords, e.g. 'unipc(order=2)' "
                        f"(default: {' '.join(COMPARE_SAMPLERS)})")
    p.add_argument("--grids", nargs="+", metavar="GRID", default=None, choices=sorted(GRIDS),
                   help=f"sigma grids (default: {' '.join(COMPARE_GRIDS)}; "
                        f"choices: {', '.join(GRIDS)})")
    add_problem_arguments(p, mixture="img1", batch_type=_positive_int)
    p.add_argument("--quick", action="store_true",
                   help="fewer samples and a coarser reference (a few seconds)")
    p.add_argument("--optimize", nargs="+", metavar="NAME", default=(),
                   help="also run these samplers on a sigma grid optimised for the model "
                        "(sfumato.calibrate; 1024 calibration draws, 64 with --quick)")
    p.add_argument("--tune", nargs="+", metavar="NAME", default=(),
                   help="also run these UniPC samplers with coefficients tuned to the model "
                        "(sfumato.calibrate.tune_coefficients; 2048 draws, 128 with --quick)")
    p.add_argument("--no-diffusers", action="store_true", help="sfumato samplers only")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_compare)

    p = sub.add_parser("train", help="train (or resume) a run from a JSON config",
                       description="Train a model; running the same command again resumes "
                                   "from DIR/checkpoint.")
    p.add_argument("config", help="JSON config file (see configs/)")
    p.add_argument("--out", required=True, metavar="DIR", help="run directory")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_train)

    from .samplers import SAMPLERS

    p = sub.add_parser("sample", help="sample a trained run",
                       description="Sample a trained run: FILE.png writes a grid, FILE.npz "
                                   "writes 'images' (uint8 NHWC) and 'labels' if conditional.")
    p.add_argument("run", metavar="DIR", help="run directory")
    p.add_argument("--sampler", default=None, choices=sorted(SAMPLERS), metavar="NAME",
                   help="sampler name (default: the run's config); see 'sfumato samplers'")
    p.add_argument("--steps", type=_positive_int, default=None, help="number of steps")
    p.add_argument("--n", type=_positive_int, default=64, help="number of samples")
    p.add_argument("--seed", type=int, default=0, help="seed (sample i depends only on it)")
    p.add_argument("--class", dest="class_label", type=int, default=None, metavar="K",
                   help="class label for a class-conditional model")
    p.add_argument("--guidance", type=float, default=None, metavar="W",
                   help="guidance scale (1 = none): classifier-free for a conditional model, "
                        "or the scale of --classifier / --autoguide (default: the run's "
                        "config, sample.guidance)")
    p.add_argument("--classifier", metavar="DIR", default=None,
                   help="classifier guidance with this noise-conditional classifier run")
    p.add_argument("--autoguide", metavar="DIR", default=None,
                   help="autoguidance with this weaker model (e.g. DIR/checkpoints/step-...)")
    p.add_argument("--guidance-interval", type=float, nargs=2, metavar=("LO", "HI"),
                   default=None, help="guide only for LO < sigma <= HI")
    p.add_argument("--guidance-rescale", type=float, default=0.0, metavar="PHI",
                   help="CFG rescale phi in [0, 1] (Lin et al. 2024)")
    p.add_argument("--prompt", default=None, metavar="TEXT",
                   help='text prompt for a text-conditioned run, e.g. "a thick 7"')
    p.add_argument("--control", metavar="HINT.png", default=None,
                   help="spatial hint for a ControlNet run (an edge map or mask image; "
                        "bright = on)")
    p.add_argument("--control-scale", type=float, default=1.0, metavar="S",
                   help="strength of the ControlNet's residuals (default 1)")
    p.add_argument("--sigmas", metavar="GRID.json", default=None,
                   help="noise levels from 'sfumato optimize-grid' (and its sampler, unless "
                        "--sampler is given) instead of the run's grid and --steps")
    p.add_argument("--out", required=True, metavar="FILE", help="output .png or .npz")
    p.set_defaults(func=_cmd_sample)

    p = sub.add_parser(
        "optimize-grid", help="fit a sampler's noise levels to a trained run",
        description="Fit the noise levels of a STEPS-step deterministic sampler to this run "
                    "(sfumato.calibrate): solve the ODE of SAMPLES calibration draws "
                    "accurately, then move the levels to minimise the sampler's error against "
                    "those solutions. Writes GRID.json for 'sfumato sample --sigmas'. Offline "
                    "cost: ~(801 + 60 * STEPS^2) denoiser calls per draw.")
    p.add_argument("run", metavar="DIR", help="run directory")
    p.add_argument("--steps", type=_positive_int, required=True, help="number of steps (>= 2)")
    p.add_argument("--sampler", default=None, choices=sorted(SAMPLERS), metavar="NAME",
                   help="deterministic sampler (default: the run's config)")
    p.add_argument("--samples", type=_positive_int, default=1024,
                   help="calibration draws (default 1024; more generalise better)")
    p.add_argument("--seed", type=int, default=1,
                   help="seed of the calibration noise (default 1; sample with other seeds)")
    p.add_argument("--batch-size", type=_positive_int, default=None,
                   help="draws per denoiser call (default: all)")
    p.add_argument("--tune", action="store_true",
                   help="also tune UniPC's coefficients on that grid (sfumato.calibrate."
                        "tune_coefficients, SAMPLES other draws, half held out); GRID.json then "
                        "holds a 'tabulated' solver")
    p.add_argument("--out", required=True, metavar="GRID.json", help="output JSON")
    p.set_defaults(func=_cmd_optimize_grid)

    p = sub.add_parser("info", help="describe a run")
    p.add_argument("run", metavar="DIR", help="run directory")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("evaluate", help="score a run's samples: FD vs the real-vs-real floor, "
                       "class accuracy (image data sets)")
    p.add_argument("run", metavar="DIR", help="run directory")
    p.add_argument("--n", type=_positive_int, default=1000, help="samples (default 1000)")
    p.add_argument("--all", action="store_true",
                   help="every kept checkpoint (DIR/checkpoints/step-*), not just the latest")
    p.add_argument("--sampler", default=None, choices=sorted(SAMPLERS), metavar="NAME")
    p.add_argument("--steps", type=_positive_int, default=None)
    p.add_argument("--seed", type=int, default=12345, help="sampling seed")
    p.add_argument("--ref-seed", type=int, default=0,
                   help="seed of the random held-out subset FD compares with (default 0)")
    p.add_argument("--guidance", type=float, default=None, metavar="W",
                   help="classifier-free guidance scale of a conditional run (default: the "
                        "run's config, sample.guidance)")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("demo", help="train the default digits model, sample and score it",
                       description="Train the default model on scikit-learn's digits (8x8), "
                                   "sample it, write a grid, loss plot and metrics JSON, and "
                                   "print the Frechet distance next to the real-vs-real floor.")
    p.add_argument("--out", default="runs/demo", metavar="DIR", help="run directory")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``sfumato`` command; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args.func(args) or 0)
    except (UsageError, ValueError) as e:
        print(f"sfumato {args.command}: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # TrainingError, CheckpointError: a clear message, no traceback
        print(f"sfumato {args.command}: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
