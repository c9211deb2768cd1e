"""LoRA: low-rank adapters on the linear and convolution layers of a network (Hu et al. 2022,
"LoRA: Low-Rank Adaptation of Large Language Models").

A wrapped layer keeps its original module, frozen, as ``.base`` and adds named adapters, each
a pair ``A`` (rank r, Gaussian init) and ``B`` (zero init), so that (eq. 3)::

    h = W0 x + sum_adapters  scale * (alpha / r) * B A dropout(x)

- ``nn.Linear`` (in -> out): A is a Linear in -> r, B a Linear r -> out, both without bias;
  ``B A`` is an (out, in) matrix.
- ``nn.Conv2d`` (in -> out, kernel k, stride, padding, dilation; groups 1): A is a Conv2d
  in -> r with the same kernel, stride, padding, dilation and padding mode, B a 1x1 Conv2d
  r -> out; ``B A`` composes exactly into one (out, in, k, k) kernel,
  ``(B A)[o, i] = sum_j B[o, j, 0, 0] A[j, i]``, because a 1x1 convolution after a
  convolution is a per-pixel linear map of its channels.

Layers inside torch's own ``nn.MultiheadAttention`` and ``nn.Transformer*Layer`` (the text
encoder's) are left alone: those modules read their sublayers' weights directly (the
inference fast path), so a wrapper there would be bypassed without a word.

``B = 0`` at the start, so a fresh adapter leaves the network's output exactly as it was.
``alpha / r`` (section 4.1 of the paper) keeps the update's size roughly independent of the
rank; ``scale`` (default 1) multiplies it at run time (0 switches an adapter off, 0.5 applies
half of it), e.g. at sampling time. Several adapters on one layer add their outputs.

:func:`merge` folds an adapter into the base weight, ``W <- W + scale (alpha / r) B A`` (the
product and the sum in float64, one rounding to the weight's dtype), so the layer costs
nothing extra (while merged, the base weight in a state dict is the merged one);
:func:`unmerge` subtracts the same amount. The merged network computes the same function to
rounding (float32: 1e-6 on the test networks). Rounding the merged weight to its dtype
loses bits (in bfloat16, up to half an ulp of ``|W + delta|``: about 10 % of the weights of
a test U-Net moved by up to 1e-3 after a plain merge/unmerge round trip), so the merge keeps
what the rounding lost (a float32 buffer the size of the weight, while merged) and the
unmerge adds it back: a round trip restores float32, float16 and bfloat16 weights bit for
bit, in any order of unmerging several adapters.

Files (:func:`save_lora`, :func:`load_lora`): safetensors with only the adapter's tensors,
keyed as peft keys them, ``base_model.model.<module path>.lora_A.weight`` and
``...lora_B.weight`` (shapes as the layers above), and the settings in the header's metadata
under ``"sfumato_lora"`` (JSON: ``adapter``, ``rank``, ``alpha``, ``dropout``, ``targets``,
``layers`` (per-layer rank/alpha/dropout) and the caller's ``meta``, e.g. the base network's
config hash from :func:`network_config_sha256`). Loading never unpickles anything and checks
every key against the network before changing it.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from ..errors import CheckpointError, ConfigError, UsageError, check_finite
from ..files import atomic_write, read_safetensors

__all__ = ["LoRA", "DEFAULT_TARGETS", "inject_lora", "lora_layers", "merge", "unmerge",
           "set_lora_scale", "remove_lora", "trainable_lora_parameters",
           "mark_only_lora_trainable", "lora_state_dict", "save_lora", "load_lora",
           "read_lora_metadata", "network_config_sha256"]

#: the attention projections of the U-Net, DiT and cross-attention blocks: self-attention
#: ``qkv`` and ``proj``; cross-attention ``q``, ``kv`` and ``proj``
DEFAULT_TARGETS: tuple[str, ...] = ("qkv", "proj", "q", "kv")

#: key prefix of peft's saved adapters (``PeftModel.base_model.model`` is the wrapped network)
KEY_PREFIX = "base_model.model."
METADATA_KEY = "sfumato_lora"
_KEY = re.compile(r"^base_model\.model\.(.+)\.lora_([AB])\.weight$")
_SHOWN = 8  # names listed in an error message before "... and N more"


def _accumulator(device: torch.device) -> torch.dtype:
    """float64 for the merge arithmetic, float32 where float64 does not exist (MPS)."""
    return torch.float32 if device.type == "mps" else torch.float64


def _shapes(base: nn.Module, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """A's and B's weight shapes for a Linear (r, in), (out, r) or a Conv2d (r, in, kh, kw),
    (out, r, 1, 1) ``base`` and ``rank``."""
    w = base.weight
    if isinstance(base, nn.Conv2d):
        return (rank, *w.shape[1:]), (w.shape[0], rank, 1, 1)
    return (rank, w.shape[1]), (w.shape[0], rank)


class LoRA(nn.Module):
    """A linear or convolution layer with low-rank adapters: x -> base(x) + sum of the
    adapters' ``factor * B(A(dropout(x)))`` (module docstring, eq. 3 of Hu et al. 2022).

    Shapes are those of ``base``: (..., in) -> (..., out) for a Linear, (N, in, H, W) ->
    (N, out, H', W') for a Conv2d. ``base`` is frozen here. Per adapter name: ``lora_A[name]``,
    ``lora_B[name]``, ``lora_dropout[name]`` (modules), ``rank[name]``, ``alpha[name]``,
    ``scale[name]`` (run time) and, while merged into the base weight, ``merged[name]`` (the
    factor it was merged with). ``weight`` and ``bias`` are the base's, for code that reads a
    layer's dtype or device.
    """

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        if type(base) not in (nn.Linear, nn.Conv2d):
            raise UsageError(f"LoRA wraps nn.Linear and nn.Conv2d layers; got "
                             f"{type(base).__name__}")
        if isinstance(base, nn.Conv2d) and base.groups != 1:
            raise ConfigError(f"LoRA needs a convolution with groups=1; this one has groups="
                              f"{base.groups}: leave it out of the targets")
        self.base = base
        self.base_requires_grad = [p.requires_grad for p in base.parameters()]
        base.requires_grad_(False)
        self.train(base.training)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.rank: dict[str, int] = {}
        self.alpha: dict[str, float] = {}
        self.scale: dict[str, float] = {}
        self.merged: dict[str, float] = {}

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    @property
    def is_conv(self) -> bool:
        return isinstance(self.base, nn.Conv2d)

    def add_adapter(self, name: str, rank: int, alpha: float, dropout: float = 0.0,
                    generator: torch.Generator | None = None) -> None:
        """Add adapter ``name``: A ~ N(0, 1 / fan_in) (He et al. 2015's normal init with
        linear gain; the paper's "random Gaussian"), drawn on the CPU from ``generator`` (the
        default generator when None), and B = 0, in the base weight's dtype and device."""
        _check_name(name)
        _check_settings(rank, alpha, dropout)
        if name in self.lora_A:
            raise UsageError(f"this layer already has a LoRA adapter {name!r}: choose another "
                             "name, or remove_lora first")
        w, b = self.base.weight, self.base
        kw = {"bias": False, "device": w.device, "dtype": w.dtype}
        if self.is_conv:
            A: nn.Module = nn.Conv2d(b.in_channels, rank, b.kernel_size, b.stride, b.padding,
                                     b.dilation, padding_mode=b.padding_mode, **kw)
            B: nn.Module = nn.Conv2d(rank, b.out_channels, 1, **kw)
        else:
            A, B = nn.Linear(b.in_features, rank, **kw), nn.Linear(rank, b.out_features, **kw)
        fan_in = A.weight[0].numel()
        with torch.no_grad():
            A.weight.copy_(torch.randn(A.weight.shape, generator=generator) * fan_in ** -0.5)
            B.weight.zero_()
        drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        drop.train(self.training)
        self.lora_A[name], self.lora_B[name], self.lora_dropout[name] = A, B, drop
        self.rank[name], self.alpha[name], self.scale[name] = rank, float(alpha), 1.0

    def factor(self, name: str) -> float:
        """``scale * alpha / r`` of adapter ``name``."""
        return self.scale[name] * self.alpha[name] / self.rank[name]

    def delta_weight(self, name: str, factor: float) -> torch.Tensor:
        """``factor * B A`` as a weight like the base's (module docstring), in the merge
        accumulator dtype (float64)."""
        acc = _accumulator(self.base.weight.device)
        A = self.lora_A[name].weight.detach().to(acc)
        B = self.lora_B[name].weight.detach().to(acc)
        if self.is_conv:
            d = torch.einsum("oj,jikl->oikl", B[:, :, 0, 0], A)  # (out, in, kh, kw)
        else:
            d = B @ A  # (out, in)
        return factor * d

    def merge_adapter(self, name: str) -> None:
        """``W <- W + factor * B A`` with the current factor, rounded once to W's dtype; what
        the rounding lost is kept (buffer ``merge_residual_<name>``, float32 or wider, not
        saved) for :meth:`unmerge_adapter`. The adapter then stops adding its branch."""
        if name in self.merged:
            raise UsageError(f"LoRA adapter {name!r} is already merged (merging twice would "
                             "add it twice): unmerge it first")
        self._merge(name, self.factor(name))

    def unmerge_adapter(self, name: str) -> None:
        """``W <- W - factor * B A + residual`` with the factor and rounding residual of the
        merge (compensated summation, as Kahan's): the weight as it was before, bit for bit.
        Adapters merged after this one are unmerged first and merged again after, so any
        order of unmerging is exact."""
        if name not in self.merged:
            raise UsageError(f"LoRA adapter {name!r} is not merged: nothing to unmerge")
        later = list(self.merged)[list(self.merged).index(name) + 1:]
        factors = [self.merged[n] for n in later]
        for n in reversed(later):
            self._unmerge(n)
        self._unmerge(name)
        for n, f in zip(later, factors, strict=True):
            self._merge(n, f)

    def _merge(self, name: str, factor: float) -> None:
        w = self.base.weight
        with torch.no_grad():
            exact = w.to(_accumulator(w.device)) + self.delta_weight(name, factor)
            w.copy_(exact.to(w.dtype))
            residual = (exact - w.to(exact.dtype)).to(torch.promote_types(w.dtype,
                                                                          torch.float32))
        self.register_buffer(f"merge_residual_{name}", residual, persistent=False)
        self.merged[name] = factor

    def _unmerge(self, name: str) -> None:
        factor = self.merged.pop(name)
        residual = getattr(self, f"merge_residual_{name}")
        delattr(self, f"merge_residual_{name}")
        w = self.base.weight
        acc = _accumulator(w.device)
        with torch.no_grad():
            w.copy_((w.to(acc) - self.delta_weight(name, factor) + residual.to(acc))
                    .to(w.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        for name, A in self.lora_A.items():
            f = self.factor(name)
            if name in self.merged or f == 0:
                continue
            y = y + f * self.lora_B[name](A(self.lora_dropout[name](x)))
        return y

    def extra_repr(self) -> str:
        return ", ".join(f"{n}: r={self.rank[n]}, alpha={self.alpha[n]:g}, "
                         f"scale={self.scale[n]:g}" + (" (merged)" if n in self.merged else "")
                         for n in self.lora_A)


# ---------------------------------------------------------------------------------------------
# finding and wrapping layers


#: torch modules whose forward reads their sublayers' weights directly (MultiheadAttention's
#: out_proj; the transformer layers' inference fast path), so a wrapped sublayer would be
#: silently bypassed: LoRA leaves everything inside them alone
OPAQUE = (nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)


def _candidates(net: nn.Module) -> tuple[dict[str, nn.Module], list[str]]:
    """The layers LoRA can wrap, by module path: every Linear and Conv2d not inside a LoRA
    wrapper or an :data:`OPAQUE` module, and the wrappers themselves; plus the paths of the
    Linear and Conv2d layers inside opaque modules (refused, for the error message)."""
    layers: dict[str, nn.Module] = {}
    refused: list[str] = []
    inside = None  # path prefix of the module whose submodules are being skipped
    for path, m in net.named_modules():
        if not path or (inside and path.startswith(inside)):
            continue
        inside = None
        if isinstance(m, LoRA):
            layers[path], inside = m, path + "."
        elif isinstance(m, OPAQUE):
            refused += [f"{path}.{p}" for p, s in m.named_modules()
                        if isinstance(s, (nn.Linear, nn.Conv2d))]
            inside = path + "."
        elif type(m) in (nn.Linear, nn.Conv2d):
            layers[path] = m
    return layers, refused


def _matches(pattern: str, path: str) -> bool:
    """A pattern with ``*``, ``?`` or ``[`` matches the whole path (fnmatch); a plain one
    matches the path or its trailing dotted parts (``"qkv"`` and ``"1.qkv"`` match
    ``"mid.1.qkv"``, ``"proj"`` does not match ``"out_proj"``)."""
    if any(c in pattern for c in "*?["):
        return fnmatch.fnmatchcase(path, pattern)
    return path == pattern or path.endswith("." + pattern)


def _listing(names: Sequence[str]) -> str:
    more = f", ... and {len(names) - _SHOWN} more" if len(names) > _SHOWN else ""
    return ", ".join(names[:_SHOWN]) + more


def _replace(net: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(net.get_submodule(parent) if parent else net, child, module)


def _endings(paths: Iterable[str]) -> list[str]:
    """The distinct last parts of module paths, with the parent's name when the last part is
    an index (``mlp.0``): the plain patterns that select them."""
    ends = []
    for p in paths:
        parts = p.split(".")
        end = ".".join(parts[-2:]) if parts[-1].isdigit() and len(parts) > 1 else parts[-1]
        if end not in ends:
            ends.append(end)
    return ends


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not name or "." in name:
        raise UsageError(f"a LoRA adapter name must be a non-empty string without '.'; got "
                         f"{name!r}")
    if hasattr(nn.ModuleDict(), name):
        raise UsageError(f"LoRA adapter name {name!r} is taken by torch (an nn.Module "
                         "attribute): choose another")


def _check_settings(rank: int, alpha: float, dropout: float) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ConfigError(f"LoRA rank must be an integer >= 1; got {rank!r}")
    check_finite("LoRA alpha", alpha)
    if alpha <= 0:
        raise ConfigError(f"LoRA alpha must be > 0 (the update is scaled by alpha / rank); "
                          f"got {alpha!r}")
    check_finite("LoRA dropout", dropout, low=0.0)
    if dropout >= 1:
        raise ConfigError(f"LoRA dropout must be in [0, 1); got {dropout!r}")


def _plain_conv(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and m.groups == 1


def _select(net: nn.Module, targets: str | Iterable[str] | None, include_conv: bool
            ) -> dict[str, nn.Module]:
    """The layers ``targets`` (and with ``include_conv`` every Conv2d) name, by path, in
    module order; ConfigError for an explicit pattern that matches nothing, or when nothing
    matches at all."""
    layers, refused = _candidates(net)
    default = targets is None
    patterns = DEFAULT_TARGETS if default else (
        (targets,) if isinstance(targets, str) else tuple(targets))
    chosen = {p: m for p, m in layers.items()
              if any(_matches(t, p) for t in patterns)
              or (include_conv and _plain_conv(getattr(m, "base", m)))}
    unmatched = [] if default else [t for t in patterns
                                    if not any(_matches(t, p) for p in layers)]
    if unmatched or not chosen:
        kind = type(net).__name__
        if unmatched:
            what = (f"LoRA target pattern(s) {', '.join(map(repr, unmatched))} match no "
                    f"Linear or Conv2d layer of this {kind}")
        elif default:
            what = (f"this {kind} has no attention projection that the default LoRA targets "
                    f"{DEFAULT_TARGETS} name (it has no attention blocks)")
        else:
            what = "no LoRA targets given (an empty list) and include_conv is off"
        if any(_matches(t, r) for r in refused for t in unmatched):
            what += (" (layers inside torch's nn.MultiheadAttention and nn.Transformer*Layer "
                     "cannot take LoRA: those modules read their weights directly)")
        raise ConfigError(f"{what}. Patterns match a layer's path or its last dotted parts "
                          "('qkv' matches 'mid.1.qkv'), or the whole path with '*' wildcards; "
                          f"include_conv=True adds every Conv2d. Its layers end in "
                          f"{', '.join(_endings(layers))} (e.g. {_listing(list(layers))})")
    return chosen


def _wrap(net: nn.Module, layers: Mapping[str, nn.Module], name: str,
          settings: Mapping[str, tuple[int, float, float]],
          generator: torch.Generator | None) -> dict[str, LoRA]:
    """Add adapter ``name`` with ``settings[path] = (rank, alpha, dropout)`` to each layer of
    ``layers`` (wrapping a plain one in place); checks every layer before changing any."""
    taken = [p for p, m in layers.items() if isinstance(m, LoRA) and name in m.lora_A]
    if taken:
        raise UsageError(f"LoRA adapter {name!r} is already on {_listing(taken)}: choose "
                         "another name, or remove_lora first")
    for p, m in layers.items():
        if isinstance(m, nn.Conv2d) and m.groups != 1:
            raise ConfigError(f"layer {p!r} is a grouped convolution (groups={m.groups}), "
                              "which LoRA does not wrap: leave it out of the targets")
    wrapped = {}
    for p, m in layers.items():
        layer = m if isinstance(m, LoRA) else LoRA(m)
        if layer is not m:
            _replace(net, p, layer)
        layer.add_adapter(name, *settings[p], generator=generator)
        wrapped[p] = layer
    return wrapped


def inject_lora(net: nn.Module, targets: str | Iterable[str] | None = None, rank: int = 4,
                alpha: float = 4.0, dropout: float = 0.0, name: str = "default",
                include_conv: bool = False, generator: torch.Generator | None = None
                ) -> list[str]:
    """Add LoRA adapter ``name`` to the layers of ``net`` that ``targets`` names, in place.

    Args:
        net: any module; its matching ``nn.Linear`` / ``nn.Conv2d`` layers are replaced by
            :class:`LoRA` wrappers holding them as ``.base`` (frozen), or get one more adapter
            if already wrapped.
        targets: module-path patterns (one string or several). A plain pattern matches a
            path or its trailing dotted parts (``"qkv"``, ``"cross.q"``, ``"mid.1.proj"``); one
            with ``*``/``?``/``[`` matches the whole path (``"up.*.conv1"``). Each pattern
            given must match a layer. None: :data:`DEFAULT_TARGETS`, the attention
            projections (self- and cross-attention of the U-Net and DiT), needing only that
            something matches.
        rank, alpha: r and alpha of eq. 3; the update is scaled by alpha / r.
        dropout: dropout probability on the adapter branch's input.
        name: the adapter's name (several adapters can sit on one layer).
        include_conv: also wrap every Conv2d (the U-Net's residual, skip, resampling, input
            and output convolutions; DiT's patch embedding), grouped ones excepted.
        generator: draws A's initial values (CPU); None uses torch's default generator.

    Returns the wrapped module paths, in module order. Raises ConfigError for a pattern that
    matches nothing (listing the network's layers) and UsageError for an adapter name already
    on a matched layer; the network is unchanged then.
    """
    _check_name(name)
    _check_settings(rank, alpha, dropout)
    layers = _select(net, targets, include_conv)
    settings = dict.fromkeys(layers, (rank, float(alpha), float(dropout)))
    return list(_wrap(net, layers, name, settings, generator))


def lora_layers(net: nn.Module, name: str | None = None) -> dict[str, LoRA]:
    """The LoRA layers of ``net`` by module path (those holding adapter ``name`` if given);
    UsageError when there are none, naming the adapters there are."""
    layers = {p: m for p, m in net.named_modules() if isinstance(m, LoRA)}
    if not layers:
        raise UsageError(f"this {type(net).__name__} has no LoRA layers: inject_lora or "
                         "load_lora first")
    if name is None:
        return layers
    have = {p: m for p, m in layers.items() if name in m.lora_A}
    if not have:
        names = sorted({n for m in layers.values() for n in m.lora_A})
        raise UsageError(f"this network has no LoRA adapter {name!r}; its adapters: {names}")
    return have


def _adapters(net: nn.Module, name: str | None) -> list[tuple[str, LoRA, str]]:
    """(path, layer, adapter) for adapter ``name`` (every adapter when None)."""
    return [(p, m, n) for p, m in lora_layers(net, name).items()
            for n in ([name] if name is not None else list(m.lora_A))]


# ---------------------------------------------------------------------------------------------
# merging, scale, removal


def _checked(net: nn.Module, name: str | None, bad: Callable[[LoRA, str], bool],
             problem: str) -> list[tuple[str, LoRA, str]]:
    """The (path, layer, adapter) triples of adapter ``name`` (every adapter when None);
    UsageError naming those for which ``bad(layer, adapter)`` holds, before anything
    changes."""
    todo = _adapters(net, name)
    found = [f"{n!r} in {p}" for p, m, n in todo if bad(m, n)]
    if found:
        raise UsageError(f"LoRA adapter {_listing(found)} {problem}")
    return todo


def merge(net: nn.Module, name: str | None = None) -> None:
    """Fold adapter ``name`` (every adapter when None) into its layers' base weights,
    ``W <- W + scale (alpha / r) B A`` (module docstring); the output is unchanged (to
    rounding) and the adapters stop costing time. UsageError, before changing anything, if
    one of them is already merged."""
    for _, m, n in _checked(net, name, lambda m, n: n in m.merged, "is already merged "
                            "(merging twice would add it twice): unmerge it first"):
        m.merge_adapter(n)


def unmerge(net: nn.Module, name: str | None = None) -> None:
    """Undo :func:`merge` of adapter ``name`` (every adapter when None): subtract the
    merged update from the base weights. UsageError, before changing anything, if one of them
    is not merged."""
    for _, m, n in _checked(net, name, lambda m, n: n not in m.merged,
                            "is not merged: nothing to unmerge"):
        m.unmerge_adapter(n)


def set_lora_scale(net: nn.Module, scale: float, name: str | None = None) -> None:
    """Set the run-time ``scale`` of adapter ``name`` (every adapter when None): the update
    becomes ``scale (alpha / r) B A`` (0 switches it off). UsageError for a merged adapter
    (unmerge it first: its update is in the weights)."""
    check_finite("LoRA scale", scale)
    for _, m, n in _checked(net, name, lambda m, n: n in m.merged, "is merged into the "
                            "weights: unmerge it before changing its scale"):
        m.scale[n] = float(scale)


def remove_lora(net: nn.Module, merge: bool = False) -> list[str]:
    """Put every wrapped layer's base module back in place (its parameters' requires_grad as
    before wrapping). ``merge=True`` keeps the adapters' updates (merging those not merged:
    a plain network computing the same function); ``merge=False`` drops them (unmerging
    those merged: the original network). Returns the unwrapped paths."""
    layers = lora_layers(net)
    for p, m in layers.items():
        for n in list(m.lora_A):
            if merge and n not in m.merged:
                m.merge_adapter(n)
            elif not merge and n in m.merged:
                m.unmerge_adapter(n)
        for param, flag in zip(m.base.parameters(), m.base_requires_grad, strict=True):
            param.requires_grad_(flag)
        _replace(net, p, m.base)
    return list(layers)


# ---------------------------------------------------------------------------------------------
# training


def trainable_lora_parameters(net: nn.Module, name: str | None = None) -> list[nn.Parameter]:
    """The A and B weights of adapter ``name`` (every adapter when None), in module order."""
    return [w for _, m, n in _adapters(net, name)
            for w in (m.lora_A[n].weight, m.lora_B[n].weight)]


def mark_only_lora_trainable(net: nn.Module, name: str | None = None) -> list[nn.Parameter]:
    """Freeze every parameter of ``net`` except adapter ``name``'s (every adapter's when None)
    and return those (for the optimizer)."""
    params = trainable_lora_parameters(net, name)
    net.requires_grad_(False)
    for w in params:
        w.requires_grad_(True)
    return params


# ---------------------------------------------------------------------------------------------
# files


def network_config_sha256(cfg: Mapping[str, Any]) -> str:
    """SHA-256 of a network config as canonical JSON (sorted keys, no spaces): what a LoRA
    file records (``meta``) to recognise the base it was made for."""
    text = json.dumps(cfg, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def lora_state_dict(net: nn.Module, name: str = "default") -> dict[str, torch.Tensor]:
    """Adapter ``name``'s tensors keyed as peft keys them: ``base_model.model.<path>.lora_A
    .weight`` (r, in[, kh, kw]) and ``...lora_B.weight`` (out, r[, 1, 1])."""
    sd = {}
    for p, m in lora_layers(net, name).items():
        sd[f"{KEY_PREFIX}{p}.lora_A.weight"] = m.lora_A[name].weight.detach()
        sd[f"{KEY_PREFIX}{p}.lora_B.weight"] = m.lora_B[name].weight.detach()
    return sd


def _uniform(values: Iterable[Any]) -> Any:
    """The common value, or None when they differ."""
    s = set(values)
    return s.pop() if len(s) == 1 else None


def save_lora(net: nn.Module, path: str | os.PathLike, name: str = "default",
              meta: Mapping[str, Any] | None = None) -> Path:
    """Write adapter ``name`` of ``net`` to ``path`` (safetensors, atomically): the tensors of
    :func:`lora_state_dict` and the JSON settings in the header (module docstring), ``meta``
    (JSON-serialisable, e.g. ``{"base_config_sha256": ...}``) included. Returns the path."""
    layers = lora_layers(net, name)
    per_layer = {p: {"rank": m.rank[name], "alpha": m.alpha[name],
                     "dropout": getattr(m.lora_dropout[name], "p", 0.0)}
                 for p, m in layers.items()}
    info = {"adapter": name, "targets": list(layers), "layers": per_layer,
            **{k: _uniform(v[k] for v in per_layer.values())
               for k in ("rank", "alpha", "dropout")},
            "meta": dict(meta or {})}
    try:
        header = {"format": "pt", METADATA_KEY: json.dumps(info, sort_keys=True)}
    except (TypeError, ValueError) as e:
        raise UsageError(f"LoRA file meta must be JSON-serialisable: {e}") from None
    tensors = {k: v.to("cpu").contiguous().clone() for k, v in lora_state_dict(net, name).items()}
    path = Path(path)
    with atomic_write(path) as tmp:
        save_file(tensors, str(tmp), metadata=header)
    return path


def _read(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, settings) of a LoRA file; CheckpointError for a missing or unreadable file
    or one without sfumato's settings."""
    tensors, header = read_safetensors(path, "LoRA file")
    if METADATA_KEY not in header:
        raise CheckpointError(f"LoRA file {path} has no {METADATA_KEY!r} settings in its "
                              "header (rank, alpha, ...): write it with save_lora")
    try:
        info = json.loads(header[METADATA_KEY])
        layers = info["layers"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"LoRA file {path} has corrupt {METADATA_KEY!r} settings: {e}"
                              ) from None
    if not isinstance(layers, dict):
        raise CheckpointError(f"LoRA file {path} has corrupt {METADATA_KEY!r} settings")
    return tensors, info


def read_lora_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The settings a LoRA file records (module docstring): ``adapter``, ``rank``, ``alpha``,
    ``dropout``, ``targets``, ``layers`` and the ``meta`` its writer gave."""
    return _read(path)[1]


def _pairs(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor],
           info: Mapping[str, Any]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The file's (A, B) per module path; CheckpointError for foreign keys, a half pair, or
    keys that disagree with the recorded layers."""
    found: dict[str, dict[str, torch.Tensor]] = {}
    foreign = []
    for k, v in tensors.items():
        m = _KEY.match(k)
        if m is None:
            foreign.append(k)
        else:
            found.setdefault(m[1], {})[m[2]] = v
    half = [f"{KEY_PREFIX}{p}.lora_{'B' if 'A' in ab else 'A'}.weight"
            for p, ab in found.items() if len(ab) != 2]
    if foreign or half:
        raise CheckpointError(f"LoRA file {path} is not a LoRA file of this layout: "
                              + (f"unexpected keys {_listing(foreign)}" if foreign else
                                 f"missing keys {_listing(half)}"))
    if set(found) != set(info["layers"]):
        raise CheckpointError(f"LoRA file {path}: its tensors and its recorded layers differ "
                              f"({_listing(sorted(set(found) ^ set(info['layers'])))})")
    return {p: (ab["A"], ab["B"]) for p, ab in found.items()}


def load_lora(net: nn.Module, path: str | os.PathLike, name: str | None = None,
              scale: float = 1.0) -> list[str]:
    """Add the adapter stored in ``path`` (see :func:`save_lora`) to ``net`` as adapter
    ``name`` (default: the name it was saved under) with run-time ``scale``; returns the
    wrapped paths.

    ``net`` is the base network the adapter was trained on, freshly built (or already
    carrying other adapters). Every key is checked before anything changes: a CheckpointError
    names the keys whose layers the network lacks, or whose shapes differ from the layers'
    (another architecture or size), and UsageError a name already in use. Nothing is
    unpickled (safetensors).
    """
    check_finite("LoRA scale", scale)
    tensors, info = _read(path)
    name = info.get("adapter", "default") if name is None else name
    _check_name(name)
    pairs = _pairs(path, tensors, info)
    layers, _ = _candidates(net)
    missing = [f"{KEY_PREFIX}{p}.lora_A.weight" for p in pairs if p not in layers]
    if missing:
        raise CheckpointError(
            f"LoRA file {path} does not fit this {type(net).__name__}: it has no Linear or "
            f"Conv2d layer for {len(missing)} of the file's {len(pairs)} layers, keys "
            f"{_listing(missing)}. The adapter was made for another network: load it onto "
            "the base it was trained on (its config hash is in read_lora_metadata(path))")
    wrong = []
    settings = {}
    for p, (A, B) in pairs.items():
        base = layers[p].base if isinstance(layers[p], LoRA) else layers[p]
        rank = A.shape[0] if A.ndim else 0
        want_A, want_B = _shapes(base, rank)
        for part, t, want in (("A", A, want_A), ("B", B, want_B)):
            if tuple(t.shape) != want:
                wrong.append(f"{KEY_PREFIX}{p}.lora_{part}.weight {tuple(t.shape)} (the layer "
                             f"needs {want})")
        rec = info["layers"][p]
        try:
            settings[p] = (int(rec["rank"]), float(rec["alpha"]), float(rec.get("dropout", 0)))
            _check_settings(*settings[p])
        except (AttributeError, KeyError, TypeError, ValueError):
            raise CheckpointError(f"LoRA file {path}: corrupt settings for layer {p}: {rec!r}"
                                  ) from None
        if settings[p][0] != rank:
            wrong.append(f"{KEY_PREFIX}{p}.lora_A.weight rank {rank} (recorded rank "
                         f"{settings[p][0]})")
    if wrong:
        raise CheckpointError(f"LoRA file {path} does not fit this {type(net).__name__}: "
                              f"shapes differ for {_listing(wrong)}; it was made for another "
                              "architecture or size")
    chosen = {p: layers[p] for p in layers if p in pairs}  # module order
    wrapped = _wrap(net, chosen, name, settings, torch.Generator().manual_seed(0))
    with torch.no_grad():
        for p, m in wrapped.items():
            A, B = pairs[p]
            m.lora_A[name].weight.copy_(A)
            m.lora_B[name].weight.copy_(B)
            m.scale[name] = float(scale)
    return list(wrapped)

