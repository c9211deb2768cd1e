"""The editing commands of the ``sfumato`` command line: ``invert``, ``edit`` (SDEdit,
DiffEdit) and ``restore`` (inverse problems), registered by :func:`add_parsers` from
:func:`sfumato.cli.build_parser`; ``sfumato sample --noise`` reads what ``invert`` writes
with :func:`read_noise`. Same conventions as :mod:`sfumato.cli`: parse, call the library,
read and write files, print."""

from __future__ import annotations

import argparse
from pathlib import Path

from ._cli_args import _class_label, _positive_int
from .errors import UsageError

__all__ = ["add_parsers", "read_noise"]


def _cmd_restore(args: argparse.Namespace) -> int:
    import numpy as np

    from .data import from_uint8, to_uint8
    from .imageio import read_images, write_images
    from .inverse import Inpaint, parse_operator
    from .model import load

    model = load(args.run)
    if model.is_classifier or len(model.shape) != 3:
        raise UsageError(f"restore needs an image diffusion run; {args.run} is a {model.kind} "
                         f"run of data shape {model.shape}")
    op = parse_operator(args.operator, model.shape, load_mask=_read_mask)
    raw = read_images(args.input, model.shape[0])
    want = (*op.out_shape[1:], op.out_shape[0])
    if tuple(raw.shape[1:]) != want:
        raise UsageError(f"--input {args.input}: {args.operator} on this run's "
                         f"{model.shape[1]}x{model.shape[2]} images measures "
                         f"{want[0]}x{want[1]}x{want[2]} (H x W x C) images; got "
                         f"{'x'.join(map(str, raw.shape[1:]))}")
    y = from_uint8(raw)
    if isinstance(op, Inpaint):  # the damaged pixels are ignored (zeroed)
        y = op.A(y)
    options = {k: v for k, v in (("zeta", args.zeta), ("prior_std", args.prior_std),
                                 ("jump_length", args.jump_length),
                                 ("jump_n_sample", args.jump_n_sample)) if v is not None}
    out = model.restore(y, op, method=args.method, sigma_y=args.noise, seed=args.seed,
                        steps=args.steps, sampler=args.sampler, samples=args.samples,
                        class_labels=args.class_label, prompt=args.prompt,
                        guidance=args.guidance, **options)
    images = to_uint8(out.x).numpy()
    if isinstance(op, Inpaint):  # the known pixels exactly as given
        known = op.mask.permute(1, 2, 0).numpy()[None]
        images = np.where(known, raw, images)
    write_images(images, args.out, residual=out.residual.cpu().numpy())
    rms = float(out.residual.pow(2).mean().sqrt())
    scale = f" = {rms / args.noise:.2f} sigma_y" if args.noise > 0 else ""
    print(f"restored {len(images)} image(s) with {args.method} ({args.samples} posterior "
          f"sample(s) each); measurement residual RMS {rms:.4f}{scale}; wrote {args.out}")
    return 0


def _read_run_images(model, path: str):
    """A user's images at the run's size -> (N, C, H, W) float in [-1, 1]."""
    from .data import from_uint8
    from .imageio import read_images

    c, h, w = model.image_shape
    raw = read_images(path, c)
    if tuple(raw.shape[1:3]) != (h, w):
        raise UsageError(f"--input {path}: the run's images are {h}x{w}; got "
                         f"{raw.shape[1]}x{raw.shape[2]} (resize it first)")
    return from_uint8(raw)


