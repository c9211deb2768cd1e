"""Samplers: plain functions ``sample_<name>(denoiser, x, sigmas, *, generator=None,
callback=None, **kwargs) -> x``.

``x`` starts as ``sigmas[0] * noise``; the result is at ``sigmas[-1]`` (normally 0). Extra
keyword arguments that are not the sampler's own parameters are passed to the denoiser as
conditioning. ``SAMPLERS`` maps every name to its function; :func:`get_sampler` looks one up
with a clear error.
"""

from __future__ import annotations

from collections.abc import Callable

from ..errors import UsageError, did_you_mean
from ._api import SAMPLING_DEFAULTS, initial_noise, sample, sample_from
from .adaptive import sample_rk45
from .consistency import sample_consistency
from .dpm import (
    sample_dpm_solver_2,
    sample_dpm_solver_3,
    sample_dpmpp_2m,
    sample_dpmpp_2m_sde,
    sample_dpmpp_2s,
    sample_dpmpp_2s_ancestral,
    sample_dpmpp_3m,
    sample_dpmpp_3m_sde,
)
from .karras import (
    sample_ddim,
    sample_ddpm,
    sample_edm,
    sample_euler,
    sample_euler_ancestral,
    sample_heun,
)
from .multistep import sample_lms, sample_plms
from .sde import sample_euler_maruyama, sample_pc
from .tuned import sample_tabulated
from .unipc import sample_unipc, sample_unipc_bh1, sample_unipc_bh2

SAMPLERS: dict[str, Callable] = {
    "euler": sample_euler,
    "heun": sample_heun,
    "edm": sample_edm,
    "ddim": sample_ddim,
    "euler_ancestral": sample_euler_ancestral,
    "ddpm": sample_ddpm,
    "lms": sample_lms,
    "plms": sample_plms,
    "dpm_solver_2": sample_dpm_solver_2,
    "dpm_solver_3": sample_dpm_solver_3,
    "dpmpp_2s": sample_dpmpp_2s,
    "dpmpp_2s_ancestral": sample_dpmpp_2s_ancestral,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_3m": sample_dpmpp_3m,
    "dpmpp_2m_sde": sample_dpmpp_2m_sde,
    "dpmpp_3m_sde": sample_dpmpp_3m_sde,
    "unipc": sample_unipc,
    "unipc_bh1": sample_unipc_bh1,
    "unipc_bh2": sample_unipc_bh2,
    "euler_maruyama": sample_euler_maruyama,
    "pc": sample_pc,
    "rk45": sample_rk45,
    "consistency": sample_consistency,
}

#: samplers that draw noise (given their default parameters)
STOCHASTIC: frozenset[str] = frozenset(
    {"euler_ancestral", "ddpm", "dpmpp_2m_sde", "dpmpp_3m_sde",
     "dpmpp_2s_ancestral", "euler_maruyama", "pc", "consistency"}
)


#: samplers that need an argument of their own besides the grid (not in ``SAMPLERS``, whose
#: members all run with their defaults): ``tabulated`` takes ``table=`` (a solver table, e.g.
#: tuned by :func:`sfumato.calibrate.tune_coefficients`)
TABLE_SAMPLERS: dict[str, Callable] = {"tabulated": sample_tabulated}


def get_sampler(name: str) -> Callable:
    """The sampler function registered under ``name`` (in ``SAMPLERS`` or
    ``TABLE_SAMPLERS``); a clear error lists the choices."""
    try:
        return SAMPLERS[name] if name in SAMPLERS else TABLE_SAMPLERS[name]
    except KeyError:
        raise UsageError(f"unknown sampler {name!r}{did_you_mean(name, SAMPLERS)}; choose one "
                         f"of: {', '.join(sorted(SAMPLERS))}") from None


__all__ = ["SAMPLERS", "SAMPLING_DEFAULTS", "STOCHASTIC", "TABLE_SAMPLERS", "get_sampler",
           "sample", "sample_from",
           "initial_noise", "sample_tabulated"] + [f.__name__ for f in SAMPLERS.values()]
