"""Forward diffusion processes, all written in one coordinate system.

Every process here is

    x_t = s(t) * (x0 + sigma(t) * eps),   eps ~ N(0, I)

so a sampler only ever sees the *scaled-out* state ``x = x_t / s(t)`` and a noise level
``sigma``. A process decides three things: the map ``t -> sigma`` (and back), the scale
``s(t)`` a network trained on that process sees its input at, and how ``t`` is drawn at
training time. logSNR is ``-2 log sigma`` for every process.

All functions take and return tensors (float32 or float64); ``t`` and ``sigma`` are
broadcastable to each other. Units: ``sigma`` is in data units (standard deviations of the
added noise relative to the data), ``t`` is the process's own time (integer index for
discrete VP, [0, 1] for continuous ones, ``t = sigma`` for EDM).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import UsageError

__all__ = [
    "Process",
    "VPDiscrete",
    "VPContinuous",
    "SubVP",
    "VE",
    "EDM",
    "RectifiedFlow",
    "make_betas",
    "rescale_zero_terminal_snr",
    "get_process",
    "PROCESSES",
]


def _t(x: torch.Tensor | float, like: torch.Tensor | None = None) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x if x.is_floating_point() else x.to(torch.float32)
    dtype = like.dtype if like is not None else torch.float64
    return torch.as_tensor(x, dtype=dtype)


def _vp_scale(sigma: torch.Tensor) -> torch.Tensor:
    """The VP scale as a function of sigma: s = sqrt(alpha_bar) = 1 / sqrt(1 + sigma^2)."""
    return 1.0 / (1.0 + sigma**2).sqrt()


class Process:
    """Base class. Subclasses define ``sigma(t)``, ``t_from_sigma(sigma)``, ``scale(t)``.

    Attributes:
        t_min, t_max: the time interval the process is used on.
    """

    t_min: float = 0.0
    t_max: float = 1.0

    # -- the three maps -------------------------------------------------------------------
    def sigma(self, t: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def t_from_sigma(self, sigma: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def scale(self, t: torch.Tensor) -> torch.Tensor:
        """s(t): x_t = s(t) * (x0 + sigma(t) * eps). Defaults to 1 (VE-like)."""
        return torch.ones_like(_t(t))

    # -- derived ---------------------------------------------------------------------------
    def logsnr(self, t: torch.Tensor) -> torch.Tensor:
        """log SNR = log(s^2 / (s sigma)^2) = -2 log sigma(t)."""
        return -2.0 * torch.log(self.sigma(t))

    def scale_from_sigma(self, sigma: torch.Tensor) -> torch.Tensor:
        """s as a function of sigma: the factor a network trained on this process sees."""
        return self.scale(self.t_from_sigma(sigma))

    @property
    def sigma_min(self) -> float:
        return float(self.sigma(torch.tensor(self.t_min, dtype=torch.float64)))

    @property
    def sigma_max(self) -> float:
        return float(self.sigma(torch.tensor(self.t_max, dtype=torch.float64)))

    # -- training-time sampling ------------------------------------------------------------
    def sample_t(self, n: int, *, generator: torch.Generator | None = None,
                 device: torch.device | str | None = None) -> torch.Tensor:
        """Draw n training times (uniform on [t_min, t_max] unless overridden), shape (n,)."""
        u = torch.rand(n, generator=generator, device=device, dtype=torch.float64)
        return (self.t_min + (self.t_max - self.t_min) * u).to(torch.float32)

    def sample_sigma(self, n: int, *, generator: torch.Generator | None = None,
                     device: torch.device | str | None = None) -> torch.Tensor:
        """Training noise levels: ``sigma(sample_t(n))``, shape (n,)."""
        return self.sigma(self.sample_t(n, generator=generator, device=device))

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The process's native noisy sample x_t = s(t) (x0 + sigma(t) eps); t shape (batch,)."""
        t = _t(t, x0).to(x0.device)
        shape = (-1,) + (1,) * (x0.ndim - 1)
        s = self.scale(t).to(x0.dtype).reshape(shape)
        sig = self.sigma(t).to(x0.dtype).reshape(shape)
        return s * (x0 + sig * eps)


