"""DiffEdit (Couairon et al. 2023, § 3.1-3.3): edit only where two conditionings disagree.

1. **Mask** (§ 3.1): noise the input to the encoding level σ_r with ``n`` draws; where the
   denoiser's predictions under the target and the source conditioning differ is what the
   edit changes. In σ-space the noise estimates' difference is (D_src - D_tgt) / σ, so the
   mask is |D(x_σ, target) - D(x_σ, source)| averaged over draws and channels, rescaled to
   [0, 1] per image and thresholded (default 0.5).
2. **Encode** (§ 3.2): invert the input with the source conditioning down the grid from
   σ_r (:func:`sfumato.edit.invert`, solved per step, ``path=True``), keeping every level.
3. **Decode with mask guidance** (§ 3.3, eq. (3)): sample from the encoded state with the
   target conditioning; after each step the unmasked pixels are replaced by the encoded
   trajectory's at that level, ``x = M x + (1 - M) x_enc``. Outside the mask the result is
   the input exactly (the trajectory ends at it).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..errors import UsageError
from ..samplers import get_sampler
from ..samplers._common import Generator, noise_like
from .inversion import invert


@torch.no_grad()
def diffedit_mask(denoiser: Callable, x0: torch.Tensor, sigma: float, source: dict,
                  target: dict, *, n: int = 10, threshold: float = 0.5,
                  generator: Generator) -> torch.Tensor:
    """(B, 1, H, W) mask in {0, 1} (1 = edit) for images x0 (B, C, H, W): where the
    denoiser's x0 estimates at level ``sigma`` under the ``target`` and ``source``
    conditioning keywords differ (mean over ``n`` noise draws from ``generator``),
    rescaled to [0, 1] per image and kept above ``threshold``."""
    if not 0.0 < threshold < 1.0:
        raise UsageError(f"the DiffEdit mask threshold must lie in (0, 1); got {threshold}")
    diff = torch.zeros_like(x0[:, :1])
    s = torch.full((x0.shape[0],), float(sigma), dtype=x0.dtype, device=x0.device)
    for _ in range(n):
        xt = x0 + sigma * noise_like(x0, generator, "the DiffEdit mask")
        d = denoiser(xt, s, **target) - denoiser(xt, s, **source)
        diff += d.abs().mean(1, keepdim=True) / n
    lo = diff.flatten(1).min(1).values.reshape(-1, 1, 1, 1)
    hi = diff.flatten(1).max(1).values.reshape(-1, 1, 1, 1)
    return ((diff - lo) / (hi - lo).clamp_min(1e-12) > threshold).to(x0.dtype)


@torch.no_grad()
def diffedit(denoiser: Callable, x0: torch.Tensor, mask: torch.Tensor, sigmas: torch.Tensor,
             source: dict, target: dict, *, sampler: str = "ddim", iters: int = 20
             ) -> torch.Tensor:
    """Masked inversion-and-edit of x0 (B, C, H, W) with ``mask`` (B or 1, 1 or C, H, W) in
    {0, 1}: encode with the ``source`` conditioning over ``sigmas`` (from the encoding level
    down to 0; an invertible sampler), decode with ``target``, the unmasked part following
    the encoded trajectory."""
    path = invert(denoiser, x0, sigmas, sampler=sampler, iters=iters, path=True, **source)
    step = get_sampler(sampler)
    x = path[0]
    for i in range(len(sigmas) - 1):
        x = step(denoiser, x, sigmas[i:i + 2], **target)
        x = mask * x + (1 - mask) * path[i + 1]
    return x
