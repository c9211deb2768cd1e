"""``sfumato demo``: train the default digits model on the CPU, sample it, score it.

The recipe is the one that works on a CPU (see ../shared/DESIGN.md, "Defaults that matter"):
EDM preconditioning, log-normal sigma sampling and EDM loss weighting, at the data's native
8x8 resolution, a small U-Net, EMA weights for sampling. The model is class-conditional with
10% label dropout, so one network samples with and without classifier-free guidance. Writes
into the run directory: ``checkpoint/``, ``loss.png``, ``samples.png`` (unguided, classes
evenly), ``guided.png`` (one row per class, guidance ``GUIDANCE``), ``metrics.json``.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import torch

DEMO_CONFIG: dict[str, Any] = {
    "data": {"name": "digits"},
    "model": {"type": "unet", "image_size": 8, "in_channels": 1, "model_channels": 16,
              "channel_mult": [1, 2], "num_res_blocks": 2, "attention_resolutions": [],
              "mid_attention": False, "norm_groups": 8, "conditional": True},
    "objective": {"target": "edm", "sigma_data": 0.5, "sigma_sampling": "lognormal",
                  "P_mean": -1.2, "P_std": 1.2, "weighting": "edm", "label_dropout": 0.1},
    # width 16: as good as 32 at equal steps here, 2.6x cheaper per step. One thread: two are
    # only ~20% faster on an idle 2-core box and ~10x slower when the other core is busy.
    # fp32, not bf16: bf16 saves ~13% on a CPU with AVX512-BF16 but is 1.6x slower on plain
    # AVX-512 and ~10x slower on AVX2-only CPUs (oneDNN emulates it).
    "train": {"steps": 1300, "batch_size": 128, "lr": 3e-3, "warmup_steps": 50,
              "schedule": "cosine", "checkpoint_every": 500, "keep_last": 3,
              "ema": {"kind": "power", "sigma_rel": 0.1}, "precision": "fp32",
              "num_threads": 1},
    "sample": {"sampler": "dpmpp_2m", "steps": 16, "grid": "karras", "sigma_min": 0.002,
               "sigma_max": 80.0, "n_grid": 100},
}

N_EVAL = 1000  # FD at 300 samples varies 0.5-2x between draws on digits; 1000 is steady
GUIDANCE = 1.5  # CFG scale of the guided grid: best CAS at FD <= 1.5x unguided (sweep)


def run_demo(out: str | os.PathLike = "runs/demo", *, progress: bool = True,
             config: dict | None = None, n_eval: int = N_EVAL) -> dict[str, Any]:
    """Train (or resume) the demo run in ``out``, sample ``n_eval`` images, score them.

    Returns the metrics dict (also written to ``out/metrics.json``).
    """
    from .data import get_dataset
    from .files import write_json_atomic
    from .imageio import save_grid
    from .metrics import evaluate_images, get_classifier
    from .model import load
    from .train.trainer import Trainer

    t0 = time.time()
    out = Path(out)
    cfg = config or DEMO_CONFIG
    summary = Trainer(cfg, out, progress=progress).run()
    t_train = time.time() - t0
    model = load(out)
    drawn = model.sample(n_eval, seed=12345)
    save_grid(drawn.to_uint8()[:100], out / "samples.png", nrow=10)
    data = get_dataset(cfg["data"])
    metrics = evaluate_images(drawn.x, data, n=n_eval, labels=drawn.labels)
    guided = {}
    if model.num_classes:  # one row per class, classifier-free guidance
        nc = model.num_classes
        y = torch.arange(nc).repeat_interleave(10)
        rows = model.sample(len(y), seed=0, class_labels=y, guidance=GUIDANCE)
        save_grid(rows.to_uint8(), out / "guided.png", nrow=10)
        pred = get_classifier(data).predict(rows.x)  # only the accuracy: no FD, no floor
        guided = {"guidance": GUIDANCE, "guided_accuracy": float((pred == y).double().mean())}
    result = {
        "fd": metrics["fd"], "fd_floor": metrics["fd_floor"], "fd_ratio": metrics["fd_ratio"],
        "fd_floor_std": metrics.get("fd_floor_std"), "n": metrics["n"],
        "n_ref": metrics.get("n_ref"), "class_entropy": metrics.get("class_entropy"),
        "class_hist": metrics.get("class_hist"), "steps": summary["steps"],
        "train_seconds": round(t_train, 1), "total_seconds": round(time.time() - t0, 1),
        "sampler": drawn.sampler, "sampler_steps": len(drawn.sigmas) - 1,
        "accuracy": metrics.get("accuracy"), **guided,
    }
    write_json_atomic(out / "metrics.json", result)
    print(f"Frechet distance (classifier features, {result['n']} samples): "
          f"{result['fd']:.2f}   real-vs-real floor: {result['fd_floor']:.2f}   "
          f"ratio: {result['fd_ratio']:.2f}")
    if guided:
        print(f"class accuracy of samples: {result['accuracy']:.3f} unguided, "
              f"{guided['guided_accuracy']:.3f} with guidance {GUIDANCE:g} "
              f"(grid: one row per class, {out / 'guided.png'})")
    print(f"wrote {out / 'samples.png'}, {out / 'loss.png'}, {out / 'metrics.json'} "
          f"({result['total_seconds']:.0f} s in all)")
    return json.loads(json.dumps(result, default=float))