# ---------------------------------------------------------------------------------------
# VP, discrete (DDPM)
# ---------------------------------------------------------------------------------------
def make_betas(kind: str, n: int = 1000, beta_start: float | None = None,
               beta_end: float | None = None) -> torch.Tensor:
    """Beta schedules of discrete VP processes, float64, shape (n,).

    - ``linear``: Ho et al. 2020, betas linear in [1e-4, 0.02].
    - ``scaled_linear``: Stable Diffusion, sqrt(beta) linear in [sqrt(0.00085), sqrt(0.012)].
    - ``cosine``: Nichol & Dhariwal 2021 eq. (17), alpha_bar(t) = cos^2((t/T + s)/(1 + s) pi/2),
      s = 0.008, betas clipped at 0.999.
    """
    if kind == "linear":
        b0, b1 = beta_start or 1e-4, beta_end or 0.02
        return torch.linspace(b0, b1, n, dtype=torch.float64)
    if kind == "scaled_linear":
        b0, b1 = beta_start or 0.00085, beta_end or 0.012
        return torch.linspace(b0**0.5, b1**0.5, n, dtype=torch.float64) ** 2
    if kind == "cosine":
        s = 0.008
        steps = torch.arange(n + 1, dtype=torch.float64) / n
        ab = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
        betas = 1 - ab[1:] / ab[:-1]
        return betas.clamp(max=0.999)
    raise UsageError(
        f"unknown beta schedule {kind!r}; choose one of 'linear', 'scaled_linear', 'cosine'"
    )


