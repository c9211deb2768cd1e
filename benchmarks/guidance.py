"""Guidance sweep: classification accuracy of samples (CAS) and FD vs guidance scale for
classifier-free guidance, classifier guidance and autoguidance on one class-conditional run.

    python benchmarks/guidance.py RUN_DIR                # e.g. the demo run (runs/demo)
    python benchmarks/guidance.py RUN_DIR --n 1000 --bad RUN_DIR/checkpoints/step-00000500

- CFG: the run's conditional and null-class branches, one batched forward pass per step.
- Classifier guidance: the run's unconditional (null-class) branch guided by a
  noise-conditional classifier trained with ``configs/digits_classifier.json`` (trained into
  ``RUN_DIR/guidance/classifier`` if absent, ~20 CPU-s).
- Autoguidance: the run guided by its own earliest kept checkpoint (``--bad`` to choose).

CAS and FD use the metrics' clean-data classifier (:mod:`sfumato.metrics`), never the guiding
one. Writes ``RUN_DIR/guidance/sweep.json`` and ``sweep.png`` and prints the table.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from sfumato import load
from sfumato.data import get_dataset
from sfumato.files import write_json_atomic
from sfumato.guidance import AutoGuidance, ClassifierFreeGuidance, ClassifierGuidance
from sfumato.metrics import evaluate_images
from sfumato.samplers import sample_from
from sfumato.train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
SCALES = {
    "cfg": [1.0, 1.5, 2.0, 3.0, 4.0, 6.0],
    "classifier": [0.0, 1.0, 2.0, 4.0, 8.0],
    "autoguidance": [1.0, 1.5, 2.0, 3.0],
}


def earliest_checkpoint(run: Path) -> Path:
    hist = sorted((run / "checkpoints").glob("step-*"))
    if not hist:
        raise SystemExit(f"{run} keeps no earlier checkpoints; pass --bad DIR")
    return hist[0]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--n", type=int, default=1000, help="samples per point")
    ap.add_argument("--bad", type=Path, default=None, help="autoguidance's weaker model")
    ap.add_argument("--classifier", type=Path, default=None,
                    help="classifier run (default: train one into RUN/guidance/classifier)")
    ap.add_argument("--seed", type=int, default=12345)
    args = ap.parse_args(argv)

    out = args.run / "guidance"
    model = load(args.run)
    if not model.num_classes:
        raise SystemExit("the sweep needs a class-conditional run (model.conditional = true)")
    clf_dir = args.classifier or out / "classifier"
    if args.classifier is None:
        Trainer(ROOT / "configs" / "digits_classifier.json", clf_dir, progress=False).run()
    clf = load(clf_dir)
    bad_dir = args.bad or earliest_checkpoint(args.run)
    bad = load(bad_dir)
    nc = model.num_classes
    null = {"class_labels": nc}
    guided = {
        "cfg": lambda w: ClassifierFreeGuidance(model.denoiser, w, uncond=null),
        "classifier": lambda s: ClassifierGuidance(model.denoiser, clf.denoiser, s),
        "autoguidance": lambda w: AutoGuidance(model.denoiser, bad.denoiser, w),
    }
    data = get_dataset(model.config["data"])
    labels = torch.arange(args.n) % nc
    rows = []
    for kind, scales in SCALES.items():
        for w in scales:
            t0 = time.time()
            x = sample_from(guided[kind](w), (args.n, *model.shape), model.config["sample"],
                            seed=args.seed, class_labels=labels)
            m = evaluate_images(x, data, n=args.n, labels=labels)
            rows.append({"guidance": kind, "scale": w, "cas": m["accuracy"], "fd": m["fd"],
                         "fd_floor": m["fd_floor"], "seconds": round(time.time() - t0, 1)})
            r = rows[-1]
            print(f"{kind:13s} {w:5.2f}  CAS {r['cas']:.3f}  FD {r['fd']:7.2f}  "
                  f"(floor {r['fd_floor']:.2f})  {r['seconds']:.0f} s", flush=True)
    base = next(r["fd"] for r in rows if r["guidance"] == "cfg" and r["scale"] == 1.0)
    cfg_rows = [r for r in rows if r["guidance"] == "cfg"]
    ok = [r for r in cfg_rows if r["fd"] <= 1.5 * base]
    best = max(ok, key=lambda r: r["cas"])
    summary = {"run": str(args.run), "bad": str(bad_dir), "classifier": str(clf_dir),
               "n": args.n, "unguided_fd": base, "rows": rows,
               "best_cfg": best, "bar": {"cas": 0.95, "fd_vs_unguided": 1.5},
               "bar_met": best["cas"] >= 0.95}
    write_json_atomic(out / "sweep.json", summary)
    plot(rows, out / "sweep.png")
    print("\n| guidance | scale | CAS | FD | FD / unguided FD |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['guidance']} | {r['scale']:g} | {r['cas']:.3f} | {r['fd']:.2f} | "
              f"{r['fd'] / base:.2f} |")
    print(f"\nbest CFG scale with FD <= 1.5x unguided ({base:.2f}): w = {best['scale']:g}, "
          f"CAS {best['cas']:.3f}, FD {best['fd']:.2f}  -> bar (CAS >= 0.95) "
          f"{'met' if summary['bar_met'] else 'NOT met'}")
    print(f"wrote {out / 'sweep.json'} and {out / 'sweep.png'}")
    return 0


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for kind in SCALES:
        rs = [r for r in rows if r["guidance"] == kind]
        s = [r["scale"] for r in rs]
        a.plot(s, [r["cas"] for r in rs], "o-", label=kind)
        b.plot(s, [r["fd"] for r in rs], "o-", label=kind)
    a.axhline(0.95, color="gray", ls="--", lw=0.8)
    a.set(xlabel="guidance scale", ylabel="CAS (accuracy of samples)", title="CAS")
    b.axhline(rows[0]["fd_floor"], color="gray", ls="--", lw=0.8, label="real-vs-real floor")
    b.set(xlabel="guidance scale", ylabel="FD (classifier features)", title="FD",
          yscale="log")
    a.legend()
    b.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
