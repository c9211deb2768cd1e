"""The personalisation commands of the ``sfumato`` command line: ``finetune`` (a new concept
from a folder of images, :mod:`sfumato.personalize`), ``lora merge`` and ``lora zip``,
registered by :func:`add_parsers` from :func:`sfumato.cli.build_parser`. Same conventions as
:mod:`sfumato.cli`: parse, call the library, read and write files, print."""

from __future__ import annotations

import argparse
from pathlib import Path

from ._cli_args import _add_set_option, _positive_int, _trained

__all__ = ["add_parsers"]


def _cmd_finetune(args: argparse.Namespace) -> int:
    from .personalize.finetune import finetune
    from .train.config import apply_overrides, read_config_file

    config = read_config_file(args.config) if args.config else {}
    config = apply_overrides(config, args.sets)
    settings = {"token": args.token, "class_word": args.class_word}
    if args.prior_preservation is not None:
        settings["prior_preservation"] = args.prior_preservation
    summary = finetune(args.run, args.images, out=args.out, method=args.method, config=config,
                       steps=args.steps, progress=not args.no_progress, **settings)
    prompt = f"a {args.token}"
    print(f"{_trained('fine-tuned', summary)}; sample it with 'sfumato sample {args.out} "
          f"--prompt \"{prompt}\" --out FILE.png' (a class base: --class with the new label, "
          "the last one)")
    return 0


def _cmd_lora_merge(args: argparse.Namespace) -> int:
    from .personalize.combine import merge_run

    out = merge_run(args.run, args.lora, args.out)
    print(f"merged {args.lora} into {args.run}: wrote the run {out}")
    return 0


def _cmd_lora_zip(args: argparse.Namespace) -> int:
    from .personalize.combine import zip_runs

    s = zip_runs(args.subject, args.style, args.out, steps=args.steps, lr=args.lr,
                 penalty=args.penalty)
    print(f"zipped {args.subject} and {args.style} in {s['steps']} steps (loss "
          f"{s['first_loss']:.4g} -> {s['last_loss']:.4g}, {s['cpu_seconds'] / 60:.1f} "
          f"CPU-minutes): wrote {Path(args.out) / 'lora.safetensors'}")
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register ``finetune`` and ``lora`` (``merge``, ``zip``) on the subcommand parser."""
    from .personalize.adapt import METHODS

    p = sub.add_parser("finetune", help="teach a trained run a new concept from a few images",
                       description="Fine-tune the run RUN on the images in --images, bound to "
                                   "the word --token (a text base) or a new class (a class "
                                   "base), into the run --out; running the same command again "
                                   "resumes it.")
    p.add_argument("run", metavar="RUN", help="the base run directory")
    p.add_argument("--images", required=True, metavar="DIR",
                   help="folder of PNG/JPEG images of the concept (any size; resized); "
                        "NAME.txt beside NAME.png is its caption (with the token)")
    p.add_argument("--token", default="sks", help="the concept's new word (default: sks)")
    p.add_argument("--class-word", default=None, metavar="WORD",
                   help="the concept's class noun: captions 'a TOKEN WORD', prior 'a WORD'")
    p.add_argument("--method", default="lora", choices=METHODS,
                   help="what trains (default: %(default)s)")
    p.add_argument("--prior-preservation", action=argparse.BooleanOptionalAction,
                   default=None, help="DreamBooth's prior-preservation loss (default: on)")
    p.add_argument("--steps", type=_positive_int, default=None,
                   help="training steps (default: the method's)")
    p.add_argument("--config", default=None, metavar="FILE.json",
                   help="overrides: 'train', 'sample', 'text' keys and 'finetune' settings")
    _add_set_option(p)
    p.add_argument("--out", required=True, metavar="DIR", help="the personalised run")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_finetune)

    lora = sub.add_parser("lora", help="merge or zip LoRA runs",
                          description="Work with LoRA runs (sfumato finetune --method lora).")
    lsub = lora.add_subparsers(dest="lora_command", required=True, metavar="COMMAND")
    p = lsub.add_parser("merge", help="fold a LoRA into its base: a plain run",
                        description="Merge a LoRA run (or LoRA file) into its base run RUN and "
                                    "write the result as a new run in --out.")
    p.add_argument("run", metavar="RUN", help="the base run directory")
    p.add_argument("lora", metavar="LORA", help="a LoRA run directory or .safetensors file")
    p.add_argument("--out", required=True, metavar="DIR", help="the merged run (new)")
    p.set_defaults(func=_cmd_lora_merge)
    p = lsub.add_parser("zip", help="ZipLoRA: one adapter for a subject and a style",
                        description="Merge a subject LoRA run and a style LoRA run of one text "
                                    "base by learned per-column coefficients (ZipLoRA) into "
                                    "the run --out.")
    p.add_argument("subject", metavar="SUBJECT_DIR")
    p.add_argument("style", metavar="STYLE_DIR")
    p.add_argument("--steps", type=_positive_int, default=100)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--penalty", type=float, default=0.01,
                   help="weight of the |cosine| penalty between the coefficient vectors")
    p.add_argument("--out", required=True, metavar="DIR", help="the zipped run (new)")
    p.set_defaults(func=_cmd_lora_zip)
