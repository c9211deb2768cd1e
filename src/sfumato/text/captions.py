"""Captions for digit images: the label plus attributes measured from the pixels.

A caption such as ``"a thick 7, slanted to the right"`` carries more than the class label, so
a text-conditioned model has something to learn beyond class conditioning, and the attributes
of a generated image can be measured again to check that the model followed the text.

Three attributes are measured by :func:`digit_attributes`, each a continuous number per image
(ink ``w = (x + 1) / 2`` clipped to [0, 1], so high pixel values are ink, as in the bundled
digits and MNIST after scaling to [-1, 1]):

- ``thickness``: mean stroke width as a fraction of the image height,
  ``2 * sum(w) / TV(w) / H``. For a stroke of width t and length l, the ink mass is t l and
  the total variation (the length of the ink's outline, both sides of the stroke) is about
  2 l, so the ratio is t. By the coarea formula TV = integral of the perimeters of the level
  sets: the measure is a level-set-averaged stroke width, robust to the soft edges of 8x8
  digits and bilinear resizing (on the bundled digits, thickness at 8x8 and after upsampling
  to 28x28 correlate at 0.98). Strokes about a pixel wide read wider than drawn, so take
  thresholds at the resolution the captions are for.
- ``slant``: the shear of the ink, ``cov(x, y_up) / var(y_up)`` over ink-weighted pixel
  coordinates (x to the right, y_up upwards, both in pixels): the slope dx/dy of the
  least-squares line x = a + slant * y_up through the ink. **Positive = the top leans right**
  (like italics), 0 = upright; a unit shear ``x -> x + s * y_up`` adds s.
- ``size``: the ink-weighted radius of gyration ``sqrt(var(x) + var(y))`` as a fraction of
  the image side (sqrt(H W)); scaling the digit by k scales it by k.

Words come from quantiles of the training set (:func:`attribute_thresholds`, the 1/3 and 2/3
quantiles, optionally per class so that "a large 1" means large for a 1 and the words carry
information the label does not): below the lower threshold ``thin`` / ``small`` /
``left``, above the upper one ``thick`` / ``large`` / ``right``, and no word in the middle
third. Slant words are only given when true in absolute terms too: ``left`` needs
slant < 0 and ``right`` slant > 0 (handwriting leans right on average, so the lowest third
can still lean right). :func:`make_captions` renders several phrasings per image, numerals
and number words, attribute words sometimes left out, all drawn from a ``torch.Generator``;
:func:`parse_prompt` reads label and attribute words back from any such text.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch

from ..errors import UsageError

__all__ = [
    "ATTRIBUTES",
    "NUMBER_WORDS",
    "TEMPLATES",
    "attribute_thresholds",
    "caption",
    "class_prompts",
    "default_prompts",
    "describe",
    "digit_attributes",
    "make_captions",
    "parse_prompt",
]

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

#: attribute -> (word for the low third, word for the high third)
ATTRIBUTES: dict[str, tuple[str, str]] = {
    "thickness": ("thin", "thick"),
    "slant": ("left", "right"),
    "size": ("small", "large"),
}

# Surface forms of each canonical word: before the noun ("a thick 7") and after it ("a 7,
# slanted to the right"). parse_prompt recognises all of them through _PATTERNS.
_PRENOMINAL: dict[str, tuple[str, ...]] = {
    "thin": ("thin",), "thick": ("thick", "bold"),
    "small": ("small", "little"), "large": ("large", "big"),
    "left": ("left-leaning", "left-slanted"), "right": ("right-leaning", "right-slanted"),
}
_PREDICATIVE: dict[str, tuple[str, ...]] = {
    "thin": ("thin", "in thin strokes"), "thick": ("thick", "bold", "in thick strokes"),
    "small": ("small",), "large": ("large", "big"),
    "left": ("slanted to the left", "leaning left"),
    "right": ("slanted to the right", "leaning right"),
}
_PATTERNS: dict[str, tuple[str, re.Pattern[str]]] = {
    "thin": ("thickness", re.compile(r"\bthin\b")),
    "thick": ("thickness", re.compile(r"\b(?:thick|bold)\b")),
    "small": ("size", re.compile(r"\b(?:small|little)\b")),
    "large": ("size", re.compile(r"\b(?:large|big)\b")),
    "left": ("slant", re.compile(r"\bleft\b")),
    "right": ("slant", re.compile(r"\bright\b")),
}
_LABEL_RE = re.compile(r"\b(?:([0-9])|(" + "|".join(NUMBER_WORDS) + r"))\b")

#: Caption templates: ``{pre}`` = prenominal attribute words (with the article when the
#: template has one), ``{label}`` = numeral or number word, ``{post}`` = ", " + predicative
#: attribute words joined with commas and "and" (or empty).
TEMPLATES: tuple[str, ...] = (
    "{a_pre_label}{post}",
    "{pre_label}{post}",
    "the digit {label}{post}",
    "handwritten {label}{post}",
    "number {label}{post}",
    "a picture of {a_pre_label}{post}",
    "{a_pre_label}, handwritten{post}",
)
#: The plain prompt for class k (what a text run samples when no prompt is given, and the
#: prompt of its training sample grid).
CLASS_PROMPT = "the digit {}"


def class_prompts(labels: torch.Tensor | Sequence[int]) -> list[str]:
    """The plain prompt of each class label: ``class_prompts([7]) == ["the digit 7"]``."""
    return [CLASS_PROMPT.format(int(k)) for k in labels]


def default_prompts(n: int, num_classes: int = len(NUMBER_WORDS)) -> list[str]:
    """n plain prompts naming the classes in turn (0, 1, ..., num_classes - 1, 0, ...)."""
    return class_prompts([i % num_classes for i in range(n)])


_N_DRAWS = 16  # uniforms drawn per caption (fixed, so captions do not shift each other)


# -- measuring ---------------------------------------------------------------------------------
def digit_attributes(images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Measure thickness, slant and size of each image (see the module docstring).

    Args:
        images: (B, 1, H, W) (or (B, H, W)) in [-1, 1], ink = high values.

    Returns:
        ``{"thickness": (B,), "slant": (B,), "size": (B,)}`` float32. An image without ink
        gets 0 for all three.
    """
    if images.ndim == 4:
        if images.shape[1] != 1:
            raise UsageError(f"digit_attributes expects one channel, got {tuple(images.shape)}")
        images = images[:, 0]
    if images.ndim != 3:
        raise UsageError(f"expected images of shape (B, 1, H, W); got {tuple(images.shape)}")
    w = ((images.to(torch.float32) + 1) / 2).clamp(0, 1)
    B, H, W = w.shape
    mass = w.sum(dim=(1, 2))
    m = mass.clamp_min(1e-8)
    # outline length: isotropic total variation with zero ink outside the image, gradients
    # taken at the centre of every 2x2 cell (within 1% of 2 pi r on a disc of radius 8)
    p = torch.nn.functional.pad(w, (1, 1, 1, 1))
    dx = (p[:, :-1, 1:] - p[:, :-1, :-1] + p[:, 1:, 1:] - p[:, 1:, :-1]) / 2
    dy = (p[:, 1:, :-1] - p[:, :-1, :-1] + p[:, 1:, 1:] - p[:, :-1, 1:]) / 2
    tv = (dx.square() + dy.square()).sqrt().sum(dim=(1, 2))
    thickness = 2 * mass / tv.clamp_min(1e-8) / H

    xs = torch.arange(W, dtype=torch.float32, device=w.device)
    ys = -torch.arange(H, dtype=torch.float32, device=w.device)  # upwards
    wx, wy = w.sum(dim=1), w.sum(dim=2)  # marginals (B, W), (B, H)
    mx = (wx * xs).sum(1) / m
    my = (wy * ys).sum(1) / m
    cx, cy = xs[None] - mx[:, None], ys[None] - my[:, None]
    var_x = (wx * cx.square()).sum(1) / m
    var_y = (wy * cy.square()).sum(1) / m
    cov = (w * cy[:, :, None] * cx[:, None, :]).sum(dim=(1, 2)) / m
    slant = cov / var_y.clamp_min(1e-8)
    size = (var_x + var_y).sqrt() / (H * W) ** 0.5
    empty = mass <= 1e-8
    zero = torch.zeros_like(mass)
    return {"thickness": torch.where(empty, zero, thickness),
            "slant": torch.where(empty, zero, slant),
            "size": torch.where(empty, zero, size)}


