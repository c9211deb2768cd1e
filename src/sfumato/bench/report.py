"""Reading the benchmark's results: best-of per NFE with a bootstrap interval, the text table
and summary, the error-vs-NFE plot and the JSON payload.

Rows fitted to the model (a result's ``calibration``, :mod:`sfumato.bench.calibrated`) are
shown in their own block of the table, marked ``fitted``, and the summary gives the best
method without them too.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import UsageError
from .calibrated import CALIBRATIONS
from .problem import Problem
from .results import Result

__all__ = ["ratio_interval", "summarize", "format_table", "format_summary", "plot_errors",
           "best_methods", "results_payload", "BOOTSTRAP_DRAWS"]

BOOTSTRAP_DRAWS = 2000
_FITTED = " / ".join(CALIBRATIONS.values())  # "optimized grid / tuned coefficients"


def ratio_interval(a: torch.Tensor, b: torch.Tensor, level: float = 0.9,
                   draws: int = BOOTSTRAP_DRAWS, seed: int = 0) -> tuple[float, float]:
    """Paired bootstrap interval of the RMS ratio ``sqrt(mean a) / sqrt(mean b)``.

    ``a``, ``b``: (B,) per-sample mean squared errors of two methods on the same noise draws.
    Samples are redrawn with replacement (the same indices for both methods) ``draws`` times;
    returns the central ``level`` interval. The RMS error of an ODE solver on a mixture is
    heavy-tailed in the samples -- the few trajectories that cross between modes late carry
    most of it (on ``img3`` at NFE 5, 1 % of the samples carry ~60 % of the squared error) --
    so the ratio measured on one draw of noise needs this interval next to it.
    """
    if a.shape != b.shape or a.ndim != 1:
        raise UsageError(f"need two (B,) tensors of per-sample errors; got {tuple(a.shape)} "
                         f"and {tuple(b.shape)}")
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, a.shape[0], (draws, a.shape[0]), generator=g)
    r = (a.double()[idx].mean(1) / b.double()[idx].mean(1).clamp(min=1e-300)).sqrt()
    lo, hi = torch.quantile(r, torch.tensor([(1 - level) / 2, (1 + level) / 2],
                                            dtype=torch.float64)).tolist()
    return lo, hi


def summarize(results: Sequence[Result], nfes: Sequence[int]) -> dict[int, dict[str, Any]]:
    """Per NFE: best sfumato (fixed-grid samplers only), best diffusers, their ratio and the
    ratio's 90 % paired bootstrap interval ``ratio_ci`` (:func:`ratio_interval`; None when
    per-sample errors are missing); when optimised grids or tuned solvers ran, also the best
    sfumato method without them (``sfumato_generic``, ``sfumato_generic_error``,
    ``ratio_generic``)."""
    out: dict[int, dict[str, Any]] = {}
    for k in nfes:
        row: dict[str, Any] = {}
        best: dict[str, Result] = {}
        for fam in ("sfumato", "diffusers"):
            cands = [r for r in results if r.family == fam and r.nfe_target == k and r.valid]
            generic = [r for r in cands if r.calibration is None]
            if fam == "sfumato" and len(generic) < len(cands):
                g = min(generic, key=lambda r: r.error) if generic else None
                row["sfumato_generic"] = g.method if g else None
                row["sfumato_generic_error"] = g.error if g else None
            if cands:
                b = best[fam] = min(cands, key=lambda r: r.error)
                row[fam], row[f"{fam}_error"], row[f"{fam}_nfe"] = b.method, b.error, b.nfe
            else:
                row[fam], row[f"{fam}_error"], row[f"{fam}_nfe"] = None, None, None
        se, de = row["sfumato_error"], row["diffusers_error"]
        row["ratio"] = se / de if se is not None and de else None
        if row.get("sfumato_generic_error") is not None and de:
            row["ratio_generic"] = row["sfumato_generic_error"] / de
        mses = [best[f].sample_mse for f in best]  # both present whenever ratio is
        row["ratio_ci"] = (ratio_interval(*mses) if row["ratio"] is not None
                           and None not in mses else None)
        out[k] = row
    return out


def _fmt(r: Result | None) -> str:
    if r is None:
        return "-"
    if r.status == "ok":
        return f"{r.error:.2e}"
    return {"nan": "NaN", "error": "error", "n/a": "n/a", "skipped": "skip"}.get(r.status, "?")


def format_table(results: Sequence[Result], nfes: Sequence[int]) -> str:
    """Rows = method, columns = NFE, values = RMS error vs the reference ODE solution; one block
    per family, the methods fitted to the model in their own block (``fitted``)."""
    methods: dict[tuple[str, str], dict[int, Result]] = {}
    for r in results:
        methods.setdefault((_group(r), r.method), {})[r.nfe_target] = r
    width = max([11 + len(m) for _, m in methods] + [20]) + 1
    head = f"{'method':<{width}}" + "".join(f"{'NFE ' + str(k):>11}" for k in nfes)
    lines = [head, "-" * len(head)]
    last_family = None
    for (fam, m), cells in methods.items():
        if last_family is not None and fam != last_family:
            lines.append("")
        last_family = fam
        label = f"{fam[:9]:<9}  {m}"
        lines.append(f"{label:<{width}}" + "".join(f"{_fmt(cells.get(k)):>11}" for k in nfes))
    if any(fam == "fitted" for fam, _ in methods):
        lines += ["", f"fitted: sfumato samplers fitted to this model ({_FITTED}); the fit's "
                      "offline cost is not in the NFE"]
    return "\n".join(lines)


def format_summary(summary: dict[int, dict[str, Any]]) -> str:
    """One line per NFE of :func:`summarize`: best of each library, their ratio and its
    interval; a second line with the best method not fitted to the model, when one was."""
    lines = []
    for k, row in summary.items():
        s = f"{row['sfumato']} ({row['sfumato_error']:.2e})" if row["sfumato"] else "none"
        d = f"{row['diffusers']} ({row['diffusers_error']:.2e})" if row["diffusers"] else "none"
        ratio = f"{row['ratio']:.3f}" if row["ratio"] is not None else "n/a"
        if row.get("ratio_ci"):
            ratio += " (90% bootstrap interval {:.2f}-{:.2f})".format(*row["ratio_ci"])
        lines.append(f"NFE {k:>3}: best sfumato {s}  |  best diffusers {d}  |  ratio {ratio}")
        if row.get("ratio_generic") is not None:
            lines.append(f"         without fitted methods ({_FITTED}): "
                         f"{row['sfumato_generic']} "
                         f"({row['sfumato_generic_error']:.2e})  |  ratio "
                         f"{row['ratio_generic']:.3f}")
    return "\n".join(lines)


def _group(r: Result) -> str:
    """The block a result is shown in: its family, or ``fitted`` for a calibrated method."""
    return "fitted" if r.calibration else r.family


def best_methods(results: Sequence[Result], per_group: int) -> set[str]:
    """The ``per_group`` methods with the lowest geometric-mean error over the NFEs (a failed
    cell counts as 10) in each of sfumato, fitted and diffusers: what a plot can show."""
    score: dict[tuple[str, str], list[float]] = {}
    for r in results:
        if r.family in ("sfumato", "diffusers"):
            e = r.error if r.valid else 10.0
            score.setdefault((_group(r), r.method), []).append(math.log(max(e, 1e-12)))
    ranked = sorted((sum(v) / len(v), g, m) for (g, m), v in score.items())
    best: set[str] = set()
    for group in ("sfumato", "fitted", "diffusers"):
        best.update([m for _, g, m in ranked if g == group][:per_group])
    return best


def plot_errors(results: Sequence[Result], nfes: Sequence[int], path: str | Path,
                title: str = "") -> Path:
    """Error vs NFE on log-log axes, one line per method (sfumato solid, fitted to the model
    dotted, diffusers dashed); writes a PNG to ``path`` and returns it."""
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    path = Path(path)
    methods: dict[tuple[str, str], list[tuple[int, float]]] = {}
    for r in results:
        pts = methods.setdefault((_group(r), r.method), [])
        if r.valid and r.error > 0:
            pts.append((r.nfe if r.nfe else r.nfe_target, r.error))
    # the Agg canvas directly: no pyplot, no global backend switch
    fig = Figure(figsize=(9.5, 5.2), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    colors = matplotlib.colormaps["tab20"].colors
    for j, ((fam, m), pts) in enumerate(methods.items()):
        if not pts:
            continue
        pts.sort()
        xs, ys = zip(*pts, strict=True)
        sf = fam != "diffusers"
        style, who = {"fitted": (":", "sfumato, fitted"),
                      "diffusers": ("--", "diffusers")}.get(fam, ("-", "sfumato"))
        ax.plot(xs, ys, style, marker="o" if sf else "s", ms=4,
                color=colors[j % len(colors)], label=f"{who}: {m}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(list(nfes))
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("NFE (denoiser calls)")
    ax.set_ylabel("RMS error vs exact PF-ODE solution")
    ax.set_title(title or "sampler error vs NFE")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def _json_num(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def results_payload(problem: Problem, results: Sequence[Result], nfes: Sequence[int],
                    notes: Sequence[str] = ()) -> dict[str, Any]:
    """A JSON-able summary: problem, per-method errors per NFE, best-of per NFE, notes."""
    nfes = list(nfes)
    summary = summarize(results, nfes)
    methods: dict[str, dict[str, Any]] = {}
    for r in results:
        m = methods.setdefault(r.method, {"family": r.family, "calibration": r.calibration,
                                          "config": r.config,
                                          "errors": [None] * len(nfes),
                                          "nfe_used": [None] * len(nfes),
                                          "status": ["-"] * len(nfes),
                                          "notes": [""] * len(nfes)})
        j = nfes.index(r.nfe_target)
        m["errors"][j] = _json_num(r.error) if r.status == "ok" else None
        m["nfe_used"][j] = r.nfe
        m["status"][j] = r.status
        m["notes"][j] = r.note
    return {
        "problem": problem.info,
        "nfe": nfes,
        "methods": methods,
        "best": {str(k): {kk: _json_num(v) for kk, v in row.items()}
                 for k, row in summary.items()},
        "notes": list(notes),
    }
