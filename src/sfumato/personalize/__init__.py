"""Personalisation: teaching a trained network a new subject or style from a few images
without retraining it.

- :mod:`~sfumato.personalize.lora`: low-rank adapters (Hu et al. 2022) on the attention
  projections (and optionally the convolutions) of the U-Net and DiT, with exact merge /
  unmerge, a run-time scale, several adapters at once and small LoRA-only safetensors files
  in peft's key layout.

DreamBooth (Ruiz et al. 2023), textual inversion (Gal et al. 2023) and ZipLoRA (Shah et al.
2023) are to follow as modules of their own (issue 16), trained as run kind ``lora`` on the
common trainer with the base run recorded in ``refs.base``.
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
