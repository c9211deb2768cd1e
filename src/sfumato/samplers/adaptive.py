"""Adaptive embedded Runge-Kutta (Dormand-Prince 5(4)) PF-ODE solver."""

from __future__ import annotations


def sample_rk45(denoiser, x, sigmas, *, generator=None, callback=None, **kwargs):
    raise NotImplementedError

