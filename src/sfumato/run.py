"""A run directory, and the one place that turns it into objects.

A run is what ``sfumato train`` writes and what ``sample``, ``evaluate``, ``info``, the Python
API and the benchmarks read (file layout: :mod:`sfumato.train.checkpoint`)::

    DIR/checkpoint/{model,ema,optimizer,rng}.safetensors, config.json, state.json
    DIR/checkpoints/step-NNNNNNNN/     kept earlier checkpoints
    DIR/loss.png, samples/, metrics.json, evaluation.json

:class:`Run` reads one (a run directory or one of its checkpoint folders) and answers what it
is: its :attr:`~Run.kind`, data shape, classes, sampling defaults, the runs it was built from
(:attr:`~Run.refs`), its network and its σ-space denoiser. :func:`sfumato.model.load`
makes of it the :class:`~sfumato.model.Model` users sample from, and
:func:`sfumato.model.evaluate` scores its checkpoints. The trainer builds networks and
denoisers with the same :func:`build_network` and :func:`build_denoiser`, so a run is rebuilt
exactly as it was trained.

References between runs. A run built from another (a ControlNet and its base; later a
student and its teacher, a latent model and its autoencoder, a LoRA and its base) records it in
its config under ``refs``: ``{"base": {"path": "../demo", "sha256": "...", "kind":
"diffusion", "step": 1350}}``. The path is relative to the referring run's directory, and
the hash is the SHA-256 of the referent's EMA weights file, so :meth:`Run.resolve` finds the
referent wherever the pair is moved together and refuses one that was retrained or replaced
(:class:`~sfumato.errors.RunReferenceError`) instead of silently using other weights.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import CheckpointError, RunReferenceError
from .files import sha256_file
from .train.checkpoint import (
    archived_checkpoints,
    checkpoint_name,
    find_checkpoint,
    is_checkpoint,
    load_checkpoint,
)

__all__ = ["KINDS", "Run", "RunRef", "run_kind", "network_config", "build_network",
           "build_denoiser",
           "resolve_ref"]

#: The kinds of run, and what each one is (each kind built on other runs records them in
#: ``refs``).
KINDS: dict[str, str] = {
    "diffusion": "a denoiser trained on a data set (class-conditional or not)",
    "text": "a denoiser conditioned on text prompts",
    "controlnet": "a frozen diffusion base run plus a ControlNet steered by spatial hints",
    "classifier": "a noise-conditional classifier (for classifier guidance)",
    "student": "a few-step student distilled from a teacher run",
    "instruct": "a denoiser that edits an input image by a text instruction (InstructPix2Pix)",
    "superres": "a denoiser of full-resolution images given a low-resolution one: a cascade "
                "stage",
    "autoencoder": "an autoencoder whose latents a latent run models",
    "latent": "a denoiser in an autoencoder run's latent space",
    "cascade": "diffusion runs joined in stages of growing resolution",
    "personalized": "a base run fine-tuned on a few images of a new concept (LoRA, "
                    "DreamBooth or textual inversion)",
}

WEIGHTS_STEM = "ema"  # what sampling uses and what references hash


def run_kind(config: Mapping[str, Any]) -> str:
    """The kind of run (a key of :data:`KINDS`) a full run config describes."""
    if (config.get("distill") or {}).get("method"):
        return "student"
    if (config.get("finetune") or {}).get("method"):
        return "personalized"
    if config["objective"]["target"] == "classifier":
        return "classifier"
    if config["objective"]["target"] == "autoencoder":
        return "autoencoder"
    if config["model"].get("type") == "controlnet":
        return "controlnet"
    if (config.get("instruct") or {}).get("edits"):
        return "instruct"
    if (config.get("superres") or {}).get("low_size"):
        return "superres"
    if config.get("autoencoder"):
        return "latent"
    if (config.get("text") or {}).get("encoder"):
        return "text"
    return "diffusion"


def network_config(model_cfg: Mapping[str, Any], num_classes: int | None = None
                   ) -> dict[str, Any]:
    """The network builder's config of a run's ``model`` section: ``num_classes`` (the data
    set's, recorded in the run's state) in place of ``"conditional": true``."""
    cfg = dict(model_cfg)
    cfg.pop("conditional", None)
    if num_classes:
        cfg["num_classes"] = int(num_classes)
    return cfg


def build_network(model_cfg: Mapping[str, Any], num_classes: int | None = None) -> nn.Module:
    """The raw network of a run's ``model`` config section (see :func:`network_config`)."""
    from .nets import build_net

    return build_net(network_config(model_cfg, num_classes))


