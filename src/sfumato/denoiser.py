"""The denoiser contract and the preconditioning that turns a raw network into it.

Contract (σ-space, see ``sfumato.process``)::

    denoiser(x, sigma, **cond) -> x0_hat      # E[x0 | x0 + sigma * eps = x], same shape as x

``x`` has shape (B, ...) and ``sigma`` is a scalar or shape (B,).

Prediction targets. With ``x = x0 + sigma * eps`` every target a network may predict is a
linear combination ``y = a(sigma) x0 + b(sigma) eps``:

=========  ==============================  =====================================
target     y                               reference
=========  ==============================  =====================================
``eps``    eps                             Ho et al. 2020, eq. (11)
``x0``     x0                              --
``v``      alpha eps - sigma_vp x0         Salimans & Ho 2022, sec. 4 (VP alpha, sigma_vp)
``flow``   eps - x0                        Liu et al. 2023 / Lipman et al. 2023
``edm``    F with D = c_skip x + c_out F   Karras et al. 2022, eq. (7), Table 1
=========  ==============================  =====================================

(VP quantities in σ-space: alpha = 1/sqrt(1 + sigma^2), sigma_vp = sigma alpha.) Solving
``y = a x0 + b (x - x0)/sigma`` for x0 gives, exactly,

    x0 = c_skip x + c_out y,   c_skip = -b / (a sigma - b),   c_out = sigma / (a sigma - b).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .errors import UsageError
from .process import Process, VPDiscrete

__all__ = [
    "TARGETS",
    "target_coefficients",
    "skip_out",
    "x0_from_target",
    "target_from_x0",
    "convert",
    "edm_precond",
    "Denoiser",
    "EDMDenoiser",
    "ConsistencyDenoiser",
    "consistency_precond",
    "as_sigma",
    "discrete_eps_denoiser",
]

TARGETS = ("eps", "x0", "v", "flow", "edm")


def as_sigma(sigma: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """Broadcast sigma (scalar or (B,)) to shape (B, 1, ..., 1) in x's dtype and device."""
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    if sigma.ndim == 0:
        sigma = sigma.expand(x.shape[0])
    if sigma.ndim != 1 or sigma.shape[0] != x.shape[0]:
        raise UsageError(
            f"sigma must be a scalar or have shape (batch,) = ({x.shape[0]},); "
            f"got shape {tuple(sigma.shape)}"
        )
    return sigma.reshape((-1,) + (1,) * (x.ndim - 1))


def _check_target(target: str) -> None:
    if target not in TARGETS:
        raise UsageError(f"unknown prediction target {target!r}; choose one of {TARGETS}")


