"""DreamBooth's training set (Ruiz et al. 2023, "DreamBooth: Fine Tuning Text-to-Image
Diffusion Models for Subject-Driven Generation"): a few images of a subject bound to a rare
token, and the class-specific prior-preservation images the base model generates itself.

The loss (their eq. 2) is the base objective on the subject images with the prompt "a
[V] [class noun]" plus ``lambda`` times the same objective on the prior images with the
prompt "a [class noun]" and the base's own samples as targets, so that fine-tuning does not
drift the class (language drift) nor collapse its variety. Here the two terms are one
mixture: every batch draws prior images with probability ``lambda / (1 + lambda)``
(:func:`training_set` repeats the subject images to that proportion), which has the same
expected gradient as the paper's equal halves weighted by ``lambda``.

Prior images: with ``class_word`` the prompt "a CLASS" (the paper's choice); without one the
base's own plain prompts of each of its classes ("seven", "a smileys image", or the class
labels of a class-conditional base), which preserves what the base does for ordinary prompts.
They are generated once and cached in the run (``prior.safetensors``), checked against the
base run's weights hash.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..errors import CheckpointError, UsageError
from ..files import atomic_write, read_safetensors

__all__ = ["subject_captions", "caption_rows", "folder_captions", "prior_prompts",
           "prior_images", "training_set", "base_words", "check_token"]

PRIOR_FILE = "prior.safetensors"


def subject_captions(token: str, class_word: str | None) -> list[str]:
    """The caption variants of the subject images: "a TOKEN CLASS" and "a TOKEN" (the bare
    token too, so "a TOKEN" prompts work without the class noun)."""
    return [f"a {token} {class_word}", f"a {token}"] if class_word else [f"a {token}",
                                                                         f"{token}"]


def caption_rows(token: str, class_word: str | None, own: Sequence[str | None]
                 ) -> list[list[str]]:
    """Caption variants of each subject image: its own caption (repeated to as many
    variants), or :func:`subject_captions` where it has none."""
    subj = subject_captions(token, class_word)
    return [[c] * len(subj) if c else subj for c in own]


def folder_captions(folder: Path, names: Sequence[str], token: str) -> list[str | None]:
    """Each image's own caption: the text of the file ``NAME.txt`` beside the image ``NAME.png``
    (the layout of kohya's and other trainers' caption files), whitespace collapsed; None for
    an image without one. UsageError for a caption that does not contain the token (the
    concept would not be bound to it)."""
    out: list[str | None] = []
    for name in names:
        f = (Path(folder) / name).with_suffix(".txt")
        if not f.is_file():
            out.append(None)
            continue
        text = " ".join(f.read_text(encoding="utf-8", errors="replace").split())
        if token.lower() not in (w.lower() for w in _WORD.findall(text)):
            raise UsageError(f"the caption file {f} ({text[:60]!r}) does not contain the token "
                             f"{token!r}: write it into the caption (e.g. 'a {token} in thick "
                             "strokes') or delete the file to use the default 'a TOKEN'")
        out.append(text)
    return out


def prior_prompts(base, class_word: str | None) -> list[str] | None:
    """The prompts of the prior images, one per base class in turn (module docstring); None
    for a class-conditional base without text (its prior images are labelled instead)."""
    if not base.text_encoder:
        return None
    if class_word:
        return [f"a {class_word}"]
    named = base.state.get("class_prompts")
    if named:
        return list(named)
    from ..text.captions import default_prompts

    return default_prompts(10)


def _read_prior(path: Path, sha: str, n: int) -> dict[str, torch.Tensor] | None:
    """The cached prior images when they were made by this base (hash) and are n; None
    otherwise (made again)."""
    if not path.is_file():
        return None
    tensors, header = read_safetensors(path, "the prior-image cache",
                                       "; delete it and it is made again")
    try:
        meta = json.loads(header.get("sfumato_prior", "{}"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"the prior-image cache {path} has a corrupt header ({e}); "
                              "delete it and it is made again") from None
    if meta.get("base_sha256") != sha or meta.get("n") != n or "images" not in tensors:
        return None
    return tensors


def prior_images(out: Path, base, n: int, class_word: str | None, guidance: float | None,
                 seed: int = 0) -> tuple[torch.Tensor, torch.Tensor | None, list[str] | None]:
    """(images (n, *data_shape) in [-1, 1], or a latent base's latents; labels (n,) for a
    class base or None; prompts (n,) for a text base or None): the base's samples, from
    ``out/prior.safetensors`` when it holds those of this base, else sampled (seed ``seed``)
    and cached there."""
    from ..model import load

    path = out / PRIOR_FILE
    sha = base.weights_sha256()
    prompts = prior_prompts(base, class_word)
    cycle = [prompts[i % len(prompts)] for i in range(n)] if prompts else None
    cached = _read_prior(path, sha, n)
    if cached is not None:
        return cached["images"], cached.get("labels"), cycle
    model = load(base)
    labels = torch.arange(n) % base.num_classes if base.num_classes else None
    drawn = model.sample(n, seed=seed, prompt=cycle, class_labels=labels if labels is not None
                         else "auto", guidance=guidance)
    x = getattr(drawn, "latents", drawn.x).cpu().float()  # a latent base trains on its latents
    tensors = {"images": x.contiguous(), **({"labels": labels} if labels is not None else {})}
    meta = {"base_sha256": sha, "n": n, "class_word": class_word, "guidance": guidance,
            "seed": seed}
    out.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as tmp:
        save_file(tensors, str(tmp), metadata={"sfumato_prior": json.dumps(meta)})
    return x, labels, cycle


def training_set(subject: torch.Tensor, prior: torch.Tensor | None, weight: float
                 ) -> tuple[torch.Tensor, int]:
    """The images one epoch draws from: the subject images repeated so that they are a
    fraction ``1 / (1 + weight)`` of the set, then the prior images (module docstring).
    Returns (images, repeats of the subject)."""
    if prior is None or len(prior) == 0:
        return subject, 1
    reps = max(1, math.ceil(len(prior) / (weight * len(subject))))
    return torch.cat([subject.repeat(reps, *([1] * (subject.ndim - 1))), prior]), reps


_WORD = re.compile(r"[\w'-]+")


def base_words(base) -> set[str]:
    """The words the base run was trained on (its captions' vocabulary, lower case), and its
    class names: a new token must not be one of them."""
    words: set[str] = set()
    if base.text_encoder:
        from ..data import get_dataset

        data = get_dataset(base.config["data"])
        caps = getattr(data, "captions", None)
        if caps is None:  # digit captions: the caption module's words
            from ..text import captions as C

            caps = [*C.NUMBER_WORDS, *C.TEMPLATES,
                    *(w for forms in (*C._PRENOMINAL.values(), *C._PREDICATIVE.values())
                      for w in forms), "digit", "number", "handwritten"]
        for c in caps:
            words.update(w.lower() for w in _WORD.findall(c))
        words.update(str(d) for d in range(10))
    for name in base.state.get("class_names") or base.state.get("class_prompts") or []:
        words.update(w.lower() for w in _WORD.findall(str(name)))
    return words


def check_token(token: str, base, taken: Sequence[str] = ()) -> None:
    """UsageError for a token that is empty, more than one word, or already a word the base
    knows (``base_words``) or in ``taken``."""
    if not token or not _WORD.fullmatch(token):
        raise UsageError(f"the token must be one word of letters, digits, ' or -; got {token!r} "
                         "(e.g. --token sks)")
    used = base_words(base) | {t.lower() for t in taken}
    if token.lower() in used:
        raise UsageError(f"the token {token!r} is already in use: the base run {base.path} "
                         "was trained on captions with that word, so it has a meaning there. "
                         "Choose a rare string such as 'sks' or 'zwx'")
