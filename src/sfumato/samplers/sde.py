"""Reverse-SDE samplers: Euler-Maruyama and predictor-corrector with a Langevin corrector (Song et al. 2021b)."""

from __future__ import annotations


def sample_euler_maruyama(denoiser, x, sigmas, *, generator=None, callback=None, **kwargs):
    raise NotImplementedError


def sample_pc(denoiser, x, sigmas, *, generator=None, callback=None, **kwargs):
    raise NotImplementedError

