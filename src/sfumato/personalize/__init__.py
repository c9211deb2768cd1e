"""Personalisation: teaching a trained network a new subject or style from a few images
without retraining it.

Each method trains a run of kind ``personalized`` on the common trainer, with its base run
recorded in ``refs.base`` (path + weights hash): ``sfumato finetune`` /
:func:`sfumato.finetune` (:mod:`~sfumato.personalize.finetune`).

- :mod:`~sfumato.personalize.lora`: low-rank adapters (Hu et al. 2022) on the attention
  projections (and optionally the convolutions) of the U-Net and DiT, with exact merge /
  unmerge, a run-time scale, several adapters at once and small LoRA-only safetensors files
  in peft's key layout.
- :mod:`~sfumato.personalize.dreambooth`: the subject + prior-preservation training set of
  DreamBooth (Ruiz et al. 2023) and the token checks.
- :mod:`~sfumato.personalize.textual_inversion`: a new input embedding of the frozen MiniLM
  encoder (Gal et al. 2023).
- :mod:`~sfumato.personalize.adapt`: what each method adds to and trains in the base network
  (adapters, every weight, a token, or a new class slot for a class-conditional base).
- :mod:`~sfumato.personalize.ziplora` and :mod:`~sfumato.personalize.combine`: ZipLoRA (Shah
  et al. 2023) and ``sfumato lora merge`` / ``sfumato lora zip``.
"""

from __future__ import annotations

from .lora import (
    DEFAULT_TARGETS,
    LoRA,
    inject_lora,
    load_lora,
    lora_layers,
    lora_state_dict,
    mark_only_lora_trainable,
    merge,
    network_config_sha256,
    read_lora_metadata,
    remove_lora,
    save_lora,
    set_lora_scale,
    trainable_lora_parameters,
    unmerge,
)

__all__ = ["DEFAULT_TARGETS", "LoRA", "inject_lora", "load_lora", "lora_layers",
           "lora_state_dict", "mark_only_lora_trainable", "merge", "network_config_sha256",
           "read_lora_metadata", "remove_lora", "save_lora", "set_lora_scale",
           "trainable_lora_parameters", "unmerge"]
