"""The benchmark problem: one exact model, one process, one draw of noise, one reference.

- **Process**: a discrete VP process (:class:`~sfumato.process.VPDiscrete`, 1000 steps,
  ``scaled_linear`` or ``linear`` betas), the setting diffusers' schedulers are built for.
- **Model**: a :class:`~sfumato.mixture.GaussianMixture` (:data:`MIXTURES`), whose denoiser
  ``D(x, sigma)`` is exact, so the only error left is the solver's.
- **Noise levels**: grids (:meth:`Problem.grid`, names of :data:`sfumato.sigmas.GRIDS`) stay
  inside the process's trained range ``[sigma(t=0), sigma(t=T-1)]`` and then take the final
  step to 0, as diffusers does.
- **Same noise, same initial value problem**: one draw ``z``; the σ-space start is
  ``x_start = sigma_max z`` at ``sigma_max = sigma(T-1)``; in VP coordinates that is the
  latent ``L = x_start / sqrt(1 + sigma_max^2)`` (= 0.998 z for scaled_linear, where a diffusers
  pipeline would use z itself; we use L so that both libraries solve exactly the same initial
  value problem). A method whose first noise level ``sigma_0`` is below ``sigma_max``
  ("leading" spacing) starts, as in a diffusers pipeline, from the same VP latent read at its
  own first level (:func:`start_state`); its error then includes what skipping the top of the
  schedule costs.
- **Reference**: :func:`sfumato.accuracy.reference_ode` (RK4 in log sigma, float64) from
  ``(sigma_max, x_start)`` down to ``sigma = REF_SIGMA = 1e-4``, then ``D(x, 1e-4)``: the
  PF-ODE solution at sigma = 0. Its own accuracy is estimated by halving its step count.
- **Final-step floor**: every fixed-grid method ends with a step from its last positive sigma
  (at best sigma(t=0), ~0.03 for Stable Diffusion's betas) into 0. The error of an *exact* solve
  down to sigma(t=0) followed by the first-order step ``D(x, sigma(t=0))`` is reported as
  ``final_step_floor``; methods whose last step is higher order can go below.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import sigmas
from ..accuracy import reference_ode, rms
from ..errors import UsageError
from ..mixture import GaussianMixture, random_mixture
from ..process import VPDiscrete
from .specs import parse_grid

__all__ = ["MIXTURES", "REF_SIGMA", "Problem", "make_mixture", "make_problem", "start_state",
           "add_problem_arguments"]

REF_SIGMA = 1e-4  # the reference ODE stops here, then takes D(x, REF_SIGMA)


def _mix_2d(g: torch.Generator) -> GaussianMixture:
    return random_mixture(dim=2, k=8, scale=1.0, min_std=0.05, max_std=0.3, generator=g)


def _mix_img(shape: tuple[int, ...]) -> Callable[[torch.Generator], GaussianMixture]:
    def build(g: torch.Generator) -> GaussianMixture:
        d = math.prod(shape)
        return random_mixture(dim=d, k=8, scale=0.5, min_std=0.05, max_std=0.3,
                              generator=g, event_shape=shape)

    return build


#: mixture name -> (description, builder(generator))
MIXTURES: dict[str, tuple[str, Callable[[torch.Generator], GaussianMixture]]] = {
    "gmm2d": ("2-D, 8 components, std 0.05-0.3, means ~ N(0, 1)", _mix_2d),
    "img1": ("image-shaped (1, 4, 4), 8 components, std 0.05-0.3, means ~ N(0, 0.25)",
             _mix_img((1, 4, 4))),
    "img3": ("image-shaped (3, 4, 4), 8 components, std 0.05-0.3, means ~ N(0, 0.25)",
             _mix_img((3, 4, 4))),
}


def make_mixture(name: str, seed: int = 0) -> GaussianMixture:
    """A benchmark mixture by name (see :data:`MIXTURES`), deterministic in ``seed``."""
    if name not in MIXTURES:
        raise UsageError(f"unknown mixture {name!r}; choose one of {sorted(MIXTURES)}")
    return MIXTURES[name][1](torch.Generator().manual_seed(1000 + seed))


@dataclass
class Problem:
    """One benchmark problem: the process, the exact model, the shared noise and the reference.

    Attributes:
        process: the discrete VP process (float64 tables).
        model: the exact σ-space denoiser (a Gaussian mixture).
        x_start: σ-space start ``sigma_max * z``, float64, shape (B, *event_shape).
        latent: the same start in VP coordinates, ``x_start / sqrt(1 + sigma_max^2)``.
        reference: the PF-ODE solution at sigma = 0 from ``(sigma_max, x_start)``, (B, ...).
        ref_accuracy: RMS between the reference and one computed with half the steps.
        info: a JSON-able description, including ``final_step_floor``: the error of the exact
            ODE solution at sigma_min = sigma(t=0) followed by the final step ``D(x, sigma_min)``
            -- the least error any grid that ends at sigma_min can reach.
        fits: what was fitted to this model, by (calibration, sampler, steps, draws)
            (:mod:`sfumato.bench.calibrated`).
        calibration_sets: calibration draws and their solutions, shared by every fit (same
            seed and size -> same draws, whatever the sampler or step count).
    """

    process: VPDiscrete
    model: GaussianMixture
    x_start: torch.Tensor
    latent: torch.Tensor
    reference: torch.Tensor
    ref_accuracy: float
    info: dict[str, Any] = field(default_factory=dict)
    fits: dict[tuple, Any] = field(default_factory=dict, repr=False)
    calibration_sets: dict = field(default_factory=dict, repr=False)
    _grids: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def sigma_max(self) -> float:
        return self.process.sigma_max

    @property
    def sigma_min(self) -> float:
        return self.process.sigma_min

    @functools.cached_property
    def data_std(self) -> torch.Tensor:
        """Standard deviations of the data along its principal axes (square roots of the
        eigenvalues of the mixture's covariance), (d,) ascending: the data statistic of the
        grids in :data:`sfumato.sigmas.DATA_GRIDS` (with real data: a PCA of the training
        set)."""
        return torch.linalg.eigvalsh(self.model.covariance()).clamp(min=0).sqrt()

    def grid(self, spec: str, n: int) -> torch.Tensor:
        """Grid ``spec`` (a :data:`sfumato.sigmas.GRIDS` name, optionally with keywords, e.g.
        ``'polyexponential(rho=2)'``) with ``n`` steps over the process's range, then 0:
        (n + 1,) float64. Data-aware grids get :attr:`data_std`. Cached (``gaussian_cov`` on a
        48-dimensional spectrum takes most of a second to build); returns a copy."""
        if (spec, n) not in self._grids:
            name, kwargs = parse_grid(spec)
            if name in sigmas.DATA_GRIDS:
                kwargs.setdefault("sigma_data", self.data_std)
            self._grids[spec, n] = sigmas.get_sigmas(name, n, process=self.process, **kwargs)
        return self._grids[spec, n].clone()


def add_problem_arguments(parser, *, mixture: str, batch_type: Callable[[str], int] = int,
                          batch: int = 128) -> None:
    """``--mixture``, ``--schedule``, ``--batch``: the arguments of :func:`make_problem`, as
    ``sfumato compare`` and ``benchmarks/samplers.py`` take them (argparse ``parser``), with
    default mixture ``mixture`` and sample count ``batch``."""
    parser.add_argument("--mixture", default=mixture, choices=sorted(MIXTURES),
                        help="the exact model (default: %(default)s)")
    parser.add_argument("--schedule", default="scaled_linear",
                        choices=["scaled_linear", "linear"],
                        help="VP beta schedule, 1000 steps (default: %(default)s)")
    parser.add_argument("--batch", type=batch_type, default=batch,
                        help="number of samples (default: %(default)s)")


def make_problem(mixture: str = "img3", schedule: str = "scaled_linear", batch: int = 128,
                 seed: int = 0, ref_steps: int = 400) -> Problem:
    """Build the benchmark problem (deterministic in ``seed``) with ``batch`` samples.

    ``ref_steps`` RK4 steps in log sigma from sigma_max to 1e-4 (4 model calls each) give the
    reference; ``ref_steps // 2`` more give its accuracy estimate (RK4 is 4th order, so the
    reference is ~15x more accurate than that estimate).
    """
    if batch < 1:
        raise UsageError(f"batch must be a positive integer; got {batch}")
    process = VPDiscrete(schedule=schedule, n=1000)
    model = make_mixture(mixture, seed)
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(batch, *model.event_shape, generator=g, dtype=torch.float64)
    smax = process.sigma_max
    x_start = smax * z
    latent = x_start / math.sqrt(1 + smax**2)

    def solve(steps: int) -> tuple[torch.Tensor, float]:
        # two legs, sigma_max -> sigma_min -> REF_SIGMA, steps split by log-sigma length, so
        # the state at sigma_min gives the final-step floor for free
        smin = process.sigma_min
        l1, l2 = math.log(smax / smin), math.log(smin / REF_SIGMA)
        n1 = max(1, round(steps * l1 / (l1 + l2)))
        x_min = reference_ode(model, x_start, smax, smin, steps=n1)
        x = reference_ode(model, x_min, smin, REF_SIGMA, steps=max(1, steps - n1))
        ref = model(x, torch.full((batch,), REF_SIGMA, dtype=torch.float64))
        return ref, rms(model(x_min, torch.full((batch,), smin, dtype=torch.float64)), ref)

    reference, floor = solve(ref_steps)
    ref_acc = rms(reference, solve(max(ref_steps // 2, 2))[0])
    info = {"mixture": mixture, "mixture_desc": MIXTURES[mixture][0], "schedule": schedule,
            "batch": batch, "seed": seed, "event_shape": list(model.event_shape),
            "sigma_min": process.sigma_min, "sigma_max": smax, "ref_steps": ref_steps,
            "ref_accuracy": ref_acc, "final_step_floor": floor}
    return Problem(process, model, x_start, latent, reference, ref_acc, info)


def start_state(problem: Problem, sigma0: float) -> torch.Tensor:
    """σ-space start (B, ...) for a method whose first noise level is ``sigma0``.

    ``x_start`` when ``sigma0`` is sigma_max (up to float32 rounding); otherwise the shared VP
    latent read at ``sigma0``: ``latent * sqrt(1 + sigma0^2)`` (what a diffusers pipeline does
    with "leading" spacing).
    """
    if abs(sigma0 - problem.sigma_max) <= 1e-5 * problem.sigma_max:
        return problem.x_start
    return problem.latent * math.sqrt(1 + sigma0**2)
