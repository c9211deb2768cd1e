"""Guidance wrappers checked against a class-conditional Gaussian mixture, where the
conditional denoiser and the noisy classifier p(y | x, sigma) are exact (the ``class_gm``
fixture of conftest.py)."""

from __future__ import annotations

import pytest
import torch

from sfumato import sigmas as S
from sfumato.accuracy import CountingDenoiser, sliced_wasserstein
from sfumato.guidance import (
    AutoGuidance,
    ClassifierFreeGuidance,
    ClassifierGuidance,
    NoisyClassifier,
    in_interval,
)
from sfumato.samplers import SAMPLERS


def _xy(gm, sigma=1.5, n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = gm.sample(n, generator=g, sigma=sigma)
    y = torch.randint(0, gm.num_classes, (n,), generator=g)
    return x, y


def _exact_classifier(gm):
    return lambda x, sigma: gm.class_log_posterior(x, sigma)


def test_mixture_conditional_pieces_are_consistent(class_gm):
    """Bayes: sum_y p(y|x) D(x|y) = D(x); the classifier's posteriors sum to one; the
    conditional score equals score + grad log p(y|x) (checked by autograd)."""
    x, y = _xy(class_gm)
    lp = class_gm.class_log_posterior(x, 1.5)
    assert torch.allclose(lp.exp().sum(1), torch.ones(len(x), dtype=lp.dtype), atol=1e-12)
    mix = sum(lp[:, c, None].exp() * class_gm.denoise(x, 1.5, torch.full((len(x),), c))
              for c in range(class_gm.num_classes))
    assert torch.allclose(mix, class_gm.denoise(x, 1.5), atol=1e-10)
    null = torch.full((len(x),), class_gm.num_classes)
    assert torch.equal(class_gm.denoise(x, 1.5, null), class_gm.denoise(x, 1.5))


@pytest.mark.parametrize("w", [0.0, 0.5, 1.0, 3.0])
def test_cfg_is_the_linear_mix_and_one_batched_call(class_gm, w):
    x, y = _xy(class_gm)
    counted = CountingDenoiser(class_gm)
    cfg = ClassifierFreeGuidance(counted, w, uncond={"class_labels": class_gm.num_classes})
    out = cfg(x, torch.tensor(1.5), class_labels=y)
    dc, du = class_gm.denoise(x, 1.5, y), class_gm.denoise(x, 1.5)
    assert torch.allclose(out, du + w * (dc - du), atol=1e-10)
    assert counted.nfe == 1  # cond and uncond in one forward pass (or the cond one at w=1)
    if w == 1.0:
        assert torch.equal(out, dc)


def test_cfg_batched_equals_two_passes_and_per_sample_sigma(class_gm):
    x, y = _xy(class_gm)
    sig = torch.linspace(0.2, 4.0, len(x), dtype=torch.float64)
    batched = ClassifierFreeGuidance(class_gm, 2.5, uncond={"class_labels": class_gm.num_classes})
    two_pass = ClassifierFreeGuidance(class_gm, 2.5, uncond={"class_labels": None})
    a, b = batched(x, sig, class_labels=y), two_pass(x, sig, class_labels=y)
    assert torch.allclose(a, b, atol=1e-12)
    ref = torch.stack([batched(x[i:i + 1], sig[i], class_labels=y[i:i + 1])[0]
                       for i in range(len(x))])
    assert torch.allclose(a, ref, atol=1e-12)


def test_cfg_interval_guides_only_inside(class_gm):
    x, y = _xy(class_gm)
    counted = CountingDenoiser(class_gm)
    cfg = ClassifierFreeGuidance(counted, 3.0, uncond={"class_labels": class_gm.num_classes},
                                 sigma_interval=(0.5, 2.0))
    assert torch.equal(cfg(x, 3.0, class_labels=y), class_gm.denoise(x, 3.0, y))  # above hi
    assert torch.equal(cfg(x, 0.5, class_labels=y), class_gm.denoise(x, 0.5, y))  # lo excluded
    inside = cfg(x, 2.0, class_labels=y)  # hi included
    dc, du = class_gm.denoise(x, 2.0, y), class_gm.denoise(x, 2.0)
    assert torch.allclose(inside, du + 3 * (dc - du), atol=1e-10)
    assert counted.nfe == 3
    mask = in_interval(torch.tensor([0.1, 0.5, 1.0, 2.0, 9.0]), 5, (0.5, 2.0), x.device)
    assert mask.tolist() == [False, False, True, True, False]
    with pytest.raises(ValueError, match="lo < hi"):
        in_interval(1.0, 2, (2.0, 1.0), x.device)


def test_cfg_rescale_matches_conditional_std(class_gm):
    x, y = _xy(class_gm, sigma=3.0)
    plain = ClassifierFreeGuidance(class_gm, 4.0, uncond={"class_labels": class_gm.num_classes})
    full = ClassifierFreeGuidance(class_gm, 4.0, uncond={"class_labels": class_gm.num_classes},
                                  rescale=1.0)
    half = ClassifierFreeGuidance(class_gm, 4.0, uncond={"class_labels": class_gm.num_classes},
                                  rescale=0.5)
    dc = class_gm.denoise(x, 3.0, y)
    r = full(x, 3.0, class_labels=y)
    assert torch.allclose(r.std(dim=1), dc.std(dim=1), rtol=1e-10)
    p = plain(x, 3.0, class_labels=y)
    assert torch.allclose(half(x, 3.0, class_labels=y), 0.5 * r + 0.5 * p, atol=1e-12)
    with pytest.raises(ValueError, match="rescale"):
        ClassifierFreeGuidance(class_gm, 2.0, uncond={}, rescale=1.5)


@pytest.mark.parametrize("s", [0.0, 1.0, 2.5])
def test_classifier_guidance_with_exact_classifier_equals_cfg(class_gm, s):
    """sigma^2 grad log p(y|x) = D(x|y) - D(x) exactly, so classifier guidance at scale s on the
    unconditional model is classifier-free guidance at w = s; s = 1 is the conditional model."""
    x, y = _xy(class_gm)
    cg = ClassifierGuidance(class_gm, _exact_classifier(class_gm), s)
    cfg = ClassifierFreeGuidance(class_gm, s, uncond={"class_labels": class_gm.num_classes})
    with torch.no_grad():  # the classifier gradient must still be taken
        out = cg(x, torch.tensor(1.5, dtype=torch.float64), class_labels=y)
    assert torch.allclose(out, cfg(x, 1.5, class_labels=y), atol=1e-9)
    if s == 1.0:
        assert torch.allclose(out, class_gm.denoise(x, 1.5, y), atol=1e-9)


def test_classifier_guidance_conditional_model_and_interval(class_gm):
    x, y = _xy(class_gm)
    cg = ClassifierGuidance(class_gm, _exact_classifier(class_gm), 2.0, condition_denoiser=True,
                            sigma_interval=(1.0, 2.0))
    dc = class_gm.denoise(x, 1.5, y)
    expect = dc + 2.0 * (dc - class_gm.denoise(x, 1.5))
    assert torch.allclose(cg(x, 1.5, class_labels=y), expect, atol=1e-9)
    assert torch.equal(cg(x, 3.0, class_labels=y), class_gm.denoise(x, 3.0, y))


def test_autoguidance_mix(class_gm):
    x, y = _xy(class_gm)
    bad = lambda x, s, **c: 0.8 * class_gm.denoise(x, s, **c)  # noqa: E731
    ag = AutoGuidance(class_gm, bad, 2.0)
    good_x0 = class_gm.denoise(x, 1.5, y)
    assert torch.allclose(ag(x, 1.5, class_labels=y), 0.8 * good_x0 + 2 * 0.2 * good_x0,
                          atol=1e-12)
    assert torch.equal(AutoGuidance(class_gm, bad, 1.0)(x, 1.5, class_labels=y), good_x0)
    assert torch.allclose(AutoGuidance(class_gm, class_gm, 5.0)(x, 1.5), class_gm.denoise(x, 1.5),
                          atol=1e-12)


def test_guided_sampling_hits_the_class_distribution(class_gm):
    """Heun with classifier guidance (exact classifier, s = 1) samples p(x | y): sliced
    Wasserstein to fresh class samples within 1.5x the sample-vs-sample floor, and far from
    the unconditional distribution."""
    n, c = 1500, 1
    g = torch.Generator().manual_seed(3)
    y = torch.full((n,), c)
    x = torch.randn(n, 3, generator=g, dtype=torch.float64) * 40
    cg = ClassifierGuidance(class_gm, _exact_classifier(class_gm), 1.0)
    out = SAMPLERS["heun"](cg, x, S.karras(40, 0.01, 40.0), class_labels=y)
    ref1 = class_gm.sample(n, generator=g, class_labels=y)
    ref2 = class_gm.sample(n, generator=g, class_labels=y)
    def sw(a, b):
        return sliced_wasserstein(a, b, 256, generator=torch.Generator().manual_seed(9))

    floor = sw(ref1, ref2)
    assert sw(out, ref1) <= 1.5 * floor
    assert sw(class_gm.sample(n, generator=g), ref1) > 3 * floor


def test_cfg_errors(class_gm):
    x, y = _xy(class_gm)
    cfg = ClassifierFreeGuidance(class_gm, 2.0, uncond={"class_labels": class_gm.num_classes})
    with pytest.raises(ValueError, match="class_labels"):
        cfg(x, 1.0)


def test_noisy_classifier_scales_inputs():
    seen = {}

    def net(x_in, c_noise):
        seen["x"], seen["c"] = x_in, c_noise
        return torch.zeros(x_in.shape[0], 3)

    clf = NoisyClassifier(net, sigma_data=0.5)
    x = torch.ones(2, 1, 4, 4)
    clf(x, torch.tensor([0.0 + 1.2, 3.0]))
    assert torch.allclose(seen["x"][:, 0, 0, 0], torch.tensor([1.2, 3.0]).pow(2).add(0.25)
                          .rsqrt())
    assert torch.allclose(seen["c"], torch.tensor([1.2, 3.0]).log() / 4)