def _cmd_invert(args: argparse.Namespace) -> int:
    import numpy as np

    from .files import atomic_write
    from .model import load

    out = Path(args.out)
    if out.suffix != ".npz":
        raise UsageError(f"--out must end in .npz; got {str(out)!r}")
    model = load(args.run)
    x = _read_run_images(model, args.input)
    cond = {"steps": args.steps, "class_labels": args.class_label, "prompt": args.prompt}
    record = {}
    if args.null_text:
        if args.sampler not in (None, "euler") or not (args.guidance or 1.0) > 1.0:
            raise UsageError("--null-text fits the unconditional branch of guided DDIM "
                             "sampling: give --guidance W > 1 (and --sampler euler or none)")
        sampler = "euler"
        inv = model.null_text_invert(x, guidance=args.guidance, **cond)
        z = inv.x_T / inv.sigmas[0]
        record["null_offsets"] = inv.offsets.cpu().numpy().astype(np.float32)
    else:
        sampler = model.inversion_sampler(args.sampler)
        z = model.invert(x, sampler=sampler, guidance=args.guidance, iters=args.iters, **cond)
    steps = args.steps or int(model.run.sampling["steps"])
    record |= {"noise": z.cpu().numpy().astype(np.float32), "sampler": np.array(sampler),
              "steps": np.array(steps), "class_label": np.array(
                  -1 if args.class_label is None else args.class_label),
              "guidance": np.array(np.nan if args.guidance is None else args.guidance)}
    if args.prompt is not None:
        record["prompt"] = np.array(args.prompt)
    with atomic_write(out) as tmp:
        np.savez(tmp, **record)
    print(f"inverted {len(z)} image(s) with {sampler}, {steps} steps; wrote {out} (sample it "
          f"with 'sfumato sample {args.run} --noise {out} --out FILE')")
    return 0


def read_noise(path: str) -> dict:
    """NOISE.npz from ``sfumato invert`` -> {"noise": tensor, "sampler", "steps",
    "class_label", "guidance", "prompt", "null_offsets"} (None where not recorded)."""
    import numpy as np
    import torch

    try:
        with np.load(path, allow_pickle=False) as f:
            got = {k: f[k] for k in f.files}
        noise = torch.from_numpy(np.asarray(got["noise"], dtype=np.float32))
    except (OSError, ValueError, KeyError) as e:
        raise UsageError(f"--noise {path!r} is not a NOISE.npz from 'sfumato invert' (an "
                         f"array 'noise'): {e}") from None

    def item(key):
        return got[key].item() if key in got else None

    label, guidance = item("class_label"), item("guidance")
    return {"noise": noise, "sampler": item("sampler"), "steps": item("steps"),
            "class_label": None if label is None or label < 0 else int(label),
            "guidance": None if guidance is None or guidance != guidance else guidance,
            "prompt": item("prompt"), "null_offsets": torch.from_numpy(
                np.asarray(got["null_offsets"], dtype=np.float32))
            if "null_offsets" in got else None}


def _cmd_edit(args: argparse.Namespace) -> int:
    from .data import to_uint8
    from .imageio import write_images
    from .model import load

    model = load(args.run)
    x = _read_run_images(model, args.input)
    if args.instruction is not None and model.kind != "instruct":
        raise UsageError(f"--instruction needs an instruct run (InstructPix2Pix, e.g. trained "
                         f"from configs/digits_instruct.json); {args.run} is a {model.kind} run")
    if args.instruction is None and model.kind == "instruct":
        raise UsageError("an instruct run edits by --instruction TEXT, e.g. 'make it thicker'")
    if args.instruction is not None:
        edited = model.instruct(x, args.instruction, image_guidance=args.image_guidance,
                                guidance=args.guidance, steps=args.steps,
                                sampler=args.sampler, seed=args.seed)
        what = f"InstructPix2Pix: {args.instruction!r}"
    elif args.method == "p2p":
        if args.source_prompt is None or args.prompt is None:
            raise UsageError("p2p edits a prompt: give --source-prompt (what the input shows) "
                             "and --prompt (the edited text)")
        reweight = _reweight(args.reweight) if args.reweight else None
        _, edited = model.prompt_to_prompt(args.source_prompt, args.prompt, x=x,
                                           mode=args.p2p_mode,
                                           cross_replace=args.cross_replace,
                                           reweight=reweight, guidance=args.guidance,
                                           steps=args.steps)
        what = f"Prompt-to-Prompt {args.p2p_mode}: {args.source_prompt!r} -> {args.prompt!r}"
    elif args.method == "diffedit":
        target = args.prompt if args.prompt is not None else args.class_label
        source = args.source_prompt if args.source_prompt is not None else args.source_class
        if target is None:
            raise UsageError("diffedit needs the edit's target: --class K or --prompt TEXT "
                             "(and its source: --source-class / --source-prompt, default "
                             "unconditional)")
        edited, mask = model.diffedit(x, source, target, strength=args.strength,
                                      steps=args.steps, sampler=args.sampler or "ddim",
                                      seed=args.seed, threshold=args.threshold,
                                      guidance=args.guidance)
        if args.mask_out:
            write_images(to_uint8(mask * 2 - 1).numpy(), args.mask_out)
        what = f"DiffEdit, mask {float(mask.mean()):.0%} of the pixels"
    else:
        edited = model.edit(x, args.strength, steps=args.steps, sampler=args.sampler,
                            seed=args.seed, class_labels=args.class_label, prompt=args.prompt,
                            guidance=args.guidance)
        what = f"SDEdit, strength {args.strength:g}"
    write_images(to_uint8(edited).numpy(), args.out)
    print(f"edited {len(edited)} image(s) ({what}); wrote {args.out}")
    return 0


