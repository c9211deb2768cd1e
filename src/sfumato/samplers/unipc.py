"""UniPC (Zhao et al. 2023): unified predictor-corrector, bh1/bh2, orders 1-3."""

from __future__ import annotations


def sample_unipc(denoiser, x, sigmas, *, generator=None, callback=None, **kwargs):
    raise NotImplementedError


def sample_unipc_bh1(denoiser, x, sigmas, *, generator=None, callback=None, **kwargs):
    raise NotImplementedError


def sample_unipc_bh2(denoiser, x, sigmas, *, generator=None, callback=None, **kwargs):
    raise NotImplementedError

