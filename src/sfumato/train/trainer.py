"""The training loop: AdamW, warm-up + cosine/constant LR, gradient clipping and
accumulation, EMA, bf16 autocast, seeded determinism, exact resume, NaN guard, DDP.

Determinism and exact resume. Every random draw comes from explicit generators whose states
are checkpointed: ``data`` (which examples form a batch), ``noise`` (sigma and eps) and torch's
default generator (dropout). The learning rate is a pure function of the step. So a run killed
at any point and resumed from its last checkpoint continues with bitwise the same tensors as a
run that was never interrupted (on CPU; CUDA kernels may be non-deterministic).

Distributed. Under ``torchrun`` (WORLD_SIZE > 1) the model is wrapped in DDP (gloo on CPU,
NCCL on CUDA). Every rank draws the same *global* batch indices, sigmas and noise and takes
its own slice of them, so N processes with a global batch B compute the same update as one
process with batch B (up to floating-point summation order). Only rank 0 logs and writes.
"""

from __future__ import annotations

import json
import math
import os
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, RunReferenceError, TrainingError
from ..files import atomic_write
from ..run import Run, build_denoiser, build_network, network_config
from ..runtime import default_device
from .checkpoint import (
    find_checkpoint,
    load_checkpoint,
    optimizer_from_flat,
    optimizer_to_flat,
    save_checkpoint,
)
from .config import load_config
from .ema import build_ema
from .objective import build_objective

__all__ = ["Trainer", "TrainingError", "train", "lr_at", "default_device"]


def lr_at(step: int, cfg: dict) -> float:
    """Learning rate at optimizer step ``step`` (0-based): linear warm-up, then cosine decay to
    ``min_lr_ratio * lr`` or constant."""
    lr, warm, total = cfg["lr"], cfg["warmup_steps"], cfg["steps"]
    if warm > 0 and step < warm:
        return lr * (step + 1) / warm
    if cfg["schedule"] == "constant":
        return lr
    if cfg["schedule"] != "cosine":
        raise ConfigError(f"unknown LR schedule {cfg['schedule']!r}; use 'cosine' or 'constant'")
    frac = min(1.0, (step - warm) / max(1, total - warm))
    lo = cfg["min_lr_ratio"]
    return lr * (lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * frac)))


