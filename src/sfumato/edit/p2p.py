"""Prompt-to-Prompt (Hertz et al. 2023, "Prompt-to-Prompt Image Editing with Cross-Attention
Control", ICLR): edit a generated image by changing its prompt while keeping its layout.

The cross-attention maps M (queries = image positions, keys = text tokens) decide where each
word acts. P2P samples the source prompt P and the target prompt P* from the same noise, in
one batch, and while sampling overwrites the target's maps M*_t with an edit of the source's
maps M_t (§3.1, Algorithm 1). The edit functions (§3.2):

- **word swap** (:class:`AttentionReplace`): ``Edit(M_t, M*_t, t) = M_t`` for t >= τ (the
  noisiest steps), ``M*_t`` after, so the layout is fixed early and the new word can still
  change the details;
- **adding a phrase** (:class:`AttentionRefine`): target token j takes the source column
  A(j) of the token it is aligned to (:func:`token_alignment`), a new token keeps its own;
- **attention re-weighting** (:class:`AttentionReweight`): the columns of chosen tokens are
  scaled by c, strengthening (c > 1) or weakening (c < 1) what they say.

Here τ is a noise level: a controller edits while ``σ > sigma_min_control``;
:func:`fraction_to_sigma` turns the paper's fraction of the steps (``cross_replace_steps``,
0.8 by default there) into it. The hook is the ``controller`` attribute of the
:class:`~sfumato.nets.context.CrossAttention` layers. These networks also add a pooled text
embedding to every block's conditioning (:class:`~sfumato.nets.context.ContextEmbedding`),
which by itself fixes much of the layout: measured on the digits text model, "a thin 3" →
"a thick 3" from the same noise moved the images as far with the maps held as without
(RMS 0.48 either way). So while a controller edits the maps the target also takes the
source's pooled text (:meth:`AttentionController.pooled`); then holding 0.6 of 18 steps
brings the RMS change down to 0.34 with every target still thicker, and 0.8 to 0.14 with
the thickness change almost gone.

Batch layout: :func:`prompt_to_prompt` samples ``cat([x_src (n), x_tgt (n)])``; classifier-free
guidance doubles that to ``[cond src, cond tgt, uncond src, uncond tgt]``. A controller views
the maps' batch as (G, 2, n) and rewrites the target half of every group from its source
half. The unconditional groups hold the null text (the networks' null token alone), whose maps
are exactly one-hot on key 0 for both prompts, so editing them changes nothing.

    from sfumato.edit import AttentionReplace, fraction_to_sigma, prompt_tokens, prompt_to_prompt
    src, tgt = prompt_tokens("a thin 3"), prompt_tokens("a thick 3")
    ctl = AttentionReplace(src, tgt, sigma_min_control=fraction_to_sigma(sigmas, 0.8))
    x_src, x_tgt = prompt_to_prompt(guided, sigmas[0] * z, sigmas, source_cond, target_cond, ctl)
"""

from __future__ import annotations

import difflib
import functools
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ..errors import UsageError, check_finite
from ..nets.context import ContextEmbedding, CrossAttention
from ..samplers import get_sampler
from ..samplers._common import Generator, check_sigmas
from ..text.encoders import TinyTextEncoder, minilm_path, text_encoder_class

__all__ = ["AttentionController", "AttentionRefine", "AttentionReplace", "AttentionReweight",
           "attention_control", "cross_attention_layers", "fraction_to_sigma", "prompt_tokens",
           "prompt_to_prompt", "token_alignment", "word_positions"]


