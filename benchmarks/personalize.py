"""Personalisation: a concept the base never saw, learned from five images, per method.

    python benchmarks/personalize.py --base runs/text --concept cat --out runs/personalize-bench
    python benchmarks/personalize.py --base runs/mnist --concept giraffe --methods lora dreambooth
    python benchmarks/personalize.py --base runs/emoji_ldm --concept giraffe --methods lora

For one base run (a MiniLM text run or a class-conditional run, in pixel or latent space)
and one animal class of the ``animal-mnist`` silhouettes (:mod:`sfumato.data.animals`,
resized to the base's image size; painted orange on white for an RGB base such as the emoji
latent model):

1. five training images of the concept are written as PNGs to ``OUT/concept-CONCEPT/`` and
   each method (``--methods``: ``lora``, ``lora-noprior``, ``dreambooth``,
   ``dreambooth-noprior``, ``textual-inversion``) fine-tunes the base on them
   (``sfumato.finetune``, token ``sks``) into ``OUT/METHOD``; its process CPU-minutes
   (prior images included), trainable parameters and file size are recorded;
2. subject fidelity: ``--n`` samples of "a sks" (the concept's class slot on a class base)
   are judged by two concept-vs-rest classifiers trained on *other* images of the concept:
   against the base's data (a SmallCNN), and against the base's data and the other animals
   (another seed, twice the width; at 8 x 8 a cat and a dog are close, so this judge is
   strict); the mean nearest-neighbour distance (RMS, in [-1, 1] units) of
   the samples to the five training images, next to that of held-out concept images, shows
   copying;
3. prior preservation: ``--n-prior`` samples of the base's ordinary prompts (each class in
   turn): class accuracy and FD / floor in the base data's classifier features (and alt FD in
   a second classifier), before (the base) and after each method.

CFG ``--guidance`` for every text prompt. Writes OUT/results.json, OUT/table.md and a grid
per method (``OUT/METHOD/sks.png``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from latent import alt_classifier

import sfumato
from sfumato.data import get_dataset
from sfumato.data.animals import ANIMALS, load_animals
from sfumato.data.base import ImageData, resize, to_uint8
from sfumato.files import write_results
from sfumato.imageio import save_grid, save_png
from sfumato.metrics import evaluate_images
from sfumato.metrics.classifier import RECIPES, train_classifier
from sfumato.run import Run

METHODS = {"lora": {"method": "lora"},
           "lora-noprior": {"method": "lora", "prior_preservation": False},
           "dreambooth": {"method": "dreambooth"},
           "dreambooth-noprior": {"method": "dreambooth", "prior_preservation": False},
           "textual-inversion": {"method": "textual-inversion"}}


#: the ink colour of the silhouettes for an RGB base (RGB in [0, 1]; on white, as emoji are)
INK = (0.95, 0.55, 0.10)


def painted(x: torch.Tensor, channels: int) -> torch.Tensor:
    """Silhouettes x (N, 1, H, W) in [-1, 1] (ink high) as ``channels``-channel images: as they
    are for a grey base, for an RGB base the ink in :data:`INK` on a white ground."""
    if channels == 1:
        return x
    w = (x + 1) / 2
    ink = torch.tensor(INK).reshape(1, 3, 1, 1)
    return ((1 - w) + w * ink) * 2 - 1


def concept_sets(concept: str, shape: tuple[int, ...], n_subject: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(subject images, other images of the concept, other animals) at the base's image
    shape (C, H, W)."""
    animals = load_animals()
    k = ANIMALS.index(concept)
    x = torch.cat([animals.train, animals.heldout])
    y = torch.cat([animals.labels, animals.heldout_labels])
    x = painted(resize(x, tuple(shape[1:])), shape[0])
    mine = x[y == k]
    return mine[:n_subject], mine[n_subject:], x[y != k]


