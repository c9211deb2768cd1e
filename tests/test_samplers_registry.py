"""Contract tests run on every registered sampler: finite at every step count, deterministic,
batch-size independent with per-sample generators, no in-place edits, dtype policy, clear
errors, conditioning passed through, classifier-free guidance."""

import pytest
import torch

from sfumato import sigmas as S
from sfumato.guidance import ClassifierFreeGuidance
from sfumato.mixture import random_mixture
from sfumato.samplers import SAMPLERS, STOCHASTIC, get_sampler

GM = random_mixture(2, 4, generator=torch.Generator().manual_seed(0))
NAMES = sorted(SAMPLERS)


def _x(n=6, dtype=torch.float64, seed=1, smax=80.0):
    return torch.randn(n, 2, dtype=dtype, generator=torch.Generator().manual_seed(seed)) * smax


def _run(name, x, sig, seed=0, **kw):
    gen = torch.Generator().manual_seed(seed)
    return SAMPLERS[name](GM, x, sig, generator=gen, **kw)


@pytest.mark.parametrize("name", NAMES)
def test_finite_at_every_step_count(name):
    x = _x()
    for n in list(range(1, 11)) + [15, 30, 50]:
        for grid in ("karras", "loglinear"):
            out = _run(name, x, S.get_sigmas(grid, n, sigma_min=0.002, sigma_max=80.0))
            assert torch.isfinite(out).all(), f"{name}: non-finite output at {n} steps ({grid})"
            assert out.shape == x.shape


@pytest.mark.parametrize("name", NAMES)
def test_deterministic_no_inplace_and_dtypes(name):
    x = _x(dtype=torch.float32)
    sig = S.karras(8, 0.002, 80.0)
    x_copy, sig_copy = x.clone(), sig.clone()
    a, b = _run(name, x, sig), _run(name, x, sig)
    assert torch.equal(a, b), "same generator seed must give identical output"
    assert torch.equal(x, x_copy) and torch.equal(sig, sig_copy), "inputs modified in place"
    assert a.dtype == torch.float32
    c = _run(name, x.double(), sig)
    assert c.dtype == torch.float64 and torch.isfinite(c).all()
    h = _run(name, x.to(torch.bfloat16), sig)  # state kept in float32, result in input dtype
    assert h.dtype == torch.bfloat16 and torch.isfinite(h.float()).all()

    def bf16_net(x, sigma):  # a network running in bf16 returns bf16
        return GM(x.double(), sigma.double()).to(torch.bfloat16)

    d = SAMPLERS[name](bf16_net, x, sig, generator=torch.Generator().manual_seed(0))
    assert d.dtype == torch.float32 and torch.isfinite(d).all()
    assert (d - a).abs().max() < 0.5, "bf16 network should only perturb the result slightly"


@pytest.mark.parametrize("name", sorted(STOCHASTIC))
def test_per_sample_generators_make_samples_batch_independent(name):
    sig = S.karras(10, 0.002, 80.0)
    x = _x(5)
    gens = lambda idx: [torch.Generator().manual_seed(100 + i) for i in idx]  # noqa: E731
    full = SAMPLERS[name](GM, x, sig, generator=gens(range(5)))
    for i in (0, 3):
        alone = SAMPLERS[name](GM, x[i:i + 1], sig, generator=gens([i]))
        torch.testing.assert_close(alone[0], full[i], rtol=1e-9, atol=1e-9)
    other = SAMPLERS[name](GM, x, sig, generator=gens(range(10, 15)))
    assert not torch.allclose(other, full), "different seeds must give different samples"
    with pytest.raises(ValueError, match="generator"):
        SAMPLERS[name](GM, x, sig)


@pytest.mark.parametrize("name", NAMES)
def test_conditioning_and_callback(name):
    seen = []

    def cond_denoiser(x, sigma, *, shift):
        return GM(x - shift, sigma) + shift

    sig = S.karras(4, 0.002, 80.0)
    x = _x(64)
    out = SAMPLERS[name](cond_denoiser, x, sig, generator=torch.Generator().manual_seed(0),
                         callback=seen.append, shift=torch.tensor([5.0, 0.0], dtype=torch.float64))
    base = _run(name, x, sig)
    assert torch.isfinite(out).all()
    assert seen and {"x", "sigma", "denoised"} <= set(seen[0])
    moved = float((out - base)[:, 0].mean())
    assert moved > 3.0, f"the conditioning kwarg did not reach the denoiser (moved {moved})"


def test_clear_errors():
    with pytest.raises(ValueError,
                       match="unknown sampler 'dpmpp2m' \\(did you mean 'dpmpp_2m'\\?\\)"):
        get_sampler("dpmpp2m")
    f = get_sampler("euler")
    with pytest.raises(ValueError, match="strictly decreasing"):
        f(GM, _x(), torch.tensor([1.0, 2.0, 0.0]))
    with pytest.raises(ValueError, match="at least 2 values"):
        f(GM, _x(), torch.tensor([1.0]))
    with pytest.raises(ValueError, match=r"shape \(batch, \.\.\.\)"):
        f(GM, torch.zeros(2), S.karras(3, 0.1, 1.0))
    with pytest.raises(ValueError, match="must return x0_hat with the input's shape"):
        f(lambda x, s: x[:, :1], _x(), S.karras(3, 0.1, 1.0))


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_every_sampler_runs_guided(class_gm, name):
    """Each sampler with CFG at w = 1 gives the conditional model's result, and at w = 3 a
    finite one; conditioning reaches the denoiser through the sampler's **cond."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 3, generator=g, dtype=torch.float64) * 20
    y = torch.arange(16) % class_gm.num_classes
    sig = S.karras(8, 0.05, 20.0)
    fn = SAMPLERS[name]
    kw = {"generator": torch.Generator().manual_seed(1)} if name in STOCHASTIC else {}
    one = ClassifierFreeGuidance(class_gm, 1.0, uncond={"class_labels": class_gm.num_classes})
    a = fn(one, x, sig, class_labels=y, **kw)
    kw = {"generator": torch.Generator().manual_seed(1)} if name in STOCHASTIC else {}
    b = fn(class_gm, x, sig, class_labels=y, **kw)
    assert torch.equal(a, b)
    three = ClassifierFreeGuidance(class_gm, 3.0, uncond={"class_labels": class_gm.num_classes})
    kw = {"generator": torch.Generator().manual_seed(1)} if name in STOCHASTIC else {}
    assert torch.isfinite(fn(three, x, sig, class_labels=y, **kw)).all()
