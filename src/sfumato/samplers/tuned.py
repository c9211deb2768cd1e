"""A multistep solver given by its coefficient table: UniPC written out, or tuned to a model.

A data-prediction multistep solver with one NFE per step is nothing but the numbers
(P, C, F) on its grid (:class:`StepTable`; the form is in :mod:`sfumato.samplers._table`):
:func:`unipc_table` gives UniPC's (and :func:`sfumato.samplers.sample_unipc` is that table
run), and :func:`sfumato.calibrate.tune_coefficients` moves them to minimise the error on one
model's calibration draws, as the learned-solver papers do (Shaul et al. 2023, "Bespoke
solvers"; Zheng et al. 2023, "DPM-Solver-v3", empirical model statistics; Frankel et al. 2025,
"S4S: solving for a diffusion model solver"). :func:`sample_tabulated` runs any table. The
tuned tables keep sum_j F_j = -sigma_m, as UniPC's weights do, so they stay exact for a
constant denoiser.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..errors import UsageError
from ._common import Callback, Generator, finish, prepare
from ._table import StepTable, run_reporting, run_table
from .unipc import unipc_table

__all__ = ["StepTable", "unipc_table", "sample_tabulated", "run_table", "UNIPC_VARIANTS"]

#: the UniPC samplers whose coefficients a table holds (and tuning moves): name -> variant
UNIPC_VARIANTS = {"unipc": "bh2", "unipc_bh1": "bh1", "unipc_bh2": "bh2"}


@torch.no_grad()
def sample_tabulated(denoiser: Callable, x: torch.Tensor, sigmas: torch.Tensor, *,
                     table: StepTable | dict, generator: Generator = None,
                     callback: Callback = None, **cond) -> torch.Tensor:
    """Multistep sampler with the coefficients of ``table`` (a :class:`StepTable` or its
    dict, e.g. from :func:`sfumato.calibrate.tune_coefficients` or :func:`unipc_table`),
    on the table's own grid, which ``sigmas`` must equal. 1 NFE per step.
    ``generator`` is unused (deterministic)."""
    table = table if isinstance(table, StepTable) else StepTable.from_dict(table)
    model, x, sigmas, dtype = prepare(denoiser, x, sigmas, cond)
    s = sigmas.double().cpu()
    ts = torch.tensor(table.sigmas, dtype=torch.float64)
    if s.shape != ts.shape or not torch.allclose(s, ts, rtol=1e-6, atol=0):
        raise UsageError(f"sigmas {s.tolist()} are not the grid the table was made for "
                         f"{table.sigmas}: pass table.sigmas")
    return finish(run_reporting(model, x, sigmas, table, callback), dtype)
