"""Distances between 2-D point clouds and fresh ground truth: sliced Wasserstein (from
:mod:`sfumato.accuracy`) and kernel MMD, each with its sampling-noise floor."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from ..accuracy import sliced_wasserstein
from ..errors import UsageError
from ..runtime import torch_threads

__all__ = ["DEFAULT_BANDWIDTHS", "mmd", "evaluate_2d"]

#: RBF bandwidths for data with unit standard deviation: fine structure to global shape.
DEFAULT_BANDWIDTHS: tuple[float, ...] = (0.05, 0.1, 0.2, 0.5, 1.0, 2.0)


def _kernel_mean(a: torch.Tensor, b: torch.Tensor, bandwidths: Sequence[float],
                 block: int = 1024) -> float:
    """mean_{i,j} of k(a_i, b_j), k = average over bandwidths of exp(-|a-b|^2 / (2 h^2)).
    Squared distances from direct differences (no cancellation), kernels in float32, sums in
    float64."""
    total = 0.0
    with torch_threads(1):  # block-wise elementwise work: threads only add overhead here
        for i in range(0, a.shape[0], block):
            for j in range(0, b.shape[0], block):
                d2 = (a[i:i + block, None, :] - b[None, j:j + block, :]).pow(2).sum(-1).float()
                for h in bandwidths:
                    total += float(torch.exp(d2 * (-0.5 / (h * h))).sum(dtype=torch.float64))
    return total / (a.shape[0] * b.shape[0] * len(bandwidths))


def _median_bandwidth(x: torch.Tensor, max_points: int = 2000) -> float:
    x = x[:max_points]
    d = torch.pdist(x)
    return float(d.median()) if d.numel() else 1.0


def _bandwidths(b: torch.Tensor, bandwidths) -> Sequence[float]:
    if isinstance(bandwidths, str):
        if bandwidths != "median":
            raise UsageError(f"bandwidths must be a sequence or 'median'; got {bandwidths!r}")
        return (_median_bandwidth(b),)
    return tuple(float(h) for h in bandwidths)


def _flat(x: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(x).detach().cpu().reshape(x.shape[0], -1).double()


def mmd(a: torch.Tensor, b: torch.Tensor,
        bandwidths: Sequence[float] | str = DEFAULT_BANDWIDTHS) -> float:
    """Maximum mean discrepancy between point clouds (N, ...) and (M, ...): the square root of
    the biased (V-statistic, always >= 0) MMD^2 with a sum of RBF kernels. Costs O(N M).

    ``bandwidths``: a fixed set (default, for unit-scale data), or ``"median"`` for one RBF
    whose bandwidth is the median pairwise distance of ``b`` (the reference), so repeated
    comparisons against the same reference share a kernel.
    """
    a, b = _flat(a), _flat(b)
    if a.shape[1] != b.shape[1]:
        raise UsageError(f"point clouds differ in dimension: {a.shape} and {b.shape}")
    h = _bandwidths(b, bandwidths)
    m2 = _kernel_mean(a, a, h) + _kernel_mean(b, b, h) - 2 * _kernel_mean(a, b, h)
    return math.sqrt(max(m2, 0.0))


def _sampler(toy) -> Callable[[int, torch.Generator], torch.Tensor]:
    if isinstance(toy, str):
        from ..data.toys import TOYS, sample_toy

        if toy not in TOYS:
            from ..data._config import unknown

            raise unknown("toy", toy, TOYS)
        return lambda n, g: sample_toy(toy, n, g)
    if hasattr(toy, "sample"):
        return toy.sample
    if callable(toy):
        return toy
    raise TypeError("toy must be a toy name, a ToyData or a callable (n, generator) -> (n, 2)")


@torch.no_grad()
def evaluate_2d(samples: torch.Tensor, toy, *, seed: int = 0, n_proj: int = 256,
                bandwidths: Sequence[float] | str = DEFAULT_BANDWIDTHS,
                max_mmd: int = 2000, floor_repeats: int = 3) -> dict:
    """Compare 2-D samples (N, 2) with fresh ground truth of the same size.

    ``toy``: a toy name (``"moons"``, ...), a ``ToyData``, or a callable
    ``(n, generator) -> (n, 2)``. Returns ``{"sw", "sw_floor", "mmd", "mmd_floor", "n",
    "n_mmd"}``: the sliced Wasserstein distance (:func:`sfumato.accuracy.sliced_wasserstein`)
    and the MMD between the samples and a ground-truth sample of the same size, and as floor
    the same metric between further independent ground-truth samples and that reference
    (mean over ``floor_repeats`` draws): what a perfect sampler scores. MMD, quadratic in
    the size, uses the first ``n_mmd = min(N, max_mmd)`` points of every set. Seeded by
    ``seed``.
    """
    samples = _flat(samples)
    if samples.shape[0] < 2:
        raise UsageError(f"need at least 2 samples; got {tuple(samples.shape)}")
    if not torch.isfinite(samples).all():
        raise UsageError("samples contain NaN or inf")
    n = samples.shape[0]
    draw = _sampler(toy)
    g = torch.Generator().manual_seed(seed)
    ref = _flat(draw(n, g))
    if ref.shape != samples.shape:
        raise UsageError(f"samples {tuple(samples.shape)} differ from ground truth "
                         f"{tuple(ref.shape)}")
    others = [_flat(draw(n, g)) for _ in range(max(1, floor_repeats))]

    def sw(x):
        return sliced_wasserstein(x, ref, n_proj, generator=torch.Generator().manual_seed(seed))

    m = min(n, max_mmd)
    h = _bandwidths(ref[:m], bandwidths)
    k_ref = _kernel_mean(ref[:m], ref[:m], h)

    def mmd_ref(x):
        x = x[:m]
        return math.sqrt(max(_kernel_mean(x, x, h) + k_ref - 2 * _kernel_mean(x, ref[:m], h),
                             0.0))

    return {"sw": sw(samples), "sw_floor": sum(map(sw, others)) / len(others),
            "mmd": mmd_ref(samples), "mmd_floor": sum(map(mmd_ref, others)) / len(others),
            "n": n, "n_mmd": m}
