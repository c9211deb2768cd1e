"""Latent diffusion: autoencoder reconstructions, and pixel vs latent models side by side.

    python benchmarks/latent.py --parts ae --ae-runs runs/mnist_ae runs/mnist_ae_l1 ...
    python benchmarks/latent.py --parts ldm --pixel-run runs/mnist --latent-run runs/mnist_ldm

1. ``ae``: each autoencoder run's reconstructions of ``--n`` held-out images (PSNR, and the
   Fréchet distance of reconstructions vs real images in the data set's classifier features,
   rFD, next to the real-vs-real floor), codebook use for VQ, training CPU-minutes (the
   perceptual feature net's training included) and parameters. Train the ablations with
   ``--set`` (``reconstruction.perceptual=0``, ``reconstruction.gan=0``) of one config.
2. ``ldm``: a pixel run and a latent run of the same data: FD / floor and class accuracy of
   ``--n`` samples (CFG ``--guidance``, the runs' own sampler and steps unless given), training
   CPU-minutes (for the latent run, its autoencoder's added), and sampling throughput
   (images per CPU-second and per wall-second, decoding included) measured alternately in
   one process at the same sampler and NFE, with the ratio.
3. ``emoji``: pixel vs latent text-to-image runs on 32x32 emoji (configs/emoji_unet.json,
   configs/emoji_ldm.json): FD / floor of samples from held-out captions, category accuracy
   of samples from category prompts, throughput, and a caption-prompted grid per model.

Writes OUT/results.json and OUT/table.md (of the parts run).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import sfumato
from sfumato.files import write_results
from sfumato.metrics import evaluate_images
from sfumato.nets import count_params
from sfumato.run import Run


def _cpu_minutes(run: Run) -> float:
    return (run.train_cpu_seconds or 0.0) / 60


def _model_cpu_minutes(m) -> float:
    """Training CPU-minutes of a loaded model, its autoencoder's included (latent runs)."""
    ae = getattr(m, "autoencoder", None)
    return _cpu_minutes(m.run) + (_cpu_minutes(ae.run) if ae is not None else 0.0)


