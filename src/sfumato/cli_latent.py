"""The autoencoder commands of the ``sfumato`` command line: ``reconstruct`` (images through
an autoencoder run and back, with their PSNR), registered by :func:`add_parsers` from
:func:`sfumato.cli.build_parser`. Same conventions as :mod:`sfumato.cli`: parse, call the
library, read and write files, print."""

from __future__ import annotations

import argparse

from .errors import UsageError

__all__ = ["add_parsers"]


def _cmd_reconstruct(args: argparse.Namespace) -> int:
    from .cli_edit import _read_run_images
    from .data import to_uint8
    from .imageio import write_images
    from .metrics import psnr
    from .model import load

    ae = load(args.run)
    if ae.kind != "autoencoder":
        raise UsageError(f"reconstruct needs an autoencoder run; {args.run} is a {ae.kind} run")
    x = _read_run_images(ae, args.input)
    z = ae.encode(x)
    rec = ae.decode(z)
    write_images(to_uint8(rec).numpy(), args.out,
                 **({"latents": z.numpy()} if args.out.endswith(".npz") else {}))
    db = psnr(rec, x)
    print(f"reconstructed {len(x)} image(s) through latents {tuple(z.shape[1:])} "
          f"(f = {ae.net.factor}); PSNR {float(db.mean()):.2f} dB mean, "
          f"{float(db.min()):.2f} worst; wrote {args.out}")
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register ``reconstruct`` on the ``sfumato`` subcommand parser ``sub``."""
    p = sub.add_parser("reconstruct", help="encode and decode images with an autoencoder run",
                       description="Pass images through an autoencoder run (sfumato train "
                                   "configs/<data>_autoencoder.json): FILE.png writes a grid, "
                                   "FILE.npz 'images' (uint8 NHWC) and the scaled 'latents'.")
    p.add_argument("run", metavar="DIR", help="autoencoder run directory")
    p.add_argument("--input", required=True, metavar="IMG",
                   help="an image file or an .npz with 'images' (uint8 NHWC), at the run's size")
    p.add_argument("--out", required=True, metavar="FILE", help=".png grid or .npz arrays")
    p.set_defaults(func=_cmd_reconstruct)