def binary_judge(pos: torch.Tensor, neg: torch.Tensor, seed: int, width: int = 1):
    """A SmallCNN (the default recipe, 1500 steps, ``width`` times as wide) telling ``pos``
    (label 1) from ``neg``; every 5th image is held out for its accuracy."""
    x = torch.cat([pos, neg])
    y = torch.cat([torch.ones(len(pos)), torch.zeros(len(neg))]).long()
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    test = torch.arange(len(x)) % 5 == 0
    data = ImageData("judge", x[~test], y[~test], x[test], y[test], num_classes=2)
    base = RECIPES["default"]
    return train_classifier(data, {**base, "steps": 1500, "seed": seed,
                                   "width": width * base["width"]})


def accept_rate(judges, x: torch.Tensor) -> list[float]:
    """Fraction of the images x that each binary judge calls label 1, one per judge."""
    return [float((c.predict(x) == 1).float().mean()) for c in judges]


def concept_classifiers(others: torch.Tensor, rest_animals: torch.Tensor, base_data
                        ) -> list:
    """Two concept-vs-rest classifiers (label 1 = the concept), trained on other images of
    the concept: against the base's training images, and against those and the other animals
    (another seed, twice the width: the stricter judge)."""
    return [binary_judge(others, base_data.train, 0),
            binary_judge(others, torch.cat([base_data.train, rest_animals]), 2, width=2)]


