"""Null-text inversion (Mokady et al. 2023): exact reconstruction under classifier-free guidance.

Plain DDIM inversion follows the conditional model's ODE; sampling back with guidance w > 1
follows another one, so the image drifts (Mokady et al. 2023, §3). Null-text inversion keeps
the network and the prompt and instead tunes the *unconditional* branch, once per step:

1. the pivot: invert at w = 1 (here solved exactly, :func:`sfumato.edit.invert`), giving
   states x*_0 (noise) ... x*_N = x0 on the grid σ_0 > ... > σ_N = 0;
2. from x̄_0 = x*_0, for each step i optimise ∅_i so the guided DDIM step lands on the pivot,
   ``min_∅ ‖x*_{i+1} − Φ_i(x̄_i; ∅)‖²`` (their eq. (3); Adam, a few iterations, starting from
   ∅_{i-1}; their Algorithm 1), then ``x̄_{i+1} = Φ_i(x̄_i; ∅_i)``.

Φ_i is the DDIM (= Euler in σ-space) step ``x + (σ_{i+1} − σ_i)(x − D_w(x, σ_i))/σ_i``, as in
the paper. What is tuned, ∅_i, is an offset (B, E) added to the unconditional branch's
conditioning vector (the networks' ``extra_embedding``, E = their embedding width): the null
class's embedding for a class-conditional run, the null text's pooled embedding for a text
run. The conditional branch never sees it, and ∅_i = 0 is plain guidance. So the method works
for every conditional run here (the paper tunes the null prompt's token embeddings of a text
encoder; an offset of the conditioning vector is this code base's analogue, and a smaller one).

:class:`NullOffsetGuidance` is the guided denoiser with the fitted offsets, looked up by σ:
any sampler that calls it at the grid's levels in order (euler/ddim, and P2P built on them)
reproduces the image from the pivot's noise.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from ..errors import UsageError
from ..guidance import ClassifierFreeGuidance
from ..nets.embedding import ConditionEmbedding
from ..samplers._common import check_sigmas
from .inversion import _rms, invert

__all__ = ["NullTextInversion", "NullOffsetGuidance", "embedding_width", "null_text_invert"]

_KEY = "extra_embedding"


class NullTextInversion(NamedTuple):
    """x_T (B, C, H, W) at ``sigmas[0]`` (divide by it for unit noise), the per-step offsets
    (N, B, E) of the unconditional conditioning vector, the grid (N + 1,) and the final
    per-image RMS distance of the pivot path (N, B) reached at each step."""

    x_T: torch.Tensor
    offsets: torch.Tensor
    sigmas: torch.Tensor
    step_error: torch.Tensor


def embedding_width(net: nn.Module) -> int:
    """E, the width of ``net``'s conditioning vector (what ``extra_embedding`` must have)."""
    for m in net.modules():
        if isinstance(m, ConditionEmbedding):
            return int(m.emb_dim)
    raise UsageError(f"{type(net).__name__} has no conditioning embedding: null-text "
                     "inversion needs a sfumato UNet/DiT (extra_embedding)")


def _check_guided(guided: object) -> ClassifierFreeGuidance:
    if not isinstance(guided, ClassifierFreeGuidance) or guided.rescale or guided.sigma_interval:
        raise UsageError("null-text inversion tunes the unconditional branch of plain "
                         "classifier-free guidance: use guidance > 1 on a conditional run "
                         "(no rescale, no guidance interval)")
    return guided