def _dist_info() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _maybe_init_distributed(device: torch.device) -> bool:
    """Start the process group under a launcher (``WORLD_SIZE`` > 1) unless the caller already
    has; True when this call started it (and so :func:`_finish_distributed` ends it)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend)
        return True
    return False


def _finish_distributed() -> None:
    """All ranks wait for rank 0's last writes, then tear down the group the trainer started
    together (a rank leaving with a live gloo group can abort at interpreter exit)."""
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


class Trainer:
    """Owns one run directory. ``Trainer(config, out).run()`` trains to ``train.steps``,
    resuming from ``out/checkpoint`` if it exists.

    Args:
        config: path to a JSON config, a dict of overrides, or None (defaults).
        out: the run directory.
        device: torch device; default CUDA if available else CPU.
        progress: show a tqdm bar (rank 0 only).
    """

    def __init__(self, config: str | os.PathLike | dict | None, out: str | os.PathLike, *,
                 device: torch.device | str | None = None, progress: bool = True) -> None:
        from ..data import get_dataset

        self.cfg = load_config(config)
        self.out = Path(out)
        self.device = torch.device(device) if device is not None else default_device()
        self._owns_group = _maybe_init_distributed(self.device)
        self.rank, self.world = _dist_info()
        tc = self.cfg["train"]
        if tc["num_threads"]:
            torch.set_num_threads(int(tc["num_threads"]))
        if tc["batch_size"] % (self.world * tc["grad_accum"]):
            raise ConfigError(
                f"train.batch_size={tc['batch_size']} must be divisible by world_size "
                f"({self.world}) x grad_accum ({tc['grad_accum']})"
            )
        torch.manual_seed(tc["seed"] + 1000 * self.rank)
        self.data = get_dataset(self.cfg["data"])
        self.x_train = self.data.train
        self.y_train = getattr(self.data, "labels", None)
        self.cpu_seconds_setup = 0.0  # CPU time spent before the first step counts too
        self.autoencoder = self._setup_latent()
        self.personal = self._setup_personal()
        base_weights = self._resolve_control_base()
        model_cfg = dict(self.cfg["model"])
        nc = getattr(self.data, "num_classes", None)
        self.is_classifier = self.cfg["objective"]["target"] == "classifier"
        if self.is_classifier:
            if not nc or self.y_train is None:
                raise ConfigError("objective.target='classifier' needs a labelled data set "
                                  f"({self.cfg['data']} has no labels)")
            if self.cfg["objective"]["label_dropout"]:
                raise ConfigError("objective.label_dropout must be 0 for a classifier")
            if model_cfg["type"] != "classifier":
                raise ConfigError("objective.target='classifier' needs model.type='classifier' "
                                  f"(got {model_cfg['type']!r})")
        self.num_classes = nc if (model_cfg.get("conditional") or self.is_classifier) and nc \
            else model_cfg.get("num_classes")
        self.hint = model_cfg.get("hint") if model_cfg["type"] == "controlnet" else None
        if self.hint and model_cfg["base"].get("num_classes"):  # a class-conditional base
            self.num_classes = model_cfg["base"]["num_classes"]
        if self.personal is not None:  # a class base gets one more class: the concept
            self.num_classes = self.personal.num_classes
        if self.hint:
            self.hint_cond(self.x_train[:1])  # an unknown hint name fails here
        self._setup_text()
        self.superres = self._setup_superres()
        self.net = (build_network(model_cfg, self.num_classes) if self.personal is None else
                    self.personal.network(torch.Generator().manual_seed(tc["seed"] + 3))
                    ).to(self.device)
        if base_weights is not None:
            self.net.base.load_state_dict(base_weights)
        self.denoiser = build_denoiser(self.net, self.cfg["objective"])
        self.is_autoencoder = self.cfg["objective"]["target"] == "autoencoder"
        if self.is_autoencoder:  # reconstruction + perceptual + GAN (sfumato.autoencoder)
            from ..autoencoder import AutoencoderObjective

            self.objective = AutoencoderObjective(self)
            self.cpu_seconds_setup += self.objective.setup_cpu_seconds
        elif self.cfg["distill"]:  # a student: the method's loss around its teacher
            from ..distill import build_objective as build_distill_objective

            self.objective = build_distill_objective(self)
        else:
            self.objective = build_objective(self.cfg["objective"])
        self.ema = build_ema(self.net, tc["ema"]).to(self.device)
        self.opt = torch.optim.AdamW([p for p in self.net.parameters() if p.requires_grad],
                                     lr=tc["lr"], betas=tuple(tc["betas"]),
                                     weight_decay=tc["weight_decay"])
        self.g_data = torch.Generator().manual_seed(tc["seed"])
        self.g_noise = torch.Generator().manual_seed(tc["seed"] + 1)
        self.step, self.bad_steps, self.losses = 0, 0, []
        self.cpu_seconds = self.cpu_seconds_setup  # (encoding latents, a perceptual net)
        self.ddp = None
        if self.world > 1:
            self.ddp = nn.parallel.DistributedDataParallel(
                self.net, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        # the same preconditioning, called through the DDP wrapper when distributed
        self.train_denoiser = self.denoiser if self.ddp is None else \
            build_denoiser(self.ddp, self.cfg["objective"])
        self.progress = progress and self.rank == 0
        self._resume()

    def _resolve_control_base(self) -> dict | None:
        """For ``model.type = "controlnet"`` with ``base`` naming a run directory: read that
        run, put its network config into ``model.base`` (the checkpoint then rebuilds without
        it), ``hint`` (default "edges") into ``model``, its objective into ``objective`` (the
        ControlNet learns the base's own loss) and a reference to it (path + weights hash,
        :mod:`sfumato.run`) into ``refs.base``, and return its EMA weights. None otherwise."""
        model_cfg = self.cfg["model"]
        if model_cfg["type"] != "controlnet" or not isinstance(model_cfg.get("base"), str):
            return None
        base = Run(model_cfg["base"])
        base_model = network_config(base.config["model"], base.num_classes)
        if base_model.get("type") != "unet":
            raise ConfigError(f"a ControlNet needs a U-Net base; {base.path} holds a "
                              f"{base_model.get('type')!r} network")
        if list(base.data_shape or []) != list(self.x_train.shape[1:]):
            raise ConfigError(f"the base run {base.path} was trained on data of shape "
                              f"{list(base.data_shape or [])}, this data set is "
                              f"{list(self.x_train.shape[1:])}")
        self.cfg["model"] = {"hint": "edges", **model_cfg, "base": base_model}
        self.cfg["objective"] = {**base.config["objective"],
                                 "label_dropout": self.cfg["objective"]["label_dropout"]}
        self.cfg["refs"] = {"base": base.reference_from(self.out).to_dict()}
        return base.weights()

    def _setup_personal(self):
        """For a personalised run (``finetune.method`` set, :mod:`sfumato.personalize`): the
        :class:`~sfumato.personalize.finetune.Personalization` whose concept and prior images
        (and labels) the run trains on. None otherwise."""
        if not self.cfg["finetune"].get("method"):
            return None
        from ..personalize.finetune import Personalization

        c0 = time.process_time()
        personal = Personalization(self)
        self.x_train, self.y_train = personal.x, personal.labels
        self.cpu_seconds_setup += time.process_time() - c0
        return personal

    def _setup_latent(self):
        """For a latent run (config ``autoencoder``: an autoencoder run directory): record it
        in ``refs.autoencoder`` (path + weights hash), and train on its scaled latents of the
        training images, encoded once and cached in the run (:mod:`sfumato.latent`). Returns
        the :class:`~sfumato.autoencoder.AutoencoderModel`, or None for a pixel-space run."""
        if not self.cfg.get("autoencoder"):
            return None
        from ..latent import cached_latents, open_autoencoder

        c0 = time.process_time()
        ae = open_autoencoder(self.cfg["autoencoder"], self.data.shape, self.device)
        ref = ae.run.reference_from(self.out)
        self.cfg["refs"] = {**self.cfg["refs"], "autoencoder": ref.to_dict()}
        if not self.cfg["finetune"].get("method"):  # (a personalised run encodes its own)
            self.x_train = cached_latents(self.out, ae, self.data, self.cfg["data"],
                                          self.rank == 0, ref.sha256)
        self.cpu_seconds_setup += time.process_time() - c0
        return ae

    def _setup_superres(self):
        """For a super-resolution run (``superres.low_size`` set): the
        :class:`~sfumato.lowres.LowResConditioning` that makes each batch's low-resolution,
        noise-augmented input from the clean images (checked against the data and network).
        None otherwise."""
        sec = self.cfg["superres"]
        if not sec["low_size"]:
            return None
        from ..lowres import LowResConditioning, check_superres_config

        if self.autoencoder is not None or self.instruct is not None or self.hint:
            raise ConfigError("superres cannot be combined with a latent run, instruct.edits "
                              "or a ControlNet: the input image is the low-resolution one")
        hw = check_superres_config(sec, self.x_train.shape[1:], self.cfg["model"])
        return LowResConditioning(hw, sec["aug_sigma_max"], sec["aug_zero_p"],
                                  bool(self.cfg["model"].get("aug_level")))

    def _setup_text(self) -> None:
        """Caption the training images and encode the captions once (``text`` section)."""
        from ..text.conditioner import TextConditioner

        self.text = self.instruct = None
        tcfg, icfg = self.cfg["text"], self.cfg["instruct"]
        if icfg["edits"] and not tcfg["encoder"]:
            raise ConfigError("instruct.edits needs a text encoder for the instructions: set "
                              "text.encoder ('minilm' or 'tiny')")
        if not tcfg["encoder"]:
            return
        if self.personal is not None:  # the concept's and the prior images' captions
            self.text = self.personal.text_conditioner(tcfg)
            return
        if icfg["edits"] and self.autoencoder is not None:
            raise ConfigError("instruct.edits edits images in pixel space; a latent run "
                              "(config 'autoencoder') cannot train on instruction pairs yet")
        if icfg["edits"]:  # instruction pairs, not captions
            from ..edit.instruct import InstructionPairs

            self._check_text_net(tcfg["encoder"])
            self.text = TextConditioner(tcfg)
            self.instruct = InstructionPairs(icfg["edits"], self.text.prompts, self.text.null(),
                                             icfg["drop"])
            return
        if getattr(self.data, "captions", None) is not None:  # the data set's own texts
            self._check_text_net(tcfg["encoder"])
            self.text = TextConditioner(tcfg).fit_given(self.data.captions, self.y_train,
                                                        self.data.class_names)
            return
        if self.y_train is None or self.data.train.ndim != 4:
            raise ConfigError("text conditioning captions labelled images; "
                              f"{self.cfg['data']} has no labels")
        self._check_text_net(tcfg["encoder"])
        g = torch.Generator().manual_seed(self.cfg["train"]["seed"] + 7)
        self.text = TextConditioner(tcfg).fit(self.data.train, self.y_train,
                                              int(self.data.num_classes), g)

    def _check_text_net(self, encoder: str) -> None:
        """The network takes what the text encoder gives (a wrapper's base is checked)."""
        model = self.cfg["model"]
        net = model.get("base", model) if model["type"] == "image_conditioned" else model
        if encoder != "minilm" and net is not model:
            raise ConfigError("an image-conditioned (instruct) network takes the frozen "
                              "encoder's states: set text.encoder 'minilm'")
        if encoder == "tiny" and net["type"] != "text_conditioned":
            raise ConfigError("text.encoder 'tiny' trains its encoder inside the model: use "
                              "model.type 'text_conditioned' (backbone + encoder)")
        if encoder == "minilm" and net.get("context_dim") != 384:
            raise ConfigError("text.encoder 'minilm' gives 384-d token states: build the "
                              "network with model.context_dim = 384")

    def hint_cond(self, x0: torch.Tensor) -> dict[str, torch.Tensor]:
        """For a ControlNet run, ``{"hint": hint made from the clean images x0}``."""
        from ..control import make_hint

        return {"hint": make_hint(self.hint, x0)} if self.hint else {}

    # -- precision -------------------------------------------------------------------------
    def _autocast(self):
        p = self.cfg["train"]["precision"]
        use_bf16 = p == "bf16" or (p == "auto" and self.device.type == "cuda"
                                   and torch.cuda.is_bf16_supported())
        if p not in ("auto", "fp32", "bf16"):
            raise ConfigError(f"unknown precision {p!r}; use 'auto', 'fp32' or 'bf16'")
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext()

    # -- checkpoints -----------------------------------------------------------------------
    def _resume(self) -> None:
        ck = find_checkpoint(self.out)
        if ck is None:
            return
        extra = hasattr(self.objective, "extra_state")
        tensors, state, saved_cfg = load_checkpoint(
            ck, stems=("model", "ema", "optimizer", "rng") + (("objective",) if extra else ()))
        for role, ref in (saved_cfg.get("refs") or {}).items():
            now = self.cfg["refs"].get(role)
            if now is None or now["sha256"] != ref["sha256"]:
                raise RunReferenceError(
                    f"{self.out} was started from the {role} run {ref['path']} (relative to it) "
                    f"with weights SHA-256 {ref['sha256'][:12]}...; that run has changed since "
                    f"(now {now and now['sha256'][:12]}...). Restore it, or start a new --out "
                    "directory on the new one")
        for sec in ("data", "model", "objective", "distill", "finetune"):  # (older: none)
            if (saved_cfg.get(sec) or {}) != (self.cfg[sec] or {}):
                raise ConfigError(
                    f"{self.out} holds a run with a different '{sec}' config; resume it with "
                    f"its own config ({ck / 'config.json'}) or choose a new --out directory"
                )
        self._load_weights(self.net, tensors["model"], ck / "model.safetensors")
        self._load_weights(self.ema.module, tensors["ema"], ck / "ema.safetensors")
        self.opt.load_state_dict(optimizer_from_flat(tensors["optimizer"], state["optimizer"]))
        if extra:  # an objective with state of its own (a DMD fake denoiser and optimizer)
            self.objective.load_extra_state(tensors["objective"], state["objective"])
        rng = tensors["rng"]
        self.g_data.set_state(rng["data"])
        self.g_noise.set_state(rng["noise"])
        torch.set_rng_state(rng[f"torch_rank{self.rank}"] if f"torch_rank{self.rank}" in rng
                            else rng["torch_rank0"])
        self.step, self.bad_steps = int(state["step"]), int(state.get("bad_steps", 0))
        self.losses = [tuple(v) for v in state.get("losses", [])]
        self.cpu_seconds = float(state.get("train_cpu_seconds", 0.0))

    def _weights(self, net: nn.Module) -> dict[str, torch.Tensor]:
        """The tensors of ``net`` a checkpoint stores: all, or a personalised run's own."""
        if self.personal is None:
            return net.state_dict()
        from ..personalize.adapt import trainable_state

        return trainable_state(self.personal.names, net)

    def _load_weights(self, net: nn.Module, tensors: dict[str, torch.Tensor], where) -> None:
        if self.personal is None:
            net.load_state_dict(tensors)
            return
        from ..personalize.adapt import load_trainable_state

        load_trainable_state(net, self.personal.names, tensors, str(where))

    def save(self) -> Path | None:
        """Write a checkpoint of the current step (rank 0). Refuses non-finite weights."""
        rng = {"data": self.g_data.get_state(), "noise": self.g_noise.get_state(),
               "torch_rank0": torch.get_rng_state()}
        if self.rank != 0:
            return None
        if not all(torch.isfinite(p).all() for p in self.net.parameters()):
            raise TrainingError("refusing to checkpoint non-finite weights; the last "
                                "checkpoint is kept")
        opt_t, opt_meta = optimizer_to_flat(self.opt.state_dict())
        state = {"step": self.step, "bad_steps": self.bad_steps, "optimizer": opt_meta,
                 "lr": lr_at(max(self.step - 1, 0), self.cfg["train"]),
                 "lr_schedule": {k: self.cfg["train"][k] for k in
                                 ("lr", "warmup_steps", "schedule", "min_lr_ratio", "steps")},
                 "losses": self.losses, "world_size": self.world,
                 "num_classes": self.num_classes, "data_shape": list(self.x_train.shape[1:]),
                 "train_cpu_seconds": self.cpu_seconds, "time": time.time()}
        if self.is_autoencoder:  # the latent scale, measured on training images
            from ..autoencoder import latent_stats

            n = int(self.cfg["reconstruction"]["scale_images"])
            state["latent"] = latent_stats(self.ema.module, self.x_train[:n])
        if self.autoencoder is not None:
            state["image_shape"] = list(self.data.shape)
        if self.text is not None and self.text.class_prompts:
            state["class_prompts"] = self.text.class_prompts
        if self.personal is not None:
            state.update(self.personal.state())
            self.personal.write_files(self.ema.module)
        tensors = {"model": self._weights(self.net), "ema": self._weights(self.ema.module),
                   "optimizer": opt_t, "rng": rng}
        if hasattr(self.objective, "extra_state"):
            tensors["objective"], state["objective"] = self.objective.extra_state()
        return save_checkpoint(self.out, tensors=tensors, state=state, config=self.cfg,
                               keep_last=self.cfg["train"]["keep_last"])

    def _checkpoint_status(self) -> str:
        """What a stopped run leaves on disk, in words."""
        ck = find_checkpoint(self.out)
        if ck is None:
            tc = self.cfg["train"]
            return (f"No checkpoint was written yet ({self.out} holds none; the first is due "
                    f"at step {tc['checkpoint_every'] or tc['steps']}).")
        step = json.loads((ck / "state.json").read_text())["step"]
        return f"The last good checkpoint, step {step}, in {ck} is intact."

    # -- one step --------------------------------------------------------------------------
    def _global_batch(self) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor,
                                     torch.Tensor]:
        """(x0, conditioning kwargs, sigma, noise) of the global batch."""
        B = self.cfg["train"]["batch_size"]
        idx = torch.randint(0, self.x_train.shape[0], (B,), generator=self.g_data)
        x0 = self.x_train[idx]
        cond: dict[str, torch.Tensor] = {}
        if self.y_train is not None and self.num_classes:
            y = self.y_train[idx]
            if self.cfg["objective"]["label_dropout"] > 0:
                drop = torch.rand(B, generator=self.g_data) < self.cfg["objective"]["label_dropout"]
                y = torch.where(drop, torch.full_like(y, self.num_classes), y)
            cond["class_labels"] = y
        if self.instruct is not None:  # x0 becomes the edited image, the input a condition
            x0, pair = self.instruct.batch(x0, self.g_data)
            cond.update(pair)
        elif self.text is not None:
            cond.update(self.text.batch(idx, self.g_data))
        cond.update(self.hint_cond(x0))
        if self.superres is not None:  # the low-resolution input, noised (sfumato.lowres)
            cond.update(self.superres.batch(x0, self.g_noise))
        sigma = self.objective.sample_sigma(B, self.denoiser, generator=self.g_noise)
        noise = torch.randn(x0.shape, generator=self.g_noise, dtype=x0.dtype)
        return x0, cond, sigma, noise

    def train_step(self) -> float:
        """One optimizer step over the global batch; returns the mean loss (nan if skipped)."""
        tc = self.cfg["train"]
        self.objective.at_step(self.step)
        x0, cond, sigma, noise = self._global_batch()
        b = x0.shape[0] // self.world
        sl = slice(self.rank * b, (self.rank + 1) * b)
        x0, sigma, noise = x0[sl], sigma[sl], noise[sl]
        cond = {k: v[sl] for k, v in cond.items()}
        acc = tc["grad_accum"]
        mb = b // acc
        for g in self.opt.param_groups:
            g["lr"] = lr_at(self.step, tc)
        self.opt.zero_grad(set_to_none=True)
        total = torch.zeros((), device=self.device)
        for k in range(acc):
            ms = slice(k * mb, (k + 1) * mb)
            xk, sk, nk = (t[ms].to(self.device) for t in (x0, sigma, noise))
            ck = {n: v[ms].to(self.device) for n, v in cond.items()}
            sync = nullcontext() if (self.ddp is None or k == acc - 1) else self.ddp.no_sync()
            with sync, self._autocast():
                loss = self.objective.loss(self.train_denoiser, xk, generator=self.g_noise,
                                           sigma=sk, noise=nk, **ck).mean() / acc
            loss.backward()
            total += loss.detach()
        if self.world > 1:
            torch.distributed.all_reduce(total)
            total /= self.world
        value = float(total)
        if not math.isfinite(value):
            self.opt.zero_grad(set_to_none=True)
            self.bad_steps += 1
            if self.bad_steps >= tc["max_bad_steps"]:
                raise TrainingError(
                    f"the loss was non-finite ({value}) for {self.bad_steps} steps in a row at "
                    f"step {self.step}; stopping. {self._checkpoint_status()} Lower train.lr, "
                    "set train.grad_clip, or check the data for NaNs."
                )
            return value
        self.bad_steps = 0
        if tc["grad_clip"]:
            nn.utils.clip_grad_norm_(self.net.parameters(), tc["grad_clip"])
        self.opt.step()
        self.step += 1
        self.ema.update(self.net, self.step)
        return value

    # -- the loop ---------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Train until ``train.steps``; checkpoint periodically and at the end. Returns a
        summary dict (steps, final loss, seconds)."""
        from tqdm.auto import tqdm

        tc = self.cfg["train"]
        total, t0 = tc["steps"], time.time()
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
        bar = tqdm(total=total, initial=self.step, disable=not self.progress, desc="train",
                   dynamic_ncols=True)
        ema_loss = None
        while self.step < total:
            before, c0 = self.step, time.process_time()
            loss = self.train_step()
            self.cpu_seconds += time.process_time() - c0
            if self.step == before:  # skipped (non-finite loss)
                continue
            ema_loss = loss if ema_loss is None else 0.95 * ema_loss + 0.05 * loss
            if self.step % tc["log_every"] == 0 or self.step == total:
                self.losses.append((self.step, loss))
            bar.update(1)
            bar.set_postfix(loss=f"{ema_loss:.4f}", lr=f"{lr_at(self.step - 1, tc):.2e}")
            if tc["checkpoint_every"] and self.step % tc["checkpoint_every"] == 0 \
                    and self.step < total:
                self.save()
            if tc["sample_every"] and self.step % tc["sample_every"] == 0 and self.rank == 0:
                self.write_samples()
        bar.close()
        self.save()
        if self.rank == 0:
            self.write_samples()
            self.write_loss_plot()
        summary = {"steps": self.step, "loss": ema_loss, "seconds": time.time() - t0,
                   "train_cpu_seconds": self.cpu_seconds}
        if self.rank == 0:
            (self.out / "train_summary.json").write_text(json.dumps(summary, indent=2))
        if self._owns_group:  # a group the caller started is the caller's to end
            _finish_distributed()
        return summary

    # -- artefacts --------------------------------------------------------------------------
    @torch.no_grad()
    def write_samples(self) -> Path | None:
        """A PNG grid of EMA samples at the current step (images only)."""
        from ..data.base import to_uint8
        from ..imageio import save_grid
        from ..samplers._api import sample_from
        from ..text.captions import default_prompts

        if self.x_train.ndim != 4 or self.is_classifier:
            return None
        path = self.out / "samples" / f"step-{self.step:08d}.png"
        if self.is_autoencoder:  # held-out images above their reconstructions, row by row
            n = self.cfg["sample"]["n_grid"]
            rows = max(1, int(n ** 0.5))
            real = self._real_rows(rows * (n // rows))
            with torch.autocast(self.device.type, enabled=False):
                rec = self.ema.module(real.to(self.device).float())[0].clamp(-1, 1).cpu()
            pairs = torch.stack([real, rec]).reshape(2, -1, rows, *real.shape[1:])
            grid = pairs.permute(1, 0, 2, 3, 4, 5).reshape(-1, *real.shape[1:])
            save_grid(to_uint8(grid), path, nrow=rows)
            return path
        sc = self.cfg["sample"]
        ema_den = build_denoiser(self.ema.module, self.cfg["objective"])
        n = sc["n_grid"]
        labels = (torch.arange(n) % self.num_classes) if self.num_classes else None
        cond = {}
        if self.hint:  # hints of real images
            cond = self.hint_cond(self._real_rows(n))
        if self.instruct is not None:  # held-out digits, each edit in turn
            cond = self.instruct.examples(self._real_rows(n))
        elif self.text is not None and getattr(self.data, "captions", None):  # its texts
            cond = self.text.prompts([self.data.captions[i % len(self.data.captions)]
                                      for i in range(n)])
        elif self.text is not None:  # each class's plain prompt, like the class grid
            cond = self.text.prompts(default_prompts(n, int(self.data.num_classes)))
        if self.superres is not None:  # held-out images, downsampled, with their labels
            cond.update(self.superres.examples(self._real_rows(n)))
            real_y = self.data.heldout_labels if getattr(self.data, "heldout", None) is not None \
                else self.y_train
            if labels is not None and real_y is not None:
                labels = real_y[torch.arange(n) % real_y.shape[0]]
        cond = {k: v.to(self.device) for k, v in cond.items()}
        x = sample_from(ema_den, (n, *self.x_train.shape[1:]), sc, seed=0, device=self.device,
                        class_labels=labels, **cond)
        if self.autoencoder is not None:
            x = self.autoencoder.decode(x)
        save_grid(to_uint8(x.cpu()), path)
        return path

    def _real_rows(self, n: int) -> torch.Tensor:
        """n real images: the first rows of the held-out split (or train), cycled."""
        real = self.data.heldout if getattr(self.data, "heldout", None) is not None \
            else self.x_train
        return real[torch.arange(n) % real.shape[0]]

    def write_loss_plot(self) -> Path | None:
        if not self.losses:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        steps, vals = zip(*self.losses, strict=True)
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(steps, vals, lw=0.6, alpha=0.5, label="loss")
        k = max(1, len(vals) // 50)
        if len(vals) > k:
            sm = torch.tensor(vals).unfold(0, k, 1).mean(1).tolist()
            ax.plot(steps[k - 1:], sm, lw=1.5, label=f"mean of {k}")
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("weighted loss")
        ax.legend()
        fig.tight_layout()
        path = self.out / "loss.png"
        with atomic_write(path) as tmp:
            fig.savefig(tmp, dpi=110)
        plt.close(fig)
        return path


def train(config: str | os.PathLike | dict | None = None, out: str | os.PathLike = "runs/run",
          **kwargs) -> dict[str, Any]:
    """Train (or resume) a run: ``sfumato.train("configs/digits_unet.json", out="runs/d")``."""
    return Trainer(config, out, **kwargs).run()