def rescale_zero_terminal_snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2024, Alg. 1: shift/scale sqrt(alpha_bar) so that the last step has SNR 0.

    Returns alpha_bar with ``alpha_bar[-1] == 0`` exactly (sigma infinite there).
    """
    sab = alphas_cumprod.sqrt()
    first, last = sab[0].clone(), sab[-1].clone()
    sab = (sab - last) * first / (first - last)
    return sab**2


@dataclass
class VPDiscrete(Process):
    """DDPM-style discrete VP process with ``n`` timesteps t = 0..n-1.

    sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t), s_t = sqrt(alpha_bar_t).
    Non-integer t (from ``t_from_sigma``) interpolates log sigma linearly between steps;
    ``quantize=True`` rounds to the nearest step instead (what a network trained only on
    integer t expects).

    With ``zero_terminal_snr=True`` the last alpha_bar is 0 (sigma = inf); since a sampler
    cannot start at infinity, it is replaced by ``terminal_alpha_bar`` (default 2**-24, i.e.
    sigma_max ~ 4096, as diffusers does), or by half the previous step's alpha_bar if that is
    smaller (so sigma keeps increasing); far beyond where the data term matters.
    """

    schedule: str = "linear"
    n: int = 1000
    beta_start: float | None = None
    beta_end: float | None = None
    zero_terminal_snr: bool = False
    quantize: bool = False
    terminal_alpha_bar: float = 2.0**-24

    def __post_init__(self) -> None:
        betas = make_betas(self.schedule, self.n, self.beta_start, self.beta_end)
        ab = torch.cumprod(1 - betas, 0)
        if self.zero_terminal_snr:
            ab = rescale_zero_terminal_snr(ab)
            ab[-1] = min(self.terminal_alpha_bar, float(ab[-2]) / 2)
        self.betas = betas
        self.alphas_cumprod = ab
        self.sigmas = ((1 - ab) / ab).sqrt()  # increasing in t, float64
        self.log_sigmas = self.sigmas.log()
        self.t_min, self.t_max = 0.0, float(self.n - 1)

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        t = _t(t)
        tc = t.to(torch.float64).clamp(0, self.n - 1)
        lo = tc.floor().long().clamp(max=self.n - 2)
        w = tc - lo
        ls = self.log_sigmas.to(t.device)
        return ((1 - w) * ls[lo] + w * ls[lo + 1]).exp().to(t.dtype)

    def t_from_sigma(self, sigma: torch.Tensor) -> torch.Tensor:
        sigma = _t(sigma)
        ls = self.log_sigmas.to(sigma.device)
        lsig = sigma.to(torch.float64).clamp(min=1e-300).log()
        idx = torch.searchsorted(ls, lsig.reshape(-1).contiguous()).reshape(lsig.shape)
        lo = (idx - 1).clamp(0, self.n - 2)
        w = ((lsig - ls[lo]) / (ls[lo + 1] - ls[lo])).clamp(0, 1)
        t = lo.to(torch.float64) + w
        if self.quantize:
            t = t.round()
        return t.to(sigma.dtype)

    def scale(self, t: torch.Tensor) -> torch.Tensor:
        return _vp_scale(self.sigma(t))

    def scale_from_sigma(self, sigma: torch.Tensor) -> torch.Tensor:
        return _vp_scale(_t(sigma))

    def sample_t(self, n: int, *, generator: torch.Generator | None = None,
                 device: torch.device | str | None = None) -> torch.Tensor:
        """Uniform integer timesteps in [0, n-1] (Ho et al. 2020, Alg. 1), as float."""
        return torch.randint(0, self.n, (n,), generator=generator, device=device).float()


# ---------------------------------------------------------------------------------------
# continuous processes (Song et al. 2021), EDM, rectified flow
# ---------------------------------------------------------------------------------------
@dataclass
class VPContinuous(Process):
    """Continuous VP SDE with linear beta(t) = beta_min + t (beta_max - beta_min), t in [eps, 1].

    alpha_bar(t) = exp(-beta_min t - (beta_max - beta_min) t^2 / 2) (Song et al. 2021, eq. 33),
    s = sqrt(alpha_bar), sigma = sqrt(1/alpha_bar - 1).
    """

    beta_min: float = 0.1
    beta_max: float = 20.0
    eps: float = 1e-3

    def __post_init__(self) -> None:
        self.t_min, self.t_max = self.eps, 1.0

    def _neg_log_ab(self, t: torch.Tensor) -> torch.Tensor:
        return self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t**2

    def _t_from_neg_log_ab(self, L: torch.Tensor) -> torch.Tensor:
        db = self.beta_max - self.beta_min
        return (-self.beta_min + (self.beta_min**2 + 2 * db * L).sqrt()) / db

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        return torch.expm1(self._neg_log_ab(_t(t))).sqrt()

    def t_from_sigma(self, sigma: torch.Tensor) -> torch.Tensor:
        return self._t_from_neg_log_ab(torch.log1p(_t(sigma) ** 2))

    def scale(self, t: torch.Tensor) -> torch.Tensor:
        return torch.exp(-0.5 * self._neg_log_ab(_t(t)))

    def scale_from_sigma(self, sigma: torch.Tensor) -> torch.Tensor:
        return _vp_scale(_t(sigma))


@dataclass
class SubVP(VPContinuous):
    """sub-VP SDE (Song et al. 2021, eq. 35): mean as VP, variance (1 - alpha_bar)^2.

    s = sqrt(alpha_bar), sigma = (1 - alpha_bar) / sqrt(alpha_bar).
    """

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        L = self._neg_log_ab(_t(t))
        return -torch.expm1(-L) * torch.exp(0.5 * L)

    def t_from_sigma(self, sigma: torch.Tensor) -> torch.Tensor:
        sigma = _t(sigma)
        u = 2.0 / (sigma + (sigma**2 + 4).sqrt())  # sqrt(alpha_bar): u^2 + sigma u - 1 = 0
        return self._t_from_neg_log_ab(-2.0 * u.log())

    def scale_from_sigma(self, sigma: torch.Tensor) -> torch.Tensor:
        sigma = _t(sigma)
        return 2.0 / (sigma + (sigma**2 + 4).sqrt())


@dataclass
class VE(Process):
    """VE SDE / NCSN (Song et al. 2021, eq. 31): sigma(t) = sigma_min (sigma_max/sigma_min)^t."""

    sigma_lo: float = 0.01
    sigma_hi: float = 50.0

    def __post_init__(self) -> None:
        self.t_min, self.t_max = 0.0, 1.0

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        t = _t(t)
        return self.sigma_lo * (self.sigma_hi / self.sigma_lo) ** t

    def t_from_sigma(self, sigma: torch.Tensor) -> torch.Tensor:
        return torch.log(_t(sigma) / self.sigma_lo) / math.log(self.sigma_hi / self.sigma_lo)


@dataclass
class EDM(Process):
    """EDM (Karras et al. 2022): s = 1, sigma(t) = t; training sigma ~ LogNormal(P_mean, P_std).

    Defaults: P_mean = -1.2, P_std = 1.2, sigma in [0.002, 80] (Table 1).
    """

    sigma_lo: float = 0.002
    sigma_hi: float = 80.0
    P_mean: float = -1.2
    P_std: float = 1.2

    def __post_init__(self) -> None:
        self.t_min, self.t_max = self.sigma_lo, self.sigma_hi

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        return _t(t).clone()

    def t_from_sigma(self, sigma: torch.Tensor) -> torch.Tensor:
        return _t(sigma).clone()

    def sample_t(self, n: int, *, generator: torch.Generator | None = None,
                 device: torch.device | str | None = None) -> torch.Tensor:
        """log sigma ~ N(P_mean, P_std^2) (Karras et al. 2022, Table 1, 'Noise distribution')."""
        z = torch.randn(n, generator=generator, device=device)
        return (self.P_mean + self.P_std * z).exp()


@dataclass
class RectifiedFlow(Process):
    """Linear interpolant x_t = (1 - t) x0 + t eps (Liu et al. 2023; Lipman et al. 2023).

    s = 1 - t, sigma = t / (1 - t), t(sigma) = sigma / (1 + sigma). Training t: uniform, or
    logit-normal with ``logit_mean``/``logit_std`` (Esser et al. 2024, eq. 19) when
    ``t_sampling='logit_normal'``.
    """

    t_lo: float = 1e-4
    t_hi: float = 1.0 - 1e-4
    t_sampling: str = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0

    def __post_init__(self) -> None:
        self.t_min, self.t_max = self.t_lo, self.t_hi
        if self.t_sampling not in ("uniform", "logit_normal"):
            raise UsageError(
                f"unknown t_sampling {self.t_sampling!r}; use 'uniform' or 'logit_normal'"
            )

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        t = _t(t)
        return t / (1 - t)

    def t_from_sigma(self, sigma: torch.Tensor) -> torch.Tensor:
        sigma = _t(sigma)
        return sigma / (1 + sigma)

    def scale(self, t: torch.Tensor) -> torch.Tensor:
        return 1 - _t(t)

    def scale_from_sigma(self, sigma: torch.Tensor) -> torch.Tensor:
        return 1.0 / (1.0 + _t(sigma))

    def sample_t(self, n: int, *, generator: torch.Generator | None = None,
                 device: torch.device | str | None = None) -> torch.Tensor:
        if self.t_sampling == "logit_normal":
            z = torch.randn(n, generator=generator, device=device)
            t = torch.sigmoid(self.logit_mean + self.logit_std * z)
            return t.clamp(self.t_min, self.t_max)
        return super().sample_t(n, generator=generator, device=device)


PROCESSES: dict[str, type[Process]] = {
    "vp_discrete": VPDiscrete,
    "vp": VPContinuous,
    "subvp": SubVP,
    "ve": VE,
    "edm": EDM,
    "flow": RectifiedFlow,
}


def get_process(name: str, **kwargs) -> Process:
    """Build a process by name (``vp_discrete``, ``vp``, ``subvp``, ``ve``, ``edm``, ``flow``)."""
    try:
        cls = PROCESSES[name]
    except KeyError:
        raise UsageError(
            f"unknown process {name!r}; choose one of {sorted(PROCESSES)}"
        ) from None
    return cls(**kwargs)