# -- controllers --------------------------------------------------------------------------------
class AttentionController:
    """Base of the P2P controllers: ``controller(probs (B, heads, N, K), layer) -> probs``, the
    hook of :class:`~sfumato.nets.context.CrossAttention` (K = 1 + L keys, key 0 the null
    token).

    Args:
        sigma_min_control: τ as a noise level: the maps are edited while ``sigma`` > it
            (:func:`fraction_to_sigma`); 0 edits at every step of a grid ending in 0.

    Attributes set by the sampling wrapper of :func:`prompt_to_prompt` before each network
    call: ``sigma`` (the current level; None = always edit) and ``n`` (images per prompt, so
    B = G * 2 * n). Subclasses define :meth:`edit`.
    """

    def __init__(self, sigma_min_control: float = 0.0) -> None:
        if math.isnan(sigma_min_control):
            raise UsageError("sigma_min_control must be a number (inf = never edit)")
        self.sigma_min_control = float(sigma_min_control)
        self.sigma: float | None = None
        self.n: int | None = None

    def active_at(self, sigma: float | None) -> bool:
        """Whether the maps are edited at level ``sigma`` (None: yes)."""
        return sigma is None or sigma > self.sigma_min_control

    def __call__(self, probs: torch.Tensor, layer: CrossAttention) -> torch.Tensor:
        if not self.active_at(self.sigma):
            return probs
        pairs = self._pairs(probs)  # (G, 2, n, heads, N, K)
        target = self.edit(pairs[:, 0], pairs[:, 1])
        return torch.stack([pairs[:, 0], target.to(probs.dtype)], 1).reshape(probs.shape)

    def _pairs(self, probs: torch.Tensor) -> torch.Tensor:
        if self.n is None:
            raise UsageError("the controller does not know the images per prompt: set its `n` "
                             "or sample through prompt_to_prompt")
        if probs.shape[0] % (2 * self.n):
            raise UsageError(f"attention batch {probs.shape[0]} is not G x 2 x n = {self.n} "
                             "(source and target halves, see sfumato.edit.p2p)")
        return probs.reshape(-1, 2, self.n, *probs.shape[1:])

    def edit(self, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The target's new maps from the source's and its own, both (G, n, heads, N, K)."""
        raise NotImplementedError

    def pooled(self, pooled: torch.Tensor) -> torch.Tensor:
        """The pooled text embedding (B, E) of :class:`~sfumato.nets.context.ContextEmbedding`:
        while editing, the target takes the source's (a global summary of the prompt, which
        would otherwise change the whole layout at once; see the module docstring)."""
        if not self.active_at(self.sigma):
            return pooled
        pairs = self._pairs(pooled)
        return torch.stack([pairs[:, 0], pairs[:, 0]], 1).reshape(pooled.shape)


class AttentionReplace(AttentionController):
    """Word swap (Hertz et al. 2023, §3.2 "Word Swap"): while σ > ``sigma_min_control`` the
    target uses the source's maps, ``Edit(M_t, M*_t, t) = M_t`` for t >= τ, else its own.

    The maps are matched by key position, so both prompts must have the same number of
    tokens (:func:`prompt_tokens`): a UsageError names both token lists otherwise.
    """

    def __init__(self, source_tokens: Sequence[str], target_tokens: Sequence[str],
                 sigma_min_control: float = 0.0) -> None:
        super().__init__(sigma_min_control)
        if len(source_tokens) != len(target_tokens):
            raise UsageError(f"a word swap needs prompts with the same number of tokens; got "
                             f"{len(source_tokens)} {list(source_tokens)} and "
                             f"{len(target_tokens)} {list(target_tokens)} (use AttentionRefine "
                             "for an edit that adds or removes tokens)")

    def edit(self, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return source


class AttentionRefine(AttentionController):
    """Adding a phrase (Hertz et al. 2023, §3.2 "Adding a New Phrase"): while σ >
    ``sigma_min_control``, target key j takes the source column A(j) when the target token is
    aligned to a source token (:func:`token_alignment`), else keeps its own column:
    ``Edit(M_t, M*_t, t)_{i,j} = (M*_t)_{i,j}`` if A(j) = None else ``(M_t)_{i,A(j)}``.
    """

    def __init__(self, source_tokens: Sequence[str], target_tokens: Sequence[str],
                 sigma_min_control: float = 0.0) -> None:
        super().__init__(sigma_min_control)
        self.alignment = torch.tensor(token_alignment(source_tokens, target_tokens))

    def edit(self, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        K = target.shape[-1]
        a = self.alignment.to(target.device)
        if len(a) > K:
            raise UsageError(f"the alignment covers {len(a)} keys but the maps have {K}: take "
                             "the tokens with the run's max_length")
        a = torch.cat([a, a.new_full((K - len(a),), -1)])  # padding keys keep their own column
        return torch.where(a >= 0, source[..., a.clamp_min(0)], target)


class AttentionReweight(AttentionController):
    """Attention re-weighting (Hertz et al. 2023, §3.2 "Attention Re-weighting"): at every
    step the target's columns at key ``positions`` are scaled by ``scale`` (c), without
    renormalising, as in the paper; c = 1 is the identity.

    Args:
        positions: key positions (>= 1; 0 is the null token) of the words to re-weight
            (:func:`word_positions`).
        scale: c (the paper uses about [-2, 2]).
        base: a controller applied first, in its own σ range (e.g. :class:`AttentionReplace`
            for the same prompt, which re-weights the source's maps as the paper's
            equation does).
    """

    def __init__(self, positions: Sequence[int], scale: float,
                 base: AttentionController | None = None) -> None:
        super().__init__(-math.inf)
        check_finite("the re-weighting scale c", scale)
        if not positions or min(positions) < 1:
            raise UsageError(f"re-weight key positions >= 1 (0 is the null token); got "
                             f"{list(positions)}")
        self.positions, self.scale, self.base = list(positions), float(scale), base

    def pooled(self, pooled: torch.Tensor) -> torch.Tensor:
        """The base controller's pooled edit in its σ range; the target's own without one."""
        if self.base is None:
            return pooled
        self.base.sigma, self.base.n = self.sigma, self.n
        return self.base.pooled(pooled)

    def edit(self, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.base is not None and self.base.active_at(self.sigma):
            target = self.base.edit(source, target)
        if max(self.positions) >= target.shape[-1]:
            raise UsageError(f"re-weight positions {self.positions} beyond the "
                             f"{target.shape[-1]} keys")
        w = torch.ones(target.shape[-1], dtype=target.dtype, device=target.device)
        w[self.positions] = self.scale
        return target * w


def fraction_to_sigma(sigmas: torch.Tensor, fraction: float) -> float:
    """``sigma_min_control`` that edits the first ``floor(fraction * steps)`` steps of the
    grid ``sigmas`` (steps + 1 levels, decreasing): halfway between the last edited level and
    the next, so rounding of σ cannot move the boundary; inf for none (fraction 0). Inner
    evaluations of a multi-stage sampler are edited when their σ lies above it."""
    check_finite("the edited fraction of the steps", fraction, low=0.0, high=1.0)
    check_sigmas(sigmas)
    k = math.floor(fraction * (len(sigmas) - 1) + 1e-9)
    return math.inf if k == 0 else float(sigmas[k - 1] + sigmas[k]) / 2


# -- tokens -------------------------------------------------------------------------------------
@functools.cache
def _minilm_tokenizer() -> Any:
    """The WordPiece tokenizer of :class:`~sfumato.text.MiniLMEncoder` (without its model)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)


