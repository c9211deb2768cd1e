"""Likelihood by the probability-flow ODE, checked against exact Gaussian-mixture densities.

The model's log p(x) has two error sources besides round-off: the prior mismatch at sigma_max
(N(0, sigma_max^2) in place of the mixture's p_{sigma_max}) and the ODE solver. ``stats``
returns the trajectory's end point, so the tests measure each one separately against the
mixture's closed form, and then the total against the issue's bar of 1e-3 nats per dimension.
"""

from __future__ import annotations

import math

import pytest
import torch

from sfumato._rk import dopri5
from sfumato.likelihood import bits_per_dim, divergence, log_likelihood
from sfumato.mixture import GaussianMixture, random_mixture

SIGMA_MIN = 0.002
BAR = 1e-3  # nats per dimension


# tiny tensors gain nothing from intra-op threads; on a busy 2-core box the thread pool's
# spin-waits made this file ~7x slower (119 s vs 16 s)
pytestmark = pytest.mark.usefixtures("one_thread_module")


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def centred(gm: GaussianMixture) -> GaussianMixture:
    """The same mixture shifted to mean zero (data are normally centred before training;
    the prior mismatch is first order in the data mean, see test_prior_mismatch_...)."""
    covs = gm.U @ torch.diag_embed(gm.lam) @ gm.U.transpose(1, 2)
    return GaussianMixture(gm.means - gm.mean(), covs, gm.log_w.exp(), event_shape=gm.event_shape)


def mixture(dim: int) -> GaussianMixture:
    return centred(random_mixture(dim, 4, scale=2.0, generator=gen(dim)))


def split_errors(gm, x, lp, stats, sigma_max):
    """(total, prior mismatch, solver) errors in nats per dimension, each shape (B,)."""
    d = x[0].numel()
    exact = gm.log_prob(x, sigma=SIGMA_MIN)
    mismatch = gm.log_prob(stats["x_sigma_max"], sigma=sigma_max) - stats["prior_logp"]
    return ((lp - exact).abs() / d, mismatch.abs() / d, (lp + mismatch - exact).abs() / d)


# -- exact trace against the closed form -------------------------------------------------------

@pytest.mark.parametrize("dim", [2, 4])
def test_exact_trace_matches_mixture_in_distribution(dim):
    gm = mixture(dim)
    x = gm.sample(12, generator=gen(100 + dim))
    st = {}
    lp = log_likelihood(gm, x, exact_trace=True, sigma_max=80.0, stats=st)
    assert lp.shape == (12,) and lp.dtype == torch.float64
    total, mismatch, solver = split_errors(gm, x, lp, st, 80.0)
    # sigma_max = 80 (the EDM default) is enough for a centred mixture of scale 2: the
    # mismatch is second order, ~ Var(x0) / sigma_max^2 (measured: <= 7e-4 nats/dim)
    assert mismatch.max() < 0.8 * BAR, f"prior mismatch {mismatch.max():.2e} nats/dim"
    assert solver.max() < 0.3 * BAR, f"solver error {solver.max():.2e} nats/dim"
    assert total.max() < BAR, f"error {total.max():.2e} nats/dim"
    assert st["nfe"] < 400 and st["steps"] > 5


def test_exact_trace_far_points():
    """Points 4-6 data scales from every mode: log p is in the hundreds of nats, so the solver
    needs a tighter rtol, and the end point lies far out, so sigma_max must be larger."""
    dim = 2
    gm = mixture(dim)
    direction = torch.tensor([[1.0, 0.3], [-0.6, 1.0], [-1.0, -1.0]], dtype=torch.float64)
    x = 10.0 * direction / direction.norm(dim=1, keepdim=True)
    st = {}
    lp = log_likelihood(gm, x, exact_trace=True, sigma_max=2000.0, rtol=1e-7, atol=1e-7,
                        stats=st)
    total, mismatch, solver = split_errors(gm, x, lp, st, 2000.0)
    assert (gm.log_prob(x, SIGMA_MIN) < -40).all()  # really far out
    assert mismatch.max() < 0.5 * BAR
    assert total.max() < BAR, f"error {total.max():.2e} nats/dim"


def test_prior_mismatch_is_what_stats_report():
    """An uncentred mixture: the N(0, sigma_max^2) prior is off by ~|mean| / sigma_max per
    sample. The result's error must be exactly that mismatch (up to the solver), and shrink
    when sigma_max grows."""
    gm = random_mixture(2, 4, scale=2.0, generator=gen(7))
    assert gm.mean().norm() > 0.5
    x = gm.sample(6, generator=gen(8))
    errs = []
    for smax in (80.0, 1000.0):
        st = {}
        lp = log_likelihood(gm, x, exact_trace=True, sigma_max=smax, stats=st)
        total, mismatch, solver = split_errors(gm, x, lp, st, smax)
        assert solver.max() < 0.3 * BAR
        errs.append(total.max())
    assert errs[0] > BAR  # the bar is not met with an uncentred mixture at sigma_max = 80 ...
    assert errs[1] < errs[0] / 5  # ... and the error falls roughly like 1 / sigma_max


