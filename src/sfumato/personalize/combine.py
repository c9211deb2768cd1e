"""Runs made of LoRA runs: a LoRA merged into its base (``sfumato lora merge``), and a subject
LoRA and a style LoRA zipped into one (``sfumato lora zip``, :mod:`~.ziplora`).

- :func:`merge_run`: the base run's network with the adapter folded into its weights (and a
  class slot made an ordinary class), written as a plain run of the base's kind: it samples
  at the base's speed and needs neither the base nor the LoRA any more (``refs`` records
  both, for provenance).
- :func:`zip_runs`: ZipLoRA's merger coefficients learned on both runs' own images and
  captions, written as a personalised run (method ``ziplora``) whose ``lora.safetensors``
  holds the one zipped adapter; ``sfumato sample OUT --prompt "a sks zzz"``.
"""

from __future__ import annotations

import copy
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError, UsageError
from ..run import Run, build_denoiser, build_network
from .adapt import SlotEmbedding
from .finetune import SUBJECT_FILE, read_subject
from .lora import load_lora, network_config_sha256, read_lora_metadata, remove_lora

__all__ = ["merge_run", "zip_runs"]


def _fresh(out: Path) -> None:
    from ..train.checkpoint import find_checkpoint

    if find_checkpoint(out) is not None:
        raise UsageError(f"{out} already holds a run; choose a new --out directory (nothing "
                         "was written)")


def _plain(net: nn.Module) -> nn.Module:
    """Fold every adapter into its layer and make class slots ordinary class rows."""
    remove_lora(net, merge=True)
    for m in list(net.modules()):
        if isinstance(getattr(m, "label", None), SlotEmbedding):
            w = m.label.weight.detach()
            m.label = nn.Embedding(w.shape[0], w.shape[1])
            with torch.no_grad():
                m.label.weight.copy_(w)
    return net


def _autoencoder_ref(run: Run, out: Path) -> dict[str, Any]:
    """``{"autoencoder": ref}`` of a latent run's autoencoder, as a run in ``out`` records it
    (a run made from ``run``'s config samples through it); {} for a pixel-space run."""
    if not run.config.get("autoencoder"):
        return {}
    return {"autoencoder": run.resolve("autoencoder").reference_from(out).to_dict()}


def _lora_file(path: Path) -> Path:
    return path / "lora.safetensors" if path.is_dir() else path


def merge_run(base: str | os.PathLike, lora: str | os.PathLike, out: str | os.PathLike
              ) -> Path:
    """Merge the LoRA ``lora`` (a LoRA run directory, or a LoRA ``.safetensors`` file) into
    the run ``base`` and write the result as a new run in ``out`` (module docstring).
    Refuses a LoRA made for another base (hash or keys) and an ``out`` holding a run."""
    from ..train.checkpoint import save_checkpoint

    out, lora = Path(out), Path(lora)
    _fresh(out)
    base_run = Run(base)
    if lora.is_dir() and not (lora / "lora.safetensors").is_file():
        raise UsageError(f"{lora} holds no lora.safetensors: merge a LoRA run (sfumato "
                         "finetune --method lora) or a LoRA file")
    state = dict(base_run.state)
    if lora.is_dir():  # a LoRA run: its network (with a class slot, if any) from its base
        run = Run(lora)
        mine = run.resolve("base")
        if mine.weights_sha256() != base_run.weights_sha256():
            raise CheckpointError(f"{lora} was fine-tuned from {mine.path}, whose weights "
                                  f"differ from {base_run.path}'s; merge it into its own base")
        net = _plain(run.network())
        state.update({k: run.state[k] for k in ("num_classes", "class_names") if k in run.state})
    else:
        meta = read_lora_metadata(lora).get("meta", {})
        want = network_config_sha256(base_run.config["model"])
        if meta.get("base_config_sha256") not in (None, want):
            raise CheckpointError(f"LoRA file {lora} was made for another network (config "
                                  f"hash {meta['base_config_sha256'][:12]}..., {base_run.path}"
                                  f" has {want[:12]}...)")
        net = base_run.network()
        load_lora(net, lora)
        net = _plain(net)
    config = copy.deepcopy(base_run.config)
    config["refs"] = {**config.get("refs", {}), **_autoencoder_ref(base_run, out),
                      "merged_base": base_run.reference_from(out).to_dict()}
    state["merged_lora"] = str(lora.resolve())
    weights = {k: v.float() for k, v in net.state_dict().items()}
    save_checkpoint(out, tensors={"ema": weights, "model": weights}, state=state, config=config)
    return out