def nn_distance(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Mean over x of the RMS distance to the nearest image of ref."""
    d = torch.cdist(x.flatten(1), ref.flatten(1)) / x[0].numel() ** 0.5
    return float(d.min(1).values.mean())


def concept_samples(m, n: int, guidance: float, token: str) -> torch.Tensor:
    if m.text:
        return m.sample(n, prompt=f"a {token}", guidance=guidance, seed=1).x
    return m.sample(n, class_labels=m.num_classes - 1, guidance=guidance, seed=1).x


def ordinary(m, n: int, guidance: float, data, alt, base_state: dict) -> dict:
    """Class accuracy and FD / floor of the base's ordinary prompts (or labels): the base
    run's prompt of each class (``base_state``; emoji), else the digit prompts."""
    base_classes = data.num_classes
    labels = torch.arange(n) % base_classes
    if m.text:
        from sfumato.text.captions import default_prompts

        prompts = base_state.get("class_prompts")
        prompts = [prompts[i % len(prompts)] for i in range(n)] if prompts else \
            default_prompts(n, base_classes)
        x = m.sample(n, prompt=prompts, guidance=guidance, seed=2).x
    else:
        x = m.sample(n, class_labels=labels, guidance=guidance, seed=2).x
    r = evaluate_images(x, data, labels=labels)
    a = evaluate_images(x, data, classifier=alt)
    return {"accuracy": r["accuracy"], "fd_ratio": r["fd_ratio"], "alt_fd_ratio": a["fd_ratio"]}


def dotted(x: torch.Tensor) -> torch.Tensor:
    """The style: strokes drawn in dots (the ink kept on a checkerboard), (N, C, H, W)."""
    h, w = x.shape[-2:]
    board = ((torch.arange(h)[:, None] + torch.arange(w)[None, :]) % 2 == 0).float()
    return ((x + 1) / 2 * board) * 2 - 1


def style_judges(subject: torch.Tensor, rest: torch.Tensor) -> tuple:
    """Judges for ZipLoRA that each read one attribute whatever the other is: the concept vs
    the rest (digits and other animals), each plain and dotted; and dotted vs plain strokes,
    over the concept and the rest."""
    both = torch.cat([subject, rest])
    return (binary_judge(torch.cat([subject, dotted(subject)]), torch.cat([rest, dotted(rest)]),
                         0),
            binary_judge(dotted(both), both, 1))


def zip_part(args, subject_run: Path, others: torch.Tensor, rest: torch.Tensor, data,
             rows: list, lines: list) -> None:
    """ZipLoRA vs weight averaging: a style LoRA ('zzq', five dotted digits 0-4 captioned
    "a zzq 0" ... "a zzq 4", so zzq is an adjective as "thick" in "a thick 7") and the subject
    LoRA, joined; each model's samples of "a sks", "a zzq 7" (a digit the style never showed)
    and "a zzq sks", read by a concept judge and a dotted-strokes judge that each ignore the
    other attribute."""
    from sfumato.personalize.combine import merge_run, zip_runs
    from sfumato.personalize.ziplora import naive_merge

    style_dir = args.out / "style-dotted"
    style_dir.mkdir(parents=True, exist_ok=True)
    plain = data.train[[int((data.labels == k).nonzero()[0]) for k in range(5)]]
    for i, img in enumerate(to_uint8(dotted(plain)).numpy()):
        save_png(img, style_dir / f"{i}.png")
        (style_dir / f"{i}.txt").write_text(f"a zzq {i}")  # the style word as an adjective
    c0 = time.process_time()
    sfumato.finetune(args.base, style_dir, out=args.out / "style", method="lora",
                     token="zzq", progress=False)
    style_cpu = (time.process_time() - c0) / 60
    concept_judge, dotted_judge = style_judges(others, torch.cat([data.train[5:], rest]))
    c0 = time.process_time()
    zip_runs(subject_run, args.out / "style", args.out / "zip", steps=args.zip_steps)
    zip_cpu = (time.process_time() - c0) / 60
    net = Run(args.base).network()
    naive_merge(net, subject_run / "lora.safetensors", args.out / "style" / "lora.safetensors"
                ).save(args.out / "average.safetensors")
    merge_run(args.base, args.out / "average.safetensors", args.out / "average")
    lines += ["", f"## ZipLoRA: '{args.concept}' (sks) in dotted strokes (zzq)", "",
              f"Style LoRA {style_cpu:.2f} CPU-min; zip {args.zip_steps} steps "
              f"{zip_cpu:.2f} CPU-min. Fraction of {args.n} samples per prompt that a "
              f"{args.concept}-vs-rest judge (plain and dotted images on both sides; accuracy "
              f"{concept_judge.test_acc:.3f}) and a dotted-vs-plain judge (digits and animals "
              f"on both sides; accuracy {dotted_judge.test_acc:.3f}) accept.", "",
              "| model | prompt | concept | dotted |", "|---|---|---|---|"]
    joint = ("a sks", "a zzq 7", "a zzq sks")
    models = (("subject LoRA", subject_run, ("a sks", "a zzq sks")),
              ("style LoRA", args.out / "style", ("a zzq 7", "a zzq sks")),
              ("weight average", args.out / "average", joint),
              ("ZipLoRA", args.out / "zip", joint))
    for name, run, prompts in models:
        m = sfumato.load(run)
        for prompt in prompts:
            x = m.sample(args.n, prompt=prompt, guidance=args.guidance, seed=1).x
            if prompt == "a zzq sks":
                save_grid(to_uint8(x[:64]), args.out / f"zip-{name.split()[0]}.png", nrow=8)
            acc = accept_rate((concept_judge, dotted_judge), x)
            rows.append({"zip": name, "prompt": prompt, "accept": acc})
            lines.append(f"| {name} | {prompt} | {acc[0]:.2f} | {acc[1]:.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", type=Path, default=Path("runs/text"))
    ap.add_argument("--concept", default="giraffe", choices=ANIMALS)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--n-subject", type=int, default=5)
    ap.add_argument("--steps", type=int, default=None, help="train.steps (method default)")
    ap.add_argument("--n", type=int, default=200, help="'a sks' samples")
    ap.add_argument("--n-prior", type=int, default=500, help="ordinary-prompt samples")
    ap.add_argument("--guidance", type=float, default=3.0)
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="finetune settings, e.g. prior_images=100 lora.rank=8")
    ap.add_argument("--out", type=Path, default=Path("runs/personalize-bench"))
    ap.add_argument("--zip", action="store_true",
                    help="also ZipLoRA vs weight averaging (a text base; needs method lora)")
    ap.add_argument("--zip-steps", type=int, default=100)
    args = ap.parse_args()
    from sfumato.train.config import apply_overrides

    torch.set_num_threads(1)
    extra = apply_overrides({}, args.set)
    base_run = Run(args.base)
    data = get_dataset(base_run.config["data"])
    subject, others, rest = concept_sets(args.concept, base_run.image_shape, args.n_subject)
    folder = args.out / f"concept-{args.concept}"
    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(to_uint8(subject).numpy()):
        save_png(img, folder / f"{i}.png")
    clfs = concept_classifiers(others, rest, data)
    alt = alt_classifier(data)
    held = others[:args.n]
    rows = [{"concept": args.concept, "classifier_test_acc": [c.test_acc for c in clfs],
             "heldout_accept": accept_rate(clfs, held),
             "heldout_nn": nn_distance(held, subject),
             "subject_accept": accept_rate(clfs, subject)}]
    base_model = sfumato.load(args.base)
    before = ordinary(base_model, args.n_prior, args.guidance, data, alt, base_run.state)
    base_x = concept_samples(base_model, args.n, args.guidance, "sks") if base_model.text \
        else None
    rows.append({"method": "base", **before,
                 **({"accept": accept_rate(clfs, base_x)}
                    if base_x is not None else {})})
    print(rows)
    for name in args.methods:
        out = args.out / name
        c0 = time.process_time()
        sfumato.finetune(args.base, folder, out=out, steps=args.steps, progress=False,
                         **{**METHODS[name], **extra})
        cpu = (time.process_time() - c0) / 60
        m = sfumato.load(out)
        x = concept_samples(m, args.n, args.guidance, "sks")
        save_grid(to_uint8(x[:64]), out / "sks.png", nrow=8)
        ema = out / "checkpoint" / "ema.safetensors"
        trainable = sum(t.numel() for t in Run(out).weights().values())
        rows.append({"method": name, "cpu_minutes": cpu, "trainable": trainable,
                     "file_bytes": ema.stat().st_size,
                     "base_bytes": (Path(base_run.checkpoint) / "ema.safetensors").stat().st_size,
                     "accept": accept_rate(clfs, x),
                     "nn": nn_distance(x, subject),
                     **ordinary(m, args.n_prior, args.guidance, data, alt, base_run.state)})
        print(rows[-1])
    lines = [f"## Personalisation of {args.base} on '{args.concept}' ({args.n_subject} images)",
             "", f"Concept classifiers' accuracy {rows[0]['classifier_test_acc']}; they accept "
             f"held-out {args.concept} images at {rows[0]['heldout_accept']} and the training "
             f"{args.n_subject} at {rows[0]['subject_accept']}; held-out images' "
             f"NN distance to the training five {rows[0]['heldout_nn']:.3f}.", "",
             "| method | CPU-min | trainable | file / base | 'a sks' accepted | strict | NN dist | "
             "class acc | FD / floor | alt FD / floor |", "|---" * 10 + "|"]
    for r in rows[1:]:
        acc = r.get("accept", ["–", "–"])
        fmt = lambda v: f"{v:.2f}" if isinstance(v, float) else str(v)  # noqa: E731
        size = f"{r['file_bytes'] / r['base_bytes']:.1%}" if "file_bytes" in r else "–"
        lines.append(f"| {r['method']} | {fmt(r.get('cpu_minutes', '–'))} | "
                     f"{r.get('trainable', '–')} | {size} | {fmt(acc[0])} | {fmt(acc[1])} | "
                     f"{fmt(r.get('nn', '–'))} | {r['accuracy']:.3f} | {r['fd_ratio']:.2f} | "
                     f"{r['alt_fd_ratio']:.2f} |")
    if args.zip:
        zip_part(args, args.out / "lora", others, rest, data, rows, lines)
    write_results(args.out, rows, lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
