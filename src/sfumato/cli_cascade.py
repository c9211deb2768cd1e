"""The cascade commands of the ``sfumato`` command line: ``cascade`` (join a base run and
super-resolution runs into a cascade folder), registered by :func:`add_parsers` from
:func:`sfumato.cli.build_parser`, and what ``sfumato sample`` and ``sfumato info`` do with a
cascade folder (:func:`sample_cascade`, :func:`info_cascade`). Same conventions as
:mod:`sfumato.cli`: parse, call the library (:mod:`sfumato.cascade`), read and write files,
print."""

from __future__ import annotations

import argparse
from pathlib import Path

from ._cli_args import _positive_int
from .errors import UsageError

__all__ = ["add_parsers", "sample_cascade", "info_cascade"]


def _cmd_cascade(args: argparse.Namespace) -> int:
    from .cascade import CascadeModel, make_cascade

    sample = {k: v for k, v in (("sampler", args.sampler), ("steps", args.steps))
              if v is not None}
    aug = args.aug_sigma[0] if args.aug_sigma and len(args.aug_sigma) == 1 else args.aug_sigma
    path = make_cascade([args.base, *args.superres], args.out, aug_sigma=aug, sample=sample)
    model = CascadeModel.load(args.out)
    chain = " -> ".join("x".join(map(str, s)) for s in model.shapes)
    print(f"wrote {path}: {chain} in {len(model.stages)} stages, augmentation level(s) "
          f"{model.aug_levels()}; sample it with 'sfumato sample {args.out} --out x.png'")
    return 0


def sample_cascade(model, args: argparse.Namespace) -> int:
    """``sfumato sample`` of a cascade folder (``model``: its
    :class:`~sfumato.cascade.CascadeModel`): a .png grid of the final samples, or an .npz of
    ``images``, ``labels`` and every earlier stage's ``stage<k>_images``."""
    import numpy as np

    from .data import to_uint8
    from .imageio import write_images

    if getattr(model, "kind", None) != "cascade":
        raise UsageError(f"--aug-sigma sets the conditioning noise of a cascade's "
                         f"super-resolution stages; {args.run} is not a cascade folder (make "
                         "one with 'sfumato cascade BASE SR --out DIR')")
    unused = [flag for flag, value in (
        ("--classifier", args.classifier), ("--autoguide", args.autoguide),
        ("--guidance-interval", args.guidance_interval),
        ("--guidance-rescale", args.guidance_rescale), ("--prompt", args.prompt),
        ("--control", args.control), ("--sigmas", args.sigmas), ("--noise", args.noise))
        if value]
    if unused:
        raise UsageError(f"{', '.join(unused)} do(es) not apply to a cascade; sample its "
                         "base run with them, or leave them out")
    out = Path(args.out)
    if out.suffix not in (".png", ".npz"):
        raise UsageError(f"--out must end in .png (a grid) or .npz (arrays); got {str(out)!r}")
    kw = {} if args.class_label == "auto" else {"class_labels": args.class_label}
    drawn = model.sample(args.n, seed=args.seed, aug_sigma=args.aug_sigma,
                         sampler=args.sampler, steps=args.steps, guidance=args.guidance, **kw)
    arrays = {} if out.suffix == ".png" else {
        f"stage{k}_images": to_uint8(x).numpy() for k, x in enumerate(drawn.stages[:-1])}
    if drawn.labels is not None and out.suffix == ".npz":
        arrays["labels"] = drawn.labels.cpu().numpy().astype(np.int64)
    write_images(to_uint8(drawn.x).numpy(), out, nrow=model.num_classes or None, **arrays)
    print(f"wrote {args.n} samples ({'x'.join(map(str, model.shape))}, augmentation level(s) "
          f"{drawn.aug_sigma}) to {out}")
    return 0


def info_cascade(path: str) -> int:
    """``sfumato info`` of a cascade folder: its stages, their status and settings."""
    from .cascade import describe_cascade

    for label, value in describe_cascade(path):
        print(f"{label + ':':<12} {value}")
    return 0


def _level(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a noise level >= 0, got {text!r}") from None
    if not v >= 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite noise level >= 0, got {text!r}")
    return v


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register ``cascade`` on the ``sfumato`` subcommand parser ``sub``."""
    from .samplers import SAMPLERS

    p = sub.add_parser(
        "cascade", help="join a base run and super-resolution runs into a cascade",
        description="Join the run BASE (low resolution) and super-resolution runs SR (config "
                    "section superres, e.g. configs/mnist_superres.json; each taking the "
                    "previous stage's output size) into a cascade folder DIR: writes "
                    "DIR/cascade.json with each stage's path and weights hash (a retrained "
                    "or moved-away stage is refused when the cascade is loaded). Sample it "
                    "with 'sfumato sample DIR', describe it with 'sfumato info DIR'.")
    p.add_argument("base", metavar="BASE", help="the base run directory (lowest resolution)")
    p.add_argument("superres", metavar="SR", nargs="+",
                   help="super-resolution run directories, in order of growing resolution")
    p.add_argument("--out", required=True, metavar="DIR", help="the cascade folder")
    p.add_argument("--aug-sigma", type=_level, nargs="+", default=None, metavar="S",
                   help="sampling-time noise level of the upsampled conditioning image (Ho et "
                        "al. 2022, conditioning augmentation): one, or one per SR stage "
                        "(default: each SR run's superres.aug_sigma)")
    p.add_argument("--sampler", default=None, choices=sorted(SAMPLERS), metavar="NAME",
                   help="sampler of every stage (default: each run's)")
    p.add_argument("--steps", type=_positive_int, default=None,
                   help="steps of every stage (default: each run's)")
    p.set_defaults(func=_cmd_cascade)


def add_sample_option(p: argparse.ArgumentParser) -> None:
    """``--aug-sigma`` on ``sfumato sample`` (a cascade's sampling-time level)."""
    p.add_argument("--aug-sigma", type=_level, default=None, metavar="S",
                   help="for a cascade: the noise level of every super-resolution stage's "
                        "conditioning image (default: the cascade's)")