def _forward(run: Run, objective: dict, g_images: torch.Tensor, rows: list[list[str]]):
    """A ZipLoRA forward of one LoRA run: its own training images noised at the base's
    training noise levels, denoised under their own captions (``rows``: the caption
    variants of each image; draws from the generator)."""
    from ..text.conditioner import TextConditioner
    from ..train.objective import build_objective

    obj = build_objective(objective)
    text = TextConditioner(run.config["text"])
    flat = [c for row in rows for c in row]
    cond = text.prompts(flat)
    width = len(rows[0])

    def forward(net: nn.Module, g: torch.Generator) -> torch.Tensor:
        den = build_denoiser(net, objective)
        idx = torch.randint(0, len(g_images), (16,), generator=g)
        x0 = g_images[idx]
        sigma = obj.sample_sigma(len(idx), den, generator=g)
        noise = torch.randn(x0.shape, generator=g)
        j = idx * width + torch.randint(0, width, (len(idx),), generator=g)
        c = {k: v[j] for k, v in cond.items()}
        return den(x0 + sigma.reshape(-1, 1, 1, 1) * noise, sigma, **c)

    return forward


def zip_runs(subject: str | os.PathLike, style: str | os.PathLike, out: str | os.PathLike, *,
             steps: int = 100, lr: float = 0.01, penalty: float = 0.01, seed: int = 0
             ) -> dict[str, Any]:
    """ZipLoRA of two LoRA runs of one text base into the personalised run ``out`` (module
    docstring). Returns a summary (steps, first and last loss, CPU seconds)."""
    from ..model import load
    from ..train.checkpoint import save_checkpoint
    from .dreambooth import caption_rows
    from .ziplora import zip_loras

    out = Path(out)
    _fresh(out)
    runs = [Run(subject), Run(style)]
    for r in runs:
        if r.kind != "personalized" or r.config["finetune"]["method"] != "lora":
            raise UsageError(f"{r.path} is not a LoRA run (sfumato finetune --method lora)")
    bases = [r.resolve("base") for r in runs]
    if bases[0].weights_sha256() != bases[1].weights_sha256():
        raise UsageError(f"{subject} and {style} were fine-tuned from different bases")
    base = bases[0]
    if not base.text_encoder:
        raise UsageError("lora zip needs LoRA runs of a text base (their prompts are zipped)")
    c0 = time.process_time()
    fwd = []
    ae = load(base.resolve("autoencoder")) if base.config.get("autoencoder") else None
    for r in runs:
        x, own = read_subject(r.dir / SUBJECT_FILE)
        if ae is not None:  # a latent base: its denoiser sees latents
            x = ae.encode(x)
        s = r.config["finetune"]
        fwd.append(_forward(r, base.config["objective"], x,
                            caption_rows(s["token"], s["class_word"], own)))
    net = build_network(base.config["model"], base.num_classes)
    net.load_state_dict(base.weights())
    z = zip_loras(net, runs[0].dir / "lora.safetensors", runs[1].dir / "lora.safetensors",
                  fwd[0], fwd[1], steps=steps, lr=lr, penalty=penalty,
                  generator=torch.Generator().manual_seed(seed))
    out.mkdir(parents=True, exist_ok=True)
    z.save(out / "lora.safetensors", meta={
        "base_config_sha256": network_config_sha256(base.config["model"]), "zipped": [
            str(r.dir.resolve()) for r in runs]}, name="default")
    fresh = build_network(base.config["model"], base.num_classes)
    load_lora(fresh, out / "lora.safetensors")
    weights = {k: v for k, v in fresh.state_dict().items() if ".lora_" in k}
    config = copy.deepcopy(runs[0].config)
    config["finetune"] = {**config["finetune"], "method": "ziplora",
                          "token": [r.config["finetune"]["token"] for r in runs]}
    config["refs"] = {"base": base.reference_from(out).to_dict(),
                      **_autoencoder_ref(base, out),
                      **{role: r.reference_from(out).to_dict()
                         for role, r in zip(("subject", "style"), runs, strict=True)}}
    cpu = time.process_time() - c0
    state = {**runs[0].state, "step": steps, "train_cpu_seconds": cpu,
             "losses": [[i, v] for i, v in enumerate(z.history)]}
    save_checkpoint(out, tensors={"ema": weights}, state=state, config=config)
    return {"steps": steps, "first_loss": z.history[0], "last_loss": z.history[-1],
            "cpu_seconds": cpu}
