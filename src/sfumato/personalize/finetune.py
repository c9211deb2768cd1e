"""Fine-tuning a trained run on a few images of a new concept: the run kind ``personalized``.

A personalised run is an ordinary run directory: ``sfumato sample``, :func:`sfumato.load`,
``sfumato info`` and ``sfumato evaluate`` use it as any other. Its config is the base run's
(data, network, objective, text, sampling) plus the section ``finetune`` (method and
settings, :data:`FINETUNE_DEFAULTS`) and ``refs.base`` (the base run: path + weights hash),
and the common :class:`~sfumato.train.trainer.Trainer` trains it (progress bar, EMA,
checkpoints, exact kill-and-resume, NaN guard)::

    sfumato finetune runs/text --images concept/ --token sks --method lora --out runs/sks
    sfumato sample runs/sks --prompt "a sks" --out sks.png

    sfumato.finetune("runs/text", images="concept/", token="sks", out="runs/sks")

The run keeps its own copy of the concept images (``subject.safetensors``) and the prior
images it generated (``prior.safetensors``, :mod:`~sfumato.personalize.dreambooth`); a
LoRA run also writes ``lora.safetensors`` (peft's key layout) and a textual-inversion run on
a text base ``token.safetensors``, each small and loadable onto the base network alone.

A latent base (a denoiser in an autoencoder run's latent space, :mod:`sfumato.latent`) is
fine-tuned in its latent space: the concept images are read at the autoencoder's image size
and encoded by the base's own autoencoder (``refs.autoencoder``, checked by hash), the prior
images are the base's sampled latents, and the run samples images through that autoencoder
as the base does.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ..errors import ConfigError, RunReferenceError, UsageError, did_you_mean
from ..files import atomic_write, read_safetensors
from ..run import Run, build_network
from .adapt import METHODS, adapt_network

__all__ = ["FINETUNE_DEFAULTS", "finetune", "finetune_config", "Personalization"]

#: the ``finetune`` section: method and settings
FINETUNE_DEFAULTS: dict[str, Any] = {
    "method": None,              # lora | dreambooth | textual-inversion
    "images": None,              # the concept's image folder (absolute; copied into the run)
    "token": "sks",              # the new concept's word (or class slot's name)
    "class_word": None,          # "a TOKEN CLASS" captions and "a CLASS" prior prompts
    "prior_preservation": True,  # DreamBooth's prior-preservation loss (dreambooth.py)
    "prior_images": 200,         # prior images the base generates (cached in the run)
    "prior_weight": 1.0,         # lambda of the prior term
    "prior_guidance": None,      # guidance of the prior images (None: the base's default)
    "lora": {"rank": 4, "alpha": 4.0, "dropout": 0.0, "targets": None,
             "include_conv": False},
}

#: train-section defaults per method (the base run's train section under them)
METHOD_TRAIN: dict[str, dict[str, Any]] = {
    "lora": {"steps": 1600, "lr": 2e-3},  # 800 underfits hard concepts (docs/personalization.md)
    "dreambooth": {"steps": 300, "lr": 2e-4},
    "textual-inversion": {"steps": 400, "lr": 5e-3},
}
#: textual inversion of a class base's new slot: its embedding row needs larger steps than a
#: MiniLM token vector (giraffe on MNIST: 0.08 of samples recognised at 5e-3, 0.52 at 2e-2)
SLOT_TRAIN: dict[str, Any] = {"lr": 2e-2}
_TRAIN = {"batch_size": 32, "warmup_steps": 20, "schedule": "constant", "grad_accum": 1,
          "checkpoint_every": 100, "keep_last": 2, "sample_every": 0,
          "ema": {"kind": "power", "sigma_rel": 0.1}}

SUBJECT_FILE = "subject.safetensors"
LORA_FILE = "lora.safetensors"
TOKEN_FILE = "token.safetensors"


def _settings(given: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(FINETUNE_DEFAULTS)
    for k, v in given.items():
        if k not in out:
            raise ConfigError(f"unknown setting 'finetune.{k}'{did_you_mean(k, out)}; the "
                              f"settings are {sorted(out)}")
        if k == "lora":
            bad = [j for j in v if j not in out["lora"]]
            if bad:
                raise ConfigError(f"unknown setting 'finetune.lora.{bad[0]}'"
                                  f"{did_you_mean(bad[0], out['lora'])}; the settings are "
                                  f"{sorted(out['lora'])}")
            out["lora"].update(v)
        else:
            out[k] = v
    if out["method"] not in METHODS:
        raise UsageError(f"unknown fine-tuning method {out['method']!r}"
                         f"{did_you_mean(str(out['method']), METHODS)}; choose one of "
                         f"{list(METHODS)}")
    if out["prior_images"] < 1 or not out["prior_weight"] > 0:
        raise ConfigError("finetune.prior_images must be >= 1 and prior_weight > 0")
    return out


def _check_base(base: Run) -> None:
    if base.kind not in ("diffusion", "text", "latent"):
        raise UsageError(f"the base {base.path} is a {base.kind} run; fine-tune a diffusion "
                         "run (class- or text-conditioned, in pixel or latent space)")
    text = base.text_encoder
    if not (text or base.num_classes):
        raise UsageError(f"the base {base.path} is unconditional: a new concept needs a text "
                         "token or a class slot to bind to (train a class- or "
                         "text-conditioned base)")
    if text == "tiny":
        raise UsageError(f"the base {base.path} trains its own byte-level text encoder "
                         "(text.encoder 'tiny'), which has no vocabulary to add a token to; "
                         "fine-tune a MiniLM run (text.encoder 'minilm') or a class run")


def finetune_config(base: Run, images: str | os.PathLike, out: str | os.PathLike, *,
                    method: str = "lora", config: Mapping[str, Any] | None = None,
                    steps: int | None = None, **settings: Any) -> dict[str, Any]:
    """The full run config of a personalised run of ``base`` written to ``out``: the base's
    data, network, objective, text and sampling; the method's training defaults; ``config``
    (overrides, sections as in a run config; ``finetune`` for settings) on top; ``settings``
    (``token``, ``class_word``, ``prior_preservation``, ...) and ``steps`` last."""
    from ..train.config import load_config

    _check_base(base)
    over = copy.deepcopy(dict(config or {}))
    given = {"method": method, **over.pop("finetune", {}), **settings}
    s = _settings(given)
    s["images"] = str(Path(images).resolve())
    tc = base.config
    train = {**tc["train"], **_TRAIN, **METHOD_TRAIN[s["method"]]}
    if s["method"] == "textual-inversion" and not base.text_encoder:
        train.update(SLOT_TRAIN)
    cfg = {"data": tc["data"], "model": tc["model"], "objective": tc["objective"],
           "train": train, "text": tc.get("text", {}), "sample": tc["sample"],
           "finetune": s, "refs": {"base": base.reference_from(out).to_dict()}}
    if tc.get("autoencoder"):  # a latent base: its own autoencoder (the trainer records it)
        cfg["autoencoder"] = str(base.resolve("autoencoder").path)
    for sec, val in over.items():
        if not isinstance(val, dict) or sec in ("data", "model", "objective", "refs"):
            raise ConfigError(f"a fine-tuning config may override 'train', 'sample', 'text' "
                              f"settings and 'finetune'; got section {sec!r}")
        cfg[sec] = {**cfg.get(sec, {}), **val}
    if steps is not None:
        cfg["train"]["steps"] = int(steps)
    return load_config(cfg)


class Personalization:
    """The trainer's side of a personalised run (its config has ``finetune.method``): the
    base run, the training set (subject images repeated + prior images, with their labels or
    captions), the adapted network, and the small state a checkpoint stores."""

    def __init__(self, trainer) -> None:
        from ..run import RunRef, resolve_ref
        from .dreambooth import check_token, prior_images, training_set

        cfg = trainer.cfg
        self.settings = s = _settings(cfg["finetune"])
        self.out: Path = trainer.out
        if "base" not in cfg["refs"]:
            raise ConfigError("a personalised run's config needs refs.base (made by "
                              "sfumato.finetune)")
        self.base = resolve_ref(self.out, RunRef.from_dict(cfg["refs"]["base"]), "base")
        _check_base(self.base)
        self.base_classes = self.base.num_classes
        check_token(s["token"], self.base)
        subject, self.own_captions = self._subject(Path(s["images"]), trainer.rank == 0)
        if trainer.autoencoder is not None:  # a latent base: train on the latents
            subject = self._base_latents(trainer, subject)
        prior = labels = prompts = None
        if s["prior_preservation"]:
            prior, labels, prompts = prior_images(
                self.out, self.base, int(s["prior_images"]), s["class_word"],
                s["prior_guidance"], seed=cfg["train"]["seed"])
        self.x, self.reps = training_set(subject, prior, float(s["prior_weight"]))
        self.n_subject = len(subject) * self.reps
        self.labels = None
        if self.base_classes:  # the concept is class K; the prior keeps its labels
            k = torch.full((self.n_subject,), self.base_classes, dtype=torch.long)
            self.labels = k if labels is None else torch.cat([k, labels.long()])
        self.prompts = prompts
        self.num_classes = self.base_classes + 1 if self.base_classes else None

    def _subject(self, folder: Path, write: bool) -> tuple[torch.Tensor, list[str | None]]:
        """The concept images and each one's own caption (or None): the run's own copy (made
        from ``folder`` at the first start, resized to the base's image shape; captions from
        ``NAME.txt`` files beside a text base's images, :func:`~.dreambooth.folder_captions`)."""
        from ..imageio import read_image_folder
        from .dreambooth import folder_captions

        path = self.out / SUBJECT_FILE
        if path.is_file():
            return read_subject(path)
        shape = self.base.image_shape
        x, skipped, names = read_image_folder(folder, shape[0], tuple(shape[1:]))
        if skipped:
            print(f"skipped {len(skipped)} unreadable file(s) in {folder}: "
                  f"{', '.join(skipped[:5])}")
        if self.base.text_encoder:
            own = folder_captions(folder, names, self.settings["token"])
        else:  # a class base: the concept is its new class, captions have no place
            own = [None] * len(names)
            if any((folder / n).with_suffix(".txt").is_file() for n in names):
                print(f"ignored the caption files in {folder}: the base {self.base.path} has "
                      "no text encoder (the concept is its new class)")
        if write:
            self.out.mkdir(parents=True, exist_ok=True)
            with atomic_write(path) as tmp:
                save_file({"images": x.contiguous()}, str(tmp),
                          metadata={"folder": str(folder), "skipped": json.dumps(skipped),
                                    "names": json.dumps(names), "captions": json.dumps(own)})
        return x, own

    def _base_latents(self, trainer, x: torch.Tensor) -> torch.Tensor:
        """The concept images x encoded by the trainer's autoencoder, refused unless it is
        the one the base recorded (the same weights hash)."""
        mine = trainer.cfg["refs"]["autoencoder"]["sha256"]
        theirs = self.base.refs["autoencoder"].sha256
        if mine != theirs:
            raise RunReferenceError(
                f"the autoencoder {trainer.cfg['autoencoder']} (weights SHA-256 {mine[:12]}...) "
                f"is not the one the base {self.base.path} was trained on ({theirs[:12]}...): "
                "restore it, or fine-tune a base trained on this autoencoder")
        return trainer.autoencoder.encode(x).cpu()

    def captions(self) -> list[list[str]]:
        """Caption variants per training image (a text base): the subject's (each image's
        own caption, or the token's default captions), then the prior prompt of each prior
        image."""
        from .dreambooth import caption_rows

        rows = caption_rows(self.settings["token"], self.settings["class_word"],
                            self.own_captions)
        return rows * self.reps + [[p] * len(rows[0]) for p in (self.prompts or [])]

    def network(self, generator: torch.Generator | None = None) -> torch.nn.Module:
        """The base network with its EMA weights, adapted (:mod:`~.adapt`); records the
        names of the state-dict keys a checkpoint stores."""
        net = build_network(self.base.config["model"], self.base_classes)
        net.load_state_dict(self.base.weights())
        self.names = adapt_network(net, self.settings, self.base_classes, generator,
                                   getattr(self, "token", None))
        return net

    def text_conditioner(self, tcfg: Mapping[str, Any]):
        """The text conditioning of the training images (a text base): the base's encoder
        on :meth:`captions`; for textual inversion one that encodes the token with the
        trained embedding (``self.token``, initialised from ``class_word`` or "object"; the
        network carries it, :meth:`network`)."""
        from ..text.conditioner import TextConditioner

        if self.settings["method"] != "textual-inversion":
            return TextConditioner(dict(tcfg)).fit_rows(self.captions())
        from .textual_inversion import TokenEmbedding, TokenTextConditioner

        self.token = TokenEmbedding(self.settings["token"])
        text = TokenTextConditioner(dict(tcfg), self.token)
        start = TokenEmbedding.from_word(text.encoder, self.settings["token"],
                                         self.settings["class_word"] or "object")
        with torch.no_grad():
            self.token.vectors.copy_(start.vectors)
        return text.fit_rows(self.captions())

    def write_files(self, net: torch.nn.Module) -> None:
        """The run's portable files from the (EMA) network: ``lora.safetensors`` for a LoRA
        run (peft's key layout), ``token.safetensors`` for textual inversion on a text base
        (meta: the base's network-config and weights hashes, the token)."""
        from .lora import network_config_sha256

        meta = {"base_config_sha256": network_config_sha256(self.base.config["model"]),
                "base_weights_sha256": self.base.weights_sha256(),
                "token": self.settings["token"]}
        if self.settings["method"] == "lora":
            from .lora import save_lora

            save_lora(net, self.out / LORA_FILE, meta=meta)
        if hasattr(net, "token_embedding"):
            from .textual_inversion import save_token

            save_token(net.token_embedding, self.out / TOKEN_FILE, meta=meta)

    def state(self) -> dict[str, Any]:
        """What the run's state.json records beyond a plain run's."""
        s = {"personalized": {"method": self.settings["method"], "token": self.settings["token"],
                              "subject_images": self.n_subject, "base_classes":
                              self.base_classes}}
        if self.base.state.get("class_prompts"):  # the base's prompt of each class (emoji)
            s["class_prompts"] = self.base.state["class_prompts"]
        if self.base_classes:
            names = self.base.state.get("class_names") or [str(k) for k in
                                                           range(self.base_classes)]
            s["class_names"] = [*names, self.settings["token"]]
        return s


def read_subject(path: Path) -> tuple[torch.Tensor, list[str | None]]:
    """A personalised run's copy of its concept images (N, C, H, W) in [-1, 1] and each
    one's own caption or None (a run written before captions existed has none)."""
    tensors, header = read_safetensors(path, "the run's copy of its images")
    x = tensors["images"]
    own = json.loads(header.get("captions") or "null") or [None] * len(x)
    return x, own


def finetune(base: str | os.PathLike | Run, images: str | os.PathLike, *,
             out: str | os.PathLike, method: str = "lora",
             config: str | os.PathLike | Mapping | None = None, steps: int | None = None,
             progress: bool = True, **settings: Any) -> dict[str, Any]:
    """Fine-tune ``base`` (a run directory) on the images in the folder ``images`` with
    ``method`` ("lora", "dreambooth", "textual-inversion") into the run ``out``, or resume it
    there: the same call again continues a killed run exactly. ``settings``: ``token``,
    ``class_word``, ``prior_preservation``, ``prior_images``, ``prior_weight``, ``lora``
    (:data:`FINETUNE_DEFAULTS`); ``config``: a JSON file or dict of overrides; ``steps``:
    train.steps. Returns the trainer's summary."""
    from ..train.config import read_config_file
    from ..train.trainer import Trainer

    if isinstance(config, (str, os.PathLike)):
        config = read_config_file(config)
    run = base if isinstance(base, Run) else Run(base)
    cfg = finetune_config(run, images, out, method=method, config=config, steps=steps,
                          **settings)
    return Trainer(cfg, out, progress=progress).run()