def target_coefficients(
    target: str, sigma: torch.Tensor, sigma_data: float = 0.5
) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, b) with target = a * x0 + b * eps, for x = x0 + sigma * eps."""
    _check_target(target)
    one = torch.ones_like(sigma)
    if target == "eps":
        return 0 * one, one
    if target == "x0":
        return one, 0 * one
    if target == "v":
        alpha = 1 / (1 + sigma**2).sqrt()
        return -sigma * alpha, alpha
    if target == "flow":
        return -one, one
    c_skip, c_out, _, _ = edm_precond(sigma, sigma_data)
    # F = (x0 - c_skip (x0 + sigma eps)) / c_out
    return (1 - c_skip) / c_out, -c_skip * sigma / c_out


def skip_out(
    target: str, sigma: torch.Tensor, sigma_data: float = 0.5
) -> tuple[torch.Tensor, torch.Tensor]:
    """(c_skip, c_out) with x0 = c_skip * x + c_out * target (exact; see module docstring)."""
    if target == "edm":
        c_skip, c_out, _, _ = edm_precond(sigma, sigma_data)
        return c_skip, c_out
    a, b = target_coefficients(target, sigma, sigma_data)
    den = a * sigma - b
    return -b / den, sigma / den


def x0_from_target(target: str, y: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor | float,
                   sigma_data: float = 0.5) -> torch.Tensor:
    """x0 from a prediction ``y`` of ``target`` at σ-space state x (shapes (B, ...))."""
    c_skip, c_out = skip_out(target, as_sigma(sigma, x), sigma_data)
    return c_skip * x + c_out * y


def target_from_x0(target: str, x0: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor | float,
                   sigma_data: float = 0.5) -> torch.Tensor:
    """The value of ``target`` implied by x0 at state x: a x0 + b (x - x0) / sigma."""
    s = as_sigma(sigma, x)
    a, b = target_coefficients(target, s, sigma_data)
    return a * x0 + b * (x - x0) / s


def convert(y: torch.Tensor, src: str, dst: str, x: torch.Tensor, sigma: torch.Tensor | float,
            sigma_data: float = 0.5) -> torch.Tensor:
    """Convert a prediction between targets (e.g. eps -> v) at state x and noise level sigma."""
    return target_from_x0(dst, x0_from_target(src, y, x, sigma, sigma_data), x, sigma, sigma_data)


def edm_precond(sigma: torch.Tensor, sigma_data: float = 0.5):
    """EDM preconditioning (Karras et al. 2022, Table 1): (c_skip, c_out, c_in, c_noise)."""
    sd2 = sigma_data**2
    c_skip = sd2 / (sigma**2 + sd2)
    c_out = sigma * sigma_data / (sigma**2 + sd2).sqrt()
    c_in = 1 / (sigma**2 + sd2).sqrt()
    c_noise = sigma.log() / 4
    return c_skip, c_out, c_in, c_noise


class Denoiser(nn.Module):
    """Wrap a raw network ``net(x_in, c_noise, **cond) -> y`` into the σ-space denoiser contract.

    Args:
        net: the raw network; ``x_in`` has x's shape, ``c_noise`` has shape (B,).
        target: what the network predicts: ``eps``, ``x0``, ``v``, ``flow`` or ``edm``.
        process: the forward process the network was trained on. It decides the input scaling
            ``c_in = s(sigma)`` (the network sees the process's native x_t) and the noise
            conditioning ``c_noise = t(sigma) * t_scale``. A discrete ``VPDiscrete`` process
            gives fractional t by log-sigma interpolation, or the nearest step when its
            ``quantize`` is set. Ignored for target ``edm``, which uses EDM's c_in and
            c_noise = log(sigma)/4.
        t_scale: multiplies t for c_noise (e.g. 1000 for continuous-time nets trained on
            t*1000).
        sigma_data: data standard deviation used by the ``edm`` target.

    Shapes: x (B, ...), sigma scalar or (B,); returns x0_hat with x's shape and dtype. The
    network may run in lower precision; the skip connection is computed in x's dtype.
    """

    def __init__(self, net: nn.Module | Callable, target: str = "edm",
                 process: Process | None = None, t_scale: float = 1.0,
                 sigma_data: float = 0.5) -> None:
        super().__init__()
        _check_target(target)
        if target != "edm" and process is None:
            raise UsageError(
                f"target {target!r} needs the process the network was trained on "
                "(e.g. process=VPDiscrete()) to know its input scaling and time input"
            )
        self.net = net
        self.target = target
        self.process = process
        self.t_scale = t_scale
        self.sigma_data = sigma_data

    def precondition(self, sigma: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(c_skip, c_out, c_in, c_noise) for sigma of shape (B, 1, ..., 1)."""
        if self.target == "edm":
            return edm_precond(sigma, self.sigma_data)
        c_skip, c_out = skip_out(self.target, sigma, self.sigma_data)
        c_in = self.process.scale_from_sigma(sigma).to(sigma.dtype)
        c_noise = self.process.t_from_sigma(sigma).to(sigma.dtype) * self.t_scale
        return c_skip, c_out, c_in, c_noise

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, **cond) -> torch.Tensor:
        s = as_sigma(sigma, x)
        c_skip, c_out, c_in, c_noise = self.precondition(s)
        y = self.net(c_in * x, c_noise.reshape(-1), **cond)
        return c_skip * x + c_out * y.to(x.dtype)

    def raw_target(self, x0: torch.Tensor, eps: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """The training target for the network given clean x0 and noise eps (shapes (B, ...))."""
        s = as_sigma(sigma, x0)
        x = x0 + s * eps
        c_skip, c_out = self.precondition(s)[:2]
        return (x0 - c_skip * x) / c_out


class EDMDenoiser(Denoiser):
    """Shorthand for ``Denoiser(net, target='edm', sigma_data=...)``."""

    def __init__(self, net: nn.Module | Callable, sigma_data: float = 0.5) -> None:
        super().__init__(net, target="edm", sigma_data=sigma_data)


def consistency_precond(sigma: torch.Tensor, sigma_min: float = 0.002,
                        sigma_data: float = 0.5) -> tuple[torch.Tensor, ...]:
    """Consistency-model preconditioning (Song et al. 2023, App. C, eq. 21 with the σ-space
    of EDM): ``c_skip = sd^2 / ((sigma - sigma_min)^2 + sd^2)``, ``c_out = sd (sigma -
    sigma_min) / sqrt(sigma^2 + sd^2)``, EDM's c_in and c_noise. At sigma = sigma_min,
    c_skip = 1 and c_out = 0 exactly: the boundary condition f(x, sigma_min) = x holds for
    every network. For sigma_min -> 0 it is EDM's preconditioning, so a student starts from
    its EDM teacher's weights."""
    sd2 = sigma_data**2
    c_skip = sd2 / ((sigma - sigma_min) ** 2 + sd2)
    c_out = (sigma - sigma_min) * sigma_data / (sigma**2 + sd2).sqrt()
    c_in = 1 / (sigma**2 + sd2).sqrt()
    return c_skip, c_out, c_in, sigma.log() / 4


class ConsistencyDenoiser(Denoiser):
    """A consistency function ``f(x, sigma) = c_skip x + c_out F(c_in x, c_noise)`` with the
    boundary condition built in (:func:`consistency_precond`). Called like a denoiser; its
    output is the end of the PF-ODE trajectory through (x, sigma), not the posterior mean."""

    def __init__(self, net: nn.Module | Callable, sigma_min: float = 0.002,
                 sigma_data: float = 0.5) -> None:
        super().__init__(net, target="edm", sigma_data=sigma_data)
        self.sigma_min = float(sigma_min)

    def precondition(self, sigma: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return consistency_precond(sigma, self.sigma_min, self.sigma_data)


def discrete_eps_denoiser(net: nn.Module | Callable, process: VPDiscrete | None = None,
                          target: str = "eps") -> Denoiser:
    """A denoiser for a DDPM-style network called as ``net(x_t, timestep)`` with integer-like
    timesteps (e.g. a diffusers ``UNet2DModel`` behind a thin adapter).

    Uses ``process.t_from_sigma`` for the timestep, fractional by default; build the process
    with ``quantize=True`` for the nearest integer step.
    """
    process = process or VPDiscrete()
    return Denoiser(net, target=target, process=process)