def _reweight(spec: str) -> tuple[str, float]:
    """``WORD=C`` -> (word, c)."""
    word, sep, c = spec.rpartition("=")
    try:
        if not (sep and word):
            raise ValueError
        return word, float(c)
    except ValueError:
        raise UsageError(f"--reweight takes WORD=C (e.g. thick=2); got {spec!r}") from None


def _read_mask(path: str, hw: tuple[int, int]):
    """An inpainting mask image -> (H, W) bool, True where the pixel is to be filled in
    (white), at exactly the run's size."""
    from .imageio import read_images

    a = read_images(path, 1)[0, ..., 0]
    if a.shape != tuple(hw):
        raise UsageError(f"mask {path!r} is {a.shape[0]}x{a.shape[1]}; the run's images are "
                         f"{hw[0]}x{hw[1]}")
    import torch

    return torch.from_numpy(a >= 128)


def add_parsers(sub, sampler_names: list[str]) -> None:
    """Register ``invert``, ``edit`` and ``restore`` on the subparsers ``sub``."""
    from .edit import INVERTIBLE

    def conditioning(p: argparse.ArgumentParser) -> None:
        p.add_argument("--class", dest="class_label", type=_class_label, default=None,
                       metavar="K", help="condition on a class (default: unconditional)")
        p.add_argument("--prompt", default=None, metavar="TEXT",
                       help="condition a text run on a prompt (default: unconditional)")
        p.add_argument("--guidance", type=float, default=None, metavar="W",
                       help="classifier-free guidance scale (default: the run's)")

    def image_command(name: str, summary: str, description: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=summary, description=description)
        p.add_argument("run", metavar="DIR", help="run directory")
        p.add_argument("--input", required=True, metavar="IMG",
                       help="images at the run's size (.png or .npz 'images')")
        return p

    p = image_command("invert", "find the noise that reproduces images",
                      "Run a deterministic sampler backwards (DDIM / PF-ODE inversion, solved "
                      "exactly per step by fixed-point iterations): 'sfumato sample DIR --noise "
                      "NOISE.npz' with the same sampler and steps reproduces the images.")
    p.add_argument("--sampler", default=None, choices=INVERTIBLE,
                   help="default: the run's if invertible, else heun")
    p.add_argument("--steps", type=_positive_int, default=None,
                   help="steps (default: the run's)")
    p.add_argument("--iters", type=int, default=20,
                   help="fixed-point iterations per step (0: plain DDIM inversion)")
    p.add_argument("--null-text", action="store_true",
                   help="null-text inversion (Mokady et al. 2023) for sampling with --guidance "
                        "W > 1: the unconditional branch is tuned per step so that guided "
                        "DDIM (euler) sampling reproduces the images")
    conditioning(p)
    p.add_argument("--out", required=True, metavar="NOISE.npz", help="output .npz")
    p.set_defaults(func=_cmd_invert)

    p = image_command("edit", "edit images with the run as prior (SDEdit, DiffEdit)",
                      "SDEdit: noise the images to the level --strength picks (0 keeps them, "
                      "1 is pure noise) and sample back down in --steps steps, steered by "
                      "--class / --prompt. DiffEdit (--method diffedit): edit only where the "
                      "target (--class / --prompt) and the source (--source-class / "
                      "--source-prompt) disagree; the rest stays exactly as given. "
                      "Prompt-to-Prompt (--method p2p, a text run): the input is inverted "
                      "under --source-prompt (null-text inversion at --guidance > 1) and "
                      "sampled again with --prompt while the cross-attention maps follow the "
                      "source's. An "
                      "instruct run (InstructPix2Pix) edits by --instruction TEXT, with "
                      "--image-guidance (closeness to the input) and --guidance (strength of "
                      "the instruction).")
    p.add_argument("--method", default="sdedit", choices=["sdedit", "p2p", "diffedit"],
                   help="default: %(default)s")
    p.add_argument("--strength", type=float, default=0.5,
                   help="in [0, 1] (default 0.5); DiffEdit's encoding level")
    p.add_argument("--source-class", type=int, default=None, metavar="K",
                   help="diffedit: the input's class (default: unconditional)")
    p.add_argument("--source-prompt", default=None, metavar="TEXT",
                   help="diffedit: a prompt describing the input")
    p.add_argument("--threshold", type=float, default=0.5,
                   help="diffedit: mask threshold in (0, 1) (default 0.5)")
    p.add_argument("--mask-out", default=None, metavar="FILE",
                   help="diffedit: also write the masks (.png / .npz)")
    p.add_argument("--p2p-mode", default="replace", choices=["replace", "refine"],
                   help="p2p: word swap (same token count) or refine (words added/removed)")
    p.add_argument("--cross-replace", type=float, default=0.6, metavar="F",
                   help="p2p: fraction of the steps with the source's attention maps and "
                        "pooled text (0.6)")
    p.add_argument("--reweight", default=None, metavar="WORD=C",
                   help="p2p: also scale the attention to WORD of --prompt by C")
    p.add_argument("--instruction", default=None, metavar="TEXT",
                   help="an instruct run's edit, e.g. 'make it thicker'")
    p.add_argument("--image-guidance", type=float, default=1.5, metavar="S",
                   help="instruct: image guidance scale s_I (default 1.5)")
    p.add_argument("--steps", type=_positive_int, default=None,
                   help="sampler steps from the starting level (default: the run's)")
    p.add_argument("--sampler", default=None, choices=sampler_names, metavar="NAME")
    p.add_argument("--seed", type=int, default=0)
    conditioning(p)
    p.add_argument("--out", required=True, metavar="FILE", help="output .png or .npz")
    p.set_defaults(func=_cmd_edit)

    from .inverse import METHODS as RESTORE_METHODS

    p = sub.add_parser(
        "restore", help="restore images from a measurement (inpainting, super-resolution, "
        "deblurring)",
        description="Restore images from a measurement y = A(x) + noise with the run as prior "
                    "(sfumato.inverse). --input is the measurement: the low-resolution image "
                    "for srK, the damaged image for inpainting (pixels under the mask are "
                    "ignored; they come back exactly as given), the blurred image for blur; "
                    "one image file or an .npz with 'images' (uint8 NHWC). The output is "
                    "a .png grid or an .npz ('images', 'residual') at the run's resolution.")
    p.add_argument("run", metavar="DIR", help="run directory")
    p.add_argument("--input", required=True, metavar="Y", help="the measurement (.png or .npz)")
    p.add_argument("--operator", required=True, metavar="SPEC",
                   help="inpaint:MASK.png (white = fill in), box:T,L,H,W (the box is filled "
                        "in), sr2, sr4, blur:W (Gaussian std W pixels), pixels:P (a random "
                        "fraction P known)")
    p.add_argument("--noise", type=float, default=0.0, metavar="SIGMA_Y",
                   help="measurement noise std in the data range [-1, 1] (default 0)")
    p.add_argument("--method", default="pigdm", choices=list(RESTORE_METHODS),
                   help="default: %(default)s")
    p.add_argument("--samples", type=_positive_int, default=4, metavar="K",
                   help="average K posterior samples per image (default 4; the posterior "
                        "mean as K grows); 1 = one posterior sample")
    p.add_argument("--steps", type=_positive_int, default=None,
                   help="noise levels of the run's grid (default 50)")
    p.add_argument("--sampler", default=None, choices=sampler_names, metavar="NAME",
                   help="sampler (default: the method's)")
    p.add_argument("--seed", type=int, default=0, help="seed (restoration i depends only on it)")
    conditioning(p)
    p.add_argument("--zeta", type=float, default=None, help="DPS step size")
    p.add_argument("--prior-std", type=float, default=None, help="ΠGDM's s in r^2")
    p.add_argument("--jump-length", type=_positive_int, default=None, help="RePaint")
    p.add_argument("--jump-n-sample", type=_positive_int, default=None, help="RePaint")
    p.add_argument("--out", required=True, metavar="FILE", help="output .png or .npz")
    p.set_defaults(func=_cmd_restore)
