"""Text conditioning, measured: does the named digit appear, and do attribute words move the
measured attribute the intended way?

    python benchmarks/text.py RUN_DIR [--n 50] [--guidance 1 2 3]

1. Digit accuracy: for each digit k, ``n`` samples from each of four phrasings ("the digit
   seven", "a 7", "handwritten 7", "number seven"), classified by the metrics' clean-data
   classifier (never seen by the diffusion model); with FD of the pooled samples.
2. Attributes: for each attribute and digit, ``n`` samples from "a <low> k" and "a <high> k"
   ("thin"/"thick", "left-leaning"/"right-leaning", "small"/"large"); the attribute is
   measured on the samples (:func:`sfumato.text.digit_attributes`). Reported: mean
   difference high - low (in the attribute's units) and the fraction of digits where it has
   the intended sign.

Writes ``RUN_DIR/text/eval.json`` and prints the tables.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from sfumato import load
from sfumato.data import get_dataset
from sfumato.files import write_json_atomic
from sfumato.metrics import evaluate_images
from sfumato.text import NUMBER_WORDS, digit_attributes

PHRASINGS = ("the digit {w}", "a {k}", "handwritten {k}", "number {w}")
PAIRS = {"thickness": ("thin", "thick"), "slant": ("left-leaning", "right-leaning"),
         "size": ("small", "large")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--n", type=int, default=50, help="samples per prompt")
    ap.add_argument("--guidance", type=float, nargs="+", default=[1.0, 2.0, 3.0])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    model = load(args.run)
    if model.text is None:
        raise SystemExit(f"{args.run} is not a text-conditioned run")
    data = get_dataset(model.config["data"])
    result: dict = {"run": str(args.run), "n_per_prompt": args.n, "digits": [],
                    "attributes": []}
    print("| guidance | digit accuracy | FD | FD floor |\n|---|---|---|---|")
    for w in args.guidance:
        prompts = [p.format(k=k, w=NUMBER_WORDS[k]) for k in range(10) for p in PHRASINGS]
        xs, ys = [], []
        for i, p in enumerate(prompts):
            drawn = model.sample(args.n, prompt=p, guidance=w, seed=args.seed + i)
            xs.append(drawn.x)
            ys.append(drawn.labels)
        x, y = torch.cat(xs), torch.cat(ys)
        m = evaluate_images(x, data, labels=y, floor_repeats=1)
        row = {"guidance": w, "accuracy": m["accuracy"], "fd": m["fd"],
               "fd_floor": m["fd_floor"], "n": len(x)}
        result["digits"].append(row)
        print(f"| {w:g} | {row['accuracy']:.3f} | {row['fd']:.2f} | {row['fd_floor']:.2f} |",
              flush=True)
    w_attr = max(result["digits"], key=lambda r: r["accuracy"])["guidance"]
    print(f"\nattributes at guidance {w_attr:g} (high - low prompt, measured on samples)\n"
          "| attribute | mean difference | digits with the intended sign |\n|---|---|---|")
    for attr, (low, high) in PAIRS.items():
        diffs = []
        for k in range(10):
            means = []
            for j, word in enumerate((low, high)):
                x = model.sample(args.n, prompt=f"a {word} {k}", guidance=w_attr,
                                 seed=args.seed + 1000 + 10 * k + j).x
                means.append(float(digit_attributes(x)[attr].mean()))
            diffs.append(means[1] - means[0])
        d = torch.tensor(diffs)
        row = {"attribute": attr, "low": low, "high": high, "guidance": w_attr,
               "mean_difference": float(d.mean()), "per_digit": diffs,
               "intended_sign_fraction": float((d > 0).float().mean())}
        result["attributes"].append(row)
        print(f"| {attr} ({low} -> {high}) | {row['mean_difference']:+.4f} | "
              f"{row['intended_sign_fraction']:.1f} |", flush=True)
    ref = digit_attributes(data.train)
    result["data_attribute_std"] = {k: float(v.std()) for k, v in ref.items()}
    print("(training-set std of each attribute: " + ", ".join(
        f"{k} {v:.4f}" for k, v in result["data_attribute_std"].items()) + ")")
    out = args.run / "text" / "eval.json"
    write_json_atomic(out, result)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
