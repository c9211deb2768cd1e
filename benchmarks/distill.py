"""Distillation on the demo teacher: for each method, FD / floor and class accuracy at 1, 2
and 4 NFE next to the teacher's best training-free sampler at the same NFE and the teacher
at 35 NFE (Heun, 18 steps), with each student's distillation CPU-minutes; the guided
student's class accuracy (CAS) and FD at w = 1.5 and 3 in 1-2 NFE next to the teacher with
classifier-free guidance at 35 NFE.

    python benchmarks/distill.py                        # teacher runs/demo (trained if absent)
    python benchmarks/distill.py --teacher runs/mnist --methods consistency --n 2000

FD is measured twice: in the data set's classifier features (``fd/floor``, what ``sfumato
evaluate`` reports) and, as a check in a second feature space, on raw pixels (``pix/floor``);
each next to its own real-vs-real floor. Students are distilled (or resumed) into
``OUT/<method>`` with each method's defaults; run this alone: the CPU-minutes are process time
of the training loop. Writes ``OUT/results.json``, ``OUT/table.md`` and one 10x10 grid per
method, ``OUT/<method>.png`` (2 steps, one row per class).
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import torch

import sfumato
from sfumato.data import get_dataset
from sfumato.distill import METHODS
from sfumato.files import write_json_atomic
from sfumato.imageio import save_grid
from sfumato.metrics import evaluate_images
from sfumato.sigmas import get_sigmas

#: the teacher's training-free samplers tried at each NFE (the best one is reported):
#: (sampler, steps) pairs that cost exactly that many denoiser calls, each on Karras grids
#: ending at each of GRID_ENDS (then 0: a high last level helps at few steps)
BASELINES = {1: [("euler", 1)],
             2: [("euler", 2), ("dpmpp_2m", 2), ("unipc", 2)],
             4: [("euler", 4), ("dpmpp_2m", 4), ("unipc", 4), ("dpmpp_3m", 4)]}
GRID_ENDS = (0.002, 0.3, 1.0, 2.5)
NFES = (1, 2, 4)


def score(x: torch.Tensor, labels, data, seed: int) -> dict:
    """FD / floor in classifier features and on pixels, class accuracy."""
    m = evaluate_images(x, data, labels=labels, seed=seed)
    p = evaluate_images(x, data, labels=None, seed=seed,
                        feature_extractor=lambda im: im.flatten(1))
    return {"fd_ratio": m["fd_ratio"], "accuracy": m.get("accuracy"),
            "pix_ratio": p["fd_ratio"]}


def teacher_rows(teacher, data, n: int, seed: int, ref_seed: int) -> list[dict]:
    rows = []
    for nfe in NFES:
        best = None
        for (sampler, steps), end in itertools.product(BASELINES[nfe], GRID_ENDS):
            sig = get_sigmas("karras", steps, sigma_min=end, sigma_max=80.0)
            out = teacher.sample(n, sampler=sampler, sigmas=sig, seed=seed)
            r = {"method": f"teacher {sampler} (karras to {end:g})", "nfe": nfe,
                 **score(out.x, out.labels, data, ref_seed)}
            if best is None or r["fd_ratio"] < best["fd_ratio"]:
                best = r
        rows.append(best)
    out = teacher.sample(n, sampler="heun", steps=18, seed=seed)
    rows.append({"method": "teacher heun", "nfe": 35, **score(out.x, out.labels, data, ref_seed)})
    return rows


def guided_rows(student, teacher, data, n: int, seed: int, ref_seed: int) -> list[dict]:
    rows = []
    for w in (1.5, 3.0):
        for k in (1, 2):
            out = student.sample(n, steps=k, guidance=w, seed=seed)
            rows.append({"method": "guided student", "w": w, "nfe": k,
                         **score(out.x, out.labels, data, ref_seed)})
        out = teacher.sample(n, sampler="heun", steps=18, guidance=w, seed=seed)
        rows.append({"method": "teacher CFG heun", "w": w, "nfe": 70,
                     **score(out.x, out.labels, data, ref_seed)})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--teacher", type=Path, default=Path("runs/demo"))
    ap.add_argument("--methods", nargs="+", default=sorted(METHODS), choices=sorted(METHODS))
    ap.add_argument("--out", type=Path, default=Path("runs/distill-bench"))
    ap.add_argument("--n", type=int, default=1000, help="samples per measurement")
    ap.add_argument("--seed", type=int, default=12345, help="sampling seed")
    ap.add_argument("--ref-seed", type=int, default=0, help="held-out subset seed")
    ap.add_argument("--steps", type=int, default=None, help="train.steps (default: method's)")
    args = ap.parse_args(argv)

    if not (args.teacher / "checkpoint").is_dir():
        from sfumato.demo import run_demo

        run_demo(args.teacher, progress=False)
    teacher = sfumato.load(args.teacher)
    data = get_dataset(teacher.config["data"])
    rows = teacher_rows(teacher, data, args.n, args.seed, args.ref_seed)
    for method in args.methods:
        out = args.out / method
        t0 = time.time()
        sfumato.distill(args.teacher, method, out=out, steps=args.steps, progress=False)
        student = sfumato.load(out)
        cpu = student.run.train_cpu_seconds / 60
        def at(k: int, student=student, method=method):  # progressive: one per step count
            return student if method != "progressive" else sfumato.load(
                METHODS[method].round_checkpoint(student.run, k))

        for k in NFES:
            drawn = at(k).sample(args.n, steps=k, seed=args.seed)
            rows.append({"method": method, "nfe": k, "cpu_min": cpu,
                         "wall_s": time.time() - t0,
                         **score(drawn.x, drawn.labels, data, args.ref_seed)})
        y = torch.arange(10).repeat_interleave(10)
        save_grid(at(2).sample(100, steps=2, class_labels=y, seed=0).to_uint8(),
                  args.out / f"{method}.png", nrow=10)
        if method == "guided":
            rows += guided_rows(student, teacher, data, args.n, args.seed, args.ref_seed)
        print(json.dumps(rows[-1]), flush=True)
    write_json_atomic(args.out / "results.json", {"teacher": str(args.teacher), "n": args.n,
                                                  "rows": rows})
    lines = ["| method | w | NFE | FD / floor | pixel FD / floor | class accuracy | "
             "distillation CPU-min |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        acc = "" if r.get("accuracy") is None else f"{r['accuracy']:.3f}"
        cpu = f"{r['cpu_min']:.1f}" if "cpu_min" in r else ""
        lines.append(f"| {r['method']} | {r.get('w', '')} | {r['nfe']} | {r['fd_ratio']:.2f} | "
                     f"{r['pix_ratio']:.2f} | {acc} | {cpu} |")
    table = "\n".join(lines)
    (args.out / "table.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
