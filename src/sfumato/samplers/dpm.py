"""Exponential integrators: DPM-Solver (Lu et al. 2022a) and DPM-Solver++ (Lu et al. 2022b).

In σ-space (x = x0 + sigma eps, the VP alpha divided out) every formula of both papers holds
with alpha_t = 1 and sigma_t = sigma. With lambda = -log(sigma), a step sigma -> sigma_next
has length h = log(sigma / sigma_next) and the exact solution of the PF-ODE is

    x_next = (sigma_next / sigma) x + int_0^h e^{-(h - tau)} D(lambda + tau) dtau       (data)
           = x - sigma_next int_0^h e^{h - tau} eps(lambda + tau) dtau                   (noise)

(Lu et al. 2022a, Prop. 3.1, and its data-prediction form in Lu et al. 2022b, sec. 4).
DPM-Solver approximates eps by a Taylor polynomial in lambda (noise prediction), DPM-Solver++
approximates D (data prediction);
:mod:`sfumato.samplers._exp` has the phi functions. The first-order member of both families
is x_next = (sigma_next / sigma) x + (1 - sigma_next / sigma) D, i.e. Euler / DDIM exactly.

The step into sigma = 0 (h = inf, see :mod:`sfumato.sigmas`): the single-step solvers
(DPM-Solver-2/3, DPM-Solver++(2S) and its ancestral form) and the SDE solvers with eta > 0
take that first-order step, x_next = D(x, sigma), the posterior mean. The multistep ODE
solvers (DPM-Solver++(2M), (3M), and the SDE forms with eta = 0) take an Adams-Bashforth step
in sigma over their last ``final_order`` PF-ODE slopes, at most 3 (default 3;
:func:`sfumato.samplers._common.final_step`; ``final_order=1`` gives x = D). A grid that ends
at sigma_min > 0 has no step into 0.

All scalar coefficients are computed in float64 from the grid; the state stays in the working
dtype of :mod:`sfumato.samplers._common`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from itertools import pairwise

import torch

from ..errors import UsageError
from ._common import (
    Callback,
    Generator,
    ancestral_step,
    final_step,
    finish,
    noise_like,
    prepare,
    report,
)
from ._exp import log_ratio, phi, step_order

__all__ = [
    "sample_dpm_solver_2",
    "sample_dpm_solver_3",
    "sample_dpmpp_2s",
    "sample_dpmpp_2s_ancestral",
    "sample_dpmpp_2m",
    "sample_dpmpp_3m",
    "sample_dpmpp_2m_sde",
    "sample_dpmpp_3m_sde",
]


def _check_ratio(name: str, r: float) -> None:
    if not 0 < r <= 1:
        raise UsageError(f"{name} must be in (0, 1] (a fraction of the step in lambda); got {r!r}")


def _check_noise(eta: float, s_noise: float) -> None:
    if eta < 0 or not math.isfinite(eta):
        raise UsageError(f"eta must be a finite number >= 0; got {eta!r}")
    if s_noise < 0 or not math.isfinite(s_noise):
        raise UsageError(f"s_noise must be a finite number >= 0; got {s_noise!r}")


# ---------------------------------------------------------------------------------------
# DPM-Solver (noise prediction), single-step
# ---------------------------------------------------------------------------------------
def _single_step(denoiser: Callable, x: torch.Tensor, sigmas: torch.Tensor, cond: dict,
                 step: Callable, callback: Callback) -> torch.Tensor:
    """Drive a single-step method: ``step(model, x, D(x, sigma), sigma, sigma_next)`` gives
    x at sigma_next (float sigmas); the step into sigma = 0 is the first-order x = D."""
    model, x, sigmas, dtype = prepare(denoiser, x, sigmas, cond)
    s = sigmas.double().cpu().tolist()
    for i in range(len(s) - 1):
        denoised = model(x, sigmas[i])
        x = denoised if s[i + 1] == 0 else step(model, x, denoised, s[i], s[i + 1])
        report(callback, i, x, sigmas[i], sigmas[i + 1], denoised)
    return finish(x, dtype)


@torch.no_grad()
def sample_dpm_solver_2(denoiser: Callable, x: torch.Tensor, sigmas: torch.Tensor, *,
                        r1: float = 0.5, generator: Generator = None, callback: Callback = None,
                        **cond) -> torch.Tensor:
    """DPM-Solver-2, single-step, noise prediction (Lu et al. 2022a, Alg. 1).

    With eps_hat(x, s) = (x - D(x, s)) / s, lambda_mid = lambda + r1 h, s_mid = sigma e^{-r1 h}::

        u      = x - s_mid (e^{r1 h} - 1) eps_hat(x, sigma)
        x_next = x - sigma_next (e^h - 1) eps_hat(x, sigma)
                   - sigma_next (e^h - 1) / (2 r1) (eps_hat(u, s_mid) - eps_hat(x, sigma))

    Order 2 for any r1 in (0, 1] (r1 = 1/2 is the exponential midpoint rule). 2 NFE per step;
    the step into sigma = 0 is first order (x = D, 1 NFE). ``generator`` is unused.
    """
    _check_ratio("r1", r1)

    def step(model, x, denoised, sigma, sigma_next):
        h = log_ratio(sigma, sigma_next)
        s_mid = sigma * math.exp(-r1 * h)
        eps = (x - denoised) / sigma
        u = x - (s_mid * math.expm1(r1 * h)) * eps
        eps_mid = (u - model(u, s_mid)) / s_mid
        c = sigma_next * math.expm1(h)
        return x - c * eps - (c / (2 * r1)) * (eps_mid - eps)

    return _single_step(denoiser, x, sigmas, cond, step, callback)


@torch.no_grad()
def sample_dpm_solver_3(denoiser: Callable, x: torch.Tensor, sigmas: torch.Tensor, *,
                        r1: float = 1 / 3, r2: float = 2 / 3, generator: Generator = None,
                        callback: Callback = None, **cond) -> torch.Tensor:
    """DPM-Solver-3, single-step, noise prediction (Lu et al. 2022a, Alg. 2).

    With s_j = sigma e^{-r_j h} (lambda_j = lambda + r_j h) and eps_0 = eps_hat(x, sigma)::

        u_1 = x - s_1 (e^{r1 h} - 1) eps_0
        D_1 = eps_hat(u_1, s_1) - eps_0
        u_2 = x - s_2 (e^{r2 h} - 1) eps_0 - s_2 (r2 / r1) ((e^{r2 h} - 1) / (r2 h) - 1) D_1
        D_2 = eps_hat(u_2, s_2) - eps_0
        x_next = x - sigma_next (e^h - 1) eps_0 - (sigma_next / r2) ((e^h - 1) / h - 1) D_2

    ((e^z - 1) / z - 1 = z phi_2(z).) Order 3 for the paper's r1 = 1/3, r2 = 2/3; 3 NFE per
    step, the step into sigma = 0 first order (x = D, 1 NFE). ``generator`` is unused.
    """
    _check_ratio("r1", r1)
    _check_ratio("r2", r2)
    if not r1 < r2:
        raise UsageError(f"need r1 < r2; got r1={r1!r}, r2={r2!r}")

    def step(model, x, denoised, sigma, sigma_next):
        h = log_ratio(sigma, sigma_next)
        s1, s2 = sigma * math.exp(-r1 * h), sigma * math.exp(-r2 * h)
        eps = (x - denoised) / sigma
        u1 = x - (s1 * math.expm1(r1 * h)) * eps
        d1 = (u1 - model(u1, s1)) / s1 - eps
        u2 = (x - (s2 * math.expm1(r2 * h)) * eps
              - (s2 * r2 / r1 * r2 * h * phi(2, r2 * h)) * d1)
        d2 = (u2 - model(u2, s2)) / s2 - eps
        return x - (sigma_next * math.expm1(h)) * eps - (sigma_next / r2 * h * phi(2, h)) * d2

    return _single_step(denoiser, x, sigmas, cond, step, callback)


# ---------------------------------------------------------------------------------------
# DPM-Solver++ (data prediction), single-step
# ---------------------------------------------------------------------------------------
def _dpmpp_2s_step(model, x: torch.Tensor, denoised: torch.Tensor, sigma: float,
                   sigma_to: float, r: float) -> torch.Tensor:
    """One DPM-Solver++(2S) step sigma -> sigma_to > 0 (Lu et al. 2022b, Alg. 1)."""
    h = log_ratio(sigma, sigma_to)
    s_mid = sigma * math.exp(-r * h)
    u = (s_mid / sigma) * x - math.expm1(-r * h) * denoised
    d = (1 - 1 / (2 * r)) * denoised + (1 / (2 * r)) * model(u, s_mid)
    return (sigma_to / sigma) * x - math.expm1(-h) * d


@torch.no_grad()
def sample_dpmpp_2s(denoiser: Callable, x: torch.Tensor, sigmas: torch.Tensor, *,
                    r: float = 0.5, generator: Generator = None, callback: Callback = None,
                    **cond) -> torch.Tensor:
    """DPM-Solver++(2S), single-step, data prediction (Lu et al. 2022b, Alg. 1).

    With s_mid = sigma e^{-r h} (lambda_mid = lambda + r h) and D_0 = D(x, sigma)::

        u      = (s_mid / sigma) x - (e^{-r h} - 1) D_0
        D_r    = (1 - 1 / (2r)) D_0 + 1 / (2r) D(u, s_mid)
        x_next = (sigma_next / sigma) x - (e^{-h} - 1) D_r

    Order 2; 2 NFE per step, the step into sigma = 0 first order (x = D, 1 NFE).
    ``generator`` is unused.
    """
    _check_ratio("r", r)

    def step(model, x, denoised, sigma, sigma_next):
        return _dpmpp_2s_step(model, x, denoised, sigma, sigma_next, r)

    return _single_step(denoiser, x, sigmas, cond, step, callback)


@torch.no_grad()
def sample_dpmpp_2s_ancestral(denoiser: Callable, x: torch.Tensor, sigmas: torch.Tensor, *,
                              eta: float = 1.0, s_noise: float = 1.0, r: float = 0.5,
                              generator: Generator = None, callback: Callback = None,
                              **cond) -> torch.Tensor:
    """DPM-Solver++(2S) ancestral: a 2S step (:func:`sample_dpmpp_2s`) from sigma to
    sigma_down, then fresh noise of std s_noise * sigma_up, with (sigma_down, sigma_up) from
    :func:`~sfumato.samplers._common.ancestral_step` (eta = 1: DDPM's posterior variance).

    2 NFE per step (1 where sigma_down = 0, i.e. the step into sigma = 0, which lands on D).
    eta = 0 is :func:`sample_dpmpp_2s`.
    """
    _check_noise(eta, s_noise)
    _check_ratio("r", r)
    model, x, sigmas, dtype = prepare(denoiser, x, sigmas, cond)
    for i, (sigma, sigma_next) in enumerate(pairwise(sigmas)):
        denoised = model(x, sigma)
        down, up = ancestral_step(sigma, sigma_next, eta)
        down, up = float(down), float(up)
        x = denoised if down == 0 else _dpmpp_2s_step(model, x, denoised, float(sigma), down, r)
        if up > 0 and s_noise > 0:
            x = x + noise_like(x, generator, "dpmpp_2s_ancestral with eta > 0") * (s_noise * up)
        report(callback, i, x, sigma, sigma_next, denoised)
    return finish(x, dtype)


# ---------------------------------------------------------------------------------------
# DPM-Solver++ multistep, ODE and SDE
# ---------------------------------------------------------------------------------------
def _dpmpp_multistep(denoiser: Callable, x: torch.Tensor, sigmas: torch.Tensor, cond: dict, *,
                     order: int, eta: float, s_noise: float, solver_type: str,
                     lower_order_final: bool, generator: Generator, callback: Callback,
                     caller: str, final_order: int) -> torch.Tensor:
    """The DPM-Solver++ multistep family, ODE (eta = 0) and SDE (eta > 0), orders 1-3.

    In lambda = -log(sigma) the SDE family sharing the PF-ODE's marginals is
    dx = (1 + eta) (D - x) dlambda + sqrt(2 eta) sigma dW, of which eta = 0 is the PF-ODE and
    eta = 1 the reverse diffusion SDE of SDE-DPM-Solver++ (Lu et al. 2022b, sec. 5). Its
    linear part is integrated exactly; with H = (1 + eta) h and D replaced by the polynomial
    p(tau / h) = D_0 + (tau / h) D1 + (tau / h)^2 D2 through the last denoised values,

        x_next = (sigma_next / sigma) e^{-eta h} x + int_0^H e^{-(H - u)} p(u / H) du + noise
               = (sigma_next / sigma) e^{-eta h} x
                 + H phi_1(-H) D_0 + H phi_2(-H) D1 + 2 H phi_3(-H) D2
                 + s_noise sigma_next sqrt(1 - e^{-2 eta h}) z.

    D1 (= h D'(lambda) + O(h^3)) and D2 (= h^2 D''(lambda) / 2 + O(h^3)) are divided
    differences of the last three denoised values with r0 = h_prev / h, r1 = h_prevprev / h.
    Order 2 uses D1 = (D_0 - D_prev) / r0 with coefficient H phi_1(-H) / 2 ("midpoint",
    DPM-Solver++(2M), Lu et al. 2022b Alg. 2) or H phi_2(-H) ("heun", the exact integral of
    the linear interpolant). Warm-up with orders 1, 2; ``lower_order_final`` as in
    :func:`sfumato.samplers._exp.step_order`. The step into sigma = 0 (h infinite) is, for the
    ODE (eta = 0), an Adams-Bashforth step in sigma over the last min(``final_order``, 3)
    slopes (:func:`sfumato.samplers._common.final_step`); with noise (eta > 0) it is x = D.
    ``caller`` names the public sampler in the error for a missing generator.
    """
    model, x, sigmas, dtype = prepare(denoiser, x, sigmas, cond)
    s = sigmas.double().cpu().tolist()
    hist: list[torch.Tensor] = []  # previous denoised, most recent last
    hs: list[float] = []  # previous step lengths in lambda, most recent last
    slopes: list[tuple[float, torch.Tensor]] = []  # (sigma, (x - D) / sigma), most recent last
    for i in range(len(s) - 1):
        sigma, sigma_next = s[i], s[i + 1]
        denoised = model(x, sigmas[i])
        slopes = (slopes + [(sigma, (x - denoised) / sigma)])[-3:]
        if sigma_next == 0:
            x = final_step(x, slopes, order=final_order) if eta == 0 else denoised
        else:
            h = log_ratio(sigma, sigma_next)
            hh = (1 + eta) * h
            x = (sigma_next / sigma * math.exp(-eta * h)) * x + (hh * phi(1, -hh)) * denoised
            k = step_order(order, len(hist) + 1, i, s, lower_order_final)
            if k >= 2:
                r0 = hs[-1] / h
                d1_0 = (denoised - hist[-1]) / r0
                if k == 2:
                    c1 = 0.5 * hh * phi(1, -hh) if solver_type == "midpoint" else hh * phi(2, -hh)
                    x = x + c1 * d1_0
                else:
                    r1 = hs[-2] / h
                    d1_1 = (hist[-1] - hist[-2]) / r1
                    d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
                    d2 = (d1_0 - d1_1) / (r0 + r1)
                    x = x + (hh * phi(2, -hh)) * d1 + (2 * hh * phi(3, -hh)) * d2
            if eta > 0 and s_noise > 0:
                std = sigma_next * math.sqrt(-math.expm1(-2 * eta * h)) * s_noise
                x = x + noise_like(x, generator, caller) * std
            hist = (hist + [denoised])[-(order - 1):] if order > 1 else []
            hs = (hs + [h])[-(order - 1):] if order > 1 else []
        report(callback, i, x, sigmas[i], sigmas[i + 1], denoised)
    return finish(x, dtype)


@torch.no_grad()
def sample_dpmpp_2m(denoiser: Callable, x: torch.Tensor, sigmas: torch.Tensor, *,
                    final_order: int = 3, generator: Generator = None,
                    callback: Callback = None, **cond) -> torch.Tensor:
    """DPM-Solver++(2M), multistep, data prediction (Lu et al. 2022b, Alg. 2).

    With r = h_prev / h and D_i = D(x_i, sigma_i)::

        D      = (1 + 1 / (2r)) D_i - 1 / (2r) D_{i-1}
        x_next = (sigma_next / sigma) x - (e^{-h} - 1) D

    Order 2, 1 NFE per step. The first step is first order; the step into sigma = 0 is an
    Adams-Bashforth step in sigma of order ``final_order`` (at most 3) over the stored slopes
    (:func:`sfumato.samplers._common.final_step`; 1 gives x = D). ``generator`` is unused.
    """
    return _dpmpp_multistep(denoiser, x, sigmas, cond, order=2, eta=0.0, s_noise=0.0,
                            solver_type="midpoint", lower_order_final=False, generator=None,
                            callback=callback, caller="dpmpp_2m", final_order=final_order)


@torch.no_grad()
def sample_dpmpp_3m(denoiser: Callable, x: torch.Tensor, sigmas: torch.Tensor, *,
                    lower_order_final: bool = True, final_order: int = 3,
                    generator: Generator = None, callback: Callback = None,
                    **cond) -> torch.Tensor:
    """DPM-Solver++(3M), third-order multistep, data prediction (Lu et al. 2022b;
    the "multistep third update" of the authors' DPM-Solver v2 code).

    With r0 = h_prev / h, r1 = h_prevprev / h and the last three denoised values::

        D1_0 = (D_i - D_{i-1}) / r0,   D1_1 = (D_{i-1} - D_{i-2}) / r1
        D1   = D1_0 + r0 / (r0 + r1) (D1_0 - D1_1)         # h D'   + O(h^3)
        D2   = (D1_0 - D1_1) / (r0 + r1)                    # h^2 D'' / 2 + O(h^3)
        x_next = (sigma_next / sigma) x + h phi_1(-h) D_i + h phi_2(-h) D1 + 2 h phi_3(-h) D2

    In the reference code's notation (phi_1 = expm1(-h), phi_2 = phi_1 / h + 1,
    phi_3 = phi_2 / h - 1/2): x_next = (sigma_next / sigma) x - phi_1 D_i + phi_2 D1
    - 2 phi_3 D2. Note the factor 2 on the last term: D2 estimates half the second derivative,
    and the exact integral of the quadratic interpolant needs it (without it the D'' term is
    halved and the method is only second order; tests/test_samplers_dpm.py pins it).

    Order 3, 1 NFE per step; warm-up with orders 1, 2. With ``lower_order_final`` (default),
    grids of fewer than 15 steps end with orders 2, 1 before sigma_min
    (:func:`sfumato.samplers._exp.step_order`): on a Karras grid the last steps are long in
    lambda (h > 1), where the quadratic extrapolation of D costs accuracy. The step into
    sigma = 0 is an Adams-Bashforth step in sigma of order ``final_order`` (at most 3) over the
    stored slopes (:func:`sfumato.samplers._common.final_step`; 1 gives x = D).
    ``generator`` is unused.

    Asymptotically the first-order warm-up step caps the global order at 2 (its local error is
    O(h^2)); the pre-asymptotic order over practical step counts is close to 3 (measured in
    tests/test_samplers_dpm.py; errors per NFE in ``docs/samplers.md``).
    """
    return _dpmpp_multistep(denoiser, x, sigmas, cond, order=3, eta=0.0, s_noise=0.0,
                            solver_type="heun", lower_order_final=lower_order_final,
                            generator=None, callback=callback, caller="dpmpp_3m",
                            final_order=final_order)


@torch.no_grad()
def sample_dpmpp_2m_sde(denoiser: Callable, x: torch.Tensor, sigmas: torch.Tensor, *,
                        eta: float = 1.0, s_noise: float = 1.0, solver_type: str = "midpoint",
                        final_order: int = 3, generator: Generator = None,
                        callback: Callback = None, **cond) -> torch.Tensor:
    """SDE-DPM-Solver++(2M) (Lu et al. 2022b, sec. 5 / App.), generalised to eta >= 0.

    With h_eta = (1 + eta) h and D1 = (D_i - D_{i-1}) / r, r = h_prev / h::

        x_next = (sigma_next / sigma) e^{-eta h} x + (1 - e^{-h_eta}) D_i + c D1
                 + s_noise sigma_next sqrt(1 - e^{-2 eta h}) z

    with c = (1 - e^{-h_eta}) / 2 (``solver_type="midpoint"``) or
    c = h_eta phi_2(-h_eta) = 1 - (1 - e^{-h_eta}) / h_eta (``"heun"``). eta = 1 is the paper's
    SDE solver; eta = 0 with "midpoint" is exactly :func:`sample_dpmpp_2m`. 1 NFE per step;
    the first step is first order. The step into sigma = 0 lands on D when eta > 0 (the
    default); with eta = 0 it is the Adams-Bashforth step of order ``final_order`` (at most 3)
    of :func:`sample_dpmpp_2m`.
    """
    _check_noise(eta, s_noise)
    if solver_type not in ("midpoint", "heun"):
        raise UsageError(f"solver_type must be 'midpoint' or 'heun'; got {solver_type!r}")
    return _dpmpp_multistep(denoiser, x, sigmas, cond, order=2, eta=eta, s_noise=s_noise,
                            solver_type=solver_type, lower_order_final=False, generator=generator,
                            callback=callback, caller="dpmpp_2m_sde with eta > 0",
                            final_order=final_order)


@torch.no_grad()
def sample_dpmpp_3m_sde(denoiser: Callable, x: torch.Tensor, sigmas: torch.Tensor, *,
                        eta: float = 1.0, s_noise: float = 1.0, lower_order_final: bool = True,
                        final_order: int = 3, generator: Generator = None,
                        callback: Callback = None, **cond) -> torch.Tensor:
    """SDE-DPM-Solver++(3M): the third-order multistep data-prediction update with the linear
    part and noise of the eta-SDE integrated exactly (Lu et al. 2022b, sec. 5; the 3M SDE
    variant popularised by k-diffusion, after Gonzalez et al. 2023)::

        x_next = (sigma_next / sigma) e^{-eta h} x + H phi_1(-H) D_i + H phi_2(-H) D1
                 + 2 H phi_3(-H) D2 + s_noise sigma_next sqrt(1 - e^{-2 eta h}) z,

    H = (1 + eta) h, D1 and D2 as in :func:`sample_dpmpp_3m` (the D2 coefficient is the exact
    integral of the quadratic interpolant, twice k-diffusion's). eta = 0 is exactly
    :func:`sample_dpmpp_3m` (``lower_order_final`` and ``final_order`` likewise). 1 NFE per
    step; warm-up with orders 1, 2. The step into sigma = 0 lands on D when eta > 0 (the
    default); with eta = 0 it is that of :func:`sample_dpmpp_3m`.
    """
    _check_noise(eta, s_noise)
    return _dpmpp_multistep(denoiser, x, sigmas, cond, order=3, eta=eta, s_noise=s_noise,
                            solver_type="heun", lower_order_final=lower_order_final,
                            generator=generator, callback=callback,
                            caller="dpmpp_3m_sde with eta > 0", final_order=final_order)