def build_denoiser(net: nn.Module | Callable, obj_cfg: Mapping[str, Any]) -> nn.Module:
    """Wrap a raw network with the preconditioning its ``objective`` config section names (a
    :class:`~sfumato.guidance.NoisyClassifier` for ``target="classifier"``)."""
    if obj_cfg["target"] == "classifier":
        from .guidance import NoisyClassifier

        return NoisyClassifier(net, obj_cfg["sigma_data"])
    if obj_cfg["target"] == "autoencoder":  # no preconditioning: the network itself
        return net
    from .denoiser import ConsistencyDenoiser, Denoiser
    from .process import get_process

    if obj_cfg["target"] == "consistency":
        return ConsistencyDenoiser(net, obj_cfg.get("sigma_min") or 0.002, obj_cfg["sigma_data"])

    process = None
    if obj_cfg.get("process"):
        proc_cfg = dict(obj_cfg["process"])
        process = get_process(proc_cfg.pop("name"), **proc_cfg)
    return Denoiser(net, target=obj_cfg["target"], process=process,
                    t_scale=obj_cfg.get("t_scale", 1.0), sigma_data=obj_cfg["sigma_data"])


@dataclass(frozen=True)
class RunRef:
    """How one run refers to another: ``path`` relative to the referring run's directory,
    the SHA-256 of the referent's weights, and (for messages) its kind and step."""

    path: str
    sha256: str
    kind: str | None = None
    step: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "sha256": self.sha256, "kind": self.kind, "step": self.step}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RunRef:
        return cls(str(d["path"]), str(d["sha256"]), d.get("kind"), d.get("step"))


