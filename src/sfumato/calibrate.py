"""Optimised sigma grids: fit a deterministic sampler's noise levels to one model.

At 5-10 steps the grid decides most of a solver's error, and the best grid depends on the
model: where along the trajectory the denoiser's output changes fastest (for a mixture: the
noise levels at which a trajectory commits to a mode). Generic grids (Karras, log-linear,
:func:`sfumato.sigmas.gaussian_lte`) guess this from the noise range or a Gaussian surrogate.
:func:`optimize_sigmas` measures it instead -- the idea of the optimised-schedule papers
(Watson et al. 2021, "Learning to efficiently sample from diffusion probabilistic models";
Sabour et al. 2024, "Align your steps"; Xue et al. 2024, "Accelerating diffusion sampling with
optimized time steps"; Chen et al. 2024, "A geometric perspective ... GITS"):

1. draw ``samples`` starting points ``sigma_max * z`` from ``generator`` (calibration noise,
   never the noise you evaluate on);
2. solve their probability-flow ODE accurately (RK4 in log sigma, ``ref_steps`` steps, to
   ``ref_sigma``, then ``D(x, ref_sigma)``): the targets;
3. minimise, over the ``n - 1`` interior levels (log sigma; the first level stays
   ``sigma_max``, the last positive one stays >= ``sigma_min``, then 0), the RMS distance of
   the sampler's output to the targets -- Nelder-Mead (scipy), started from ``init``.

No network is trained: the result is a grid (``n + 1`` numbers) for this model, sampler and
step count, usable with every sampler function. The offline cost is ``4 ref_steps + 1``
denoiser calls per calibration sample for the targets and ``n`` per sample for each trial
grid; :class:`OptimizedSigmas` reports both.

The error is heavy-tailed over starting points (a few trajectories that switch modes late
carry most of it), so the fit needs thousands of calibration samples to hold on new noise:
on the benchmark mixtures 4096 transfer (errors within ~10 % of the calibration error on
fresh noise), 256 do not (the fit follows a handful of outliers).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from . import sigmas as grids
from .accuracy import CountingDenoiser, reference_ode
from .errors import UsageError
from .samplers.tuned import StepTable, run_table, unipc_table

__all__ = ["OptimizedSigmas", "optimize_sigmas", "TunedSolver", "tune_coefficients"]


@dataclass
class OptimizedSigmas:
    """Result of :func:`optimize_sigmas`.

    Attributes:
        sigmas: the optimised grid, (n + 1,) float64, decreasing, ending in 0.
        init_sigmas: the starting grid, same shape.
        error: RMS error of the sampler on the calibration set with ``sigmas``.
        init_error: the same with ``init_sigmas``.
        trials: grids tried (objective evaluations).
        nfe: denoiser calls per calibration sample, targets and trials together.
    """

    sigmas: torch.Tensor
    init_sigmas: torch.Tensor
    error: float
    init_error: float
    trials: int
    nfe: int

    def to_dict(self) -> dict:
        """JSON-able form (the grid as a list)."""
        return {"sigmas": self.sigmas.tolist(), "init_sigmas": self.init_sigmas.tolist(),
                "error": self.error, "init_error": self.init_error, "trials": self.trials,
                "nfe": self.nfe}


def _sampler_fn(sampler: str | Callable) -> Callable:
    from .samplers import STOCHASTIC, get_sampler

    if callable(sampler):
        return sampler
    if sampler in STOCHASTIC or sampler == "rk45":
        raise UsageError(f"optimize_sigmas needs a deterministic fixed-grid sampler; "
                         f"{sampler!r} is {'adaptive' if sampler == 'rk45' else 'stochastic'}")
    return get_sampler(sampler)


def _bind(denoiser: Callable, cond: dict[str, torch.Tensor]) -> Callable:
    """``denoiser`` with its conditioning fixed (one chunk's rows)."""
    return (lambda x, sigma: denoiser(x, sigma, **cond)) if cond else denoiser


def _targets(denoiser: Callable, x: torch.Tensor, sigma_max: float, ref_sigma: float,
             ref_steps: int) -> torch.Tensor:
    y = reference_ode(denoiser, x, sigma_max, ref_sigma, steps=ref_steps)
    return denoiser(y, torch.full((x.shape[0],), ref_sigma, dtype=x.dtype, device=x.device))


def _chunked(denoiser: Callable, samples: int, batch_size: int | None,
             cond: dict[str, torch.Tensor] | None) -> tuple[list[slice], list[Callable]]:
    """Chunks of ``batch_size`` draws and, per chunk, the denoiser with its conditioning."""
    bs = batch_size or samples
    chunks = [slice(i, i + bs) for i in range(0, samples, bs)]
    return chunks, [_bind(denoiser, {k: v[c] for k, v in (cond or {}).items()}) for c in chunks]


def target_calls(ref_steps: int) -> int:
    """Denoiser calls per draw of a calibration target (RK4: 4 per step, then the final D)."""
    return 4 * ref_steps + 1


def _calibration_set(denoiser: Callable, sigma_max: float, *, shape: Sequence[int],
                     generator: torch.Generator, samples: int, ref_sigma: float,
                     ref_steps: int, batch_size: int | None, dtype: torch.dtype,
                     device: torch.device | str, cond: dict[str, torch.Tensor] | None,
                     cache: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Calibration starts ``sigma_max * z`` (``samples`` draws from ``generator``) and their
    accurate PF-ODE solutions: (x, target), computed ``batch_size`` draws at a time.

    ``cache`` (a dict kept by the caller for one denoiser, unconditioned calls only) holds
    sets already solved, keyed by the arguments and the generator's state; a hit skips the
    solve and leaves the generator as the draw would have."""
    for k, v in (cond or {}).items():
        if not torch.is_tensor(v) or v.shape[:1] != (samples,):
            raise UsageError(f"cond[{k!r}] must be a tensor with samples = {samples} rows; got "
                             f"{tuple(v.shape) if torch.is_tensor(v) else type(v).__name__}")
    key = None
    if cache is not None and not cond:
        key = (float(sigma_max), tuple(shape), samples, float(ref_sigma), ref_steps, dtype,
               str(device), generator.get_state().numpy().tobytes())
        if key in cache:
            x, target, state = cache[key]
            generator.set_state(state)
            return x, target
    z = torch.randn(samples, *shape, generator=generator, dtype=torch.float64)
    x = (sigma_max * z).to(dtype=dtype, device=device)
    chunks, models = _chunked(denoiser, samples, batch_size, cond)
    target = torch.cat([_targets(m, x[c], sigma_max, ref_sigma, ref_steps)
                        for m, c in zip(models, chunks, strict=True)])
    if key is not None:
        cache[key] = (x, target, generator.get_state())
    return x, target


@torch.no_grad()
def optimize_sigmas(denoiser: Callable, sampler: str | Callable, n: int, *,
                    sigma_min: float, sigma_max: float, shape: Sequence[int],
                    generator: torch.Generator, init: torch.Tensor | None = None,
                    samples: int = 4096, ref_steps: int = 200,
                    ref_sigma: float | None = None, max_trials: int | None = None,
                    batch_size: int | None = None, dtype: torch.dtype = torch.float32,
                    device: torch.device | str = "cpu",
                    sampler_kwargs: dict | None = None,
                    cond: dict[str, torch.Tensor] | None = None,
                    cache: dict | None = None) -> OptimizedSigmas:
    """Fit an ``n``-step grid for ``sampler`` (a name in ``SAMPLERS`` or a sampler function)
    to ``denoiser`` (see the module docstring for the method).

    Args:
        shape: shape of one sample, e.g. (C, H, W).
        generator: draws the calibration noise (use a seed you do not evaluate with).
        init: starting grid with ``n + 1`` values ending in 0 (default
            :func:`sfumato.sigmas.gaussian_lte`, order 3).
        samples: calibration starting points (default 4096; see the module docstring).
        ref_steps: RK4 steps of the target solutions.
        ref_sigma: where the target ODE solve stops before its final ``D`` (default
            ``sigma_min``, the lowest level a network was trained at; a model valid below it,
            like :class:`sfumato.mixture.GaussianMixture`, can go lower to target sigma = 0).
        max_trials: objective evaluations (default ``60 * (n - 1)``, at least 40).
        batch_size: calibration samples per denoiser call (default: all at once).
        dtype, device: of the calibration tensors.
        sampler_kwargs: the sampler's own options (e.g. ``{"order": 2}``).
        cond: conditioning for the denoiser, tensors with ``samples`` rows (e.g. class labels
            spread over the classes); each calibration draw gets its row.
        cache: a dict you keep for this denoiser: calibration sets (starts and targets)
            solved once are reused by later calls with the same arguments and generator state
            (e.g. one grid per step count from one seed); ``nfe`` still counts their cost.

    Returns:
        :class:`OptimizedSigmas` with the grid and the calibration errors before and after.
        The grid keeps ``init``'s first level and never goes below ``sigma_min``.
    """
    from scipy.optimize import minimize

    fn = _sampler_fn(sampler)
    counted = CountingDenoiser(denoiser)  # the trial grids' calls
    kw = dict(sampler_kwargs or {})
    if int(n) != n or n < 2:
        raise UsageError(f"n must be an integer >= 2 (with one step there is nothing to place); "
                         f"got {n!r}")
    if not 0 < sigma_min < sigma_max:
        raise UsageError(f"need 0 < sigma_min < sigma_max; got {sigma_min}, {sigma_max}")
    if samples < 1 or ref_steps < 1:
        raise UsageError(f"samples and ref_steps must be positive; got {samples}, {ref_steps}")
    ref_sigma = sigma_min if ref_sigma is None else float(ref_sigma)
    if not 0 < ref_sigma <= sigma_min:
        raise UsageError(f"ref_sigma must be in (0, sigma_min={sigma_min}]; got {ref_sigma}")
    if init is None:
        init = grids.gaussian_lte(n, sigma_min, sigma_max, order=3)
    init = torch.as_tensor(init, dtype=torch.float64).detach().cpu()
    if init.shape != (n + 1,) or init[-1] != 0 or not (init[:-1].diff() < 0).all() \
            or init[-2] < sigma_min * (1 - 1e-9):
        raise UsageError(f"init must be a decreasing grid of n + 1 = {n + 1} values from "
                         f"sigma_max down to >= sigma_min, then 0; got {init.tolist()}")
    max_trials = max(40, 60 * (n - 1)) if max_trials is None else int(max_trials)

    x, target = _calibration_set(
        denoiser, float(init[0]), shape=shape, generator=generator, samples=samples,
        ref_sigma=ref_sigma, ref_steps=ref_steps, batch_size=batch_size, dtype=dtype,
        device=device, cond=cond, cache=cache)
    chunks, models = _chunked(counted, samples, batch_size, cond)

    top, lo = math.log(float(init[0])), math.log(sigma_min)
    trials = [0]

    def grid_of(u: Sequence[float]) -> torch.Tensor:
        levels = torch.tensor([top, *u], dtype=torch.float64).clamp(min=lo).exp()
        return torch.cat([levels, levels.new_zeros(1)])

    def error(u) -> float:
        trials[0] += 1
        u = [float(v) for v in u]
        if any(b > a - 1e-3 for a, b in zip([top, *u[:-1]], u, strict=True)):  # not decreasing
            return math.inf
        sig = grid_of(u)
        sq = sum(float(((fn(m, x[c], sig, **kw) - target[c]) ** 2).sum())
                 for m, c in zip(models, chunks, strict=True))
        err = math.sqrt(sq / target.numel())
        return err if math.isfinite(err) else math.inf

    u0 = init[1:-1].clamp(min=sigma_min).log().tolist()
    # an absolute first simplex in log sigma (scipy's default is 5 % of each value, which
    # freezes levels near sigma = 1, where log sigma is ~0), stepping down unless that would
    # cross sigma_min
    simplex = [u0] + [[v + (0.15 if v - 0.15 < lo else -0.15) * (i == j)
                       for j, v in enumerate(u0)] for i in range(n - 1)]
    init_error = error(u0)
    res = minimize(error, u0, method="Nelder-Mead",
                   options={"maxfev": max_trials, "xatol": 2e-3, "fatol": 1e-7,
                            "initial_simplex": simplex})
    best, best_err = (res.x, float(res.fun)) if res.fun < init_error else (u0, init_error)
    return OptimizedSigmas(sigmas=grid_of(best), init_sigmas=init, error=best_err,
                           init_error=init_error, trials=trials[0],
                           nfe=target_calls(ref_steps) + counted.per_sample(samples))


@dataclass
class TunedSolver:
    """Result of :func:`tune_coefficients`.

    Attributes:
        table: the tuned coefficients (:class:`sfumato.samplers.tuned.StepTable`), on
            ``table.sigmas``; sample with ``sample_tabulated(denoiser, x, table.sigmas,
            table=table)``.
        init_table: UniPC's coefficients on the same grid (the starting point).
        error: RMS error on the held-out calibration draws with ``table``.
        init_error: the same with ``init_table``.
        iters: optimisation steps taken; ``best_iter`` the one kept (0: the start).
        nfe: denoiser calls per calibration draw (targets and training together).
    """

    table: StepTable
    init_table: StepTable
    error: float
    init_error: float
    iters: int
    best_iter: int
    nfe: int

    @property
    def sigmas(self) -> torch.Tensor:
        """The grid, (n + 1,) float64."""
        return torch.tensor(self.table.sigmas, dtype=torch.float64)

    def to_dict(self) -> dict:
        """JSON-able form (both tables as dicts)."""
        return {"table": self.table.to_dict(), "init_table": self.init_table.to_dict(),
                "error": self.error, "init_error": self.init_error, "iters": self.iters,
                "best_iter": self.best_iter, "nfe": self.nfe}


def tune_coefficients(denoiser: Callable,
                      sigmas: torch.Tensor | Sequence[float] | Sequence[torch.Tensor], *,
                      shape: Sequence[int], generator: torch.Generator, order: int = 3,
                      variant: str = "bh1", samples: int = 8192, holdout: float = 0.5,
                      iters: int = 400, lr: float = 5e-3, minibatch: int = 1024,
                      eval_every: int = 25, ref_steps: int = 200,
                      ref_sigma: float | None = None, dtype: torch.dtype = torch.float32,
                      device: torch.device | str = "cpu",
                      cond: dict[str, torch.Tensor] | None = None,
                      cache: dict | None = None) -> TunedSolver:
    """Tune UniPC's coefficients on the grid ``sigmas`` to ``denoiser``: a learned solver with
    the grid held fixed (see :mod:`sfumato.samplers.tuned` for the form and the papers).

    ``sigmas`` may also be a list of candidate grids (1-D tensors with the same first level
    and the same step count, ending in 0): the one on which UniPC has the least held-out
    error is tuned.

    1. ``samples`` calibration starts and their accurate PF-ODE solutions, as in
       :func:`optimize_sigmas` (``ref_sigma`` defaults to the grid's last positive sigma);
       a fraction ``holdout`` of them is kept aside.
    2. Start from :func:`~sfumato.samplers.tuned.unipc_table` (``order``, ``variant``) and
       move every coefficient by Adam (``lr``, ``iters`` steps on random ``minibatch``-draw
       subsets of the rest), the solver differentiated end to end through ``denoiser``.
       Entries of step i move in units of 1 - sigma_{i+1}/sigma_i (the size of its base
       step), the final weights in units of the last positive sigma sigma_m and with their
       sum held at -sigma_m, so the tuned solver stays exact for a constant denoiser.
    3. Keep the coefficients with the least RMS error on the held-out draws, checked every
       ``eval_every`` steps (UniPC's own if nothing beats it), so a fit that follows a few
       heavy-tailed training draws is not kept.

    The denoiser must be differentiable in x (a network or
    :class:`sfumato.mixture.GaussianMixture`); memory grows with ``minibatch`` x steps.
    ``cond``: tensors with ``samples`` rows.
    Tune on the grid you will sample with (e.g. ``optimize_sigmas(...).sigmas``).
    ``cache``: see :func:`optimize_sigmas` (calibration sets solved once per denoiser).
    """
    cands = (list(sigmas) if isinstance(sigmas, (list, tuple)) and sigmas
             and torch.is_tensor(sigmas[0]) and sigmas[0].ndim == 1 else [sigmas])
    tables = [unipc_table(c, order=order, variant=variant) for c in cands]
    first = tables[0].sigmas
    if any(t.sigmas[-1] != 0 or abs(t.sigmas[0] - first[0]) > 1e-9 * first[0]
           or len(t.sigmas) != len(first) for t in tables):
        raise UsageError("every grid must end in 0 (the tuned solver takes the step into 0), "
                         "and candidate grids must share their first level and step count; "
                         f"got {[t.sigmas for t in tables]}")
    if not 0 < holdout < 1 or samples < 2:
        raise UsageError(f"need 0 < holdout < 1 and samples >= 2; got {holdout}, {samples}")
    if iters < 0 or lr <= 0 or minibatch < 1 or eval_every < 1:
        raise UsageError("iters >= 0, lr > 0, minibatch >= 1 and eval_every >= 1 are needed")
    counted = CountingDenoiser(denoiser)  # training and held-out calls
    if ref_sigma is None:
        ref_sigma = min(t.sigmas[-2] for t in tables)
    with torch.no_grad():
        x, target = _calibration_set(
            denoiser, first[0], shape=shape, generator=generator, samples=samples,
            ref_sigma=float(ref_sigma), ref_steps=ref_steps, batch_size=None, dtype=dtype,
            device=device, cond=cond, cache=cache)
    n_val = max(1, round(samples * holdout))
    val, train = torch.arange(samples - n_val, samples), torch.arange(samples - n_val)

    def model_for(idx: torch.Tensor) -> Callable:
        c = {k: v[idx.to(v.device)] for k, v in (cond or {}).items()}
        return lambda xi, sv: counted(
            xi, torch.full((xi.shape[0],), sv, dtype=xi.dtype, device=xi.device), **c)

    def holdout_error(table: StepTable, coef: Callable | None = None) -> float:
        with torch.no_grad():
            out = run_table(model_for(val), x[val], table, coef)
            err = float((out - target[val]).pow(2).mean().sqrt())
        return err if math.isfinite(err) else math.inf

    errors = [holdout_error(t) for t in tables]
    table = tables[min(range(len(tables)), key=errors.__getitem__)]
    s = table.sigmas
    rows = {"P": table.predictor, "C": table.corrector, "F": [table.final]}
    deltas = {(kind, i): torch.zeros(len(row), dtype=torch.float64, requires_grad=True)
              for kind, rs in rows.items() for i, row in enumerate(rs) if row}

    def coef(kind: str, i: int, k: int, v: float):
        if kind != "F":
            return v + (1 - s[i + 1] / s[i]) * deltas[(kind, i)][k]
        # final weights move so that their sum stays -sigma_m (exact for a constant D); the
        # float64 scalars scale the state in its own dtype
        d = deltas[("F", 0)]
        return v + s[-2] * (d[k] if k else -d[1:].sum())

    def snapshot() -> StepTable:
        with torch.no_grad():
            new = {kind: [[float(coef(kind, i, k, v)) for k, v in enumerate(row)]
                          for i, row in enumerate(rs)] for kind, rs in rows.items()}
        return StepTable(list(s), new["P"], new["C"], new["F"][0])

    opt = torch.optim.Adam(list(deltas.values()), lr=lr)
    pick = torch.Generator().manual_seed(int(torch.randint(2**62, (1,), generator=generator)))
    init_error = best_err = min(errors)
    best, best_iter, done = table, 0, 0
    for it in range(1, iters + 1):
        idx = train[torch.randperm(len(train), generator=pick)[:minibatch]]
        opt.zero_grad()
        with torch.enable_grad():
            loss = (run_table(model_for(idx), x[idx], table, coef) - target[idx]).pow(2).mean()
            if not torch.isfinite(loss):
                break  # keep the best so far
            loss.backward()
        opt.step()
        done = it
        if it % eval_every == 0 or it == iters:
            err = holdout_error(table, coef)
            if err < best_err:
                best, best_err, best_iter = snapshot(), err, it
    return TunedSolver(table=best, init_table=table, error=best_err, init_error=init_error,
                       iters=done, best_iter=best_iter,
                       nfe=target_calls(ref_steps) + counted.per_sample(samples))