class NullOffsetGuidance(nn.Module):
    """Classifier-free guidance whose unconditional branch gets offset ``offsets[i]`` at
    ``sigma == sigmas[i]``: ``forward(x, sigma, **cond)`` with x (B, ...) where B is a
    multiple of the offsets' batch n (images repeated in blocks of n, as P2P batches source
    and target). A level not on the grid is a UsageError (the offsets belong to the grid)."""

    def __init__(self, guided: ClassifierFreeGuidance, sigmas: torch.Tensor,
                 offsets: torch.Tensor) -> None:
        super().__init__()
        self.guided, self.sigmas, self.offsets = _check_guided(guided), sigmas, offsets
        if offsets.ndim != 3 or offsets.shape[0] != len(sigmas) - 1:
            raise UsageError(f"offsets must have shape (steps = {len(sigmas) - 1}, B, E); "
                             f"got {tuple(offsets.shape)}")

    def step_of(self, sigma: torch.Tensor | float) -> int:
        s = float(torch.as_tensor(sigma).reshape(-1)[0])
        hit = torch.isclose(self.sigmas[:-1].double(), torch.tensor(s, dtype=torch.float64),
                            rtol=1e-6, atol=0.0).nonzero()
        if not len(hit):
            raise UsageError(f"sigma {s:g} is not a level of the grid the null-text offsets "
                             "were fitted on: sample with the same sampler (euler) and steps")
        return int(hit[0])

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, **cond) -> torch.Tensor:
        delta = self.offsets[self.step_of(sigma)].to(x)
        if x.shape[0] % delta.shape[0]:
            raise UsageError(f"batch {x.shape[0]} is not a multiple of the {delta.shape[0]} "
                             "inverted images")
        return _guided_with(self.guided, delta.repeat(x.shape[0] // delta.shape[0], 1))(
            x, sigma, **cond)


def _guided_with(guided: ClassifierFreeGuidance, delta: torch.Tensor):
    """``guided`` with ``delta`` (B, E) added to the unconditional conditioning vector only."""
    g = ClassifierFreeGuidance(guided.denoiser, guided.scale,
                               uncond={**guided.uncond, _KEY: delta})

    def den(x: torch.Tensor, sigma, **cond) -> torch.Tensor:
        return g(x, sigma, **cond, **{_KEY: torch.zeros_like(delta)})

    return den


def _ddim_step(den, x: torch.Tensor, s: torch.Tensor, s_next: torch.Tensor, cond: dict
               ) -> torch.Tensor:
    """DDIM in σ-space (Song et al. 2021, eq. (12) with η = 0), written as
    :func:`sfumato.samplers.sample_ddim` writes it: D + σ' (x − D)/σ."""
    d = den(x, s.to(x).expand(x.shape[0]), **cond)
    return d + s_next.to(x) * ((x - d) / s.to(x))


def null_text_invert(guided: ClassifierFreeGuidance, x0: torch.Tensor, sigmas: torch.Tensor,
                     *, width: int, iters: int = 10, lr: float = 3e-2, tol: float = 1e-4,
                     pivot_iters: int = 20, **cond) -> NullTextInversion:
    """Null-text inversion of images x0 (B, C, H, W) for ``guided`` (classifier-free guidance,
    scale w) over ``sigmas`` (ending in 0), see the module docstring. ``width``: E
    (:func:`embedding_width` of the network). Per step at most ``iters`` Adam steps of
    learning rate ``lr``, stopping when every image's RMS distance to the pivot is below
    ``tol``; ``pivot_iters``: the solver iterations of the w = 1 pivot inversion."""
    guided = _check_guided(guided)
    check_sigmas(sigmas)
    pivot = invert(guided.denoiser, x0, sigmas, sampler="euler", iters=pivot_iters,
                   path=True, **cond)
    B = x0.shape[0]
    delta = torch.zeros(B, width, device=x0.device, dtype=torch.float32)
    x, offsets, errors = pivot[0], [], []
    for i in range(len(sigmas) - 1):
        s, s_next, target = sigmas[i], sigmas[i + 1], pivot[i + 1]
        delta = delta.detach().clone().requires_grad_(True)
        opt = torch.optim.Adam([delta], lr=lr)
        for _ in range(iters):
            with torch.enable_grad():
                err = _rms(_ddim_step(_guided_with(guided, delta), x, s, s_next, cond) - target)
                if bool((err < tol).all()):
                    break
                (grad,) = torch.autograd.grad(err.square().sum(), delta)
            delta.grad = grad
            opt.step()
        delta = delta.detach()
        with torch.no_grad():
            x = _ddim_step(_guided_with(guided, delta), x, s, s_next, cond)
        offsets.append(delta)
        errors.append(_rms(x - target))
    return NullTextInversion(pivot[0], torch.stack(offsets), sigmas, torch.stack(errors))
