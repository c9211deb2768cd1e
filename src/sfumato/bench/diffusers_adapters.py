"""diffusers schedulers on the benchmark's exact model (needs ``pip install 'sfumato[bench]'``).

Imported only when diffusers configurations run (by :func:`sfumato.bench.runner.run_benchmark`
and :func:`sfumato.bench.compare.compare`), so that ``import sfumato.bench`` never needs
diffusers; diffusers itself is imported inside the functions that drive it.

- Every scheduler gets the problem's exact betas (``trained_betas``) and predicts eps:
  :class:`EpsModel` reads the σ-space mixture as an eps-prediction network in VP coordinates,
  ``x = x_t sqrt(1 + sigma^2)``, ``eps = (x - D(x, sigma)) / sigma``.
- **Comparison space**: all configurations end at sigma = 0 (DDIM/PNDM use
  ``set_alpha_to_one=True``; the others ``final_sigmas_type='zero'``), where the VP scale is 1,
  so the VP output *is* the data-space output. The one exception, UniPC-bh1 with
  ``final_sigmas_type='sigma_min'`` (bh1 returns NaN when it steps into 0), ends at
  sigma(t=0); its VP output ``x`` is read as ``x sqrt(1 + sigma^2)`` there.
- **The model's sigma**: a scheduler passes a timestep; the wrapper evaluates the mixture at
  the sigma the scheduler itself assumes for that call (``scheduler.sigmas[i]``, whose timestep
  diffusers may have rounded, e.g. with Karras sigmas), i.e. diffusers' best case;
  ``sigma_source='timestep'`` uses sigma(t) instead (what an integer-t network sees; it moves
  the best diffusers errors by a few percent, either way). diffusers schedulers compute in
  float32, sfumato here in float64: measured, the errors agree to 4-5 digits (e.g. sfumato
  Euler vs diffusers Euler on the same Karras grid), so precision plays no part.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..accuracy import CountingDenoiser
from ..errors import UsageError
from ..process import VPDiscrete
from .problem import Problem, start_state
from .results import Result, finite_error, steps_for_budget

__all__ = ["EpsModel", "DiffusersConfig", "diffusers_configs", "run_diffusers",
           "dedupe_diffusers", "DIFFUSERS_STOCHASTIC"]


class EpsModel:
    """A σ-space denoiser read as a diffusers eps-prediction model in VP coordinates.

    ``model(x_t, t, sigma=None) -> eps`` with ``x_t = s (x0 + sigma eps)``,
    ``s = 1 / sqrt(1 + sigma^2)``: ``x = x_t / s``, ``eps = (x - D(x, sigma)) / sigma``.

    ``sigma`` defaults to the process's ``sigma(t)`` (log-sigma interpolation between integer
    steps, the inverse of diffusers' ``_sigma_to_t``); the benchmark passes the scheduler's own
    sigma when it can read it (see :func:`run_diffusers`). Computes in float64 and returns
    ``x_t``'s dtype. Counts calls in ``nfe`` (a :class:`~sfumato.accuracy.CountingDenoiser` around
    the σ-space denoiser: one per call).
    """

    def __init__(self, denoiser: Callable, process: VPDiscrete) -> None:
        self.denoiser, self.process = CountingDenoiser(denoiser), process

    @property
    def nfe(self) -> int:
        """Model calls so far (each is one call of the σ-space denoiser)."""
        return self.denoiser.nfe

    def sigma_of(self, t: torch.Tensor | float) -> torch.Tensor:
        return self.process.sigma(torch.as_tensor(t, dtype=torch.float64))

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor | float,
                 sigma: torch.Tensor | float | None = None) -> torch.Tensor:
        sig = self.sigma_of(t) if sigma is None else torch.as_tensor(sigma, dtype=torch.float64)
        sig = sig.to(torch.float64).reshape(-1)
        if sig.numel() == 1:
            sig = sig.expand(x_t.shape[0])
        b = sig.reshape((-1,) + (1,) * (x_t.ndim - 1))
        x = x_t.to(torch.float64) * (1 + b**2).sqrt()
        eps = (x - self.denoiser(x, sig)) / b
        return eps.to(x_t.dtype)


#: diffusers schedulers whose ``sample`` is the σ-space state (k-diffusion style)
_SIGMA_SPACE = {"EulerDiscreteScheduler", "HeunDiscreteScheduler", "LMSDiscreteScheduler",
                "KDPM2DiscreteScheduler"}


@dataclass
class DiffusersConfig:
    """A diffusers scheduler class name and the keyword arguments it is built with.

    ``label`` is the name without the timestep-spacing part (used when the spacing turns out
    not to matter, see :func:`dedupe_diffusers`).
    """

    name: str
    cls: str
    kwargs: dict[str, Any]
    label: str = ""


def _accepts(cls_name: str, key: str) -> bool:
    try:
        import diffusers

        return key in inspect.signature(getattr(diffusers, cls_name).__init__).parameters
    except Exception:  # noqa: BLE001
        return False


def diffusers_configs(level: str = "full") -> list[DiffusersConfig]:
    """The diffusers configurations benchmarked (deterministic, eps-driven; needs diffusers).

    ``level='full'``: every scheduler x its timestep spacings (leading with steps_offset=1 as
    Stable Diffusion ships, trailing, linspace; where the scheduler has the option) x sigma
    options (default, Karras, exponential, and Lu's uniform-logSNR for DPM-Solver++) x solver
    order/variant. All end at sigma = 0 (``set_alpha_to_one=True`` for DDIM/PLMS, the default
    ``final_sigmas_type='zero'`` elsewhere), except UniPC-bh1, which gives NaN when its last
    step reaches sigma = 0 and is also run with ``final_sigmas_type='sigma_min'``.
    ``'small'``: a handful of strong ones for ``sfumato compare``.
    """
    if level == "small":  # the best diffusers configurations of the full benchmark
        return [
            DiffusersConfig("Euler karras", "EulerDiscreteScheduler",
                            {"use_karras_sigmas": True}),
            DiffusersConfig("LMS karras", "LMSDiscreteScheduler", {"use_karras_sigmas": True}),
            DiffusersConfig("DPM++2M karras", "DPMSolverMultistepScheduler",
                            {"solver_order": 2, "use_karras_sigmas": True}),
            DiffusersConfig("UniPC-bh2 o2 exp", "UniPCMultistepScheduler",
                            {"solver_order": 2, "solver_type": "bh2",
                             "use_exponential_sigmas": True}),
            DiffusersConfig("DEIS o3 karras", "DEISMultistepScheduler",
                            {"solver_order": 3, "use_karras_sigmas": True}),
        ]
    if level != "full":
        raise UsageError(f"unknown level {level!r}; use 'full' or 'small'")
    spacings = [("leading", {"timestep_spacing": "leading", "steps_offset": 1}),
                ("trailing", {"timestep_spacing": "trailing"}),
                ("linspace", {"timestep_spacing": "linspace"})]
    out: list[DiffusersConfig] = []

    def add(label: str, cls: str, sigma_opts: Sequence[tuple[str, dict]], **kw: Any) -> None:
        sps = spacings if _accepts(cls, "timestep_spacing") else [("", {})]
        for so_name, so in sigma_opts:
            lab = " ".join(x for x in (label, so_name) if x)
            for sp_name, sp in sps:
                out.append(DiffusersConfig(" ".join(x for x in (lab, sp_name) if x), cls,
                                           {**kw, **sp, **so}, label=lab))

    plain = [("", {})]
    kexp = [("", {}), ("karras", {"use_karras_sigmas": True}),
            ("exp", {"use_exponential_sigmas": True})]
    add("DDIM", "DDIMScheduler", plain, clip_sample=False, set_alpha_to_one=True)
    add("PLMS", "PNDMScheduler", plain, skip_prk_steps=True, set_alpha_to_one=True)
    add("LMS", "LMSDiscreteScheduler", kexp)
    add("Euler", "EulerDiscreteScheduler", kexp)
    add("Heun", "HeunDiscreteScheduler", kexp)
    add("KDPM2", "KDPM2DiscreteScheduler", kexp)
    for order in (2, 3):
        add(f"DPM++{order}M", "DPMSolverMultistepScheduler",
            kexp + [("lu", {"use_lu_lambdas": True})],
            solver_order=order, algorithm_type="dpmsolver++")
    for order in (2, 3):
        add(f"DPM++{order}S", "DPMSolverSinglestepScheduler", kexp,
            solver_order=order, algorithm_type="dpmsolver++")
    for variant in ("bh1", "bh2"):
        for order in (1, 2, 3):
            add(f"UniPC-{variant} o{order}", "UniPCMultistepScheduler", kexp,
                solver_order=order, solver_type=variant)
    for order in (1, 2, 3):
        add(f"UniPC-bh1 o{order} end@sigma_min", "UniPCMultistepScheduler", kexp,
            solver_order=order, solver_type="bh1", final_sigmas_type="sigma_min")
    for order in (2, 3):
        add(f"DEIS o{order}", "DEISMultistepScheduler", kexp, solver_order=order)
    return out


#: diffusers schedulers left out of the ODE table because they are stochastic
DIFFUSERS_STOCHASTIC = ("DDPMScheduler", "EulerAncestralDiscreteScheduler",
                        "KDPM2AncestralDiscreteScheduler", "DPMSolverSDEScheduler",
                        "DPMSolverMultistepScheduler(algorithm_type='sde-dpmsolver++')")


@contextlib.contextmanager
def _quiet_diffusers() -> Iterator[None]:
    """Silence diffusers' deprecation warnings and config-change log lines while we drive it
    (they are about diffusers' own API, not about the benchmark); restores both after."""
    logger = logging.getLogger("diffusers")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _build_scheduler(cfg: DiffusersConfig, process: VPDiscrete):
    import diffusers

    cls = getattr(diffusers, cfg.cls)
    return cls(num_train_timesteps=process.n, trained_betas=process.betas.numpy(),
               prediction_type="epsilon", **cfg.kwargs)


def _steps_for(sched, nfe: int) -> tuple[int, int] | None:
    """The scheduler's largest step count within ``nfe`` model calls (one per timestep)."""

    def nfe_of(n: int) -> int:
        sched.set_timesteps(n)
        return len(sched.timesteps)

    return steps_for_budget(nfe_of, nfe)


def _scheduler_sigma(sched, i: int) -> float | None:
    """The sigma the scheduler assumes for its i-th model call, if it keeps one."""
    name = type(sched).__name__
    if name == "KDPM2DiscreteScheduler":
        idx = sched.step_index if sched.step_index is not None else 0
        table = sched.sigmas if sched.state_in_first_order else sched.sigmas_interpol
        return float(table[idx])
    sig = getattr(sched, "sigmas", None)
    if sig is not None and len(sig) == len(sched.timesteps) + 1:
        return float(sig[i])
    return None


def run_diffusers(problem: Problem, cfg: DiffusersConfig, nfe: int,
                  sigma_source: str = "scheduler", dtype: torch.dtype = torch.float32) -> Result:
    """Drive diffusers scheduler ``cfg`` with the exact eps model at the largest step count
    whose model-call count is <= ``nfe``.

    ``sigma_source='scheduler'`` evaluates the model at the sigma the scheduler itself assumes
    for each call when it keeps one (e.g. its Karras sigmas, whose timesteps diffusers rounds
    to integers): diffusers' best case, as if the network understood fractional timesteps.
    ``'timestep'`` evaluates at ``sigma(t)`` of the timestep passed, as a network trained on
    integer t sees it. Latents run in ``dtype`` (diffusers casts to float32 internally anyway).
    """
    with _quiet_diffusers():
        return _run_diffusers(problem, cfg, nfe, sigma_source, dtype)


def _run_diffusers(problem: Problem, cfg: DiffusersConfig, nfe: int, sigma_source: str,
                   dtype: torch.dtype) -> Result:
    if sigma_source not in ("scheduler", "timestep"):
        raise UsageError("sigma_source must be 'scheduler' or 'timestep'")
    name = cfg.name
    conf = {"scheduler": cfg.cls, **cfg.kwargs}
    try:
        sched = _build_scheduler(cfg, problem.process)
        found = _steps_for(sched, nfe)
    except Exception as e:  # noqa: BLE001
        return Result(name, "diffusers", nfe, status="error", note=f"{type(e).__name__}: {e}",
                      config=conf)
    if found is None:
        return Result(name, "diffusers", nfe, status="n/a", config=conf)
    n, _ = found
    model = EpsModel(problem.model, problem.process)
    max_dt, fallbacks = 0.0, 0
    try:
        sched.set_timesteps(n)
        vp_coords = cfg.cls not in _SIGMA_SPACE
        if vp_coords:
            x = problem.latent.to(dtype)
        else:
            x = start_state(problem, float(sched.sigmas[0])).to(dtype)
        for i, t in enumerate(sched.timesteps):
            x_in = sched.scale_model_input(x, t)
            sig = _scheduler_sigma(sched, i) if sigma_source == "scheduler" else None
            if sig is not None:
                dt = abs(float(problem.process.t_from_sigma(torch.tensor(sig,
                                                                       dtype=torch.float64)))
                         - float(t))
                if dt > 0.51 and sig > 0:  # not the sigma of this call: don't trust it
                    sig, fallbacks = None, fallbacks + 1
                else:
                    max_dt = max(max_dt, dt)
            eps = model(x_in, t, sig)
            x = sched.step(eps, t, x).prev_sample
    except Exception as e:  # noqa: BLE001
        return Result(name, "diffusers", nfe, steps=n, status="error",
                      note=f"{type(e).__name__}: {e}", config=conf)
    # the output is the sample at the scheduler's last level: 0 for every config here except
    # final_sigmas_type='sigma_min'; a VP sample there is s (x0 + sigma eps): read it in σ-space
    sig_last = float(sched.sigmas[-1]) if getattr(sched, "sigmas", None) is not None else 0.0
    if vp_coords and sig_last > 0:
        x = x.to(torch.float64) * math.sqrt(1 + sig_last**2)
    res = finite_error(x, problem.reference)
    notes = []
    if max_dt > 0.01:
        notes.append(f"model sigma != sigma(t) by up to {max_dt:.2f} steps")
    if fallbacks:
        notes.append(f"{fallbacks} calls at sigma(t): the scheduler's sigma did not match t")
    if sig_last > 0:
        notes.append(f"ends at sigma={sig_last:.3g}")
    note = "; ".join(notes)
    return Result(name, "diffusers", nfe, nfe=model.nfe, steps=n, note=note, config=conf, **res)


def _diffusers_fingerprint(problem: Problem, cfg: DiffusersConfig,
                           nfes: Sequence[int]) -> tuple | None:
    """What a config actually runs at each NFE (class, non-spacing options, timesteps,
    sigmas): two configs with the same fingerprint give identical results."""
    with _quiet_diffusers():
        return _fingerprint(problem, cfg, nfes)


def _fingerprint(problem: Problem, cfg: DiffusersConfig, nfes: Sequence[int]) -> tuple | None:
    try:
        sched = _build_scheduler(cfg, problem.process)
        parts: list[Any] = [cfg.cls, tuple(sorted((k, repr(v)) for k, v in cfg.kwargs.items()
                                                  if k not in ("timestep_spacing",
                                                               "steps_offset")))]
        for k in nfes:
            found = _steps_for(sched, k)
            if found is None:
                parts.append(None)
                continue
            sched.set_timesteps(found[0])
            sig = getattr(sched, "sigmas", None)
            parts.append((tuple(float(t) for t in sched.timesteps),
                          None if sig is None else tuple(round(float(v), 7) for v in sig)))
        return tuple(parts)
    except Exception:  # noqa: BLE001 - a broken config is reported by run_diffusers
        return None


def dedupe_diffusers(problem: Problem, cfgs: Sequence[DiffusersConfig],
                     nfes: Sequence[int]) -> tuple[list[DiffusersConfig], list[str]]:
    """Drop configs that run exactly the same schedule as an earlier one (e.g. Karras sigmas
    make DPM-Solver's timestep spacing irrelevant); returns (kept, notes)."""
    groups: dict[tuple, list[DiffusersConfig]] = {}
    kept: list[DiffusersConfig] = []
    for cfg in cfgs:
        fp = _diffusers_fingerprint(problem, cfg, nfes)
        if fp is None:
            kept.append(cfg)
        elif fp in groups:
            groups[fp].append(cfg)
        else:
            groups[fp] = [cfg]
            kept.append(cfg)
    dup = []
    by_first = {id(g[0]): g for g in groups.values()}
    for i, cfg in enumerate(kept):
        g = by_first.get(id(cfg))
        if not g or len(g) == 1:
            continue
        if cfg.label and all(c.label == cfg.label for c in g):
            new = DiffusersConfig(f"{cfg.label} (any spacing)", cfg.cls, cfg.kwargs, cfg.label)
            kept[i] = new
            dup.append(f"{new.name}: spacing makes no difference")
        else:
            dup.append(f"{', '.join(c.name for c in g[1:])} = {cfg.name}")
    notes = [f"{sum(len(g) - 1 for g in groups.values())} diffusers configurations run "
             "exactly the same schedule as another and are not repeated ("
             + "; ".join(dup) + ")"] if dup else []
    return kept, notes
