"""Linear multistep samplers: LMS (Karras et al. 2022 / k-diffusion) and PLMS/PNDM (Liu et al. 2022)."""

from __future__ import annotations


def sample_lms(denoiser, x, sigmas, *, generator=None, callback=None, **kwargs):
    raise NotImplementedError


def sample_plms(denoiser, x, sigmas, *, generator=None, callback=None, **kwargs):
    raise NotImplementedError

