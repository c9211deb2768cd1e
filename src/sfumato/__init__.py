"""sfumato: diffusion generative models in one σ-space.

Every forward process is ``x_t = s(t) (x0 + sigma(t) eps)``; samplers work on the scaled-out
state ``x = x0 + sigma eps`` with a denoiser ``D(x, sigma, **cond) -> x0_hat``.

Modules: :mod:`sfumato.process` (forward processes), :mod:`sfumato.denoiser`
(preconditioning), :mod:`sfumato.sigmas` (grids), :mod:`sfumato.samplers` (sampler
functions), :mod:`sfumato.likelihood`, :mod:`sfumato.toy` (exact Gaussian-mixture model),
:mod:`sfumato.check` (convergence and distribution checks), :mod:`sfumato.nets`,
:mod:`sfumato.data`, :mod:`sfumato.metrics`, :mod:`sfumato.train`.

High level: ``sfumato.train(config, out=DIR)``, ``model = sfumato.load(DIR)``,
``model.sample(n, sampler=..., steps=..., seed=...)``.
"""

from . import denoiser, process, samplers, sigmas, toy
from .api import Model, load
from .denoiser import Denoiser, EDMDenoiser
from .samplers import SAMPLERS, get_sampler, sample
from .train.trainer import train

__version__ = "0.1.0"

__all__ = [
    "Model",
    "load",
    "train",
    "sample",
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