class Run:
    """A trained run read from disk: ``Run(DIR)`` for a run directory (its latest complete
    checkpoint), or a checkpoint folder (``DIR/checkpoints/step-NNNNNNNN``).

    Raises :class:`~sfumato.errors.CheckpointError` when there is no complete checkpoint.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        path = Path(path)
        if not path.is_dir():
            raise CheckpointError(f"{path} is not a run directory (train one with "
                                  "'sfumato train CONFIG --out DIR')")
        if is_checkpoint(path):
            self.checkpoint = path
            # DIR/checkpoint -> DIR; DIR/checkpoints/step-N -> DIR
            self.dir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
        elif (found := find_checkpoint(path)) is not None:
            self.checkpoint, self.dir = found, path
        else:
            raise CheckpointError(f"{path} has no complete checkpoint yet (train it with "
                                  "'sfumato train CONFIG --out DIR')")
        self.path = path
        _, self.state, self.config = load_checkpoint(self.checkpoint, stems=())

    # -- what the run is --------------------------------------------------------------------
    @property
    def kind(self) -> str:
        return run_kind(self.config)

    @property
    def step(self) -> int:
        return int(self.state["step"])

    @property
    def data_shape(self) -> tuple[int, ...] | None:
        shape = self.state.get("data_shape")
        return tuple(shape) if shape else None

    @property
    def image_shape(self) -> tuple[int, ...]:
        """The shape (C, H, W) of the images the run models: a latent run's decoded images
        (not its latents'), else its data's; () when the state records neither."""
        return tuple(self.state.get("image_shape") or self.data_shape or ())

    @property
    def text_encoder(self) -> str | None:
        """The run's text encoder ("minilm", "tiny"), or None for a run without text."""
        return (self.config.get("text") or {}).get("encoder")

    @property
    def num_classes(self) -> int | None:
        return self.state.get("num_classes")

    @property
    def sampling(self) -> dict[str, Any]:
        """The run's sampling defaults: its config's ``sample`` section over the library's
        (:data:`sfumato.samplers.SAMPLING_DEFAULTS`)."""
        from .samplers._api import SAMPLING_DEFAULTS

        return {**SAMPLING_DEFAULTS, **self.config.get("sample", {})}

    @property
    def train_cpu_seconds(self) -> float | None:
        return self.state.get("train_cpu_seconds")

    def checkpoints(self, every: bool = False) -> list[Path]:
        """Checkpoint folders to evaluate: the latest only, or (``every``) each kept one plus
        the latest when it is not archived yet, oldest first."""
        kept = archived_checkpoints(self.dir) if every else []
        if checkpoint_name(self.step) not in [c.name for c in kept]:
            kept.append(self.checkpoint)
        return kept

    # -- objects -----------------------------------------------------------------------------
    def weights(self, stem: str = WEIGHTS_STEM) -> dict[str, torch.Tensor]:
        """One weights file of the checkpoint as a state dict (``ema`` or ``model``)."""
        tensors, _, _ = load_checkpoint(self.checkpoint, stems=(stem,))
        return tensors[stem]

    def network(self, *, stem: str = WEIGHTS_STEM, device: torch.device | str = "cpu",
                dtype: torch.dtype = torch.float32) -> nn.Module:
        """The run's network with its ``stem`` weights, in eval mode, without gradients."""
        if self.kind == "personalized":  # the base run's network and weights + its own
            from .personalize.adapt import personalized_network

            net = personalized_network(self, stem)
        else:
            net = build_network(self.config["model"], self.num_classes)
            net.load_state_dict(self.weights(stem))
        return net.to(device=device, dtype=dtype).eval().requires_grad_(False)

    def denoiser(self, *, stem: str = WEIGHTS_STEM, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> nn.Module:
        """The run's σ-space denoiser ``D(x, sigma, **cond)`` (for a classifier run, the
        :class:`~sfumato.guidance.NoisyClassifier`)."""
        return build_denoiser(self.network(stem=stem, device=device, dtype=dtype),
                              self.config["objective"])

    # -- references -------------------------------------------------------------------------
    @property
    def refs(self) -> dict[str, RunRef]:
        """The runs this one was built from, by role (``base``, ``teacher``, ...)."""
        return {k: RunRef.from_dict(v) for k, v in (self.config.get("refs") or {}).items()}

    def weights_sha256(self) -> str:
        """SHA-256 of this checkpoint's EMA weights file (what references record)."""
        f = self.checkpoint / f"{WEIGHTS_STEM}.safetensors"
        if not f.is_file():
            raise CheckpointError(f"checkpoint {self.checkpoint} is incomplete: missing "
                                  f"{f.name}")
        return sha256_file(f)

    def reference_from(self, referrer_dir: str | os.PathLike) -> RunRef:
        """How a run in ``referrer_dir`` records this one (path relative to it + hash)."""
        rel = os.path.relpath(self.path.resolve(), Path(referrer_dir).resolve())
        return RunRef(Path(rel).as_posix(), self.weights_sha256(), self.kind, self.step)

    def resolve(self, role: str) -> Run:
        """The run recorded under ``refs[role]``, checked against its recorded hash."""
        refs = self.refs
        if role not in refs:
            raise RunReferenceError(f"{self.dir} records no {role!r} run (it has "
                                    f"{sorted(refs) or 'none'})")
        return resolve_ref(self.dir, refs[role], role)

    # -- description ------------------------------------------------------------------------
    def describe(self) -> list[tuple[str, str]]:
        """(label, value) lines that describe the run, for ``sfumato info``."""
        c, obj = self.config, self.config["objective"]
        lines = [("run", str(self.path)), ("kind", f"{self.kind} ({KINDS.get(self.kind, '')})"),
                 ("step", f"{self.step} of {c['train']['steps']}"),
                 ("data", f"{c['data']}  shape {list(self.data_shape or [])}"),
                 ("model", str(c["model"])),
                 ("objective", f"target {obj['target']}, sigma {obj['sigma_sampling']}, "
                               f"weighting {obj['weighting']}"),
                 ("classes", str(self.num_classes)), ("sampling", str(self.sampling))]
        for role, ref in self.refs.items():
            lines.append((role, f"{ref.path} ({ref_status(self.dir, ref)})"))
        if self.kind == "student":
            d, s = c["distill"], self.sampling
            settings = ", ".join(f"{k} {v}" for k, v in d.items() if k != "method")
            lines.append(("distilled", f"method {d['method']} ({settings}); student of the "
                                       "teacher above"))
            lines.append(("recommended", f"{s['steps']} step(s) of {s['sampler']} "
                                         "('sfumato sample DIR --steps K' for others)"))
        if self.state.get("latent"):  # an autoencoder's latents, measured on its data
            z = self.state["latent"]
            lines.append(("latent", f"shape {z['shape']}, scale {z['scale']:.4g} (1 / std), "
                                    f"mean {z['mean']:.4g}, measured on {z['images']} images"))
        if self.state.get("image_shape"):
            lines.append(("images", f"shape {self.state['image_shape']} (decoded by the "
                                    "autoencoder run)"))
        if self.kind == "superres":
            from .lowres import SUPERRES_DEFAULTS, low_hw

            sr = {**SUPERRES_DEFAULTS, **c["superres"]}
            (h, w), full = low_hw(sr["low_size"]), (self.data_shape or (0, 0, 0))[1:]
            lines.append(("superres", f"{h}x{w} -> {full[0]}x{full[1]}"
                                      f"; conditioning noise s ~ U[0, {sr['aug_sigma_max']:g}] "
                                      f"(s = 0 w.p. {sr['aug_zero_p']:g}); samples at s = "
                                      f"{sr['aug_sigma']:g}"))
        if self.state.get("losses"):
            lines.append(("last loss", f"{self.state['losses'][-1][1]:.4f}"))
        metrics = self.dir / "metrics.json"
        if metrics.is_file():
            lines.append(("metrics", metrics.read_text().strip()))
        return lines


def _referent_path(referrer_dir: str | os.PathLike, ref: RunRef) -> Path:
    """Where ``ref`` points from ``referrer_dir`` (which need not exist yet: a run about to be
    trained on its referent)."""
    return Path(os.path.normpath(Path(referrer_dir).resolve() / ref.path))


def resolve_ref(referrer_dir: str | os.PathLike, ref: RunRef, role: str = "referenced") -> Run:
    """The run ``ref`` points to from ``referrer_dir``; :class:`RunReferenceError` when it is
    missing or its weights changed since the reference was recorded."""
    where = _referent_path(referrer_dir, ref)
    try:
        run = Run(where)
    except CheckpointError as e:
        raise RunReferenceError(f"the {role} run of {referrer_dir} ({ref.path}, resolved to "
                                f"{where}) cannot be read: {e}. Put it back there, or retrain "
                                "this run on the new one") from None
    digest = run.weights_sha256()
    if digest != ref.sha256:
        raise RunReferenceError(
            f"the {role} run {where} has changed since {referrer_dir} was built from it (its "
            f"weights' SHA-256 is {digest[:12]}..., recorded {ref.sha256[:12]}... at step "
            f"{ref.step}, now step {run.step}): restore that run, or retrain this one on it")
    return run


def ref_status(referrer_dir: str | os.PathLike, ref: RunRef) -> str:
    """``"ok"``, ``"changed"`` (other weights) or ``"missing"`` (no readable run there): what
    :func:`resolve_ref` would find."""
    try:
        run = Run(_referent_path(referrer_dir, ref))
    except CheckpointError:
        return "missing"
    return "ok" if run.weights_sha256() == ref.sha256 else "changed"
