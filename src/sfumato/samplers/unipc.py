"""UniPC (Zhao et al. 2023): unified predictor-corrector, data prediction, variants bh1/bh2.

Setting (σ-space, alpha = 1, lambda = -log sigma, h = lambda_next - lambda, hh = -h): the exact
step is x_next = (sigma_next / sigma) x + int_0^h e^{-(h - tau)} D(lambda + tau) dtau
(:mod:`sfumato.samplers._exp`). With the last denoised value m_0 = D(x, sigma) and earlier (or,
for the corrector, the new) values m_k at lambda + r_k h, D_k = (m_k - m_0) / r_k, UniPC writes
(Zhao et al. 2023, Alg. 1-3, in the data-prediction form)::

    x_next = (sigma_next / sigma) x - (e^{hh} - 1) m_0 - B(h) sum_k a_k D_k

and picks a so that the Taylor terms of the integral match up to the order wanted::

    sum_k a_k r_k^{n-1} = hh n! phi_{n+1}(hh) / B(h),     n = 1, 2, ...

(phi_n as in :mod:`sfumato.samplers._exp`; this is R_p a_p = g_p / B(h) with the Vandermonde
R_p = (r_k^{n-1})). B(h) = hh ("bh1") or e^{hh} - 1 ("bh2"). With one unknown the
leading-order value a_1 = 1/2 is used instead of the exact solve (as the authors'
implementation does; with exact solves B would cancel and bh1 = bh2).

- UniP-p (predictor) uses m_0 and p - 1 earlier values (r_k = (lambda_{i-k} - lambda_i) / h < 0):
  order p.
- UniC-p (corrector) adds the new value D(x_pred, sigma_next) at r = 1 and re-takes the step
  from the same x: order p + 1, and no extra NFE, because that evaluation is the next step's m_0.

:func:`unipc_table` writes these updates out as the coefficients of the table form of
:mod:`sfumato.samplers._table` (one predictor and one corrector row per step), and
:func:`sample_unipc` runs that table. The step into sigma = 0 (h = inf) is an Adams-Bashforth
step in sigma over the PF-ODE slopes at the last ``final_order`` evaluations (default 3;
:func:`sfumato.samplers._common.final_step`; ``final_order=1`` gives the first-order x = D);
no corrector follows the last step.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence

import torch

from ..errors import UsageError
from ._common import Callback, Generator, finish, lms_weights, prepare
from ._exp import log_ratio, phi, step_order
from ._table import StepTable, run_reporting

__all__ = ["sample_unipc", "sample_unipc_bh1", "sample_unipc_bh2", "unipc_coefficients",
           "unipc_table"]


def unipc_coefficients(h: float, rks: list[float], variant: str) -> tuple[float, list[float]]:
    """(B(h), a) for a UniPC update of step h > 0 with nodes r_k (len(a) == len(rks)).

    Solves sum_k a_k r_k^{n-1} = hh n! phi_{n+1}(hh) / B(h), n = 1..len(rks), in float64
    (Vandermonde in the distinct nodes r_k, never singular); one node gets a = [1/2].
    """
    hh = -h
    B = hh if variant == "bh1" else math.expm1(hh)
    p = len(rks)
    if p == 0:
        return B, []
    if p == 1:
        return B, [0.5]
    R = torch.tensor([[r ** (n - 1) for r in rks] for n in range(1, p + 1)], dtype=torch.float64)
    b = torch.tensor([hh * math.factorial(n) * phi(n + 1, hh) / B for n in range(1, p + 1)],
                     dtype=torch.float64)
    return B, torch.linalg.solve(R, b).tolist()


def _check_options(order: int, variant: str) -> None:
    if order not in (1, 2, 3, 4, 5):
        raise UsageError(f"order must be 1, 2, 3, 4 or 5; got {order!r}")
    if variant not in ("bh1", "bh2"):
        raise UsageError(f"variant must be 'bh1' or 'bh2'; got {variant!r}")


def unipc_table(sigmas: torch.Tensor | Sequence[float], *, order: int = 3,
                variant: str = "bh2", use_corrector: bool = True,
                lower_order_final: bool = True, final_order: int = 3) -> StepTable:
    """UniPC's coefficients on ``sigmas`` (n + 1 decreasing levels), with the options of
    :func:`sample_unipc`, as a :class:`~sfumato.samplers._table.StepTable`.

    Row i holds, for the step sigmas[i] -> sigmas[i + 1] > 0, the coefficient of
    (m_{i-k} - m_i), which is -B(h) a_k / r_k with (B, a) from :func:`unipc_coefficients`
    (UniP-p, p from :func:`sfumato.samplers._exp.step_order`; UniC-p adds r = 1, the new
    value, last). The last step of a grid that ends above 0 has no corrector (it would need an
    evaluation nothing uses); without ``use_corrector`` the corrector row repeats the
    predictor's with 0 on the new value. Into 0: the Adams-Bashforth weights in sigma over the
    last ``final_order`` slopes (:func:`sfumato.samplers._common.lms_weights`).
    """
    _check_options(order, variant)
    s = [float(v) for v in torch.as_tensor(sigmas, dtype=torch.float64).tolist()]
    n = len(s) - 1
    lam = [-math.log(v) if v > 0 else math.inf for v in s]
    pred, corr, have = [], [], 1
    for i in range(n):
        if s[i + 1] == 0:
            break
        p = step_order(order, have, i, s, lower_order_final)
        h = log_ratio(s[i], s[i + 1])
        rks = [(lam[i - k] - lam[i]) / h for k in range(1, p)]
        B, a = unipc_coefficients(h, rks, variant)
        pred.append([-B * ak / r for ak, r in zip(a, rks, strict=True)])
        if use_corrector and i < n - 1:
            B, a = unipc_coefficients(h, rks + [1.0], variant)
            corr.append([-B * ak / r for ak, r in zip(a, rks + [1.0], strict=True)])
        else:  # x = x_pred: the predictor's row and nothing on the new value
            corr.append([] if i == n - 1 else pred[-1] + [0.0])
        have = min(have + 1, order)
    final = []
    if s[-1] == 0:
        nodes = s[max(0, n - max(final_order, 1)):n][::-1]  # newest first
        final = lms_weights(nodes, s[n - 1], 0.0)
    return StepTable(s, pred, corr, final)


@torch.no_grad()
def sample_unipc(denoiser: Callable, x: torch.Tensor, sigmas: torch.Tensor, *, order: int = 3,
                 variant: str = "bh2", use_corrector: bool = True,
                 lower_order_final: bool = True, final_order: int = 3,
                 generator: Generator = None, callback: Callback = None,
                 **cond) -> torch.Tensor:
    """UniPC multistep sampler (Zhao et al. 2023, Alg. 1-3): UniP-``order`` predictor, then the
    UniC corrector of the same order (one order higher) using the evaluation the next step
    needs anyway. 1 NFE per step. Runs the coefficients of :func:`unipc_table` on the grid
    (:func:`sfumato.samplers._table.run_table`).

    Args:
        order: 1 to 5 (predictor order; with the corrector the method is one order
            higher; Zhao et al. 2023 define UniP-p / UniC-p for any p, Alg. 1-2). The first
            steps warm up with orders 1, 2, ...
        variant: ``"bh1"`` (B(h) = hh) or ``"bh2"`` (B(h) = e^{hh} - 1); they differ only
            where a single coefficient is set to 1/2 (predictor of order 2, corrector of
            order 1, i.e. the warm-up and the tapered final steps).
        use_corrector: apply UniC after every step but the last.
        lower_order_final: on grids of fewer than 15 steps, the k-th last step to a positive
            sigma uses order at most k (see :func:`sfumato.samplers._exp.step_order`).
        final_order: order of the step into sigma = 0 (where log-sigma steps are infinite): an
            Adams-Bashforth step in sigma over the PF-ODE slopes (x - D) / sigma at the last
            ``final_order`` evaluations (:func:`sfumato.samplers._common.final_step`; 1 gives
            x = D(x, sigma)).

    ``generator`` is unused. Which order and variant to pick at which step count, as measured
    by the benchmark: ``docs/samplers.md``.
    """
    _check_options(order, variant)
    model, x, sigmas, dtype = prepare(denoiser, x, sigmas, cond)
    table = unipc_table(sigmas, order=order, variant=variant, use_corrector=use_corrector,
                        lower_order_final=lower_order_final, final_order=final_order)
    return finish(run_reporting(model, x, sigmas, table, callback), dtype)


def _with_variant(variant: str, b_of_h: str) -> Callable:
    """:func:`sample_unipc` with ``variant`` fixed, as a sampler of its own (same signature
    less ``variant``, so the registry and the benchmark see its ``order`` and options)."""

    def sampler(denoiser: Callable, x: torch.Tensor, sigmas: torch.Tensor,
                **kwargs) -> torch.Tensor:
        return sample_unipc(denoiser, x, sigmas, variant=variant, **kwargs)

    sig = inspect.signature(sample_unipc)
    sampler.__signature__ = sig.replace(
        parameters=[p for n, p in sig.parameters.items() if n != "variant"])
    sampler.__name__ = sampler.__qualname__ = f"sample_unipc_{variant}"
    sampler.__doc__ = (f"UniPC with B(h) = {b_of_h} (``variant={variant!r}``); see "
                       ":func:`sample_unipc`.")
    return sampler


sample_unipc_bh1 = _with_variant("bh1", "hh")
sample_unipc_bh2 = _with_variant("bh2", "e^{hh} - 1")