def attribute_thresholds(images: torch.Tensor, labels: torch.Tensor | None = None,
                         num_classes: int | None = None,
                         attrs: Mapping[str, torch.Tensor] | None = None
                         ) -> dict[str, torch.Tensor]:
    """The 1/3 and 2/3 quantiles of each attribute over a (training) set of images.

    Args:
        images: (N, 1, H, W) in [-1, 1].
        labels: (N,) class labels for per-class thresholds, or None for global ones.
        num_classes: number of classes (default ``labels.max() + 1``).
        attrs: :func:`digit_attributes` of ``images`` when already measured.

    Returns:
        ``{name: (2,)}`` (global) or ``{name: (K, 2)}`` (per class; a class with no images
        gets the global thresholds).
    """
    attrs = digit_attributes(images) if attrs is None else attrs
    q = torch.tensor([1 / 3, 2 / 3])
    glob = {k: torch.quantile(v, q) for k, v in attrs.items()}
    if labels is None:
        return glob
    labels = labels.long().cpu()
    K = int(num_classes if num_classes is not None else labels.max() + 1)
    out = {}
    for k, v in attrs.items():
        rows = [torch.quantile(v[labels == c], q) if (labels == c).any() else glob[k]
                for c in range(K)]
        out[k] = torch.stack(rows)
    return out


