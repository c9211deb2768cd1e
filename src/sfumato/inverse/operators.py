"""Linear measurement operators ``y = A(x) + sigma_y n`` for images x of shape (B, C, H, W).

===============  ==========================================  ===========================
operator         A(x)                                        y's shape (one sample)
===============  ==========================================  ===========================
``Inpaint``      x * M  (M = 1 where the pixel is known)     (C, H, W), zeros where M = 0
``box``          ``Inpaint`` with a rectangle unknown        (C, H, W)
``pixels``       ``Inpaint`` with a random fraction known    (C, H, W)
``SuperRes``     f x f average pooling                       (C, H / f, W / f)
``Blur``         separable Gaussian blur, std w pixels,      (C, H, W)
                 reflected at the border
===============  ==========================================  ===========================

Each operator gives ``A``, its adjoint ``At`` and, where cheap, closed forms of what the
methods need: the pseudo-inverse ``pinv`` (``A^+ = A^T (A A^T)^-1``) and ``cov_solve``
(``(r^2 A A^T + sigma_y^2 I)^-1 v``, ΠGDM's eq. (8)). The base class derives the adjoint by
autograd (the vector-Jacobian product of a linear map is exactly its adjoint) and solves the
rest by conjugate gradients, so a new operator only has to define ``A``.

``measured(y)`` flattens y to the coordinates that are actually observed (an inpainting
operator's known pixels), (B, m): residual norms and the exact posterior
(:meth:`sfumato.mixture.GaussianMixture.posterior`, through :meth:`Operator.matrix`) use it.

Text form (the CLI's ``--operator``, :func:`parse_operator`): ``inpaint:MASK.png``,
``box:T,L,H,W``, ``sr2``, ``sr4``, ``blur:W``, ``pixels:P``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..errors import UsageError

__all__ = ["Operator", "Inpaint", "SuperRes", "Blur", "box", "random_pixels", "parse_operator",
           "conjugate_gradient"]


def conjugate_gradient(apply: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor, *,
                       iters: int = 100, tol: float = 1e-10) -> torch.Tensor:
    """Solve ``apply(z) = b`` per sample for a symmetric positive (semi-)definite linear map
    (Hestenes & Stiefel 1952); b (B, ...). Stops when every sample's residual norm is below
    ``tol`` times its right-hand side's, or after ``iters`` steps (then the result is a
    regularised solution, as CG is for ill-conditioned maps)."""
    def dot(u, v):
        return (u * v).flatten(1).sum(1).reshape((-1,) + (1,) * (b.ndim - 1))

    z = torch.zeros_like(b)
    r, p = b.clone(), b.clone()
    rr = dot(r, r)
    stop = tol**2 * rr.clamp_min(torch.finfo(b.dtype).tiny)
    for _ in range(iters):
        if bool((rr <= stop).all()):
            break
        q = apply(p)
        alpha = rr / dot(p, q).clamp_min(torch.finfo(b.dtype).tiny)
        alpha = torch.where(rr <= stop, torch.zeros_like(alpha), alpha)
        z, r = z + alpha * p, r - alpha * q
        rr_new = dot(r, r)
        p = r + (rr_new / rr.clamp_min(torch.finfo(b.dtype).tiny)) * p
        rr = rr_new
    return z


class Operator:
    """A linear measurement on images of shape ``shape`` = (C, H, W).

    Subclasses define :meth:`A` (and ``out_shape``); the rest has generic defaults.
    """

    #: whether ``pinv`` is exact and cheap (replacement and RePaint need it)
    exact_pinv: bool = False

    def __init__(self, shape: tuple[int, int, int]) -> None:
        if len(shape) != 3:
            raise UsageError(f"measurement operators act on images (C, H, W); got shape {shape}")
        self.shape = tuple(int(s) for s in shape)

    @property
    def out_shape(self) -> tuple[int, ...]:
        """Shape of one measurement y."""
        return self.shape

    def __repr__(self) -> str:
        return f"{type(self).__name__}(shape={self.shape})"

    def _check(self, x: torch.Tensor, shape: tuple[int, ...], what: str) -> None:
        if tuple(x.shape[1:]) != tuple(shape):
            raise UsageError(f"{self!r}: {what} must have shape (batch, "
                             f"{', '.join(map(str, shape))}); got {tuple(x.shape)}")

    def A(self, x: torch.Tensor) -> torch.Tensor:
        """The measurement without noise: (B, *shape) -> (B, *out_shape)."""
        raise NotImplementedError

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x, self.shape, "x")
        return self.A(x)

    def At(self, y: torch.Tensor) -> torch.Tensor:
        """The adjoint A^T: (B, *out_shape) -> (B, *shape) (autograd's vector-Jacobian
        product of the linear map A, exact)."""
        with torch.enable_grad():
            x = torch.zeros((y.shape[0], *self.shape), dtype=y.dtype, device=y.device,
                            requires_grad=True)
            (g,) = torch.autograd.grad(self.A(x), x, grad_outputs=y)
        return g

    def AAt(self, v: torch.Tensor) -> torch.Tensor:
        """A A^T v, (B, *out_shape)."""
        return self.A(self.At(v))

    def pinv(self, y: torch.Tensor) -> torch.Tensor:
        """The pseudo-inverse A^+ y = A^T (A A^T)^-1 y, (B, *shape): the smallest x with
        A x = y (by conjugate gradients unless the operator has a closed form)."""
        return self.At(conjugate_gradient(self.AAt, y))

    def cov_solve(self, v: torch.Tensor, r2: torch.Tensor, sigma_y: float) -> torch.Tensor:
        """(r2 A A^T + sigma_y^2 I)^-1 v on the measured coordinates, v (B, *out_shape), r2
        (B,) or scalar (ΠGDM's Gaussian posterior covariance of the measurement)."""
        r2 = torch.as_tensor(r2, dtype=v.dtype, device=v.device).reshape(-1, *[1] * (v.ndim - 1))
        return conjugate_gradient(lambda z: r2 * self.AAt(z) + sigma_y**2 * z, v)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """A^+ A x: the part of x the measurement sees (an orthogonal projection)."""
        return self.pinv(self.A(x))

    def measured(self, y: torch.Tensor) -> torch.Tensor:
        """(B, m): the observed coordinates of y (all of them unless a mask hides some)."""
        return y.reshape(y.shape[0], -1)

    def measure(self, x: torch.Tensor, sigma_y: float = 0.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
        """y = A(x) + sigma_y n, n ~ N(0, I) from ``generator`` (needed when sigma_y > 0);
        unobserved coordinates stay 0."""
        y = self(x)
        if sigma_y > 0:
            if generator is None:
                raise UsageError("a noisy measurement (sigma_y > 0) draws its noise from an "
                                 "explicit generator")
            n = torch.randn(y.shape, generator=generator, dtype=y.dtype, device=generator.device)
            y = y + sigma_y * self._mask_noise(n.to(y))
        return y

    def _mask_noise(self, n: torch.Tensor) -> torch.Tensor:
        return n

    def residual(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-sample RMS of the measurement residual over the observed coordinates,
        ||A x - y|| / sqrt(m), (B,)."""
        r = self.measured(self(x) - y)
        return r.pow(2).mean(1).sqrt()

    def matrix(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """A as an (m, D) matrix on the observed coordinates (D = C H W), for small images
        (the exact posterior of :mod:`sfumato.mixture`)."""
        D = math.prod(self.shape)
        eye = torch.eye(D, dtype=dtype).reshape(D, *self.shape)
        return self.measured(self.A(eye)).T.contiguous()


class Inpaint(Operator):
    """Keep the pixels where ``mask`` is 1 (or True): A = diag(M), an orthogonal projection,
    so A^T = A^+ = A. ``mask`` (H, W), (1, H, W) or (C, H, W)."""

    exact_pinv = True

    def __init__(self, mask: torch.Tensor, shape: tuple[int, int, int]) -> None:
        super().__init__(shape)
        m = torch.as_tensor(mask)
        m = m[None] if m.ndim == 2 else m
        C, H, W = self.shape
        if m.ndim != 3 or m.shape[0] not in (1, C) or tuple(m.shape[1:]) != (H, W):
            raise UsageError(f"the inpainting mask must have shape (H, W) = ({H}, {W}) (or "
                             f"(1 or {C}, {H}, {W})) for these images; got {tuple(m.shape)}")
        self.mask = (m > 0.5 if m.is_floating_point() else m.bool()).expand(C, H, W).clone()
        if not bool(self.mask.any()):
            raise UsageError("the inpainting mask keeps no pixel: nothing is measured")

    def _m(self, x: torch.Tensor) -> torch.Tensor:
        return self.mask.to(device=x.device, dtype=x.dtype)

    def A(self, x):
        return x * self._m(x)

    def At(self, y):
        return y * self._m(y)

    pinv = At

    def cov_solve(self, v, r2, sigma_y):
        r2 = torch.as_tensor(r2, dtype=v.dtype, device=v.device).reshape(-1, *[1] * (v.ndim - 1))
        return v * self._m(v) / (r2 + sigma_y**2)

    def project(self, x):
        return self.A(x)

    def measured(self, y):
        return y.flatten(1)[:, self.mask.flatten().to(y.device)]

    def _mask_noise(self, n):
        return self.A(n)

    def paste(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x with the known pixels replaced by y's, exactly."""
        return torch.where(self.mask.to(x.device), y.to(x.dtype), x)

    def __repr__(self) -> str:
        return f"Inpaint(shape={self.shape}, known={int(self.mask.sum())}/{self.mask.numel()})"


def box(top: int, left: int, height: int, width: int, shape: tuple[int, int, int]) -> Inpaint:
    """Inpainting with the rectangle rows [top, top+height), columns [left, left+width)
    unknown (e.g. the bottom half of 8x8 digits: ``box(4, 0, 4, 8, (1, 8, 8))``)."""
    C, H, W = shape
    if min(height, width) < 1 or top < 0 or left < 0 or top + height > H or left + width > W:
        raise UsageError(f"box {top},{left},{height},{width} (top, left, height, width) does "
                         f"not fit in {H}x{W} images")
    mask = torch.ones(H, W, dtype=torch.bool)
    mask[top:top + height, left:left + width] = False
    return Inpaint(mask, shape)


def random_pixels(fraction: float, shape: tuple[int, int, int], *,
                  generator: torch.Generator | None = None) -> Inpaint:
    """Inpainting that keeps a random ``fraction`` of the pixel positions (all channels),
    drawn from ``generator`` (seed 0 if None)."""
    if not 0.0 < fraction <= 1.0:
        raise UsageError(f"pixels:P keeps a fraction P in (0, 1] of the pixels; got {fraction}")
    C, H, W = shape
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    keep = torch.randperm(H * W, generator=g)[:max(1, round(fraction * H * W))]
    mask = torch.zeros(H * W, dtype=torch.bool)
    mask[keep] = True
    return Inpaint(mask.reshape(H, W), shape)


class SuperRes(Operator):
    """f x f average pooling: A A^T = I / f^2, so A^+ y = f^2 A^T y is nearest-neighbour
    upsampling."""

    exact_pinv = True

    def __init__(self, factor: int, shape: tuple[int, int, int]) -> None:
        super().__init__(shape)
        C, H, W = self.shape
        if factor < 1 or H % factor or W % factor:
            raise UsageError(f"sr{factor}: the image size {H}x{W} must be divisible by the "
                             f"factor {factor}")
        self.factor = int(factor)

    @property
    def out_shape(self):
        C, H, W = self.shape
        return (C, H // self.factor, W // self.factor)

    def A(self, x):
        return F.avg_pool2d(x, self.factor)

    def At(self, y):
        return y.repeat_interleave(self.factor, -1).repeat_interleave(self.factor, -2) \
            / self.factor**2

    def pinv(self, y):
        return self.At(y) * self.factor**2

    def cov_solve(self, v, r2, sigma_y):
        r2 = torch.as_tensor(r2, dtype=v.dtype, device=v.device).reshape(-1, *[1] * (v.ndim - 1))
        return v / (r2 / self.factor**2 + sigma_y**2)

    def __repr__(self) -> str:
        return f"SuperRes(factor={self.factor}, shape={self.shape})"


class Blur(Operator):
    """Gaussian blur with standard deviation ``width`` pixels (kernel radius ceil(3 width)),
    separable, with the image reflected at its border (as scipy.ndimage's 'reflect'). Its
    pseudo-inverse is ill-conditioned, so it serves DPS and ΠGDM, not replacement."""

    def __init__(self, width: float, shape: tuple[int, int, int]) -> None:
        super().__init__(shape)
        if not width > 0:
            raise UsageError(f"blur:W needs a width W > 0 (pixels); got {width}")
        self.width = float(width)
        r = max(1, math.ceil(3 * self.width))
        if r >= min(self.shape[1:]):
            raise UsageError(f"blur:{width} is too wide for {self.shape[1]}x{self.shape[2]} "
                             f"images (radius {r})")
        t = torch.arange(-r, r + 1, dtype=torch.float64)
        k = torch.exp(-0.5 * (t / self.width) ** 2)
        self.kernel, self.radius = k / k.sum(), r

    def A(self, x):
        C = x.shape[1]
        k = self.kernel.to(x)
        r = self.radius
        x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="reflect"), k.reshape(1, 1, 1, -1).expand(
            C, 1, 1, -1), groups=C)
        return F.conv2d(F.pad(x, (0, 0, r, r), mode="reflect"), k.reshape(1, 1, -1, 1).expand(
            C, 1, -1, 1), groups=C)

    def __repr__(self) -> str:
        return f"Blur(width={self.width:g}, shape={self.shape})"


def parse_operator(spec: str, shape: tuple[int, int, int], *,
                   load_mask: Callable[[str, tuple[int, int]], torch.Tensor] | None = None
                   ) -> Operator:
    """An operator from its text form (``inpaint:MASK.png``, ``box:T,L,H,W``, ``sr2``,
    ``sr4``, ``srK``, ``blur:W``, ``pixels:P``) for images of ``shape`` (C, H, W).
    ``load_mask(path, (H, W))`` reads a mask image (white = unknown, to be filled, as in
    diffusers' inpainting pipelines); it is required for ``inpaint:``."""
    kind, _, arg = spec.partition(":")
    kind = kind.strip().lower()
    try:
        if kind == "inpaint":
            if not arg or load_mask is None:
                raise UsageError("inpaint:MASK.png needs a mask image (white = fill in)")
            return Inpaint(~load_mask(arg, shape[1:]), shape)
        if kind == "box":
            t, left, h, w = (int(v) for v in arg.split(","))
            return box(t, left, h, w, shape)
        if kind.startswith("sr") and not arg:
            return SuperRes(int(kind[2:]), shape)
        if kind == "blur":
            return Blur(float(arg), shape)
        if kind == "pixels":
            return random_pixels(float(arg), shape)
    except ValueError:
        pass
    raise UsageError(f"unknown operator {spec!r}: use inpaint:MASK.png, box:T,L,H,W, sr2, sr4, "
                     "blur:W (pixels) or pixels:P (fraction kept)")