def _byte_token(token_id: int) -> str:
    if token_id == TinyTextEncoder.BOS:
        return "<bos>"
    b = token_id - 2
    return chr(b) if b < 128 else f"<0x{b:02x}>"


def prompt_tokens(prompt: str, encoder: str = "minilm", max_length: int = 32) -> list[str]:
    """The tokens of ``prompt`` as the run's text ``encoder`` ("minilm" | "tiny", a run's
    ``text.encoder``) gives them to the network, truncated to ``max_length``: token j is
    context position j, key position j + 1. MiniLM: WordPiece strings with [CLS] and [SEP];
    tiny: ``"<bos>"`` and one string per UTF-8 byte of the lowercased prompt."""
    text_encoder_class(encoder)
    if encoder == "tiny":
        ids, mask = TinyTextEncoder.tokenize([prompt], max_length)
        return [_byte_token(int(i)) for i in ids[0][mask[0]]]
    tok = _minilm_tokenizer()
    return tok.convert_ids_to_tokens(tok(prompt, truncation=True,
                                         max_length=max_length)["input_ids"])


def word_positions(prompt: str, word: str, encoder: str = "minilm", max_length: int = 32
                   ) -> list[int]:
    """Key positions (1 + context positions) of the first occurrence of ``word``'s tokens in
    ``prompt``'s (:func:`prompt_tokens`); UsageError naming both if it does not occur."""
    tokens = prompt_tokens(prompt, encoder, max_length)
    inner = prompt_tokens(word, encoder, max_length)[1:]  # without [CLS] / <bos>
    inner = inner[:-1] if encoder == "minilm" else inner  # and [SEP]
    for j in range(len(tokens) - len(inner) + 1):
        if inner and tokens[j:j + len(inner)] == inner:
            return list(range(j + 1, j + 1 + len(inner)))
    raise UsageError(f"{word!r} {inner} does not occur in the tokens of {prompt!r}: {tokens}")