def ae_part(runs: list[Path], n: int, rows: list, lines: list) -> None:
    lines += [f"## Autoencoders, {n} held-out images", "",
              "alt: the Fréchet distance in a second classifier's features (another seed, "
              "twice the width).", "",
              "| run | kind | f | latent | l1 / perceptual / GAN | params | train CPU-min | "
              "PSNR dB | rFD | floor | rFD / floor | alt rFD / floor | codes used | "
              "perplexity |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for d in runs:
        ae = sfumato.load(d)
        m = ae.evaluate(n=n)
        alt = alt_classifier(sfumato.data.get_dataset(ae.run.config["data"]))
        m["alt_rfd_ratio"] = ae.evaluate(n=n, classifier=alt)["rfd_ratio"]
        rc = ae.run.config["reconstruction"]
        row = {"part": "ae", "run": str(d), "kind": ae.net.kind, "factor": ae.net.factor,
               "latent": list(ae.latent_shape), "l1": rc["l1"], "perceptual": rc["perceptual"],
               "gan": rc["gan"], "params": count_params(ae.net),
               "train_cpu_minutes": _cpu_minutes(ae.run), **m}
        rows.append(row)
        codes = (f"{m['codes_used']:.2f} | {m['perplexity']:.1f}" if "perplexity" in m
                 else "- | -")
        lines.append(f"| {d.name} | {row['kind']} | {row['factor']} | "
                     f"{'x'.join(map(str, row['latent']))} | {rc['l1']:g} / {rc['perceptual']:g}"
                     f" / {rc['gan']:g} | {row['params']:,} | {row['train_cpu_minutes']:.1f} | "
                     f"{m['psnr']:.2f} | {m['rfd']:.2f} | {m['fd_floor']:.2f} | "
                     f"{m['rfd_ratio']:.2f} | {m['alt_rfd_ratio']:.2f} | {codes} |")
        print(lines[-1], flush=True)
    lines.append("")


def _throughput(models: dict, n: int, rounds: int, **kw) -> dict[str, dict[str, float]]:
    """Images per CPU-second and per wall-second of ``model.sample(n)``, the models taking
    turns ``rounds`` times (the first, warm-up call of each is not timed)."""
    for m in models.values():
        m.sample(4, **kw)
    spent = {k: [0.0, 0.0] for k in models}
    for r in range(rounds):
        for k, m in models.items():
            c, w = time.process_time(), time.perf_counter()
            m.sample(n, seed=r, **kw)
            spent[k][0] += time.process_time() - c
            spent[k][1] += time.perf_counter() - w
    return {k: {"images_per_cpu_s": n * rounds / c, "images_per_s": n * rounds / w}
            for k, (c, w) in spent.items()}


def alt_classifier(data):
    """A second feature space for checking a Fréchet distance: a classifier of the data set
    with another seed and twice the width of the evaluation one (trained once, cached)."""
    from sfumato.metrics import RECIPES, get_classifier

    base = RECIPES.get(data.name, RECIPES["default"])
    return get_classifier(data, recipe={**base, "seed": 2, "width": 2 * base["width"]})


def ldm_part(pixel: Path, latent: Path, n: int, guidance: float, sampler: str | None,
             steps: int | None, rows: list, lines: list) -> None:
    models = {"pixel": sfumato.load(pixel), "latent": sfumato.load(latent)}
    data = sfumato.data.get_dataset(models["pixel"].config["data"])
    alt = alt_classifier(data)
    kw = {"sampler": sampler, "steps": steps, "guidance": guidance}
    speed = _throughput(models, 200, 3, **kw)
    lines += [f"## Pixel vs latent, {n} samples, CFG {guidance:g}", "",
              "FD / floor in the evaluation classifier's features, and (alt) in a second "
              "classifier's (another seed, twice the width).", "",
              "| model | data shape | params | train CPU-min | FD | floor | FD / floor | "
              "accuracy | alt FD / floor | alt accuracy | images / CPU-s | images / s |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, m in models.items():
        out = m.sample(n, seed=12345, **kw)
        e = evaluate_images(out.x, data, labels=out.labels, seed=0)
        a = evaluate_images(out.x, data, labels=out.labels, seed=0, classifier=alt)
        cpu = _model_cpu_minutes(m)
        row = {"part": "ldm", "model": name, "run": str(m.run.path), "shape": list(m.shape),
               "params": count_params(m.denoiser), "train_cpu_minutes": cpu,
               "sampler": out.sampler, "nfe_steps": len(out.sigmas) - 1, **speed[name],
               **{k: e[k] for k in ("fd", "fd_floor", "fd_ratio", "accuracy")},
               "alt_fd_ratio": a["fd_ratio"], "alt_accuracy": a["accuracy"]}
        rows.append(row)
        lines.append(f"| {name} ({m.run.path.name}) | {'x'.join(map(str, m.shape))} | "
                     f"{row['params']:,} | {cpu:.1f} | {e['fd']:.2f} | {e['fd_floor']:.2f} | "
                     f"{e['fd_ratio']:.2f} | {e['accuracy']:.3f} | {a['fd_ratio']:.2f} | "
                     f"{a['accuracy']:.3f} | {row['images_per_cpu_s']:.1f} | "
                     f"{row['images_per_s']:.1f} |")
        print(lines[-1], flush=True)
    ratio = speed["latent"]["images_per_cpu_s"] / speed["pixel"]["images_per_cpu_s"]
    lines += ["", f"Sampling throughput latent / pixel at {rows[-1]['sampler']}, "
                  f"{rows[-1]['nfe_steps']} steps: {ratio:.2f}x per CPU-second "
                  f"({speed['latent']['images_per_s'] / speed['pixel']['images_per_s']:.2f}x "
                  "per wall-second), decoding included.", ""]
    rows.append({"part": "ldm", "throughput_ratio_cpu": ratio})
    print(lines[-2], flush=True)


#: the caption-prompted grid of the docs: one row per prompt
GRID_PROMPTS = ("red heart", "smiling face with sunglasses", "cat face", "slice of pizza",
                "rocket", "japan flag", "evergreen tree", "sun with face")


def emoji_part(pixel: Path, latent: Path, n: int, guidance: float, rows: list, lines: list,
               out: Path) -> None:
    """Pixel vs latent text-to-image on emoji: FD / floor of samples from the held-out
    captions (cycled) vs the held-out images, category accuracy of samples from category
    prompts ("a {category} image", ``n // 9`` per category), and a caption-prompted grid."""
    from sfumato.data import to_uint8
    from sfumato.imageio import save_grid
    from sfumato.metrics import get_classifier

    models = {name: sfumato.load(d) for name, d in (("pixel", pixel), ("latent", latent))
              if d is not None and d.name != "none"}
    if not models:
        raise SystemExit("--parts emoji needs --emoji-pixel-run or --emoji-latent-run")
    data = sfumato.data.get_dataset(next(iter(models.values())).config["data"])
    clf = get_classifier(data)
    caps = [data.heldout_captions[i % len(data.heldout_captions)] for i in range(n)]
    per = max(1, n // data.num_classes)
    cats = torch.arange(data.num_classes).repeat_interleave(per)
    cat_prompts = [f"a {data.class_names[int(c)].lower()} image" for c in cats]
    speed = _throughput(models, 64, 2, guidance=guidance, prompt=caps[0])
    lines += [f"## Emoji 32x32 text-to-image, pixel vs latent, CFG {guidance:g}", "",
              f"FD of {n} samples from held-out captions vs the {len(data.heldout)} held-out "
              "images (the emoji classifier's features; floor: real vs real); category "
              f"accuracy of {per} samples per category prompt 'a CATEGORY image' (the "
              f"classifier reads real held-out emoji at {clf.test_acc:.2f}).", "",
              "| model | data shape | params | train CPU-min | FD | floor | FD / floor | "
              "category acc. | images / CPU-s |", "|---|---|---|---|---|---|---|---|---|"]
    grids = []
    for name, m in models.items():
        x = m.sample(n, seed=12345, guidance=guidance, prompt=caps).x
        e = evaluate_images(x, data, seed=0)
        xc = m.sample(len(cat_prompts), seed=777, guidance=guidance, prompt=cat_prompts).x
        acc = float((clf.predict(xc) == cats).float().mean())
        cpu = _model_cpu_minutes(m)
        row = {"part": "emoji", "model": name, "run": str(m.run.path), "fd": e["fd"],
               "fd_floor": e["fd_floor"], "fd_ratio": e["fd_ratio"], "category_acc": acc,
               "train_cpu_minutes": cpu, "params": count_params(m.denoiser), **speed[name]}
        rows.append(row)
        lines.append(f"| {name} | {'x'.join(map(str, m.shape))} | {row['params']:,} | "
                     f"{cpu:.1f} | {e['fd']:.1f} | {e['fd_floor']:.1f} | {e['fd_ratio']:.2f} | "
                     f"{acc:.3f} | {row['images_per_cpu_s']:.1f} |")
        print(lines[-1], flush=True)
        prompts = [p for p in GRID_PROMPTS for _ in range(8)]
        grids.append(m.sample(len(prompts), seed=5, guidance=guidance, prompt=prompts).x)
    for name, g in zip(models, grids, strict=True):
        save_grid(to_uint8(g), out / f"emoji_{name}_grid.png", nrow=8)
    lines += ["", "Grids (rows: " + ", ".join(f'"{p}"' for p in GRID_PROMPTS) + "): "
              + ", ".join(f"{out}/emoji_{name}_grid.png" for name in models), ""]


PARTS = ("ae", "ldm", "emoji")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    ap.add_argument("--ae-runs", nargs="+", type=Path, default=[Path("runs/mnist_ae")])
    ap.add_argument("--pixel-run", type=Path, default=Path("runs/mnist"))
    ap.add_argument("--latent-run", type=Path, default=Path("runs/mnist_ldm"))
    ap.add_argument("--emoji-pixel-run", type=Path, default=Path("runs/emoji_pixel"),
                    help="'none': the latent run alone")
    ap.add_argument("--emoji-latent-run", type=Path, default=Path("runs/emoji_ldm"),
                    help="'none': the pixel run alone")
    ap.add_argument("--emoji-guidance", type=float, default=3.0)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--guidance", type=float, default=1.0)
    ap.add_argument("--sampler", default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("runs/latent-bench"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    rows: list = []
    lines: list = []
    if "ae" in a.parts:
        ae_part(a.ae_runs, a.n, rows, lines)
    if "ldm" in a.parts:
        ldm_part(a.pixel_run, a.latent_run, a.n, a.guidance, a.sampler, a.steps, rows, lines)
    if "emoji" in a.parts:
        emoji_part(a.emoji_pixel_run, a.emoji_latent_run, a.n, a.emoji_guidance, rows, lines,
                   a.out)
    write_results(a.out, rows, lines)


if __name__ == "__main__":
    main()
