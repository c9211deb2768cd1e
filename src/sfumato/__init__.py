"""sfumato: diffusion generative models in one σ-space.

Every forward process is ``x_t = s(t) (x0 + sigma(t) eps)``; samplers work on the scaled-out
state ``x = x0 + sigma eps`` with a denoiser ``D(x, sigma, **cond) -> x0_hat``.

Modules: :mod:`sfumato.process` (forward processes), :mod:`sfumato.denoiser`
(preconditioning), :mod:`sfumato.sigmas` (grids), :mod:`sfumato.samplers` (sampler
functions), :mod:`sfumato.likelihood`, :mod:`sfumato.toy` (exact Gaussian-mixture model),
:mod:`sfumato.check` (convergence and distribution checks).
"""

from . import denoiser, process, samplers, sigmas, toy
from .denoiser import Denoiser, EDMDenoiser
from .samplers import SAMPLERS, get_sampler

__version__ = "0.1.0"

__all__ = [
    "Denoiser",
    "EDMDenoiser",
    "SAMPLERS",
    "get_sampler",
    "denoiser",
    "process",
    "samplers",
    "sigmas",
    "toy",
    "__version__",
]
