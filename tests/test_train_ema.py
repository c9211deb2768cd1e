"""EMA of the weights: classic (decay) and power-function (gamma / sigma_rel) averages."""

import pytest
import torch
from torch import nn

from sfumato.train.ema import EMA, PowerEMA, gamma_from_sigma_rel


def test_ema_classic_and_power():
    m = nn.Linear(2, 2)
    e = EMA(m, decay=0.9, warmup=False)
    old = e.module.weight.clone()
    with torch.no_grad():
        m.weight.add_(1.0)
    e.update(m, 1)
    torch.testing.assert_close(e.module.weight, 0.9 * old + 0.1 * m.weight)
    g = gamma_from_sigma_rel(0.05)
    assert abs(((g + 1) / ((g + 2) ** 2 * (g + 3))) ** 0.5 - 0.05) < 1e-9
    p = PowerEMA(m, gamma=6.94)
    assert p.beta(1) == 0.0 and abs(p.beta(100) - 0.99 ** 7.94) < 1e-12
    with pytest.raises(ValueError, match="exactly one"):
        PowerEMA(m)
