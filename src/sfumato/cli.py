"""The ``sfumato`` command line: a thin argparse layer over library functions.

    sfumato samplers                 list the registered samplers
    sfumato compare [--out DIR] ...  sfumato vs diffusers: error vs NFE table, PNG and JSON
    sfumato train CONFIG --out DIR [--set KEY=VALUE ...]
                                     train (or resume) a run
    sfumato sample DIR --out FILE    sample a trained run (.png grid or .npz arrays)
    sfumato optimize-grid DIR --steps N --out GRID.json
                                     fit a sampler's noise levels to the run
    sfumato invert DIR --input IMG --out NOISE.npz
                                     the noise that reproduces images (sample --noise)
    sfumato edit DIR --input IMG --strength S --out FILE
                                     SDEdit
    sfumato restore DIR --input Y --operator SPEC --out FILE
                                     inpainting, super-resolution, deblurring
    sfumato info DIR                 describe a run
    sfumato cascade BASE SR... --out DIR
                                     join a base and super-resolution runs (sample DIR)
    sfumato demo [--out DIR]         train the default digits model, sample, score

The editing commands (invert, edit, restore) live in :mod:`sfumato.cli_edit`, the cascade
command (and what sample and info do with a cascade folder) in :mod:`sfumato.cli_cascade`. Each
subcommand is a ``_cmd_<name>(args) -> int`` that parses, calls into the library
(:mod:`sfumato.run` and :mod:`sfumato.model` for runs), reads and writes files, and prints. The
project's own errors (:class:`sfumato.errors.SfumatoError`: bad usage, config, data, a missing
or changed run, training that cannot go on) are printed as one line ``sfumato <cmd>: error:
...`` (exit status 1 for training that stopped, 2 for the rest); anything else is a bug
and keeps its traceback. ``--debug`` shows the traceback of every error.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from ._cli_args import _add_set_option, _class_label, _positive_int, _trained
from .errors import SfumatoError, TrainingError, UsageError

__all__ = ["main", "build_parser"]


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
    from .bench.compare import compare  # the benchmark (and diffusers) only for this command

    def fitted(names: list[str] | None) -> list[str] | bool:  # bare flag: the recommended
        return True if names == [] else (names or [])

    # compare checks names, keywords, stochastic samplers and the mixture before it runs
    # (UsageError: exit status 2)
    payload = compare(
        args.out, nfes=args.nfe, seed=args.seed, samplers=args.samplers, grids=args.grids,
        mixture=args.mixture, schedule=args.schedule, batch=args.batch,
        use_diffusers=not args.no_diffusers, quick=args.quick, progress=not args.no_progress,
        optimize=fitted(args.optimize), tune=fitted(args.tune))
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
    print(f"\nwrote {payload['png']} and {payload['json']} ({payload['runtime_s']:.1f} s wall, "
          f"{payload['cpu_s']:.1f} s CPU)")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from .train.config import apply_overrides, read_config_file
    from .train.trainer import Trainer

    if not Path(args.config).is_file():
        raise UsageError(f"config file {args.config!r} not found (see configs/ for examples)")
    config = apply_overrides(read_config_file(args.config), args.sets)
    summary = Trainer(config, args.out, progress=not args.no_progress).run()
    print(f"trained to step {summary['steps']} in {summary['seconds']:.0f} s; "
          f"checkpoint in {Path(args.out) / 'checkpoint'}")
    return 0


def _cmd_distill(args: argparse.Namespace) -> int:
    from .distill import distill
    from .train.config import apply_overrides, read_config_file

    config = args.config
    if args.sets:  # on the --config file's overrides, or on none
        config = apply_overrides(read_config_file(config) if config else {}, args.sets)
    summary = distill(args.teacher, args.method, out=args.out, config=config,
                      steps=args.steps, progress=not args.no_progress)
    print(f"{_trained('distilled', summary)}; checkpoint in {Path(args.out) / 'checkpoint'}; "
          f"sample it with 'sfumato sample {args.out} --out FILE.png'")
    return 0


def _cmd_sample(args: argparse.Namespace) -> int:
    import numpy as np

    from .files import atomic_write
    from .imageio import save_grid
    from .model import load

    out = Path(args.out)
    if out.suffix not in (".png", ".npz"):
        raise UsageError(f"--out must end in .png (a grid) or .npz (arrays); got {str(out)!r}")
    model = load(args.run)
    if getattr(model, "kind", None) == "cascade" or args.aug_sigma is not None:
        from .cli_cascade import sample_cascade  # stages joined by cascade.json

        return sample_cascade(model, args)
    guides = {k: load(getattr(args, k)) for k in ("classifier", "autoguide") if getattr(args, k)}
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
    if args.class_label != "auto":
        kw["class_labels"] = args.class_label
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
    n = args.n
    if args.noise:  # the inversion's settings unless given here
        from .cli_edit import read_noise

        rec = read_noise(args.noise)
        kw["noise"], kw["null_offsets"], n = rec["noise"], rec["null_offsets"], len(rec["noise"])
        for key, value in (("sampler", rec["sampler"]), ("steps", rec["steps"]),
                           ("guidance", rec["guidance"]), ("prompt", rec["prompt"])):
            if kw.get(key) is None and value is not None:
                kw[key] = value
        if args.class_label == "auto":
            kw["class_labels"] = rec["class_label"]
    drawn = model.sample(n, seed=args.seed, **kw)
    if len(model.shape) != 3:  # vector data
        if out.suffix == ".png":
            raise UsageError("this model makes vectors, not images: use an .npz output")
        arrays = {"samples": drawn.x.cpu().numpy()}
    else:
        images = drawn.to_uint8()
        if out.suffix == ".png":
            save_grid(images, out, nrow=model.num_classes or None)
        arrays = {"images": images}
        if drawn.labels is not None:
            arrays["labels"] = drawn.labels.cpu().numpy().astype(np.int64)
    if out.suffix == ".npz":
        with atomic_write(out) as tmp:
            np.savez(tmp, **arrays)
    print(f"wrote {n} samples to {out}")
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
    from .files import write_json_atomic
    from .model import load
    from .samplers.tuned import UNIPC_VARIANTS

    out = Path(args.out)
    if out.suffix != ".json":
        raise UsageError(f"--out must end in .json; got {str(out)!r}")
    model = load(args.run)
    sampler = args.sampler or model.run.sampling["sampler"]
    if args.tune and sampler not in UNIPC_VARIANTS:
        raise UsageError("--tune tunes UniPC's coefficients: use --sampler unipc_bh1 (or "
                         f"{', '.join(v for v in UNIPC_VARIANTS if v != 'unipc_bh1')}); "
                         f"got {sampler!r}")
    fit = model.optimize_sigmas(args.steps, sampler=sampler, samples=args.samples,
                                seed=args.seed, batch_size=args.batch_size)
    record = {"sampler": sampler, "steps": args.steps, "run": str(args.run),
              "samples": args.samples, "seed": args.seed, **fit.to_dict()}
    print(f"calibration error {fit.init_error:.3e} -> {fit.error:.3e} ({sampler}, "
          f"{args.steps} steps, {args.samples} draws, {fit.nfe} calls per draw)")
    if args.tune:
        tuned = model.tune_solver(args.steps, variant=UNIPC_VARIANTS[sampler],
                                  sigmas=fit.sigmas, samples=args.samples, seed=args.seed + 1)
        record.update({"sampler": "tabulated", "table": tuned.table.to_dict(),
                       "tuning": {k: v for k, v in tuned.to_dict().items()
                                  if k not in ("table", "init_table")}})
        print(f"tuned coefficients: held-out error {tuned.init_error:.3e} -> "
              f"{tuned.error:.3e} ({args.samples} other draws, half held out)")
    write_json_atomic(out, record)
    print(f"wrote {out}")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from .cascade import is_cascade
    from .run import Run

    if is_cascade(args.run):  # not a run: stages joined by cascade.json
        from .cli_cascade import info_cascade

        return info_cascade(args.run)
    run = Run(args.run)
    for label, value in run.describe():
        print(f"{label + ':':<12} {value}")
    if run.kind == "autoencoder":  # reconstruction quality, measured now
        from .model import load

        m = load(run).evaluate(n=args.n)
        codes = f", codes used {m['codes_used']:.2f}, perplexity {m['perplexity']:.1f}" \
            if "perplexity" in m else ""
        print(f"{'measured:':<12} {m['n']} held-out images: PSNR {m['psnr']:.2f} dB, rFD "
              f"{m['rfd']:.2f} (floor {m['fd_floor']:.2f}, ratio {m['rfd_ratio']:.2f}){codes}")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from .files import write_json_atomic
    from .model import evaluate

    def row(r: dict) -> None:
        cpu = r["train_cpu_minutes"]
        acc = "" if r["accuracy"] is None else f"{r['accuracy']:.3f}"
        print(f"| {r['step']} | {'?' if cpu is None else f'{cpu:.1f}'} | {r['fd']:.2f} | "
              f"{r['fd_floor']:.2f} | {r['fd_ratio']:.2f} | {acc} |", flush=True)

    print("| step | train CPU min | FD | FD floor | FD / floor | class accuracy |\n"
          "|---|---|---|---|---|---|")
    result = evaluate(args.run, n=args.n, every=args.all, seed=args.seed,
                      ref_seed=args.ref_seed, sampler=args.sampler, steps=args.steps,
                      guidance=args.guidance, on_row=row)
    out = Path(args.run) / "evaluation.json"  # beside the run's (or checkpoint's) state
    write_json_atomic(out, result)
    print(f"wrote {out}")
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
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of every error (not only of bugs)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("samplers", help="list the registered samplers",
                       description="List the registered samplers and whether they draw noise.")
    p.set_defaults(func=_cmd_samplers)

    from .sigmas import GRIDS  # the grid registry (light); the benchmark loads on use only

    p = sub.add_parser(
        "compare", help="sfumato vs diffusers samplers: error vs NFE (table, PNG, JSON)",
        description=(
            "Run the sfumato samplers and grids docs/samplers.md recommends and, if "
            "installed, the strongest diffusers schedulers on one exact Gaussian-mixture "
            "model under a 1000-step VP process, and report each one's RMS error against the "
            "exact probability-flow ODE solution from the same noise, at each NFE, with 90% "
            "bootstrap intervals of the best-vs-best ratios (about a minute). Writes "
            "DIR/compare.png (log-log error vs NFE) and DIR/compare.json. The full benchmark "
            "is benchmarks/samplers.py."),
    )
    p.add_argument("--out", default="sfumato-compare", metavar="DIR",
                   help="output directory (default: %(default)s)")
    p.add_argument("--nfe", type=_positive_int, nargs="+", default=[5, 10, 20], metavar="N",
                   help="denoiser-call budgets (default: 5 10 20)")
    p.add_argument("--seed", type=int, default=0, help="seed of the mixture and the noise")
    p.add_argument("--samplers", nargs="+", metavar="SPEC", default=None,
                   help="sfumato samplers, optionally with keywords, e.g. 'unipc(order=2)' "
                        "(default: the recommended ones; sfumato.bench.compare)")
    p.add_argument("--grids", nargs="+", metavar="SPEC", default=None,
                   help="sigma grids by name, optionally with keywords, e.g. "
                        "'polyexponential(rho=2)' (default: the recommended ones; names: "
                        f"{', '.join(GRIDS)})")
    p.add_argument("--mixture", default=None,
                   help="the exact Gaussian-mixture model (sfumato.bench.MIXTURES; default: "
                        "img1, lighter-tailed than the full benchmark's img3, so a minute "
                        "gives tight intervals)")
    p.add_argument("--schedule", default="scaled_linear", choices=["scaled_linear", "linear"],
                   help="VP beta schedule, 1000 steps (default: %(default)s)")
    p.add_argument("--batch", type=_positive_int, default=None, metavar="N",
                   help="number of samples (default: enough for narrow intervals; at most 32 "
                        "with --quick)")
    p.add_argument("--quick", action="store_true",
                   help="fewer samples and a coarser reference (a few seconds)")
    p.add_argument("--optimize", nargs="*", metavar="SAMPLER", default=None,
                   help="also run these samplers on a sigma grid optimised for the model "
                        "(sfumato.calibrate; 1024 calibration draws, 64 with --quick); with no "
                        "name: the recommended sampler")
    p.add_argument("--tune", nargs="*", metavar="SAMPLER", default=None,
                   help="also run these UniPC samplers with coefficients tuned to the model "
                        "(sfumato.calibrate.tune_coefficients; 2048 draws, 128 with --quick); "
                        "with no name: the recommended sampler")
    p.add_argument("--no-diffusers", action="store_true", help="sfumato samplers only")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_compare)

    p = sub.add_parser("train", help="train (or resume) a run from a JSON config",
                       description="Train a model; running the same command again resumes "
                                   "from DIR/checkpoint.")
    p.add_argument("config", help="JSON config file (see configs/)")
    p.add_argument("--out", required=True, metavar="DIR", help="run directory")
    _add_set_option(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_train)

    from .distill import DEFAULT_METHOD, METHODS

    p = sub.add_parser("distill", help="distil a trained run into a 1-4 step student",
                       description="Distil the diffusion run TEACHER into a few-step student "
                                   "run in DIR (sfumato.distill); running the same command "
                                   "again resumes it. Sample the student with 'sfumato sample "
                                   "DIR' (its own few-step sampler, 1 step by default).")
    p.add_argument("teacher", metavar="TEACHER", help="the teacher's run directory")
    p.add_argument("--method", default=DEFAULT_METHOD, choices=sorted(METHODS),
                   help="distillation method (default: %(default)s)")
    p.add_argument("--out", required=True, metavar="DIR", help="the student's run directory")
    p.add_argument("--config", default=None, metavar="FILE.json",
                   help="overrides of the student's config: any run config section, the "
                        "method's settings in 'distill'")
    _add_set_option(p)
    p.add_argument("--steps", type=_positive_int, default=None,
                   help="training steps (default: the method's)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_distill)

    from .cli_cascade import add_parsers as add_cascade_parsers
    from .cli_cascade import add_sample_option
    from .samplers import SAMPLERS, TABLE_SAMPLERS

    sampler_names = sorted([*SAMPLERS, *TABLE_SAMPLERS])
    p = sub.add_parser("sample", help="sample a trained run",
                       description="Sample a trained run: FILE.png writes a grid, FILE.npz "
                                   "writes 'images' (uint8 NHWC) and 'labels' if conditional.")
    p.add_argument("run", metavar="DIR", help="run directory")
    p.add_argument("--sampler", default=None, choices=sampler_names, metavar="NAME",
                   help="sampler name (default: the run's config); see 'sfumato samplers'")
    p.add_argument("--steps", type=_positive_int, default=None, help="number of steps")
    p.add_argument("--n", type=_positive_int, default=64, help="number of samples")
    p.add_argument("--seed", type=int, default=0, help="seed (sample i depends only on it)")
    p.add_argument("--class", dest="class_label", type=_class_label, default="auto",
                   metavar="K|none",
                   help="class label for a class-conditional model, or 'none' for "
                        "unconditional (default: classes in turn; unconditional with "
                        "--control, whose hint fixes the content)")
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
    p.add_argument("--noise", metavar="NOISE.npz", default=None,
                   help="start from this noise ('sfumato invert'; one sample per row) with "
                        "the inversion's sampler, steps and conditioning unless given")
    add_sample_option(p)  # --aug-sigma, for a cascade
    p.add_argument("--out", required=True, metavar="FILE", help="output .png or .npz")
    p.set_defaults(func=_cmd_sample)
    add_cascade_parsers(sub)

    from .cli_data import add_parsers as add_data_parsers
    from .cli_edit import add_parsers
    from .cli_latent import add_parsers as add_latent_parsers
    from .cli_personalize import add_parsers as add_personalize_parsers

    add_parsers(sub, sampler_names)
    add_latent_parsers(sub)
    add_personalize_parsers(sub)
    add_data_parsers(sub)

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
    p.add_argument("--n", type=_positive_int, default=500,
                   help="held-out images an autoencoder run's reconstructions are scored on "
                        "(default 500)")
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
    except SfumatoError as e:
        if args.debug:
            raise
        stopped = isinstance(e, TrainingError)  # the input was fine; the run could not go on
        print(f"sfumato {args.command}: {type(e).__name__ if stopped else 'error'}: {e}",
              file=sys.stderr)
        return 1 if stopped else 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
