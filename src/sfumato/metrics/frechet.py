"""Fréchet distance between Gaussian fits of two feature sets (FID with Inception features).

    FD = |mu_a - mu_b|^2 + tr(C_a) + tr(C_b) - 2 tr((C_a C_b)^{1/2})

The trace of the matrix square root is computed without ``sqrtm`` of a non-symmetric matrix:
``(C_a C_b)^{1/2}`` is similar to ``(S C_b S)^{1/2}`` with ``S = C_a^{1/2}`` (symmetric), so
``tr = sum_i sqrt(lambda_i(S C_b S))`` from two symmetric eigen-decompositions in float64 —
real, stable, and exact for singular (rank-deficient) covariances.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import UsageError

__all__ = ["gaussian_stats", "frechet_from_stats", "frechet_distance"]


def _as_f64(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def gaussian_stats(feats) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D) of features (N, D), in float64."""
    f = _as_f64(feats)
    if f.ndim != 2 or f.shape[0] < 2:
        raise UsageError(f"features must have shape (N >= 2, D); got {f.shape}")
    if not np.isfinite(f).all():
        raise UsageError("features contain NaN or inf")
    return f.mean(0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])


def _psd_sqrt(c: np.ndarray) -> np.ndarray:
    w, u = np.linalg.eigh(0.5 * (c + c.T))
    return (u * np.sqrt(np.clip(w, 0, None))) @ u.T


def frechet_from_stats(mu_a, cov_a, mu_b, cov_b) -> float:
    """Fréchet distance between N(mu_a, cov_a) and N(mu_b, cov_b) (squared 2-Wasserstein)."""
    mu_a, mu_b, cov_a, cov_b = map(_as_f64, (mu_a, mu_b, cov_a, cov_b))
    if mu_a.shape != mu_b.shape or cov_a.shape != cov_b.shape or \
            cov_a.shape != mu_a.shape * 2:
        raise UsageError(f"mismatched statistics: means {mu_a.shape}, {mu_b.shape}; "
                         f"covariances {cov_a.shape}, {cov_b.shape}")
    s = _psd_sqrt(cov_a)
    m = s @ cov_b @ s
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh(0.5 * (m + m.T)), 0, None)).sum()
    d = mu_a - mu_b
    fd = d @ d + np.trace(cov_a) + np.trace(cov_b) - 2 * tr_sqrt
    return float(max(fd, 0.0))


def frechet_distance(feats_a, feats_b) -> float:
    """Fréchet distance between Gaussian fits of two feature sets (N_a, D) and (N_b, D)
    (arrays or tensors). With Inception pool3 features this is FID."""
    fa, fb = _as_f64(feats_a), _as_f64(feats_b)
    if fa.ndim != 2 or fb.ndim != 2 or fa.shape[1] != fb.shape[1]:
        raise UsageError(f"feature sets must be (N, D) with equal D; got {fa.shape}, {fb.shape}")
    return frechet_from_stats(*gaussian_stats(fa), *gaussian_stats(fb))