def token_alignment(source_tokens: Sequence[str], target_tokens: Sequence[str]) -> list[int]:
    """For each target key position (0 = null token, then 1 + token index) the source key
    position of the same token in the longest matching blocks (``difflib.SequenceMatcher``
    on the token lists), or -1 for a token the source does not have; 0 maps to 0."""
    out = [0] + [-1] * len(target_tokens)
    matcher = difflib.SequenceMatcher(None, list(source_tokens), list(target_tokens),
                                      autojunk=False)
    for a, b, size in matcher.get_matching_blocks():
        out[1 + b:1 + b + size] = range(1 + a, 1 + a + size)
    return out


# -- running ------------------------------------------------------------------------------------
def cross_attention_layers(net: object) -> list[CrossAttention]:
    """Every :class:`~sfumato.nets.context.CrossAttention` in ``net`` (a UNet/DiT built with
    ``context_dim``, a TextConditioned wrapper, a denoiser or guidance around one);
    UsageError if there is none."""
    layers = [m for m in net.modules() if isinstance(m, CrossAttention)] \
        if isinstance(net, nn.Module) else []
    if not layers:
        raise UsageError(f"Prompt-to-Prompt needs a text-conditioned run (cross-attention); "
                         f"{type(net).__name__} has no CrossAttention layer")
    return layers


@contextmanager
def attention_control(net: nn.Module, controller: Callable[..., torch.Tensor]
                      ) -> Iterator[list[CrossAttention]]:
    """Set ``controller`` on every cross-attention layer of ``net`` (and on its pooled-text
    embedding) for the ``with`` block (yields the cross-attention layers), restoring the
    previous controllers after. The controller is a plain
    callable ``(probs, layer) -> probs``, not an ``nn.Module`` (it must not enter the
    network's state dict)."""
    if isinstance(controller, nn.Module):
        raise UsageError("an attention controller must be a plain callable, not an nn.Module")
    layers = cross_attention_layers(net)
    held = layers + [m for m in net.modules() if isinstance(m, ContextEmbedding)]
    previous = [m.controller for m in held]
    for m in held:
        m.controller = controller
    try:
        yield layers
    finally:
        for m, c in zip(held, previous, strict=True):
            m.controller = c


class _Tracking:
    """``denoiser`` that first tells ``controller`` the level and the images per prompt
    (the batch x is (2n, ...): source then target)."""

    def __init__(self, denoiser: Callable[..., torch.Tensor],
                 controller: AttentionController) -> None:
        self.denoiser, self.controller = denoiser, controller

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor | float, **cond) -> torch.Tensor:
        self.controller.sigma = float(torch.as_tensor(sigma).max())
        self.controller.n = x.shape[0] // 2
        return self.denoiser(x, sigma, **cond)


