"""Inverse problems: every method against the exact posterior, then on real digits.

    python benchmarks/inverse.py                     # exact-posterior table + digits demo model
    python benchmarks/inverse.py --mnist runs/mnist  # also the MNIST model (slower)
    python benchmarks/inverse.py --skip-toy --skip-digits --mnist runs/mnist \
        --out runs/inverse-mnist                     # MNIST only

1. Exact posterior (:mod:`sfumato.inverse.testbed`): two Gaussian-mixture priors (16-D as
   1x4x4 images, 64-D as 1x8x8), bottom-half inpainting and sr2, σ_y in {0, 0.05}, every
   method at 10 and 50 steps: sliced Wasserstein to exact posterior samples over the
   exact-vs-exact floor, RMS error of the posterior mean (next to an exact sample mean's),
   residual RMS.
2. Real images, unconditional, from uint8 measurements (as ``sfumato restore`` reads them):
   the digits demo model on its 300 held-out images (sr2 with σ_y = 0.05; bottom-half box
   with σ_y = 0) and, with ``--mnist``, an MNIST model on 500 test images (sr4 and
   bottom-half box, σ_y = 0.05). Per method, one posterior sample and the mean of 4:
   PSNR, residual RMS / σ_y, class accuracy against the true label (the data set's
   classifier), FD / floor in its features; baselines bicubic upsampling and mean fill.

Writes OUT/results.json and OUT/table.md.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import sfumato
from sfumato.data import from_uint8, get_dataset, to_uint8
from sfumato.files import write_results
from sfumato.inverse import METHODS, Inpaint, SuperRes, box
from sfumato.inverse.testbed import image_mixture, posterior_case, score
from sfumato.metrics import evaluate_images, psnr


def toy_table(rows: list, lines: list) -> None:
    lines += ["## Exact posterior (Gaussian-mixture prior)", "",
              "| prior | operator | σ_y | method | steps | SW / floor | mean err (floor) | "
              "residual RMS |", "|---|---|---|---|---|---|---|---|"]
    for name, shape, k, seed in (("mix16", (1, 4, 4), 8, 0), ("mix64", (1, 8, 8), 10, 1)):
        gm = image_mixture(shape, k, seed)
        h, w = shape[1:]
        for opname, op in (("box bottom half", box(h // 2, 0, h - h // 2, w, shape)),
                           ("sr2", SuperRes(2, shape))):
            for sy in (0.0, 0.05):
                case = posterior_case(gm, op, sy, measurements=8, n=256)
                for method in METHODS:
                    for steps in (10, 50):
                        t = time.process_time()
                        r = score(case, method, steps)
                        r.update(prior=name, operator=opname, sigma_y=sy,
                                 cpu_s=time.process_time() - t)
                        rows.append(r)
                        lines.append(
                            f"| {name} | {opname} | {sy:g} | {method} | {steps} | "
                            f"{r['sw_ratio']:.2f} | {r['mean_err']:.3f} ({r['mean_floor']:.3f})"
                            f" | {r['residual']:.4f} |")
                        print(lines[-1], flush=True)
    lines.append("")


def image_table(run: Path, data_cfg: dict, n: int, problems: list, rows: list, lines: list,
                draws: tuple = (1, 4), methods: list | None = None) -> None:
    model = sfumato.load(run)
    data = get_dataset(data_cfg)
    x = from_uint8(to_uint8(data.heldout[:n]))  # what a user has: uint8 images
    labels = data.heldout_labels[:n]
    mean_img = from_uint8(to_uint8(data.train.mean(0, keepdim=True)))
    lines += [f"## {run} ({data_cfg['name']}, {n} held-out images, unconditional)", "",
              "| problem | method | draws | PSNR dB | residual / σ_y | class acc | FD / floor "
              "| CPU s |", "|---|---|---|---|---|---|---|---|"]

    def report(problem, method, draws, xr, op, y, sy, cpu):
        xr = from_uint8(to_uint8(xr))
        m = evaluate_images(xr, data, labels=labels)
        res = float(op.residual(xr, y).pow(2).mean().sqrt())
        row = {"run": str(run), "problem": problem, "method": method, "draws": draws,
               "psnr": float(psnr(xr, x).mean()), "residual": res, "residual_over_sigma_y":
               res / sy if sy else None, "accuracy": m["accuracy"], "fd_ratio": m["fd_ratio"],
               "cpu_s": cpu}
        rows.append(row)
        rr = f"{res / sy:.2f}" if sy else f"{res:.4f} (abs)"
        lines.append(f"| {problem} | {method} | {draws} | {row['psnr']:.2f} | {rr} | "
                     f"{row['accuracy']:.3f} | {row['fd_ratio']:.2f} | {cpu:.0f} |")
        print(lines[-1], flush=True)

    for problem, op, sy in problems:
        g = torch.Generator().manual_seed(7)
        y = op.measure(x, sy, generator=g)
        y = from_uint8(to_uint8(y))  # measurements are uint8 images too
        y = op.A(y) if isinstance(op, Inpaint) else y  # (unknown pixels zero)
        if isinstance(op, SuperRes):
            base = F.interpolate(y, scale_factor=op.factor, mode="bicubic",
                                 align_corners=False).clamp(-1, 1)
            report(problem, "bicubic", 1, base, op, y, sy, 0.0)
        else:
            report(problem, "mean fill", 1, op.paste(mean_img.expand_as(x), y), op, y, sy, 0.0)
        for method in methods or METHODS:
            for k in draws:
                t = time.process_time()
                out = model.restore(y, op, method=method, sigma_y=sy, samples=k, seed=0)
                report(problem, method, k, out.x, op, y, sy, time.process_time() - t)
    lines.append("")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--demo", type=Path, default=Path("runs/demo"), help="digits run")
    ap.add_argument("--mnist", type=Path, default=None, help="an MNIST run (optional)")
    ap.add_argument("--mnist-methods", nargs="+", default=["pigdm", "dps", "replace"],
                    choices=list(METHODS), help="methods on MNIST (RePaint costs 10x)")
    ap.add_argument("--mnist-problems", nargs="+", default=["sr4", "box"],
                    choices=["sr4", "box"], help="MNIST problems to run")
    ap.add_argument("--mnist-draws", nargs="+", type=int, default=[1, 4],
                    help="posterior draws averaged, per row (MNIST)")
    ap.add_argument("--skip-toy", action="store_true")
    ap.add_argument("--skip-digits", action="store_true")
    ap.add_argument("--out", type=Path, default=Path("runs/inverse-bench"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows: list = []
    lines: list = ["# Inverse problems (benchmarks/inverse.py)", ""]
    if not args.skip_toy:
        toy_table(rows, lines)
    if not args.demo.is_dir():
        from sfumato.demo import run_demo

        run_demo(args.demo, progress=False)
    if not args.skip_digits:
        image_table(args.demo, {"name": "digits"}, 300,
                    [("sr2 σ_y=0.05", SuperRes(2, (1, 8, 8)), 0.05),
                     ("box bottom half σ_y=0", box(4, 0, 4, 8, (1, 8, 8)), 0.0)], rows, lines)
    if args.mnist is not None:
        problems = {"sr4": ("sr4 σ_y=0.05", SuperRes(4, (1, 28, 28)), 0.05),
                    "box": ("box bottom half σ_y=0.05", box(14, 0, 14, 28, (1, 28, 28)), 0.05)}
        image_table(args.mnist, {"name": "mnist"}, 500,
                    [problems[k] for k in args.mnist_problems], rows, lines,
                    draws=tuple(args.mnist_draws), methods=args.mnist_methods)
    write_results(args.out, rows, lines)


if __name__ == "__main__":
    main()
