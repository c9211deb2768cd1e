"""Training objectives: the loss weightings' exact algebra and the sigma sampling
distributions."""

import pytest
import torch
from torch import nn

from sfumato.denoiser import Denoiser, target_from_x0
from sfumato.process import VPDiscrete
from sfumato.train.objective import Objective


class Lin(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Linear(3, 3)

    def forward(self, x, c_noise, **_):
        return self.w(x) * (1 + c_noise[:, None])


def _batch():
    g = torch.Generator().manual_seed(0)
    return (torch.randn(16, 3, generator=g), torch.rand(16, generator=g) * 5 + 0.1,
            torch.randn(16, 3, generator=g))


@pytest.mark.parametrize("target", ["eps", "v", "x0"])
def test_uniform_weighting_is_plain_mse_on_the_raw_target(target):
    x0, sigma, noise = _batch()
    den = Denoiser(Lin(), target=target, process=VPDiscrete())
    loss = Objective(weighting="uniform").loss(den, x0, generator=None, sigma=sigma, noise=noise)
    s = sigma[:, None]
    x = x0 + s * noise
    c_in = den.process.scale_from_sigma(s)
    pred = den.net(c_in * x, den.process.t_from_sigma(sigma))
    expect = ((pred - target_from_x0(target, x0, x, sigma)) ** 2).mean(1)
    torch.testing.assert_close(loss, expect, rtol=1e-4, atol=1e-6)


def test_edm_weighting_is_unit_weight_on_F_and_min_snr():
    x0, sigma, noise = _batch()
    den = Denoiser(Lin(), target="edm")
    loss = Objective(weighting="edm").loss(den, x0, generator=None, sigma=sigma, noise=noise)
    F = den.net(den.precondition(sigma[:, None])[2] * (x0 + sigma[:, None] * noise),
                sigma.log() / 4)
    expect = ((F - den.raw_target(x0, noise, sigma)) ** 2).mean(1)
    torch.testing.assert_close(loss, expect, rtol=1e-4, atol=1e-6)
    w = Objective(weighting="min_snr", gamma=5.0).weight(torch.tensor([0.1, 1.0, 10.0]), den)
    torch.testing.assert_close(w, torch.tensor([5.0, 1.0, 0.01]))


def test_sigma_sampling_distributions():
    den = Denoiser(Lin(), target="eps", process=VPDiscrete())
    g = torch.Generator().manual_seed(0)
    s = Objective(sigma_sampling="lognormal").sample_sigma(20000, den, generator=g)
    assert abs(float(s.log().mean()) + 1.2) < 0.03
    s = Objective(sigma_sampling="process").sample_sigma(20000, den, generator=g)
    t = den.process.t_from_sigma(s.double())
    assert torch.allclose(t, t.round(), atol=1e-3) and 450 < float(t.mean()) < 550
    s = Objective(sigma_sampling="logit_normal").sample_sigma(20000, den, generator=g)
    assert abs(float((s / (1 + s)).logit().mean())) < 0.03
    with pytest.raises(ValueError, match="unknown weighting"):
        Objective(weighting="snr+1")