def describe(attrs: Mapping[str, torch.Tensor], thresholds: Mapping[str, torch.Tensor],
             labels: torch.Tensor | Sequence[int] | None = None) -> list[dict[str, str]]:
    """Attribute words per image: ``[{"thickness": "thick", "slant": "right"}, ...]``.

    An attribute in its middle third gets no entry. Thresholds are (2,) or, per class,
    (K, 2) (then ``labels`` (B,) is required). Slant words also need the sign: ``left`` only
    for slant < 0, ``right`` only for slant > 0.
    """
    n = len(next(iter(attrs.values())))
    out: list[dict[str, str]] = [{} for _ in range(n)]
    for name, (low, high) in ATTRIBUTES.items():
        v = attrs[name].detach().cpu().to(torch.float32)
        t = thresholds[name].detach().cpu().to(torch.float32)
        if t.ndim == 2:
            if labels is None:
                raise UsageError("per-class thresholds need labels")
            t = t[torch.as_tensor(labels).long().cpu()]
        else:
            t = t.expand(n, 2)
        lo, hi = v < t[:, 0], v > t[:, 1]
        if name == "slant":
            lo, hi = lo & (v < 0), hi & (v > 0)
        for i in torch.nonzero(lo).flatten().tolist():
            out[i][name] = low
        for i in torch.nonzero(hi).flatten().tolist():
            out[i][name] = high
    return out


# -- rendering ---------------------------------------------------------------------------------
def _pick(options: Sequence[str], u: float) -> str:
    return options[min(int(u * len(options)), len(options) - 1)]


def _article(word: str) -> str:
    vowel = word[0] in "aeiou8" and not word.startswith("one")
    return "an" if vowel else "a"


def _join(words: Sequence[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def caption(label: int, words: Mapping[str, str], template: int, u: torch.Tensor) -> str:
    """Render one caption with every word in ``words``.

    Args:
        label: digit 0..9.
        words: canonical attribute words, e.g. ``{"thickness": "thick", "slant": "left"}``.
        template: index into :data:`TEMPLATES`.
        u: (>= 13,) uniforms in [0, 1) that make the remaining choices (numeral or word,
            synonyms, word order, prenominal or predicative placement).
    """
    u = u.tolist()
    lab = NUMBER_WORDS[label] if u[0] < 0.5 else str(label)
    order = sorted(ATTRIBUTES, key=lambda k: u[1 + list(ATTRIBUTES).index(k)])
    chosen = [words[k] for k in order if k in words]
    tpl = TEMPLATES[template]
    prenominal = "{pre_label}" in tpl or "{a_pre_label}" in tpl
    pre, post = [], []
    for j, word in enumerate(chosen):
        # templates with a slot before the noun put each word there or after it at random
        if prenominal and u[4 + j] < 0.5:
            pre.append(_pick(_PRENOMINAL[word], u[7 + j]))
        else:
            post.append(_pick(_PREDICATIVE[word], u[10 + j]))
    noun = " ".join([*pre, lab])
    text = tpl.format(label=lab, pre_label=noun, a_pre_label=f"{_article(noun)} {noun}",
                      post=", " + _join(post) if post else "")
    return text


def make_captions(labels: torch.Tensor | Sequence[int], attrs: Mapping[str, torch.Tensor],
                  thresholds: Mapping[str, torch.Tensor], generator: torch.Generator,
                  n_variants: int = 4, keep: float = 0.7) -> list[list[str]]:
    """``n_variants`` captions per image, deterministic given the generator's state.

    Each caption names the label (numeral or word) in one of :data:`TEMPLATES`; each
    attribute word from :func:`describe` is kept with probability ``keep``.

    Args:
        labels: (B,) digits 0..9.
        attrs: from :func:`digit_attributes` of the same images.
        thresholds: from :func:`attribute_thresholds` (global or per class).
        generator: the only source of randomness.

    Returns:
        B lists of ``n_variants`` strings.
    """
    labels = torch.as_tensor(labels).long().cpu()
    words = describe(attrs, thresholds, labels)
    B = len(words)
    u = torch.rand(B, n_variants, 2 + _N_DRAWS, generator=generator)
    tpl = (u[..., 0] * len(TEMPLATES)).long().clamp_max(len(TEMPLATES) - 1)
    out = []
    for i in range(B):
        row = []
        for v in range(n_variants):
            draws = u[i, v, 2:]
            kept = {k: w for j, (k, w) in enumerate(words[i].items())
                    if draws[13 + list(ATTRIBUTES).index(k)] < keep}
            row.append(caption(int(labels[i]), kept, int(tpl[i, v]), draws))
        out.append(row)
    return out


def parse_prompt(text: str) -> tuple[int | None, dict[str, str]]:
    """Read the digit and attribute words back from a caption or a free prompt.

    Returns ``(label, words)``: label 0..9 when exactly one digit is named (as a numeral or a
    word; None otherwise), words ``{attribute: canonical word}`` for every attribute named
    unambiguously (a prompt naming both ``thin`` and ``thick`` gets no thickness entry).
    """
    s = text.lower()
    labels = {int(m.group(1)) if m.group(1) else NUMBER_WORDS.index(m.group(2))
              for m in _LABEL_RE.finditer(s)}
    found: dict[str, set[str]] = {}
    for word, (attr, pattern) in _PATTERNS.items():
        if pattern.search(s):
            found.setdefault(attr, set()).add(word)
    words = {a: next(iter(ws)) for a, ws in found.items() if len(ws) == 1}
    return (labels.pop() if len(labels) == 1 else None), words
