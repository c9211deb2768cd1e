"""The data commands of the ``sfumato`` command line, registered by :func:`add_parsers` from
:func:`sfumato.cli.build_parser`::

    sfumato data fetch emoji [--cache DIR] [--tarball FILE.tgz] [--sha256 HEX]
                             [--background white|black|both]

Same conventions as :mod:`sfumato.cli`: parse, call the library, print."""

from __future__ import annotations

import argparse

__all__ = ["add_parsers"]


def _cmd_fetch_emoji(args: argparse.Namespace) -> int:
    import numpy as np

    from .data.emoji import PACKAGE, fetch_emoji

    backgrounds = ("white", "black") if args.background == "both" else (args.background,)
    folder = fetch_emoji(args.cache, tarball=args.tarball, sha256=args.sha256,
                         backgrounds=backgrounds)
    paths = [folder / f"emoji-{b}.npz" for b in backgrounds]
    with np.load(paths[0], allow_pickle=False) as z:
        labels, categories = z["labels"], [str(c) for c in z["categories"]]
        version, sha = str(z["version"]), str(z["sha256"])
    counts = np.bincount(labels, minlength=len(categories))
    print(f"{PACKAGE} {version} (SHA-256 {sha}): {labels.size} emoji in {len(categories)} "
          f"categories")
    width = max(map(len, categories))
    for name, count in zip(categories, counts, strict=True):
        print(f"  {name:<{width}}  {count:5d}")
    print(f"wrote {', '.join(map(str, paths))} (64x64 RGB, labels, captions)")
    print("Emoji art: Twemoji by Twitter, Inc and other contributors, licensed CC-BY 4.0 "
          "(https://creativecommons.org/licenses/by/4.0/); credit it with what you make")
    return 0


def add_parsers(sub) -> None:
    """Register ``data`` (with ``data fetch emoji``) on the subparsers ``sub``."""
    p = sub.add_parser("data", help="fetch the data sets that are downloaded once",
                       description="Data sets that are not shipped in a wheel: fetch them once "
                                   "into the cache, then name them in a config's data section.")
    actions = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    p = actions.add_parser("fetch", help="download a data set and build its arrays",
                           description="Download a data set into the cache and build the "
                                       "arrays its loader reads.")
    sets = p.add_subparsers(dest="dataset", metavar="DATASET", required=True)
    p = sets.add_parser(
        "emoji", help="the Twemoji set (npm package emoji-datasource-twitter)",
        description="Pack the pinned emoji-datasource-twitter version with npm (or take "
                    "--tarball), check its SHA-256, unpack it safely and write "
                    "emoji-white.npz / emoji-black.npz: the base emoji (no skin-tone "
                    "variants), 64x64 RGB on a white or black background, with category "
                    "labels and captions. Load them with {\"name\": \"emoji\"}. Twemoji art "
                    "is CC-BY 4.0 (Twitter, Inc and other contributors).")
    p.add_argument("--cache", default=None, metavar="DIR",
                   help="the emoji folder (default: $SFUMATO_CACHE/emoji, else "
                        "~/.cache/sfumato/emoji; another folder is then the data set's 'path')")
    p.add_argument("--tarball", default=None, metavar="FILE.tgz",
                   help="the package tarball downloaded by hand ('npm pack "
                        "emoji-datasource-twitter@VERSION' elsewhere, or from "
                        "registry.npmjs.org) instead of running npm")
    p.add_argument("--sha256", default=None, metavar="HEX",
                   help="the expected SHA-256 of --tarball (default: the pinned version's)")
    p.add_argument("--background", default="both", choices=["white", "black", "both"],
                   help="background to composite the transparent images on (default: both)")
    p.set_defaults(func=_cmd_fetch_emoji)