def _rows(value: torch.Tensor, n: int, key: str) -> torch.Tensor:
    if value.ndim == 0 or value.shape[0] not in (1, n):
        raise UsageError(f"conditioning {key!r} must have batch 1 or n = {n}; got "
                         f"{tuple(value.shape)}")
    return value.expand(n, *value.shape[1:])


def _paired_conditioning(source: Mapping[str, Any], target: Mapping[str, Any], n: int,
                         device: torch.device) -> dict[str, Any]:
    """Source then target rows (2n, ...) of each conditioning tensor; other values shared."""
    if set(source) != set(target):
        raise UsageError(f"source and target conditioning need the same keys; got "
                         f"{sorted(source)} and {sorted(target)}")
    out = {}
    for k, s in source.items():
        t = target[k]
        if torch.is_tensor(s) and torch.is_tensor(t):
            out[k] = torch.cat([_rows(s, n, k), _rows(t, n, k)]).to(device)
        elif torch.is_tensor(s) or torch.is_tensor(t) or s != t:
            raise UsageError(f"conditioning {k!r}: give tensors, or the same value for both")
        else:
            out[k] = s
    return out


def _paired_generators(generator: Generator, n: int) -> Generator:
    """Per-sample generators for the (2n,) batch, target i drawing source i's noise."""
    if generator is None:
        return None
    if isinstance(generator, torch.Generator):
        seeds = torch.randint(0, 2**62, (n,), generator=generator, device=generator.device)
        gens = [torch.Generator(generator.device).manual_seed(int(s)) for s in seeds]
    else:
        gens = list(generator)
        if len(gens) != n:
            raise UsageError(f"got {len(gens)} generators for {n} images; pass one per image")
    twins = [torch.Generator(g.device) for g in gens]
    for g, t in zip(gens, twins, strict=True):
        t.set_state(g.get_state())
    return gens + twins


@torch.no_grad()
def prompt_to_prompt(denoiser: Callable[..., torch.Tensor], x_T: torch.Tensor,
                     sigmas: torch.Tensor, source: Mapping[str, Any],
                     target: Mapping[str, Any], controller: AttentionController, *,
                     sampler: str = "euler", net: nn.Module | None = None,
                     generator: Generator = None, **sampler_kwargs: Any
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample the ``source`` and ``target`` prompts from the same start ``x_T`` under
    ``controller``; returns (source images, target images), each (n, C, H, W).

    Args:
        denoiser: the σ-space denoiser to sample, plain or guided (e.g.
            :class:`~sfumato.guidance.ClassifierFreeGuidance`).
        x_T: (n, C, H, W) starting state at ``sigmas[0]`` (unit noise times ``sigmas[0]``).
        sigmas: the grid, decreasing to 0.
        source, target: the conditioning keywords of each prompt (tensors with batch 1 or
            n, e.g. ``{"context": ..., "context_mask": ...}`` or ``{"text_ids": ...,
            "text_mask": ...}``); other keys (class labels...) shared.
        controller: an :class:`AttentionController`.
        sampler: a name of :data:`sfumato.samplers.SAMPLERS` (run on the 2n batch).
        net: the module holding the cross-attention layers (default: ``denoiser`` itself,
            a Denoiser or guidance around one).
        generator: for a stochastic sampler (one, which seeds one generator per image, or
            n); target i draws the same noise as source i.
        sampler_kwargs: the sampler's own options.
    """
    n = x_T.shape[0]
    cond = _paired_conditioning(source, target, n, x_T.device)
    run = get_sampler(sampler)
    with attention_control(denoiser if net is None else net, controller):
        x = run(_Tracking(denoiser, controller), torch.cat([x_T, x_T]), sigmas,
                generator=_paired_generators(generator, n), **sampler_kwargs, **cond)
    return x[:n], x[n:]
