"""ZipLoRA: merging a subject LoRA and a style LoRA trained on the same base network (Shah et
al. 2023, "ZipLoRA: Any Subject in Any Style by Effectively Merging LoRAs").

For each adapted layer, with the updates ``dW_s = f_s B_s A_s`` and ``dW_t = f_t B_t A_t``
(``f = scale * alpha / r``, :mod:`~sfumato.personalize.lora`; ``dW`` is (out, in) for a Linear,
(out, in, kh, kw) for a Conv2d), ZipLoRA learns one merger coefficient per column of ``dW``,
i.e. per input channel, ``m_s, m_t`` in R^in (initialised to 1), and merges::

    dW_m = dW_s diag(m_s) + dW_t diag(m_t)

Since ``dW diag(m) = B (A diag(m))`` (A's input channels, its dim 1, scaled), the merged layer
is ONE LoRA adapter of rank ``r_s + r_t`` with ``A_m = cat([A_s diag(m_s), A_t diag(m_t)], 0)``,
``B_m = cat([f_s B_s, f_t B_t], 1)`` and alpha = rank (factor 1): :meth:`ZipLoRA.save` writes
it as a standard LoRA file that :func:`~sfumato.personalize.lora.load_lora` reads. A layer that
only one of the two LoRAs adapts keeps that update times its (still learned) ``m``.

The merger vectors minimise the paper's merger loss ``L_merge`` (ZipLoRA section of Shah et al.
2023), with the cosine-similarity form of its orthogonality term::

    L = |D_m(x_s; c_s) - D_s(x_s; c_s)|^2 + |D_m(x_t; c_t) - D_t(x_t; c_t)|^2
        + lambda * sum_layers |cos(m_s, m_t)|

``D_s`` / ``D_t``: the network with only the subject / only the style LoRA; ``D_m``: with the
merged update; ``x_s``, ``c_s`` (``x_t``, ``c_t``): noisy inputs made from the subject's (the
style's) reference images with its own conditioning. The squared norms are taken as means over
the output's elements (so lambda does not depend on the output's size). Only the ``m`` vectors
are trained (Adam); the base weights and the LoRAs' A and B stay as they are.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError, UsageError, check_finite
from .lora import LoRA, _pairs, _read, _replace, _wrap, load_lora, lora_layers, save_lora

__all__ = ["ZipLoRA", "zip_loras", "naive_merge", "cosine_penalty", "ADAPTERS"]

#: the names the two LoRAs get on the network
ADAPTERS: tuple[str, str] = ("subject", "style")

#: ``forward(net, generator) -> output``: draws a batch's noise (and anything else random)
#: from the generator and runs the network on it (e.g. wrapped in a denoiser, with the
#: batch's conditioning); called twice per step with the same generator state
Forward = Callable[[nn.Module, torch.Generator], torch.Tensor]


def cosine_penalty(mergers: Mapping[str, Mapping[str, torch.Tensor]]) -> torch.Tensor:
    """``sum over layers of |cos(m_s, m_t)|`` (the orthogonality term of ``L_merge``) for
    ``mergers[path] = {"subject": m_s, "style": m_t}`` (each of shape (in,)); layers with only
    one of the two vectors add nothing. A scalar tensor (0 when no layer has both)."""
    terms = [F.cosine_similarity(m["subject"], m["style"], dim=0, eps=1e-8).abs()
             for m in mergers.values() if len(m) == 2]
    return torch.stack(terms).sum() if terms else torch.zeros(())


class ZipLoRA:
    """Two LoRA files on one base network with per-layer merger vectors (module docstring).

    ``net`` is the bare base network both LoRAs were trained on; the files are loaded onto it
    (in place) as adapters ``"subject"`` and ``"style"`` at scale 1, and it is put in eval
    mode. Outside :meth:`use`, the network computes the plain sum of both adapters.

    Attributes:
        net: the network.
        mergers: ``mergers[path][adapter]``, the merger vector (in,) of each adapter of each
            adapted layer (float32 leaf tensors on the layer's device, initialised to 1).
        history: the loss ``L`` of each training step, before its update.
    """

    def __init__(self, net: nn.Module, subject: str | os.PathLike,
                 style: str | os.PathLike) -> None:
        self.files = {"subject": Path(subject), "style": Path(style)}
        self.base_sha256 = _check_pair(self.files["subject"], self.files["style"])
        before = {p for p, m in net.named_modules() if isinstance(m, LoRA)}
        load_lora(net, subject, name="subject")
        try:
            load_lora(net, style, name="style")
        except Exception:
            _drop(net, "subject", unwrap={p for p, m in net.named_modules()
                                          if isinstance(m, LoRA) and p not in before})
            raise
        self.net = net.eval()
        self.layers = {p: m for p, m in lora_layers(net).items()
                       if any(n in m.lora_A for n in ADAPTERS)}
        self.factors = {p: {n: m.factor(n) for n in ADAPTERS if n in m.lora_A}
                        for p, m in self.layers.items()}
        self.mergers = {p: {n: torch.ones(m.base.weight.shape[1], device=m.base.weight.device,
                                          requires_grad=True) for n in self.factors[p]}
                        for p, m in self.layers.items()}
        self.history: list[float] = []

    def parameters(self) -> list[torch.Tensor]:
        """The merger vectors, in layer order (what the optimiser trains)."""
        return [m for ms in self.mergers.values() for m in ms.values()]

    def _branch(self, path: str, name: str, x: torch.Tensor) -> torch.Tensor:
        """``f B A (m * x)``: adapter ``name``'s update with its input channels scaled by m
        (x: (..., in) for a Linear, (N, in, H, W) for a Conv2d)."""
        layer, m = self.layers[path], self.mergers[path][name]
        m = m.view(-1, 1, 1) if layer.is_conv else m
        x = layer.lora_dropout[name](x) * m.to(x.dtype)
        return self.factors[path][name] * layer.lora_B[name](layer.lora_A[name](x))

    @contextlib.contextmanager
    def use(self, which: str) -> Iterator[nn.Module]:
        """Within the block, the network computes ``D_m`` (``which="merged"``), ``D_s``
        (``"subject"``, the style adapter off) or ``D_t`` (``"style"``); yields it."""
        if which not in ("merged", *ADAPTERS):
            raise UsageError(f"ZipLoRA.use takes 'merged', 'subject' or 'style'; got {which!r}")
        scales = {p: dict(m.scale) for p, m in self.layers.items()}
        hooks = []
        try:
            for p, m in self.layers.items():
                for n in self.factors[p]:
                    m.scale[n] = m.scale[n] if n == which else 0.0
                if which == "merged":
                    hooks.append(m.register_forward_hook(
                        lambda mod, args, out, p=p: out + sum(
                            self._branch(p, n, args[0]) for n in self.factors[p])))
            yield self.net
        finally:
            for h in hooks:
                h.remove()
            for p, m in self.layers.items():
                m.scale.update(scales[p])

    def fit(self, subject_forward: Forward, style_forward: Forward, *, steps: int = 100,
            lr: float = 0.01, penalty: float = 0.01,
            generator: torch.Generator | None = None) -> list[float]:
        """Train the merger vectors on ``L_merge`` (module docstring) with Adam for ``steps``
        steps. Per step and per LoRA, ``forward(net, generator)`` runs once for the target
        (``D_s`` or ``D_t``, without gradients) and once for ``D_m`` from the same generator
        state, so both see the same inputs. ``penalty`` is lambda. Returns :attr:`history`
        (this call's losses appended)."""
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise UsageError(f"ZipLoRA steps must be an integer >= 0; got {steps!r}")
        check_finite("ZipLoRA lr", lr, low=0.0)
        check_finite("ZipLoRA penalty", penalty, low=0.0)
        g = torch.Generator().manual_seed(0) if generator is None else generator
        params = self.parameters()
        opt = torch.optim.Adam(params, lr=lr)
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            total = 0.0
            for which, forward in (("subject", subject_forward), ("style", style_forward)):
                state = g.get_state()
                with torch.no_grad(), self.use(which) as net:
                    target = forward(net, g)
                g.set_state(state)
                with self.use("merged") as net:
                    loss = F.mse_loss(forward(net, g).float(), target.float())
                loss.backward(inputs=params)  # one graph at a time; grads to m only
                total += loss.item()
            reg = penalty * cosine_penalty(self.mergers)
            if reg.requires_grad:
                reg.backward(inputs=[m for ms in self.mergers.values() if len(ms) == 2
                                     for m in ms.values()])
            self.history.append(total + reg.item())
            opt.step()
        return self.history

    def merged_adapter(self, path: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``path``'s merged adapter ``(A_m, B_m)``: (r_s + r_t, in[, kh, kw]) and
        (out, r_s + r_t[, 1, 1]), float64, with factor 1 (module docstring)."""
        layer, As, Bs = self.layers[path], [], []
        with torch.no_grad():
            for n, f in self.factors[path].items():
                m = self.mergers[path][n].to(torch.float64)
                A = layer.lora_A[n].weight.to(torch.float64)
                As.append(A * (m.view(1, -1, 1, 1) if layer.is_conv else m.view(1, -1)))
                Bs.append(f * layer.lora_B[n].weight.to(torch.float64))
        return torch.cat(As, 0), torch.cat(Bs, 1)

    def save(self, path: str | os.PathLike, meta: Mapping[str, Any] | None = None,
             name: str = "zipped") -> Path:
        """Write the merged network's update as ONE standard LoRA file (adapter ``name``,
        per-layer rank ``r_s + r_t`` (or the one LoRA's rank), alpha = rank, dropout 0) with
        :func:`save_lora` (atomic: nothing is overwritten on an error). ``meta`` adds to the
        recorded ``merged_from`` (the two files' names) and the base config hash the inputs
        record. Returns the path."""
        adapters = {p: self.merged_adapter(p) for p in self.layers}
        settings = {p: (A.shape[0], float(A.shape[0]), 0.0) for p, (A, _) in adapters.items()}
        info = {"merged_from": [f.name for f in self.files.values()]}
        if self.base_sha256 is not None:
            info["base_config_sha256"] = self.base_sha256
        wrapped = _wrap(self.net, self.layers, name, settings, torch.Generator().manual_seed(0))
        try:
            with torch.no_grad():
                for p, layer in wrapped.items():
                    layer.lora_A[name].weight.copy_(adapters[p][0])
                    layer.lora_B[name].weight.copy_(adapters[p][1])
            return save_lora(self.net, path, name, meta={**info, **(meta or {})})
        finally:
            _drop(self.net, name, unwrap=set())


def zip_loras(net: nn.Module, subject: str | os.PathLike, style: str | os.PathLike,
              subject_forward: Forward, style_forward: Forward, *, steps: int = 100,
              lr: float = 0.01, penalty: float = 0.01,
              generator: torch.Generator | None = None) -> ZipLoRA:
    """ZipLoRA (Shah et al. 2023): load the ``subject`` and ``style`` LoRA files onto the bare
    base network ``net`` and train the merger vectors (:meth:`ZipLoRA.fit`; ``penalty`` is
    the lambda of ``L_merge``). ``subject_forward(net, g)`` / ``style_forward(net, g)`` draw
    one batch's noise from ``g`` and return the network's output on the subject's (style's)
    noisy reference images with its conditioning. Returns the :class:`ZipLoRA` (its
    ``history``, ``mergers``, :meth:`~ZipLoRA.use` and :meth:`~ZipLoRA.save`).

    CheckpointError, before ``net`` changes, for files made for different base networks
    (naming the first layer whose shapes differ) or that do not fit ``net``.
    """
    z = ZipLoRA(net, subject, style)
    z.fit(subject_forward, style_forward, steps=steps, lr=lr, penalty=penalty,
          generator=generator)
    return z


def naive_merge(net: nn.Module, subject: str | os.PathLike, style: str | os.PathLike,
                weights: tuple[float, float] = (0.5, 0.5)) -> ZipLoRA:
    """The baseline: ``dW_m = w_s dW_s + w_t dW_t`` (constant merger vectors), weight
    averaging by default; ``(1, 1)`` is the plain sum. Save it with :meth:`ZipLoRA.save`."""
    if len(weights) != 2:
        raise UsageError(f"naive_merge takes two weights (subject, style); got {weights!r}")
    check_finite("merge weights", weights)
    z = ZipLoRA(net, subject, style)
    with torch.no_grad():
        for ms in z.mergers.values():
            for n, m in ms.items():
                m.fill_(float(weights[ADAPTERS.index(n)]))
    return z


def _check_pair(subject: Path, style: Path) -> str | None:
    """CheckpointError when the two LoRA files cannot come from one base network: a shared
    layer with other input/output shapes, or different recorded base config hashes. Returns
    the recorded hash (None when neither records one)."""
    (ts, info_s), (tt, info_t) = _read(subject), _read(style)
    ps, pt = _pairs(subject, ts, info_s), _pairs(style, tt, info_t)
    for p in (p for p in ps if p in pt):
        (As, Bs), (At, Bt) = ps[p], pt[p]
        if As.shape[1:] != At.shape[1:] or Bs.shape[:1] + Bs.shape[2:] != Bt.shape[:1] \
                + Bt.shape[2:]:
            raise CheckpointError(
                f"LoRA files {subject} and {style} were made for different base networks: "
                f"layer {p!r} has A {tuple(As.shape)}, B {tuple(Bs.shape)} in the subject "
                f"file and A {tuple(At.shape)}, B {tuple(Bt.shape)} in the style file (other "
                "input/output sizes); ZipLoRA merges LoRAs trained on the same base")
    hashes = {i.get("meta", {}).get("base_config_sha256") for i in (info_s, info_t)} - {None}
    if len(hashes) > 1:
        raise CheckpointError(f"LoRA files {subject} and {style} record different base "
                              "networks (base_config_sha256 differs); ZipLoRA merges LoRAs "
                              "trained on the same base")
    return hashes.pop() if hashes else None


def _drop(net: nn.Module, name: str, unwrap: set[str]) -> None:
    """Remove adapter ``name`` from every layer holding it; put back the base module of the
    layers in ``unwrap`` that are left without adapters."""
    for p, m in lora_layers(net, name).items():
        for d in (m.lora_A, m.lora_B, m.lora_dropout):
            del d[name]
        for s in (m.rank, m.alpha, m.scale):
            s.pop(name)
        if p in unwrap and not m.lora_A:
            for param, flag in zip(m.base.parameters(), m.base_requires_grad, strict=True):
                param.requires_grad_(flag)
            _replace(net, p, m.base)