def test_gaussian_closed_form_image_shaped_with_cond():
    """x0 ~ N(0, c I) in (3, 4, 4): D = c / (c + sigma^2) x, p_sigma = N(0, (c + sigma^2) I).
    Rademacher probes give the exact trace of an isotropic Jacobian, so even one probe is
    exact here; ``c`` arrives through **cond."""

    def den(x, sigma, c):
        return c / (c + sigma[:, None, None, None] ** 2) * x

    c = 0.7
    x = torch.randn(3, 3, 4, 4, generator=gen(1), dtype=torch.float64) * math.sqrt(c)
    d = 48
    exact = (-0.5 * x.pow(2).flatten(1).sum(1) / (c + SIGMA_MIN**2)
             - 0.5 * d * math.log(2 * math.pi * (c + SIGMA_MIN**2)))
    for kw in ({"exact_trace": True}, {"generator": gen(0)}):
        lp = log_likelihood(den, x, sigma_max=200.0, c=c, **kw)
        assert ((lp - exact).abs() / d).max() < 1e-4


def test_event_shape_and_float32():
    gm = mixture(4)
    gm_img = GaussianMixture(gm.means, gm.U @ torch.diag_embed(gm.lam) @ gm.U.transpose(1, 2),
                             gm.log_w.exp(), event_shape=(1, 2, 2))
    x = gm.sample(5, generator=gen(3))
    lp = log_likelihood(gm, x, exact_trace=True)
    lp_img = log_likelihood(gm_img, x.reshape(5, 1, 2, 2), exact_trace=True)
    torch.testing.assert_close(lp_img, lp, rtol=0, atol=1e-9)
    lp32 = log_likelihood(gm, x.float(), exact_trace=True)
    assert lp32.dtype == torch.float32
    assert ((lp32.double() - gm.log_prob(x, SIGMA_MIN)).abs() / 4).max() < 2 * BAR


# -- Hutchinson ------------------------------------------------------------------------------

@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_hutchinson_unbiased_within_standard_error(probe):
    """Each sample gets its own probes, so R copies of a point in one batch are R independent
    estimates of its log p (one ODE solve for all): their mean must sit within a few standard
    errors of the exact-trace value."""
    dim, R = 4, 12
    gm = mixture(dim)
    x = gm.sample(5, generator=gen(11))
    ref = log_likelihood(gm, x, exact_trace=True)
    runs = log_likelihood(gm, x.repeat(R, 1), generator=gen(1), n_hutchinson=2,
                          probe=probe).reshape(R, 5)
    mean, sd = runs.mean(0), runs.std(0)
    assert (sd > 1e-3).all()  # the probes are random: the test can see a bias
    # 4.5 standard errors (two-sided p ~ 1e-5 per point) plus the solver's own error
    assert ((mean - ref).abs() <= 4.5 * sd / math.sqrt(R) + 2e-4).all(), (mean - ref) / sd
    # 32 probes per sample: the spread falls like 1/sqrt(probes)
    many = log_likelihood(gm, x, generator=gen(99), n_hutchinson=32, probe=probe)
    assert ((many - ref).abs() <= 4.5 * sd * math.sqrt(2 / 32) + 2e-4).all()


def test_fixed_generator_reproducible():
    gm = mixture(2)
    x = gm.sample(4, generator=gen(5))
    kw = {"rtol": 1e-3, "atol": 1e-3}
    a = log_likelihood(gm, x, generator=gen(3), **kw)
    b = log_likelihood(gm, x, generator=gen(3), **kw)
    c = log_likelihood(gm, x, generator=gen(4), **kw)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


# -- plumbing --------------------------------------------------------------------------------

class _NumpyBackward(torch.autograd.Function):
    """A denoiser whose backward leaves torch (cannot be vmapped): the divergence must fall
    back to a loop of VJPs and give the same trace."""

    gm: GaussianMixture

    @staticmethod
    def forward(ctx, x, sigma):
        ctx.save_for_backward(x, sigma)
        return _NumpyBackward.gm(x, sigma)

    @staticmethod
    def backward(ctx, g):
        x, sigma = ctx.saved_tensors
        g = torch.from_numpy(g.detach().cpu().numpy())
        with torch.enable_grad():
            xi = x.detach().requires_grad_(True)
            (gx,) = torch.autograd.grad(_NumpyBackward.gm(xi, sigma), xi, g)
        return gx, None


