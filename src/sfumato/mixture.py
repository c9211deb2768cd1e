"""A Gaussian mixture with closed-form noisy density, score and denoiser.

For data ``x0 ~ sum_k w_k N(mu_k, C_k)`` the noisy marginal at level sigma is
``p_sigma = sum_k w_k N(mu_k, C_k + sigma^2 I)`` and the exact denoiser (posterior mean,
Tweedie) is

    D(x, sigma) = x + sigma^2 grad log p_sigma(x)
                = sum_k r_k(x) [mu_k + C_k (C_k + sigma^2 I)^-1 (x - mu_k)],

with responsibilities ``r_k(x)`` under ``p_sigma``. Covariances are diagonalised once
(``C_k = U_k diag(lam_k) U_k^T``) so every level costs one projection per component.

Use it to check a sampler: ``sample_*(GaussianMixture(...), ...)`` runs an exact model, so
the only error left is the solver's.
"""

from __future__ import annotations

import math

import torch

from .errors import UsageError

__all__ = ["GaussianMixture", "MixturePosterior", "random_mixture"]


class GaussianMixture:
    """Mixture of K Gaussians in dimension D = prod(event_shape).

    Args:
        means: (K, D).
        covs: (K, D, D) full covariances, or (K, D) diagonal variances, or (K,) isotropic
            variances. Must be positive definite (a sample's log-density at sigma = 0 needs it).
        weights: (K,) nonnegative, normalised internally; uniform if omitted.
        event_shape: shape of one sample (default (D,)); e.g. (1, 4, 4) to look like images.
        classes: (K,) integer class of each component (optional). Then the mixture is also an
            exact class-conditional model: ``p(x | y)`` is the sub-mixture of class y, and
            :meth:`class_log_posterior` is the exact noisy classifier ``log p(y | x, sigma)``.

    Callable as a denoiser: ``gm(x, sigma, class_labels=None) -> x0_hat`` with x of shape
    (B, *event_shape); ``class_labels`` (B,) selects ``E[x0 | x, y]``, and the label
    ``num_classes`` (the null class of classifier-free guidance) or None the unconditional one.
    """

    def __init__(self, means: torch.Tensor, covs: torch.Tensor, weights: torch.Tensor | None = None,
                 event_shape: tuple[int, ...] | None = None,
                 classes: torch.Tensor | None = None) -> None:
        means = torch.as_tensor(means, dtype=torch.float64)
        if means.ndim != 2:
            raise UsageError(f"means must have shape (K, D); got {tuple(means.shape)}")
        K, D = means.shape
        covs = torch.as_tensor(covs, dtype=torch.float64)
        if covs.shape == (K,):
            lam, U = covs[:, None].expand(K, D).clone(), None
        elif covs.shape == (K, D):
            lam, U = covs.clone(), None
        elif covs.shape == (K, D, D):
            lam, U = torch.linalg.eigh(0.5 * (covs + covs.transpose(1, 2)))
        else:
            raise UsageError(
                f"covs must have shape (K,), (K, D) or (K, D, D) with K={K}, D={D}; "
                f"got {tuple(covs.shape)}"
            )
        if (lam <= 0).any():
            raise UsageError("covariances must be positive definite")
        w = torch.full((K,), 1.0 / K, dtype=torch.float64) if weights is None else \
            torch.as_tensor(weights, dtype=torch.float64)
        if w.shape != (K,) or (w < 0).any() or w.sum() <= 0:
            raise UsageError(f"weights must be (K,) = ({K},) nonnegative with a positive sum")
        self.means, self.lam, self.U = means, lam, U
        self.log_w = (w / w.sum()).log()
        self.event_shape = tuple(event_shape) if event_shape is not None else (D,)
        if math.prod(self.event_shape) != D:
            raise UsageError(f"event_shape {self.event_shape} does not hold D={D} values")
        self.K, self.D = K, D
        self.classes = None if classes is None else torch.as_tensor(classes, dtype=torch.long)
        if self.classes is not None and (self.classes.shape != (K,) or (self.classes < 0).any()):
            raise UsageError(f"classes must be (K,) = ({K},) nonnegative integers")
        self.num_classes = None if self.classes is None else int(self.classes.max()) + 1

    # -- helpers ---------------------------------------------------------------------------
    def _to(self, x: torch.Tensor):
        f = lambda t: None if t is None else t.to(device=x.device, dtype=x.dtype)  # noqa: E731
        return f(self.means), f(self.lam), f(self.U), f(self.log_w)

    def _flat(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[1:]) != self.event_shape:
            raise UsageError(
                f"expected x of shape (batch, {', '.join(map(str, self.event_shape))}); "
                f"got {tuple(x.shape)}"
            )
        return x.reshape(x.shape[0], self.D)

    def _parts(self, x: torch.Tensor, sigma: torch.Tensor | float):
        """Per-component log N(x; mu_k, C_k + s^2 I) (B, K) and whitened residual pieces."""
        xf = self._flat(x)
        mu, lam, U, log_w = self._to(xf)
        s2 = torch.as_tensor(sigma, dtype=xf.dtype, device=xf.device) ** 2
        s2 = s2.reshape(-1, 1, 1) if s2.ndim else s2  # (B,1,1) or scalar
        diff = xf[:, None, :] - mu[None]  # (B, K, D)
        proj = diff if U is None else torch.einsum("bkd,kde->bke", diff, U)  # eigen-coords
        var = lam[None] + s2  # (B or 1, K, D)
        logn = -0.5 * ((proj**2 / var).sum(-1) + var.log().sum(-1) + self.D * math.log(2 * math.pi))
        return xf, proj, var, lam, U, log_w, logn

    # -- public ----------------------------------------------------------------------------
    def log_prob(self, x: torch.Tensor, sigma: torch.Tensor | float = 0.0) -> torch.Tensor:
        """log p_sigma(x) in nats, shape (B,)."""
        *_, log_w, logn = self._parts(x, sigma)
        return torch.logsumexp(log_w + logn, dim=1)

    def responsibilities(self, x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        """Posterior component probabilities under p_sigma, shape (B, K)."""
        *_, log_w, logn = self._parts(x, sigma)
        return torch.softmax(log_w + logn, dim=1)

    def _class_mask(self, class_labels: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
        """(B, K) additive log-mask keeping the components of each sample's class (0 / -inf);
        zeros for the null label ``num_classes`` or None."""
        if class_labels is None:
            return torch.zeros_like(like)
        if self.classes is None:
            raise UsageError("this mixture has no classes; build it with classes=... to "
                             "condition on class_labels")
        y = torch.as_tensor(class_labels, device=like.device).long().reshape(-1, 1)
        keep = (self.classes.to(like.device)[None] == y) | (y == self.num_classes)
        return torch.zeros_like(like).masked_fill(~keep, float("-inf"))

    def class_log_posterior(self, x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        """Exact noisy classifier log p(y | x, sigma), shape (B, num_classes)."""
        if self.classes is None:
            raise UsageError("this mixture has no classes; build it with classes=...")
        *_, log_w, logn = self._parts(x, sigma)
        joint = log_w + logn  # (B, K)
        onehot = torch.nn.functional.one_hot(self.classes, self.num_classes).to(joint.device)
        per_class = torch.logsumexp(joint[:, :, None] + torch.where(
            onehot.bool(), 0.0, float("-inf")).to(joint)[None], dim=1)  # (B, C)
        return per_class - torch.logsumexp(joint, dim=1, keepdim=True)

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor | float,
                class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """Exact posterior mean E[x0 | x] (or E[x0 | x, y] given ``class_labels`` (B,)) at
        noise level sigma, same shape as x."""
        xf, proj, var, lam, U, log_w, logn = self._parts(x, sigma)
        joint = log_w + logn
        r = torch.softmax(joint + self._class_mask(class_labels, joint), dim=1)  # (B, K)
        shrunk = proj * (lam[None] / var)  # C (C + s^2)^-1 (x - mu) in eigen-coords
        back = shrunk if U is None else torch.einsum("bke,kde->bkd", shrunk, U)
        mu = self.means.to(xf)
        x0 = (r[..., None] * (mu[None] + back)).sum(1)
        return x0.reshape(x.shape)

    __call__ = denoise

    def score(self, x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        """grad_x log p_sigma(x) = (D(x, sigma) - x) / sigma^2, same shape as x."""
        s = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
        s = s.reshape((-1,) + (1,) * (x.ndim - 1)) if s.ndim else s
        return (self.denoise(x, sigma) - x) / s**2

    def sample(self, n: int, *, generator: torch.Generator | None = None,
               sigma: float = 0.0, dtype: torch.dtype = torch.float64,
               device: torch.device | str = "cpu",
               class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """n samples of p_sigma (of p_sigma(. | y) given ``class_labels`` (n,)), shape
        (n, *event_shape)."""
        if class_labels is None:
            k = torch.multinomial(self.log_w.exp(), n, replacement=True, generator=generator)
        else:
            logits = self.log_w[None].expand(n, -1)
            probs = (logits + self._class_mask(class_labels, logits)).softmax(1)
            k = torch.multinomial(probs, 1, generator=generator)[:, 0]
        z = torch.randn(n, self.D, generator=generator, dtype=torch.float64)
        z = z * (self.lam[k] + sigma**2).sqrt()
        if self.U is not None:
            z = torch.einsum("bde,be->bd", self.U[k], z)
        x = self.means[k] + z
        return x.reshape(n, *self.event_shape).to(device=device, dtype=dtype)

    def mean(self) -> torch.Tensor:
        """Mixture mean, shape (D,)."""
        return (self.log_w.exp()[:, None] * self.means).sum(0)

    def component_covariances(self) -> torch.Tensor:
        """The components' covariances C_k, shape (K, D, D)."""
        if self.U is None:
            return torch.diag_embed(self.lam)
        return self.U @ torch.diag_embed(self.lam) @ self.U.transpose(1, 2)

    def posterior(self, A: torch.Tensor, y: torch.Tensor, sigma_y: float = 0.0
                  ) -> MixturePosterior:
        """The exact posterior p(x | y) for the linear-Gaussian measurement
        y = A x + sigma_y n, n ~ N(0, I): again a Gaussian mixture (Bishop 2006, eqs.
        (2.113)-(2.117) per component), with, for S_k = A C_k A^T + sigma_y^2 I,

            w_k' ∝ w_k N(y; A mu_k, S_k)
            mu_k' = mu_k + C_k A^T S_k^-1 (y - A mu_k)
            C_k'  = C_k - C_k A^T S_k^-1 A C_k   (singular along A's rows when sigma_y = 0).

        A (m, D) with full row rank when sigma_y = 0 (e.g. :meth:`Operator.matrix
        <sfumato.inverse.operators.Operator.matrix>`); y (m,) one measurement."""
        A = torch.as_tensor(A, dtype=torch.float64)
        y = torch.as_tensor(y, dtype=torch.float64).reshape(-1)
        if A.ndim != 2 or A.shape[1] != self.D or y.shape[0] != A.shape[0]:
            raise UsageError(f"posterior needs A (m, D={self.D}) and y (m,); got A "
                             f"{tuple(A.shape)} and y {tuple(y.shape)}")
        C = self.component_covariances()
        CAt = C @ A.T  # (K, D, m)
        S = A @ CAt + sigma_y**2 * torch.eye(A.shape[0], dtype=torch.float64)  # (K, m, m)
        L = torch.linalg.cholesky(S)
        resid = y[None] - self.means @ A.T  # (K, m)
        sol = torch.cholesky_solve(resid[..., None], L)[..., 0]  # S^-1 (y - A mu)
        logdet = 2 * L.diagonal(dim1=1, dim2=2).log().sum(-1)
        logn = -0.5 * ((resid * sol).sum(-1) + logdet + A.shape[0] * math.log(2 * math.pi))
        means = self.means + (CAt @ sol[..., None])[..., 0]
        covs = C - CAt @ torch.cholesky_solve(CAt.transpose(1, 2), L)
        return MixturePosterior(means, 0.5 * (covs + covs.transpose(1, 2)),
                                torch.log_softmax(self.log_w + logn, 0), self.event_shape)

    def covariance(self) -> torch.Tensor:
        """Mixture covariance, shape (D, D)."""
        w = self.log_w.exp()
        C = self.component_covariances()
        m = self.mean()
        d = self.means - m
        return (w[:, None, None] * (C + d[:, :, None] * d[:, None, :])).sum(0)


def random_mixture(dim: int = 2, k: int = 4, *, scale: float = 2.0, min_std: float = 0.1,
                   max_std: float = 0.6, full_cov: bool = True,
                   generator: torch.Generator | None = None,
                   event_shape: tuple[int, ...] | None = None,
                   num_classes: int | None = None) -> GaussianMixture:
    """A random mixture for tests: means ~ N(0, scale^2), random full covariances with
    standard deviations along random axes in [min_std, max_std], random weights; with
    ``num_classes`` the components are assigned to classes round-robin (k % num_classes)."""
    g = generator
    means = torch.randn(k, dim, generator=g, dtype=torch.float64) * scale
    stds = min_std + (max_std - min_std) * torch.rand(k, dim, generator=g, dtype=torch.float64)
    if full_cov:
        Q, _ = torch.linalg.qr(torch.randn(k, dim, dim, generator=g, dtype=torch.float64))
        covs = Q @ torch.diag_embed(stds**2) @ Q.transpose(1, 2)
    else:
        covs = stds**2
    w = 0.5 + torch.rand(k, generator=g, dtype=torch.float64)
    classes = None if num_classes is None else torch.arange(k) % num_classes
    return GaussianMixture(means, covs, w, event_shape=event_shape, classes=classes)


class MixturePosterior:
    """A Gaussian mixture with possibly singular covariances (an exact posterior,
    :meth:`GaussianMixture.posterior`): ``means`` (K, D), ``covs`` (K, D, D), ``log_w``
    (K,) normalised."""

    def __init__(self, means: torch.Tensor, covs: torch.Tensor, log_w: torch.Tensor,
                 event_shape: tuple[int, ...]) -> None:
        self.means, self.covs, self.log_w, self.event_shape = means, covs, log_w, event_shape
        lam, U = torch.linalg.eigh(covs)
        self._factor = U * lam.clamp_min(0).sqrt()[:, None, :]  # (K, D, D): cov = F F^T

    def mean(self) -> torch.Tensor:
        """E[x | y], shape event_shape."""
        return (self.log_w.exp()[:, None] * self.means).sum(0).reshape(self.event_shape)

    def sample(self, n: int, *, generator: torch.Generator | None = None,
               dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """n exact posterior samples, shape (n, *event_shape)."""
        k = torch.multinomial(self.log_w.exp(), n, replacement=True, generator=generator)
        z = torch.randn(n, self.means.shape[1], generator=generator, dtype=torch.float64)
        x = self.means[k] + torch.einsum("bde,be->bd", self._factor[k], z)
        return x.reshape(n, *self.event_shape).to(dtype)
