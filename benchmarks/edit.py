"""Editing on the digits demo model: inversion accuracy, SDEdit's realism/faithfulness,
DiffEdit, and instruction editing (InstructPix2Pix) with an instruct run.

    python benchmarks/edit.py [--run runs/demo] [--instruct-run runs/instruct]
        [--text-run runs/text] [--parts inversion sdedit diffedit instruct text]
        [--out runs/edit-bench]

1. Inversion: 50 held-out digits (uint8, as a user has them) inverted and sampled back with
   the same sampler and 50 steps; reconstruction PSNR (mean and worst image) of plain DDIM
   inversion (one explicit step per level, ``iters=0``) and of sfumato's per-step solve, at
   CFG 1 (unconditional, and conditioned on the true class) and CFG 3 (true class); and
   null-text inversion (Mokady et al. 2023) at CFG 3.
2. SDEdit: 300 held-out digits made into blocky "sketches" (2x2 block averages, off the
   data distribution) and edited unconditionally at strengths 0.1 .. 1.0 (18 Heun steps
   from the starting level, whatever the strength): realism (FD / floor in the classifier's
   features), faithfulness (RMS distance to the sketch) and class kept (accuracy against the
   digit's label); one plot, OUT/sdedit.png (copied to docs/img/ by hand).
3. DiffEdit: 100 held-out digits, source = the true class, target = the next class
   ((label + 1) mod 10): fraction the classifier reads as the target, mask area, and
   whether the pixels outside the mask are the input's exactly, over encoding strength,
   mask threshold and guidance.
4. InstructPix2Pix: each of the six edits asked of the 300 held-out digits (trained with
   configs/digits_instruct.json): the fraction whose measured attribute moved as asked and
   the class kept, at a few (image, text) guidance scales, and with an unseen phrasing.
5. Text edits (a text run, configs/digits_text.json): Prompt-to-Prompt on null-text
   inverted held-out digits and DiffEdit, each asked "a thin 3" -> "a thick 3" and the like
   (the true digit in both prompts) on 100 digits: moved as asked, class kept.

Writes OUT/results.json and OUT/table.md (of the parts run).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import sfumato
from sfumato.data import from_uint8, get_dataset, to_uint8
from sfumato.files import write_results
from sfumato.metrics import evaluate_images, psnr


def inversion(model, data, rows: list, lines: list) -> None:
    lines += ["## Inversion, 50 held-out digits, 50 steps", "",
              "| sampler | CFG | conditioning | inversion | PSNR dB mean | worst | CPU s |",
              "|---|---|---|---|---|---|---|"]
    x = from_uint8(to_uint8(data.heldout[:50]))
    labels = data.heldout_labels[:50]
    cases = [(sampler, guidance, cond, iters) for sampler in ("ddim", "heun")
             for guidance, cond in ((1.0, None), (1.0, labels), (3.0, labels))
             for iters in (0, 20)] + [("ddim", 3.0, labels, "null-text")]
    for sampler, guidance, cond, iters in cases:
        t = time.process_time()
        kw = {"sampler": sampler, "steps": 50, "class_labels": cond, "guidance": guidance}
        if iters == "null-text":
            name = "null-text (Mokady et al.)"
            inv = model.null_text_invert(x, guidance=guidance, steps=50, class_labels=cond)
            back = model.sample(50, noise=inv.x_T / inv.sigmas[0], null_offsets=inv.offsets,
                                **kw).x
        else:
            name = "sfumato (solved)" if iters else "plain DDIM"
            back = model.sample(50, noise=model.invert(x, iters=iters, **kw), **kw).x
        p = psnr(from_uint8(to_uint8(back)), x).clamp_max(99)
        row = {"part": "inversion", "sampler": sampler, "guidance": guidance,
               "conditional": cond is not None, "inversion": name,
               "psnr_mean": float(p.mean()), "psnr_worst": float(p.min()),
               "cpu_s": time.process_time() - t}
        rows.append(row)
        lines.append(f"| {sampler} | {guidance:g} | "
                     f"{'true class' if cond is not None else 'none'} | {name} | "
                     f"{row['psnr_mean']:.1f} | {row['psnr_worst']:.1f} | "
                     f"{row['cpu_s']:.0f} |")
        print(lines[-1], flush=True)
    lines += ["", "PSNR of exact reconstructions (uint8 identical) is capped at 99 dB.", ""]


def sdedit(model, data, rows: list, lines: list, out: Path) -> None:
    lines += ["## SDEdit of blocky sketches of 300 held-out digits, unconditional, 18 Heun "
              "steps", "",
              "| strength | σ_start | FD / floor | RMS to input | class kept |",
              "|---|---|---|---|---|"]
    from sfumato.edit import strength_to_sigma

    sketch = torch.nn.functional.avg_pool2d(data.heldout, 2).repeat_interleave(2, -1) \
        .repeat_interleave(2, -2)
    x = from_uint8(to_uint8(sketch))
    labels = data.heldout_labels
    m0 = evaluate_images(x, data, labels=labels)
    lines.append(f"| 0 (the sketch) | 0 | {m0['fd_ratio']:.2f} | 0 | {m0['accuracy']:.3f} |")
    s = model.run.sampling
    curve = []
    for strength in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0):
        edited = from_uint8(to_uint8(model.edit(x, strength, steps=18, sampler="heun")))
        m = evaluate_images(edited, data, labels=labels)
        rms = float((edited - x).pow(2).flatten(1).mean(1).sqrt().mean())
        sig = strength_to_sigma(strength, s["sigma_min"], s["sigma_max"])
        rows.append({"part": "sdedit", "strength": strength, "sigma_start": sig,
                     "fd_ratio": m["fd_ratio"], "rms_to_input": rms,
                     "class_kept": m["accuracy"]})
        curve.append((rms, m["fd_ratio"], strength))
        lines.append(f"| {strength:g} | {sig:.3g} | {m['fd_ratio']:.2f} | {rms:.3f} | "
                     f"{m['accuracy']:.3f} |")
        print(lines[-1], flush=True)
    lines.append("")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 3.4))
    ax.plot([c[0] for c in curve], [c[1] for c in curve], "o-")
    for rms, fd, strength in curve:
        ax.annotate(f"{strength:g}", (rms, fd), textcoords="offset points", xytext=(4, 4),
                    fontsize=7)
    ax.set_xlabel("RMS distance to the input (faithfulness)")
    ax.set_ylabel("FD / floor (realism)")
    ax.set_title("SDEdit on held-out digits, by strength", fontsize=9)
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / "sdedit.png", dpi=120)


def diffedit(model, data, rows: list, lines: list) -> None:
    lines += ["## DiffEdit, 100 held-out digits, true class -> next class, 20 DDIM steps", "",
              "| strength | threshold | guidance | reads as target | mask area | outside mask "
              "exact | CPU s |", "|---|---|---|---|---|---|---|"]
    from sfumato.metrics.classifier import get_classifier

    clf = get_classifier(data)
    x, labels = from_uint8(to_uint8(data.heldout[:100])), data.heldout_labels[:100]
    target = (labels + 1) % 10
    for strength, threshold, guidance in ((0.5, 0.5, 1.0), (0.7, 0.5, 1.0), (0.7, 0.3, 1.0),
                                          (0.7, 0.3, 3.0), (0.9, 0.2, 3.0)):
        t = time.process_time()
        edited, mask = model.diffedit(x, labels, target, strength=strength, steps=20,
                                      threshold=threshold, guidance=guidance)
        edited = from_uint8(to_uint8(edited))
        hit = float((clf.predict(edited) == target).float().mean())
        exact = bool(((edited - x).abs() * (1 - mask)).max() == 0)
        rows.append({"part": "diffedit", "strength": strength, "threshold": threshold,
                     "guidance": guidance, "target_rate": hit, "mask_area": float(mask.mean()),
                     "outside_exact": exact, "cpu_s": time.process_time() - t})
        lines.append(f"| {strength:g} | {threshold:g} | {guidance:g} | {hit:.2f} | "
                     f"{float(mask.mean()):.2f} | {'yes' if exact else 'no'} | "
                     f"{time.process_time() - t:.0f} |")
        print(lines[-1], flush=True)
    lines.append("")


def _g(v: float | None) -> str:
    return "-" if v is None else f"{v:g}"


def instruct(model, data, rows: list, lines: list,
             scales: tuple = ((1.5, 3.0), (1.5, 1.0)), n: int = 300) -> None:
    """Each edit asked of the n held-out digits: moved in the asked direction, class kept
    (the classifier reads the input's label), for trained and unseen phrasings."""
    from sfumato.edit.attributes import (
        EDITS,
        HELDOUT_INSTRUCTIONS,
        INSTRUCTIONS,
        apply_edit,
        edit_moved,
    )
    from sfumato.metrics.classifier import get_classifier

    clf = get_classifier(data)
    x, labels = from_uint8(to_uint8(data.heldout[:n])), data.heldout_labels[:n]
    s = model.run.sampling
    acc = float((clf.predict(x) == labels).float().mean())
    lines += [f"## InstructPix2Pix, {len(x)} held-out digits per edit, {s['sampler']} {s['steps']} "
              "steps", "", f"Inputs: class accuracy {acc:.2f}. The exact edit (the training "
              "pairs' transform) as a reference.", "",
              "| edit | instruction | s_I | s_T | moved as asked | class kept | RMS change "
              "| CPU s |", "|---|---|---|---|---|---|---|---|"]
    for name in EDITS:
        ref = from_uint8(to_uint8(apply_edit(name, x)))
        cases = [("(exact edit)", None, None, ref)]
        cases += [(INSTRUCTIONS[name][0], si, st, None) for si, st in scales]
        cases.append((HELDOUT_INSTRUCTIONS[name] + " (unseen)", *scales[0], None))
        for text, si, st, out in cases:
            t = time.process_time()
            if out is None:
                out = from_uint8(to_uint8(model.instruct(x, text.removesuffix(" (unseen)"),
                                                         image_guidance=si, guidance=st)))
            moved = float(edit_moved(name, x, out).float().mean())
            kept = float((clf.predict(out) == labels).float().mean())
            rms = float((out - x).pow(2).flatten(1).mean(1).sqrt().mean())
            cpu = time.process_time() - t
            rows.append({"part": "instruct", "edit": name, "instruction": text,
                         "image_guidance": si, "text_guidance": st, "moved": moved,
                         "class_kept": kept, "rms_change": rms, "cpu_s": cpu})
            lines.append(f"| {name} | {text} | {_g(si)} | {_g(st)} | {moved:.2f} | "
                         f"{kept:.2f} | {rms:.3f} | {cpu:.0f} |")
            print(lines[-1], flush=True)
    lines.append("")


#: (edit measured, source prompt, target prompt) for the text model; {k} is the digit
TEXT_EDITS = (("thicker", "a thin {k}", "a thick {k}"), ("thinner", "a thick {k}", "a thin {k}"),
              ("bigger", "a small {k}", "a large {k}"), ("smaller", "a large {k}", "a small {k}"),
              ("slant", "a left-slanted {k}", "a right-slanted {k}"))


def text_edits(model, data, rows: list, lines: list, steps: int = 18,
               guidance: float = 3.0) -> None:
    """Prompt-to-Prompt and DiffEdit on the text model: 100 held-out digits per edit,
    source and target prompts naming the true digit; moved as asked, class kept."""
    from sfumato.edit.attributes import edit_moved
    from sfumato.metrics.classifier import get_classifier

    clf = get_classifier(data)
    x, labels = from_uint8(to_uint8(data.heldout[:100])), data.heldout_labels[:100]
    lines += [f"## Prompt-to-Prompt and DiffEdit on the text model ({model.run.path}), 100 "
              f"held-out digits per edit, CFG {guidance:g}, {steps} steps", "",
              "| edit | prompts | method | moved as asked | class kept | RMS change | CPU s |",
              "|---|---|---|---|---|---|---|"]
    methods = {
        "p2p (null-text, hold 0.6)": lambda xs, a, b: model.prompt_to_prompt(
            a, b, x=xs, guidance=guidance, steps=steps)[1],
        "diffedit (strength 0.7, threshold 0.3)": lambda xs, a, b: model.diffedit(
            xs, a, b, strength=0.7, threshold=0.3, steps=steps, guidance=guidance)[0],
    }
    for name, src, tgt in TEXT_EDITS:
        for method, run in methods.items():
            t = time.process_time()
            out = torch.empty_like(x)
            for k in labels.unique().tolist():  # one prompt pair per digit
                rows_k = labels == k
                out[rows_k] = run(x[rows_k], src.format(k=k), tgt.format(k=k)).cpu()
            out = from_uint8(to_uint8(out))
            moved = float(edit_moved(name, x, out).float().mean())
            kept = float((clf.predict(out) == labels).float().mean())
            rms = float((out - x).pow(2).flatten(1).mean(1).sqrt().mean())
            cpu = time.process_time() - t
            rows.append({"part": "text_edits", "edit": name, "method": method, "moved": moved,
                         "class_kept": kept, "rms_change": rms, "cpu_s": cpu})
            lines.append(f"| {name} | {src} → {tgt} | {method} | {moved:.2f} | {kept:.2f} | "
                         f"{rms:.3f} | {cpu:.0f} |")
            print(lines[-1], flush=True)
    lines.append("")


PARTS = ("inversion", "sdedit", "diffedit", "instruct", "text")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, default=Path("runs/demo"))
    ap.add_argument("--instruct-run", type=Path, default=Path("runs/instruct"),
                    help="an instruct run (configs/digits_instruct.json) for part 'instruct'")
    ap.add_argument("--text-run", type=Path, default=Path("runs/text"),
                    help="a text run (configs/digits_text.json) for part 'text'")
    ap.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    ap.add_argument("--out", type=Path, default=Path("runs/edit-bench"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    model = sfumato.load(args.run)
    data = get_dataset({"name": "digits"})
    rows, lines = [], ["# Editing (benchmarks/edit.py)", ""]
    if "inversion" in args.parts:
        inversion(model, data, rows, lines)
    if "sdedit" in args.parts:
        sdedit(model, data, rows, lines, args.out)
    if "diffedit" in args.parts:
        diffedit(model, data, rows, lines)
    if "instruct" in args.parts:
        instruct(sfumato.load(args.instruct_run), data, rows, lines)
    if "text" in args.parts:
        text_edits(sfumato.load(args.text_run), data, rows, lines)
    write_results(args.out, rows, lines)


if __name__ == "__main__":
    main()