def test_divergence_exact_batched_and_loop_agree_with_jacobian():
    gm = mixture(4)
    _NumpyBackward.gm = gm
    x = gm.sample(3, generator=gen(2))
    sigma = torch.full((3,), 0.4, dtype=torch.float64)
    want = torch.stack([
        torch.autograd.functional.jacobian(lambda z: gm(z[None], sigma[:1])[0], xi).trace()
        for xi in x
    ])
    xi = x.clone().requires_grad_(True)
    flag = [True]
    torch.testing.assert_close(divergence(gm(xi, sigma), xi, None, flag), want)
    assert flag == [True]
    xi = x.clone().requires_grad_(True)
    flag = [True]
    got = divergence(_NumpyBackward.apply(xi, sigma), xi, None, flag)
    torch.testing.assert_close(got, want)
    assert flag == [False]  # fell back to the loop


def test_works_under_no_grad_and_inference_mode():
    gm = mixture(2)
    _NumpyBackward.gm = gm
    x = gm.sample(3, generator=gen(6))
    kw = {"exact_trace": True, "rtol": 1e-3, "atol": 1e-3}
    ref = log_likelihood(gm, x, **kw)
    with torch.no_grad():
        a = log_likelihood(lambda z, s: _NumpyBackward.apply(z, s), x, **kw)
    with torch.inference_mode():
        b = log_likelihood(gm, x, **kw)
    torch.testing.assert_close(a, ref, rtol=0, atol=1e-9)
    torch.testing.assert_close(b, ref, rtol=0, atol=1e-9)


def test_dopri5_accuracy_both_directions():
    y0 = torch.ones(2, 3, dtype=torch.float64)
    for tol in (1e-6, 1e-9):
        y, info = dopri5(lambda t, y: -t * y, 0.0, 3.0, y0, rtol=tol, atol=tol)
        assert (y - math.exp(-4.5)).abs().max() < 20 * tol
        assert info["nfe"] == 6 * (info["steps"] + info["rejected"]) + 2
    y, _ = dopri5(lambda t, y: -t * y, 3.0, 0.0, y0 * math.exp(-4.5), rtol=1e-10, atol=1e-12)
    assert (y - 1).abs().max() < 1e-8


# -- bits per dimension ------------------------------------------------------------------------

def _bin_mixture() -> GaussianMixture:
    """2-D diagonal mixture inside (-1, 1), std >= 0.2 = 25 bins: nearly flat per bin."""
    means = torch.tensor([[-0.35, 0.2], [0.3, -0.25], [0.1, 0.45]], dtype=torch.float64)
    var = torch.tensor([[0.05, 0.08], [0.04, 0.06], [0.07, 0.04]], dtype=torch.float64)
    w = torch.tensor([0.3, 0.4, 0.3], dtype=torch.float64)
    return GaussianMixture(means - w @ means, var, w)  # centred: small prior mismatch


def _quantise(x: torch.Tensor) -> torch.Tensor:
    return ((x + 1) * 128).floor().clamp(0, 255).to(torch.uint8)


def _exact_bits(gm: GaussianMixture, k: torch.Tensor) -> torch.Tensor:
    """-log2 P(pixel = k) / D with P the probability mass of the bin [-1 + k/128, -1 +
    (k+1)/128)^D under the mixture at sigma_min, computed by the normal CDF (diagonal
    covariances make the box integral a product)."""
    a = -1 + k.double() / 128
    b = a + 1 / 128
    s = (gm.lam + SIGMA_MIN**2).sqrt()  # (K, D)
    za = (a[:, None, :] - gm.means[None]) / s[None]
    zb = (b[:, None, :] - gm.means[None]) / s[None]
    log_mass = (torch.special.ndtr(zb) - torch.special.ndtr(za)).log().sum(-1)  # (B, K)
    logp = torch.logsumexp(gm.log_w + log_mass, dim=1)
    return -logp / (k[0].numel() * math.log(2))


def test_bits_per_dim_matches_discrete_mass():
    """Bin-centre dequantisation of a density that is nearly flat per bin gives
    -log2 P(k) / D to O(bin^2); a wrong Jacobian (e.g. 1/255 bins: 0.0056 bits) or a bin
    shifted by half a bin (~0.01 bits here) fails the 1e-3 bit tolerance."""
    gm = _bin_mixture()
    k = _quantise(gm.sample(8, generator=gen(21)))
    want = _exact_bits(gm, k)
    got = bits_per_dim(gm, k, dequantize="center", exact_trace=True, dtype=torch.float64)
    assert got.shape == (8,) and got.dtype == torch.float64
    assert (got - want).abs().max() < 1e-3, (got - want)


