"""Argument types and options shared by the command-line modules (:mod:`sfumato.cli`,
:mod:`sfumato.cli_edit`)."""

from __future__ import annotations

import argparse


def _class_label(text: str) -> int | str | None:
    """``--class``: a class index, ``none`` for unconditional (``auto``: the default)."""
    special = {"none": None, "auto": "auto"}
    if text.lower() in special:
        return special[text.lower()]
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a class index or 'none' (unconditional), got {text!r}") from None


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def _add_set_option(p: argparse.ArgumentParser) -> None:
    """``--set KEY=VALUE`` (repeatable) on a command that takes a config; the items land in
    ``args.sets`` for :func:`sfumato.train.config.apply_overrides`, which checks them."""
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="change one config value, e.g. --set train.steps=100 --set "
                        "model.channel_mult=[1,2] (KEY: a dotted config key; VALUE: JSON, or "
                        "else a plain string); repeatable, applied in order")


def _trained(verb: str, summary: dict) -> str:
    """The first half of a training command's closing line: "VERB to step N in S s (M
    CPU-minutes)" from a trainer's summary."""
    return (f"{verb} to step {summary['steps']} in {summary['seconds']:.0f} s "
            f"({summary['train_cpu_seconds'] / 60:.1f} CPU-minutes)")
