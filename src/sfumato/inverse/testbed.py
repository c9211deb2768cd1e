"""The exact-posterior testbed: a Gaussian-mixture prior, a linear measurement, and the
closed-form posterior (:meth:`sfumato.mixture.GaussianMixture.posterior`) to score every
restoration method against.

    case = posterior_case(mixture, SuperRes(2, (1, 4, 4)), sigma_y=0.05)
    score(case, "pigdm", steps=50)   # {"sw_ratio", "mean_err", "residual", ...}

Scores, averaged over the case's measurements: sliced Wasserstein distance between the
method's samples and exact posterior samples, divided by the distance between two
independent exact sets of the same size (``sw_ratio``; 1 is as good as it gets); RMS error
of the method's sample mean against the exact posterior mean (``mean_err``, next to the
same error of an exact sample mean, ``mean_floor``); and the measurement residual's RMS.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..accuracy import sliced_wasserstein
from ..mixture import GaussianMixture, MixturePosterior, random_mixture
from ..sigmas import get_sigmas
from .operators import Operator

__all__ = ["PosteriorCase", "posterior_case", "score", "image_mixture"]


def image_mixture(shape: tuple[int, int, int] = (1, 4, 4), k: int = 8, seed: int = 0
                    ) -> GaussianMixture:
    """A random image-shaped mixture with data-like scale (means ~ N(0, 0.6²), component
    stds 0.05..0.3)."""
    d = shape[0] * shape[1] * shape[2]
    return random_mixture(d, k, scale=0.6, min_std=0.05, max_std=0.3, event_shape=shape,
                          generator=torch.Generator().manual_seed(seed))


@dataclass
class PosteriorCase:
    """Measurements y (M, *out_shape) of M prior draws, their exact posteriors, and two
    independent sets of n exact samples each (M, n, *shape)."""

    prior: GaussianMixture
    operator: Operator
    sigma_y: float
    y: torch.Tensor
    posteriors: list[MixturePosterior]
    exact: torch.Tensor
    exact2: torch.Tensor

    @property
    def n(self) -> int:
        return self.exact.shape[1]

    def sw(self, samples: torch.Tensor) -> float:
        """Mean over measurements of SW(samples[j], exact[j]); samples (M, n, *shape)."""
        return sum(sliced_wasserstein(s, e) for s, e in zip(samples, self.exact, strict=True)) \
            / len(self.posteriors)

    def mean_err(self, samples: torch.Tensor) -> float:
        """Mean over measurements of the RMS error of the sample mean."""
        return sum(float((s.mean(0) - p.mean()).pow(2).mean().sqrt())
                   for s, p in zip(samples, self.posteriors, strict=True)) / len(self.posteriors)


def posterior_case(prior: GaussianMixture, operator: Operator, sigma_y: float = 0.0, *,
                   measurements: int = 8, n: int = 256, seed: int = 1) -> PosteriorCase:
    """M = ``measurements`` prior draws, measured with noise ``sigma_y``, and their exact
    posteriors (all from ``seed``)."""
    g = torch.Generator().manual_seed(seed)
    y = operator.measure(prior.sample(measurements, generator=g), sigma_y, generator=g)
    A = operator.matrix()
    posts = [prior.posterior(A, operator.measured(y[j:j + 1])[0], sigma_y)
             for j in range(measurements)]
    exact = torch.stack([p.sample(n, generator=g) for p in posts])
    exact2 = torch.stack([p.sample(n, generator=g) for p in posts])
    return PosteriorCase(prior, operator, sigma_y, y, posts, exact, exact2)


def score(case: PosteriorCase, method: str, steps: int, *, sampler: str | None = None,
          options: dict | None = None, seed: int = 0) -> dict:
    """Run ``method`` with n samples per measurement on a ``steps``-step Karras grid
    (EDM's range) in float64 and score it against the exact posterior."""
    from . import restore

    M, n = case.y.shape[0], case.n
    sigmas = get_sigmas("karras", steps, sigma_min=0.002, sigma_max=80.0)
    gens = [torch.Generator().manual_seed(seed * 1_000_003 + i) for i in range(M * n)]
    out = restore(case.prior, case.y.repeat_interleave(n, 0), case.operator, method=method,
                  sigmas=sigmas, sigma_y=case.sigma_y, generator=gens, sampler=sampler,
                  options=options, dtype=torch.float64)
    x = out.x.reshape(M, n, *out.x.shape[1:])
    floor = case.sw(case.exact2)
    return {"method": method, "steps": steps, "sw": case.sw(x), "sw_floor": floor,
            "sw_ratio": case.sw(x) / floor, "mean_err": case.mean_err(x),
            "mean_floor": case.mean_err(case.exact2),
            "residual": float(out.residual.pow(2).mean().sqrt())}