def test_bits_per_dim_uniform_dequantisation():
    """Uniform dequantisation: exactly the formula from the mixture's density at the
    dequantised points (noise drawn first from the generator), and a Jensen upper bound on
    -log2 P(k) / D on average."""
    gm = _bin_mixture()
    k = _quantise(gm.sample(8, generator=gen(22)))
    got = bits_per_dim(gm, k, generator=gen(5), exact_trace=True, dtype=torch.float64)
    u = torch.rand(k.shape, generator=gen(5), dtype=torch.float64)
    x = -1 + (k.double() + u) / 128
    direct = -(gm.log_prob(x, SIGMA_MIN) + 2 * math.log(1 / 128)) / (2 * math.log(2))
    assert (got - direct).abs().max() < 1e-4
    gap = got - _exact_bits(gm, k)
    assert gap.abs().max() < 0.05  # one dequantisation draw moves a point by < 1 bin
    # Hutchinson probes come from the same generator, after the dequantisation noise
    kw = {"n_hutchinson": 2, "rtol": 1e-3, "atol": 1e-3}
    hut = bits_per_dim(gm, k, generator=gen(5), dtype=torch.float64, **kw)
    g = gen(5)
    u = torch.rand(k.shape, generator=g, dtype=torch.float64)
    lp = log_likelihood(gm, -1 + (k.double() + u) / 128, generator=g, **kw)
    torch.testing.assert_close(hut, -(lp + 2 * math.log(1 / 128)) / (2 * math.log(2)),
                               rtol=0, atol=1e-12)


def test_bits_per_dim_data_range():
    """data_range=(-1/2, 1/2) halves the bins (offset 8 bits instead of 7): the same pixels
    under the mixture mapped by x -> x / 2 (density times 2^D, noise levels halved) must give
    the same bpd, so the Jacobian term has to be right."""
    gm = _bin_mixture()
    half = GaussianMixture(gm.means / 2, gm.lam / 4, gm.log_w.exp())
    k = _quantise(gm.sample(4, generator=gen(23)))
    kw = {"dequantize": "center", "exact_trace": True, "dtype": torch.float64}
    a = bits_per_dim(gm, k, **kw)
    b = bits_per_dim(half, k, data_range=(-0.5, 0.5), sigma_min=SIGMA_MIN / 2,
                     sigma_max=40.0, **kw)
    assert (a - b).abs().max() < 1e-4
    logp = gm.log_prob(-1 + (k.double() + 0.5) / 128, SIGMA_MIN)  # bin centres, in (-1, 1)
    assert (a - (7 - logp / (2 * math.log(2)))).abs().max() < 1e-3  # 7 - log2 p(x) / D


# -- errors ----------------------------------------------------------------------------------

def test_clear_errors():
    gm = mixture(2)
    x = gm.sample(2, generator=gen(0))
    with pytest.raises(ValueError, match="generator"):
        log_likelihood(gm, x)
    with pytest.raises(TypeError, match="floating-point"):
        log_likelihood(gm, x.long(), exact_trace=True)
    with pytest.raises(ValueError, match="batch"):
        log_likelihood(gm, x[0], exact_trace=True)
    with pytest.raises(ValueError, match="sigma_min"):
        log_likelihood(gm, x, exact_trace=True, sigma_min=1.0, sigma_max=0.5)
    with pytest.raises(ValueError, match="method"):
        log_likelihood(gm, x, exact_trace=True, method="euler")
    with pytest.raises(ValueError, match="n_hutchinson"):
        log_likelihood(gm, x, generator=gen(0), n_hutchinson=0)
    with pytest.raises(ValueError, match="probe"):
        log_likelihood(gm, x, generator=gen(0), probe="sphere")
    with pytest.raises(ValueError, match="shape"):
        log_likelihood(lambda z, s: z[:, :1], x, exact_trace=True)
    with pytest.raises(RuntimeError, match="differentiabl"):
        log_likelihood(lambda z, s: gm(z, s).detach(), x, exact_trace=True)

    k = torch.zeros(2, 2, dtype=torch.uint8)
    with pytest.raises(TypeError, match="uint8"):
        bits_per_dim(gm, k.float(), generator=gen(0))
    with pytest.raises(ValueError, match="generator"):
        bits_per_dim(gm, k, exact_trace=True)
    with pytest.raises(ValueError, match="data_range"):
        bits_per_dim(gm, k, generator=gen(0), data_range=(1, -1))
    with pytest.raises(ValueError, match="dequantize"):
        bits_per_dim(gm, k, generator=gen(0), dequantize="variational")
