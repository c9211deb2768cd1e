"""Guidance: denoisers that wrap denoisers, so every sampler works with every kind of guidance.

Each class here is itself a σ-space denoiser ``guided(x, sigma, **cond) -> x0_hat``. The
samplers never know guidance exists. All three mix two predictions of x0 (posterior means)
linearly; because ``score = (D - x) / sigma^2`` is affine in D at fixed (x, sigma), mixing x0
predictions is exactly the usual mixing of scores / eps / v predictions.

=========================  =====================================================================
``ClassifierFreeGuidance``  D = D(x|∅) + w (D(x|c) - D(x|∅))          Ho & Salimans 2022, eq. (6)
                           optional rescale                           Lin et al. 2024, eq. (15-16)
                           optional sigma interval                    Kynkäänniemi et al. 2024
``ClassifierGuidance``      D = D(x) + s sigma^2 grad_x log p(y|x,σ)   Dhariwal & Nichol 2021,
                                                                      Alg. 1; Song et al. 2021,
                                                                      eq. (14) in σ-space
``AutoGuidance``            D = D_bad + w (D_good - D_bad)             Karras et al. 2024, eq. (2)
=========================  =====================================================================

A scale of 1 returns the unguided conditional model exactly (up to rounding); scale 0 returns
the reference branch (unconditional / bad model / no classifier).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from .errors import UsageError

Denoiser = Callable[..., torch.Tensor]

__all__ = ["GuidanceInput", "ClassifierFreeGuidance", "ClassifierGuidance", "AutoGuidance",
           "expand_null", "repeat_sigma",
           "NoisyClassifier", "in_interval"]


def in_interval(sigma: torch.Tensor | float, batch: int, interval: tuple[float, float] | None,
                device: torch.device) -> torch.Tensor:
    """(B,) bool: where guidance applies. ``interval=(lo, hi)`` keeps lo < sigma <= hi
    (Kynkäänniemi et al. 2024, eq. (3)); None keeps every level."""
    s = torch.as_tensor(sigma, device=device, dtype=torch.float64).reshape(-1)
    s = s.expand(batch) if s.numel() == 1 else s
    if interval is None:
        return torch.ones(batch, dtype=torch.bool, device=device)
    lo, hi = interval
    if not lo < hi:
        raise UsageError(f"sigma_interval must be (lo, hi) with lo < hi; got {interval}")
    return (s > lo) & (s <= hi)


def repeat_sigma(sigma: torch.Tensor | float, batch: int, k: int, device: torch.device
                 ) -> torch.Tensor:
    """``sigma`` for a batch of ``batch`` repeated ``k`` times (branches stacked in one call):
    a per-sample (batch,) level is repeated, a scalar stays as it is."""
    s = torch.as_tensor(sigma, device=device)
    return s.repeat(k) if s.ndim and s.numel() == batch else s


def _per_sample(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return w.to(x).reshape((-1,) + (1,) * (x.ndim - 1))


def _mix(ref: torch.Tensor, main: torch.Tensor, scale: float, active: torch.Tensor
         ) -> torch.Tensor:
    """ref + scale (main - ref) where ``active``, else main exactly."""
    guided = ref + scale * (main - ref)
    return torch.where(_per_sample(active, main).bool(), guided, main)


def expand_null(value: Any, like: Any, batch: int) -> Any:
    """A null-conditioning value broadcast to the conditional value's batch: ints/floats become
    a (B,) tensor, tensors with leading size 1 are expanded."""
    if not torch.is_tensor(like):
        return value
    if isinstance(value, (int, float)):
        return torch.full((batch,), value, dtype=like.dtype, device=like.device)
    if torch.is_tensor(value):
        value = value.to(like.device)
        return value.expand(batch, *value.shape[1:]) if value.shape[0] == 1 else value
    return value


class ClassifierFreeGuidance(nn.Module):
    """Classifier-free guidance: the conditional and unconditional branch in one forward pass.

    Args:
        denoiser: a conditional σ-space denoiser ``D(x, sigma, **cond)``.
        scale: guidance weight w (1 = plain conditional, 0 = unconditional).
        uncond: the null conditioning, replacing keys of ``cond`` in the unconditional branch,
            e.g. ``{"class_labels": num_classes}`` (an int is broadcast to (B,)) or
            ``{"context": null_states, "context_mask": null_mask}`` (leading dim 1 is
            broadcast). Keys of cond not in uncond are shared by both branches. A value None
            means "drop the key"; then the two branches run as two forward passes.
        rescale: phi of CFG rescale (Lin et al. 2024, eq. (15-16)): the guided x0 is rescaled
            to the per-sample std of the conditional x0, and mixed phi : (1 - phi) with the
            plain guided x0. 0 disables it.
        sigma_interval: (lo, hi): guide only for lo < sigma <= hi (Kynkäänniemi et al. 2024);
            outside it the conditional branch alone is evaluated (one forward pass of B).

    Shapes: x (B, ...), sigma scalar or (B,), cond tensors (B, ...). Returns (B, ...).
    """

    def __init__(self, denoiser: Denoiser, scale: float, *, uncond: Mapping[str, Any],
                 rescale: float = 0.0, sigma_interval: tuple[float, float] | None = None
                 ) -> None:
        super().__init__()
        if not 0.0 <= rescale <= 1.0:
            raise UsageError(f"rescale (phi) must be in [0, 1]; got {rescale}")
        self.denoiser, self.scale, self.uncond = denoiser, float(scale), dict(uncond)
        self.rescale, self.sigma_interval = float(rescale), sigma_interval

    def branches(self, x: torch.Tensor, sigma: torch.Tensor | float, **cond
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """(conditional x0, unconditional x0), batched into one call of 2B when possible."""
        B = x.shape[0]
        missing = [k for k in self.uncond if k not in cond and self.uncond[k] is not None]
        if missing:
            raise UsageError(f"classifier-free guidance needs the conditional value of "
                             f"{missing} (pass them to the sampler as conditioning kwargs)")
        null = {k: expand_null(self.uncond.get(k, v), v, B) for k, v in cond.items()}
        batched = all(k in null and null[k] is not None for k in self.uncond) and all(
            torch.is_tensor(v) == torch.is_tensor(null[k]) for k, v in cond.items())
        if not batched:
            un = {k: v for k, v in null.items() if v is not None}
            return self.denoiser(x, sigma, **cond), self.denoiser(x, sigma, **un)
        both = {k: torch.cat([v, null[k]]) if torch.is_tensor(v) else v for k, v in cond.items()}
        d = self.denoiser(torch.cat([x, x]), repeat_sigma(sigma, B, 2, x.device), **both)
        return d[:B], d[B:]

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, **cond) -> torch.Tensor:
        active = in_interval(sigma, x.shape[0], self.sigma_interval, x.device)
        if self.scale == 1.0 or not bool(active.any()):
            return self.denoiser(x, sigma, **cond)
        dc, du = self.branches(x, sigma, **cond)
        guided = du + self.scale * (dc - du)
        if self.rescale > 0:
            dims = tuple(range(1, x.ndim))
            ratio = dc.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True).clamp_min(
                1e-12)
            guided = self.rescale * guided * ratio + (1 - self.rescale) * guided
        return torch.where(_per_sample(active, dc).bool(), guided, dc)


class GuidanceInput(nn.Module):
    """A denoiser whose network takes the guidance scale as an input (a guided student,
    :mod:`sfumato.distill.guided`) at scale w: ``D(x, sigma, **cond, guidance_scale=w)``, one
    pass."""

    def __init__(self, denoiser: Denoiser, scale: float) -> None:
        super().__init__()
        self.denoiser, self.scale = denoiser, float(scale)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, **cond) -> torch.Tensor:
        w = torch.full((x.shape[0],), self.scale, dtype=x.dtype, device=x.device)
        return self.denoiser(x, sigma, **cond, guidance_scale=w)


class AutoGuidance(nn.Module):
    """Autoguidance (Karras et al. 2024, eq. (2)): D = D_bad + w (D_good - D_bad), where the
    bad model is a smaller or less-trained version of the good one (e.g. an earlier checkpoint
    of the same run), conditioned the same way.

    Shapes as :class:`ClassifierFreeGuidance`; two forward passes (two different networks).
    """

    def __init__(self, good: Denoiser, bad: Denoiser, scale: float, *,
                 sigma_interval: tuple[float, float] | None = None) -> None:
        super().__init__()
        self.good, self.bad, self.scale = good, bad, float(scale)
        self.sigma_interval = sigma_interval

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, **cond) -> torch.Tensor:
        active = in_interval(sigma, x.shape[0], self.sigma_interval, x.device)
        d_good = self.good(x, sigma, **cond)
        if self.scale == 1.0 or not bool(active.any()):
            return d_good
        return _mix(self.bad(x, sigma, **cond), d_good, self.scale, active)


class NoisyClassifier(nn.Module):
    """A classifier of noisy inputs in σ-space: ``clf(x, sigma) -> logits (B, num_classes)``,
    from a raw network ``net(c_in x, c_noise) -> logits`` with EDM's input scaling
    c_in = 1 / sqrt(sigma^2 + sigma_data^2) and c_noise = log(sigma) / 4 (Karras et al. 2022,
    Table 1), so one network sees unit-variance inputs at every noise level."""

    def __init__(self, net: nn.Module, sigma_data: float = 0.5) -> None:
        super().__init__()
        self.net, self.sigma_data = net, float(sigma_data)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        s = torch.as_tensor(sigma, device=x.device, dtype=torch.float32).reshape(-1)
        s = s.expand(x.shape[0]) if s.numel() == 1 else s
        c_in = (s**2 + self.sigma_data**2).rsqrt()
        return self.net(_per_sample(c_in, x) * x, s.log() / 4)


class ClassifierGuidance(nn.Module):
    """Classifier guidance in σ-space: D = D(x) + s sigma^2 grad_x log p(y | x, sigma).

    From grad log p(x | y) = grad log p(x) + grad log p(y | x) (Song et al. 2021, eq. (14))
    and D = x + sigma^2 grad log p (Tweedie); the scale s is Dhariwal & Nichol's (2021, Alg. 1).
    With an exact classifier and s = 1 this is exactly the class-conditional denoiser.

    Args:
        denoiser: the diffusion model (usually unconditional).
        classifier: ``classifier(x, sigma) -> logits (B, C)`` of the noisy input, e.g. a
            :class:`NoisyClassifier` trained by sfumato (``objective.target = "classifier"``).
        scale: s.
        condition_denoiser: also pass ``class_labels`` to the denoiser (guiding a conditional
            model); otherwise the denoiser gets the other conditioning only.
        sigma_interval: guide only for lo < sigma <= hi.

    Call: ``guided(x, sigma, class_labels=y, **cond)`` with y (B,) long; the classifier's
    gradient is taken in float32 with autograd enabled even inside ``torch.no_grad()``.
    """

    def __init__(self, denoiser: Denoiser, classifier: Callable[..., torch.Tensor],
                 scale: float, *, condition_denoiser: bool = False,
                 sigma_interval: tuple[float, float] | None = None) -> None:
        super().__init__()
        self.denoiser, self.classifier, self.scale = denoiser, classifier, float(scale)
        self.condition_denoiser, self.sigma_interval = condition_denoiser, sigma_interval

    def grad_log_prob(self, x: torch.Tensor, sigma: torch.Tensor | float,
                      class_labels: torch.Tensor) -> torch.Tensor:
        """grad_x log p(y | x, sigma), same shape as x (float32 or x's dtype if wider)."""
        dtype = torch.promote_types(x.dtype, torch.float32)
        with torch.enable_grad():
            xg = x.detach().to(dtype).requires_grad_(True)
            logp = torch.log_softmax(self.classifier(xg, sigma).float(), dim=-1)
            y = class_labels.to(x.device).long().reshape(-1, 1)
            (grad,) = torch.autograd.grad(logp.gather(1, y).sum(), xg)
        return grad

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, *,
                class_labels: torch.Tensor, **cond) -> torch.Tensor:
        if self.condition_denoiser:
            cond = {**cond, "class_labels": class_labels}
        d = self.denoiser(x, sigma, **cond)
        active = in_interval(sigma, x.shape[0], self.sigma_interval, x.device)
        if self.scale == 0.0 or not bool(active.any()):
            return d
        s = torch.as_tensor(sigma, device=x.device, dtype=torch.float64).reshape(-1)
        s2 = _per_sample((s**2).expand(x.shape[0]) * active, d)
        return d + (self.scale * s2 * self.grad_log_prob(x, sigma, class_labels)).to(d.dtype)
