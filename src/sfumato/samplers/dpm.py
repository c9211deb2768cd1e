"""Exponential integrators: DPM-Solver (Lu et al. 2022a) and DPM-Solver++ (Lu et al. 2022b)."""

from __future__ import annotations


def sample_dpm_solver_2(denoiser, x, sigmas, *, generator=None, callback=None, **kwargs):
    raise NotImplementedError


def sample_dpm_solver_3(denoiser, x, sigmas, *, generator=None, callback=None, **kwargs):
    raise NotImplementedError


def sample_dpmpp_2s(denoiser, x, sigmas, *, generator=None, callback=None, **kwargs):
    raise NotImplementedError


def sample_dpmpp_2s_ancestral(denoiser, x, sigmas, *, generator=None, callback=None, **kwargs):
    raise NotImplementedError


def sample_dpmpp_2m(denoiser, x, sigmas, *, generator=None, callback=None, **kwargs):
    raise NotImplementedError


def sample_dpmpp_3m(denoiser, x, sigmas, *, generator=None, callback=None, **kwargs):
    raise NotImplementedError


def sample_dpmpp_2m_sde(denoiser, x, sigmas, *, generator=None, callback=None, **kwargs):
    raise NotImplementedError


def sample_dpmpp_3m_sde(denoiser, x, sigmas, *, generator=None, callback=None, **kwargs):
    raise NotImplementedError

