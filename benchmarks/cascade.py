"""Cascaded diffusion on MNIST (Ho et al. 2022): a 14x14 base run and a 14 -> 28
super-resolution run, against the single-stage 28x28 run trained for about the same CPU time.

    python benchmarks/cascade.py [--base runs/cascade-base] [--sr runs/cascade-sr]
        [--single runs/mnist] [--sr-noaug runs/cascade-sr-noaug] [--n 1000]
        [--levels 0 0.1 0.25 0.5 1.0] [--sr-steps 18] [--out runs/cascade-bench]

Trained with ``sfumato train configs/mnist_cascade_base.json --out runs/cascade-base`` and
``sfumato train configs/mnist_superres.json --out runs/cascade-sr`` (the single-stage run:
configs/mnist_unet.json). Every row scores n = 1000 samples (seed 12345, classes in turn) by
FD / floor in the MNIST classifier's features and class accuracy against the conditioning
label (:func:`sfumato.metrics.evaluate_images`, reference: held-out subset of ref seed 0):

1. the single-stage run, 18 Heun steps;
2. the base's samples upsampled bilinearly (no super-resolution stage): what the SR stage adds;
3. the SR stage on n random training digits (seed 0) downsampled to 14x14, level 0: the SR
   stage's own quality, with a perfect base, next to those digits themselves (about the
   floor; the held-out split's first digits would not be: MNIST's test set begins with its
   cleaner writers, FD / floor 1.35 for the first 1000);
4. the cascade (made here with :func:`sfumato.cascade.make_cascade`): the base's n samples,
   drawn once with 18 Heun steps, upsampled by the SR stage at each sampling-time
   augmentation level (``--levels``) and SR step count (``--sr-steps``); identical to
   ``CascadeModel.sample(n, seed=12345, aug_sigma=level)``;
5. with ``--sr-noaug``: the same base samples upsampled at level 0 by an SR run trained without
   conditioning augmentation (``--set superres.aug_sigma_max=0 --set model.aug_level=false``).

Train CPU minutes are the runs' own (``train_cpu_seconds``; the cascade's is the sum of its
stages); sampling CPU seconds are this process's, per row (the cascade rows count the base's
share once, in its own row, and the SR stage's per row).

Writes OUT/results.json and OUT/table.md.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import sfumato
from sfumato.cascade import CascadeModel, make_cascade
from sfumato.data import get_dataset
from sfumato.files import write_results
from sfumato.lowres import downsample, upsample
from sfumato.metrics import evaluate_images

SEED, REF_SEED = 12345, 0


def _minutes(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds / 60:.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", type=Path, default=Path("runs/cascade-base"))
    ap.add_argument("--sr", type=Path, default=Path("runs/cascade-sr"))
    ap.add_argument("--single", type=Path, default=Path("runs/mnist"),
                    help="the single-stage 28x28 run to compare with (configs/mnist_unet.json)")
    ap.add_argument("--sr-noaug", type=Path, default=None,
                    help="an SR run trained without conditioning augmentation (row 5)")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--levels", type=float, nargs="+", default=[0.0, 0.1, 0.25, 0.5, 1.0])
    ap.add_argument("--sr-steps", type=int, nargs="+", default=[18])
    ap.add_argument("--out", type=Path, default=Path("runs/cascade-bench"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows: list[dict] = []
    lines = ["# Cascade on MNIST (benchmarks/cascade.py)", "",
             f"n = {args.n} samples (seed {SEED}, classes in turn), FD in the MNIST "
             f"classifier's features against held-out digits (ref seed {REF_SEED}), class "
             "accuracy against the conditioning label; Heun sampler.", "",
             "| model | train CPU-min | aug σ | steps | FD | FD floor | FD / floor | "
             "class acc | sampling CPU s |", "|---|---|---|---|---|---|---|---|---|"]

    def row(name: str, cpu_train: float | None, level, steps: str, x: torch.Tensor,
            labels: torch.Tensor | None, cpu_sample: float) -> None:
        m = evaluate_images(x, data, labels=labels, seed=REF_SEED)
        rows.append({"model": name, "train_cpu_minutes": cpu_train and cpu_train / 60,
                     "aug_sigma": level, "steps": steps, "sample_cpu_s": cpu_sample,
                     **{k: m.get(k) for k in ("fd", "fd_floor", "fd_ratio", "accuracy", "n")}})
        acc = "-" if m.get("accuracy") is None else f"{m['accuracy']:.3f}"
        lines.append(f"| {name} | {_minutes(cpu_train)} | {'-' if level is None else level} | "
                     f"{steps} | {m['fd']:.2f} | {m['fd_floor']:.2f} | {m['fd_ratio']:.2f} | "
                     f"{acc} | {cpu_sample:.0f} |")
        print(lines[-1], flush=True)

    make_cascade([args.base, args.sr], args.out / "cascade", sample={"sampler": "heun"})
    cascade = CascadeModel.load(args.out / "cascade")
    base_model, sr_model = cascade.stages
    data = get_dataset(sr_model.run.config["data"])
    (_, h, w), (_, H, W) = sr_model.low_shape, sr_model.shape
    t = time.process_time()
    base = base_model.sample(args.n, seed=SEED, sampler="heun", steps=18)
    cpu_base = time.process_time() - t
    single = sfumato.load(args.single)
    t = time.process_time()
    out = single.sample(args.n, seed=SEED, sampler="heun", steps=18)
    row(f"single stage {H}x{W} ({args.single})", single.run.train_cpu_seconds, None, "18",
        out.x, out.labels, time.process_time() - t)
    row(f"base {h}x{w}, bilinear to {H}x{W} (no SR)", base_model.run.train_cpu_seconds, None,
        "18", upsample(base.x, (H, W)), base.labels, cpu_base)

    pick = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[:args.n]
    real, real_labels = data.train[pick], data.labels[pick]
    row("those real digits themselves (no model)", None, None, "-", real, real_labels, 0.0)
    t = time.process_time()
    sr_real = sr_model.upsample(downsample(real, (h, w)), aug_sigma=0.0, seed=SEED,
                                class_labels=real_labels, sampler="heun", steps=18)
    row(f"SR of real digits at {h}x{w} (a perfect base)", sr_model.run.train_cpu_seconds, 0.0,
        "18", sr_real.x, real_labels, time.process_time() - t)

    for steps in args.sr_steps:
        for level in args.levels:
            t = time.process_time()
            up = cascade.upsample(base.x, class_labels=base.labels, seed=SEED, aug_sigma=level,
                                  stage_kwargs=[{}, {"steps": steps}])
            row(f"cascade {h} -> {H}", cascade.train_cpu_seconds, level, f"18 + {steps}",
                up.x, base.labels, time.process_time() - t)
    if args.sr_noaug is not None:
        make_cascade([args.base, args.sr_noaug], args.out / "cascade-noaug",
                     sample={"sampler": "heun"})
        plain = CascadeModel.load(args.out / "cascade-noaug")
        t = time.process_time()
        up = plain.upsample(base.x, class_labels=base.labels, seed=SEED, aug_sigma=0.0)
        row(f"cascade {h} -> {H}, SR trained without augmentation", plain.train_cpu_seconds,
            0.0, "18 + 18", up.x, base.labels, time.process_time() - t)
    lines += ["", f"Training: base {_minutes(base_model.run.train_cpu_seconds)} + SR "
              f"{_minutes(sr_model.run.train_cpu_seconds)} CPU-minutes "
              f"(single stage {_minutes(single.run.train_cpu_seconds)}). Sampling the base: "
              f"{cpu_base:.0f} CPU s for {args.n}, counted once (its own row)."]
    write_results(args.out, rows, lines)


if __name__ == "__main__":
    main()
