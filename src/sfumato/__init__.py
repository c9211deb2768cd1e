"""sfumato: diffusion generative models in one σ-space.

Every forward process is ``x_t = s(t) (x0 + sigma(t) eps)``; samplers work on the scaled-out
state ``x = x0 + sigma eps`` with a denoiser ``D(x, sigma, **cond) -> x0_hat``.

Modules: :mod:`sfumato.process` (forward processes), :mod:`sfumato.denoiser`
(preconditioning), :mod:`sfumato.sigmas` (grids), :mod:`sfumato.samplers` (sampler
functions), :mod:`sfumato.likelihood`, :mod:`sfumato.mixture` (exact Gaussian-mixture model),
:mod:`sfumato.accuracy` (convergence and distribution checks), :mod:`sfumato.nets`,
:mod:`sfumato.data`, :mod:`sfumato.metrics`, :mod:`sfumato.train`.

High level: ``sfumato.train(config, out=DIR)``, ``sfumato.distill(DIR, method, out=STUDENT)``
(:mod:`sfumato.distill`), ``sfumato.finetune(DIR, images=FOLDER, token="sks", out=RUN)``
(:mod:`sfumato.personalize`), ``model = sfumato.load(DIR)``,
``model.sample(n, sampler=..., steps=..., seed=...).x``; :mod:`sfumato.run` owns what a run
directory is (:class:`Run`), :func:`sfumato.evaluate` scores one.
"""

# distill is a package that is also callable: sfumato.distill(teacher, method, out=...)
from . import denoiser, distill, mixture, process, samplers, sigmas
from .denoiser import Denoiser, EDMDenoiser
from .errors import SfumatoError
from .model import Model, Samples, evaluate, load
from .personalize.finetune import finetune
from .run import Run
from .samplers import SAMPLERS, get_sampler, sample
from .train.trainer import train

__version__ = "0.1.0"

__all__ = [
    "Model",
    "Run",
    "Samples",
    "SfumatoError",
    "evaluate",
    "load",
    "train",
    "distill",
    "finetune",
    "sample",
    "Denoiser",
    "EDMDenoiser",
    "SAMPLERS",
    "get_sampler",
    "denoiser",
    "process",
    "samplers",
    "sigmas",
    "mixture",
    "__version__",
]
