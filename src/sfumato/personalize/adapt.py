"""The network of a personalised run: a base run's network, its weights, and what the method
adds and trains.

- ``lora``: LoRA adapters (:mod:`~sfumato.personalize.lora`) on the layers ``lora.targets``
  names; only the adapters train.
- ``dreambooth``: every weight of the base network trains (Ruiz et al. 2023, full
  fine-tuning).
- ``textual-inversion``: nothing of the base network trains; only the new concept's
  embedding does (Gal et al. 2023): the new token's input embedding of the text encoder (kept
  on the network as ``token_embedding``, :mod:`~sfumato.personalize.textual_inversion`) or,
  for a class-conditional base, the new class slot.

A class-conditional base (no text encoder) gets one new class slot for the concept
(:class:`SlotEmbedding`): label K for a base with K classes, the null label moving to K + 1.
The slot starts at the mean of the base's class embeddings and trains under every method.

A personalised run's checkpoint holds only the tensors that train (:func:`adapt_network`),
so a LoRA or textual-inversion run is small; :func:`personalized_network` rebuilds the whole
network from the base run and them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError, ConfigError
from ..nets.embedding import ConditionEmbedding
from .lora import inject_lora, mark_only_lora_trainable

__all__ = ["METHODS", "SlotEmbedding", "add_class_slot", "adapt_network", "trainable_state",
           "load_trainable_state", "personalized_network"]

#: the fine-tuning methods and what trains
METHODS = ("lora", "dreambooth", "textual-inversion")


class SlotEmbedding(nn.Module):
    """A class embedding with ``n_new`` more classes: the base's K class rows (frozen
    buffer), then the new rows (trained), then the base's null row (frozen buffer), so label
    K + i is new class i and K + n_new the null class. ``forward(labels (B,)) -> (B, dim)``."""

    def __init__(self, base: nn.Embedding, n_new: int = 1) -> None:
        super().__init__()
        w = base.weight.detach()
        self.register_buffer("classes", w[:-1].clone())
        self.register_buffer("null", w[-1:].clone())
        self.new = nn.Parameter(w[:-1].mean(0, keepdim=True).repeat(n_new, 1).clone())

    @property
    def weight(self) -> torch.Tensor:
        return torch.cat([self.classes, self.new, self.null])

    @property
    def num_embeddings(self) -> int:
        return self.classes.shape[0] + self.new.shape[0] + 1

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return F.embedding(labels, self.weight)


def add_class_slot(net: nn.Module) -> int:
    """Give every class embedding of ``net`` one new class (in place); returns the new label
    K. ConfigError for a network without class conditioning."""
    found = [m for m in net.modules()
             if isinstance(m, ConditionEmbedding) and m.label is not None]
    if not found:
        raise ConfigError("a new class slot needs a class-conditional base network")
    k = found[0].num_classes
    for m in found:
        m.label = SlotEmbedding(m.label)
        m.num_classes = k + 1
    for m in net.modules():  # the networks' own record (messages, checks)
        if getattr(m, "num_classes", None) == k and not isinstance(m, ConditionEmbedding):
            m.num_classes = k + 1
    return k


def adapt_network(net: nn.Module, settings: Mapping[str, Any], base_classes: int | None,
                  generator: torch.Generator | None = None,
                  token: nn.Module | None = None) -> list[str]:
    """Add to the base network ``net`` (its weights loaded) what the method ``settings
    ["method"]`` trains, and freeze the rest; returns the names of the parameters that train.
    ``base_classes``: K of a class-conditional base (a new slot is added), else None.
    ``token``: the :class:`~.textual_inversion.TokenEmbedding` a textual-inversion run on a
    text base trains (default: a new one, zero)."""
    method = settings["method"]
    if method not in METHODS:
        raise ConfigError(f"unknown fine-tuning method {method!r}; choose one of {list(METHODS)}")
    slot = bool(base_classes) and add_class_slot(net) is not None
    if method == "lora":
        lc = settings["lora"]
        inject_lora(net, lc.get("targets"), rank=int(lc["rank"]), alpha=float(lc["alpha"]),
                    dropout=float(lc["dropout"]), include_conv=bool(lc["include_conv"]),
                    generator=generator)
        mark_only_lora_trainable(net)
    elif method == "textual-inversion":
        net.requires_grad_(False)
        if not slot:
            from .textual_inversion import TokenEmbedding

            net.add_module("token_embedding", token or TokenEmbedding(settings["token"]))
    else:
        net.requires_grad_(True)
    for m in net.modules():
        if isinstance(m, SlotEmbedding):
            m.new.requires_grad_(True)
    if method == "textual-inversion" and not slot:
        net.token_embedding.requires_grad_(True)
    if method == "dreambooth":  # the whole network is the run's own
        return list(net.state_dict())
    return [n for n, p in net.named_parameters() if p.requires_grad]


def trainable_state(names: list[str], net: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors of ``names`` in ``net``'s state dict (what a checkpoint stores)."""
    sd = net.state_dict()
    return {k: sd[k] for k in names}


def load_trainable_state(net: nn.Module, names: list[str], tensors: Mapping[str, torch.Tensor],
                         where: str) -> None:
    """Load a personalised checkpoint's tensors into the adapted ``net``; CheckpointError
    naming the keys that are missing or foreign (another method or base)."""
    missing = sorted(set(names) - set(tensors))
    foreign = sorted(set(tensors) - set(net.state_dict()))
    if missing or foreign:
        raise CheckpointError(f"{where} does not fit this base and method: "
                              + (f"missing {missing[:5]}" if missing else
                                 f"unexpected keys {foreign[:5]}"))
    net.load_state_dict(dict(tensors), strict=False)


def personalized_network(run, stem: str = "ema") -> nn.Module:
    """The whole network of a personalised run: its base run's network and EMA weights
    (resolved through ``refs.base`` and checked against its hash), adapted as the run's
    ``finetune`` settings say, with the run's own ``stem`` tensors loaded."""
    from ..run import build_network

    base = run.resolve("base")
    net = build_network(base.config["model"], base.num_classes)
    net.load_state_dict(base.weights())
    settings = run.config["finetune"]
    if settings["method"] == "ziplora":  # one zipped adapter, of per-layer ranks (combine.py)
        from .lora import load_lora

        load_lora(net, run.dir / "lora.safetensors", name="default")
        names = [k for k in net.state_dict() if ".lora_" in k]
    else:
        names = adapt_network(net, settings, base.num_classes)
    load_trainable_state(net, names, run.weights(stem), f"{run.checkpoint}/{stem}.safetensors")
    return net
