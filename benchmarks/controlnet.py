"""ControlNet, measured: agreement between the hint and the sample, with and without control.

    python benchmarks/controlnet.py BASE_RUN [--hint edges|mask] [--steps 600]

Trains a ControlNet on the frozen base run (``configs/digits_controlnet.json`` with ``base``
and ``hint`` replaced; into ``BASE_RUN/controlnet-HINT``, resumed if there), then for every
held-out image: its hint, a sample of the controlled model from that hint, and a sample of the
base model alone (same class label when the base is class-conditional, same noise). Reported:
mean IoU between the hint and the same hint recomputed from each sample
(:func:`sfumato.control.hint_iou`), and the held-out images' own IoU with their hints (1 by
construction) as the ceiling; plus FD of the controlled samples. Writes
``RUN/controlnet-HINT/eval.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from sfumato import load
from sfumato.control import hint_iou, make_hint
from sfumato.data import get_dataset
from sfumato.files import write_json_atomic
from sfumato.metrics import evaluate_images
from sfumato.train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("base", type=Path)
    ap.add_argument("--hint", default="edges")
    ap.add_argument("--steps", type=int, default=None, help="training steps (config default)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    cfg = json.loads((ROOT / "configs" / "digits_controlnet.json").read_text())
    cfg["model"].update(base=str(args.base), hint=args.hint)
    if args.steps:
        cfg["train"]["steps"] = args.steps
    out = args.base / f"controlnet-{args.hint}"
    Trainer(cfg, out).run()
    ctrl, base = load(out), load(args.base)
    data = get_dataset(ctrl.config["data"])
    x, y = data.heldout, data.heldout_labels
    hints = make_hint(args.hint, x)
    labels = y if base.num_classes else None
    with_c = ctrl.sample(len(x), hint=hints, class_labels=labels, seed=args.seed).x
    without = base.sample(len(x), class_labels=labels, seed=args.seed).x
    iou_c = hint_iou(make_hint(args.hint, with_c), hints)
    iou_b = hint_iou(make_hint(args.hint, without), hints)
    m = evaluate_images(with_c, data, labels=labels, floor_repeats=1)
    result = {"base": str(args.base), "hint": args.hint, "steps": ctrl.state["step"],
              "n": len(x), "iou_controlled": float(iou_c.mean()),
              "iou_base": float(iou_b.mean()), "fd_controlled": m["fd"],
              "fd_floor": m["fd_floor"], "accuracy_controlled": m.get("accuracy")}
    print(f"hint {args.hint!r}, {len(x)} held-out images: IoU(hint, hint of sample) "
          f"controlled {result['iou_controlled']:.3f} vs base without control "
          f"{result['iou_base']:.3f}; FD of controlled samples {m['fd']:.2f} "
          f"(floor {m['fd_floor']:.2f})")
    write_json_atomic(out / "eval.json", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
