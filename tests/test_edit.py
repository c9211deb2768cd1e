"""Editing: SDEdit's strength mapping and cost, inversion's exactness (single steps compose,
inverted noise reproduces the image, with and without guidance), and the CLI."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _util import TINY_TEACHER

from sfumato import cli
from sfumato.accuracy import CountingDenoiser, sliced_wasserstein
from sfumato.edit import INVERTIBLE, invert, sdedit, strength_to_sigma
from sfumato.errors import UsageError
from sfumato.guidance import ClassifierFreeGuidance
from sfumato.mixture import random_mixture
from sfumato.samplers import get_sampler, sample_heun
from sfumato.sigmas import get_sigmas

pytestmark = pytest.mark.usefixtures("one_thread_module")


@pytest.fixture(scope="module")
def gm():
    return random_mixture(4, 5, scale=1.0, generator=torch.Generator().manual_seed(0),
                          num_classes=2)


def test_strength_maps_to_the_karras_curve():
    assert strength_to_sigma(1.0, 0.002, 80.0) == pytest.approx(80.0)
    assert strength_to_sigma(0.0, 0.002, 80.0) == pytest.approx(0.002)
    s = [strength_to_sigma(v, 0.002, 80.0) for v in np.linspace(0, 1, 11)]
    assert all(a < b for a, b in zip(s, s[1:], strict=False))
    # it is the level a fraction s of the way down a Karras grid
    grid = get_sigmas("karras", 101, sigma_min=0.002, sigma_max=80.0)  # t = i / 100
    assert strength_to_sigma(0.3, 0.002, 80.0) == pytest.approx(float(grid[70]), rel=1e-9)
    for bad in (-0.1, 1.5):
        with pytest.raises(UsageError, match="strength"):
            strength_to_sigma(bad, 0.002, 80.0)


@pytest.mark.parametrize("sampler,calls", [("euler", 10), ("heun", 19)])
def test_sdedit_makes_the_calls_asked_for(gm, sampler, calls):
    """Whatever the strength, ``steps`` steps of the sampler (no silent steps x strength)."""
    x = torch.zeros(3, 4, dtype=torch.float64)
    for strength in (0.2, 0.5, 1.0):
        counted = CountingDenoiser(gm)
        sdedit(counted, x, strength, steps=10, sigma_min=0.002, sigma_max=80.0,
               sampler=sampler, generator=torch.Generator().manual_seed(0))
        assert counted.nfe == calls
    assert torch.equal(sdedit(gm, x, 0.0, steps=10, sigma_min=0.002, sigma_max=80.0,
                              generator=torch.Generator()), x)


def test_sdedit_trades_faithfulness_for_realism(gm):
    """Strength 1 forgets an off-distribution input (samples match the prior); small
    strengths stay near it."""
    n = 2000
    x = torch.full((n, 4), 6.0, dtype=torch.float64)  # far from every component
    prior = gm.sample(n, generator=torch.Generator().manual_seed(1))
    floor = sliced_wasserstein(gm.sample(n, generator=torch.Generator().manual_seed(2)), prior)
    dist = []
    for strength in (0.05, 0.5, 1.0):
        out = sdedit(gm, x, strength, steps=30, sigma_min=0.002, sigma_max=80.0,
                     generator=torch.Generator().manual_seed(3))
        dist.append(float((out - x).pow(2).sum(1).sqrt().mean()))
        if strength == 1.0:
            assert sliced_wasserstein(out, prior) < 2 * floor
    assert dist[0] < 0.2 < dist[1] < dist[2]


@pytest.mark.parametrize("sampler", INVERTIBLE)
def test_single_steps_compose_and_inversion_is_exact(gm, sampler):
    sig = get_sigmas("karras", 12, sigma_min=0.002, sigma_max=80.0)
    step = get_sampler(sampler)
    z = torch.randn(6, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    whole = step(gm, 80.0 * z, sig)
    x = 80.0 * z
    for i in range(len(sig) - 1):
        x = step(gm, x, sig[i:i + 2])
    assert torch.allclose(whole, x, atol=1e-12)  # the premise of per-step inversion
    x0 = gm.sample(6, generator=torch.Generator().manual_seed(4))
    exact = step(gm, invert(gm, x0, sig, sampler=sampler, tol=1e-10), sig)
    plain = step(gm, invert(gm, x0, sig, sampler=sampler, iters=0), sig)
    err, plain_err = float((exact - x0).abs().max()), float((plain - x0).abs().max())
    assert err < 1e-7 and plain_err > 1e3 * err


def test_inversion_under_guidance(gm):
    """At classifier-free guidance 3 the guided ODE is inverted as exactly (where plain
    DDIM inversion is off)."""
    sig = get_sigmas("karras", 30, sigma_min=0.002, sigma_max=80.0)
    cfg = ClassifierFreeGuidance(gm, 3.0, uncond={"class_labels": 2})
    y = torch.tensor([0, 1, 0, 1])
    x0 = gm.sample(4, generator=torch.Generator().manual_seed(5), class_labels=y)
    exact = sample_heun(cfg, invert(cfg, x0, sig, sampler="heun", tol=1e-10, class_labels=y), sig,
                        class_labels=y)
    plain = sample_heun(cfg, invert(cfg, x0, sig, sampler="heun", iters=0, class_labels=y),
                        sig, class_labels=y)
    assert float((exact - x0).abs().max()) < 1e-5
    assert float((plain - x0).abs().max()) > 1e-3


def test_anderson_solve_with_a_sample_already_solved():
    """A sample whose residual is already zero makes its difference matrix singular; it
    stays put while the others converge (this used to raise)."""
    from sfumato.edit import anderson_solve

    target = torch.tensor([[1.0, 2.0, 3.0], [3.0, -4.0, 0.5]])

    def residual(z):
        r = torch.tanh(target - z)
        r[0] = 0.0
        return r

    x0 = torch.zeros(2, 3)
    x = anderson_solve(residual, x0, iters=50, tol=1e-6)
    assert torch.equal(x[0], x0[0])
    torch.testing.assert_close(x[1], target[1], atol=1e-5, rtol=0)


def test_invert_refuses_samplers_without_a_per_step_inverse(gm):
    sig = get_sigmas("karras", 4, sigma_min=0.002, sigma_max=80.0)
    for name in ("dpmpp_2m", "euler_ancestral"):
        with pytest.raises(UsageError, match="single-step deterministic"):
            invert(gm, torch.zeros(1, 4), sig, sampler=name)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tiny class-conditional digits run (trained for 30 steps)."""
    from sfumato.train.trainer import train

    run = tmp_path_factory.mktemp("edit") / "run"
    train(TINY_TEACHER, out=run, progress=False)
    return run


def _heldout(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    from sfumato.data import get_dataset

    ds = get_dataset({"name": "digits"})
    return ds.heldout[:n], ds.heldout_labels[:n]


def test_null_text_inversion_reproduces_under_guidance(tiny_run):
    """At guidance 3 plain DDIM inversion drifts; tuning the unconditional branch per step
    (Mokady et al. 2023) brings sampling back onto the image; zero offsets are plain CFG."""
    from sfumato.edit import NullOffsetGuidance
    from sfumato.model import load

    m = load(tiny_run)
    x, y = _heldout(4)
    kw = {"sampler": "euler", "steps": 10, "class_labels": y, "guidance": 3.0}
    plain = m.sample(4, noise=m.invert(x, iters=0, **kw), **kw).x
    inv = m.null_text_invert(x, guidance=3.0, steps=10, class_labels=y)
    assert inv.offsets.shape == (10, 4, 32) and inv.x_T.shape == x.shape
    tuned = m.sample(4, noise=inv.x_T / inv.sigmas[0], null_offsets=inv.offsets, **kw).x
    err_plain, err_tuned = (float((r - x).pow(2).mean().sqrt()) for r in (plain, tuned))
    assert err_tuned < 0.2 * err_plain and err_tuned < 0.01, (err_tuned, err_plain)
    # zero offsets are plain guidance exactly; the offsets belong to their grid
    guided = m.guided(3.0)
    zero = NullOffsetGuidance(guided, inv.sigmas, torch.zeros_like(inv.offsets))
    s = inv.sigmas[3]
    assert torch.equal(zero(inv.x_T, s, class_labels=y), guided(inv.x_T, s, class_labels=y))
    with pytest.raises(UsageError, match="not a level of the grid"):
        zero(inv.x_T, 0.5 * (inv.sigmas[3] + inv.sigmas[4]), class_labels=y)
    with pytest.raises(UsageError, match="classifier-free guidance"):
        m.null_text_invert(x, guidance=1.0, steps=10, class_labels=y)


def test_cli_invert_sample_edit(tiny_run, tmp_path, capsys):
    """Invert images, sample the noise back (bit-exact uint8), SDEdit, and clear errors."""
    from sfumato.data import get_dataset, to_uint8

    run = tiny_run
    digits = to_uint8(get_dataset({"name": "digits"}).heldout[:6]).numpy()
    np.savez(tmp_path / "in.npz", images=digits)
    noise = tmp_path / "z.npz"
    assert cli.main(["invert", str(run), "--input", str(tmp_path / "in.npz"), "--steps", "20",
                     "--out", str(noise)]) == 0
    rec = tmp_path / "rec.npz"
    assert cli.main(["sample", str(run), "--noise", str(noise), "--out", str(rec)]) == 0
    assert np.array_equal(np.load(rec)["images"], digits)
    # conditional inversion records its class; sampling it back uses it
    assert cli.main(["invert", str(run), "--input", str(tmp_path / "in.npz"), "--steps", "20",
                     "--class", "3", "--sampler", "euler", "--out", str(noise)]) == 0
    assert cli.main(["sample", str(run), "--noise", str(noise), "--out", str(rec)]) == 0
    assert np.array_equal(np.load(rec)["images"], digits)
    # null-text inversion at guidance 3 samples back within one grey level
    assert cli.main(["invert", str(run), "--input", str(tmp_path / "in.npz"), "--steps", "10",
                     "--class", "3", "--guidance", "3", "--null-text", "--out",
                     str(noise)]) == 0
    assert cli.main(["sample", str(run), "--noise", str(noise), "--out", str(rec)]) == 0
    diff = np.abs(np.load(rec)["images"].astype(int) - digits)
    assert diff.max() <= 2 and diff.mean() < 0.2, (diff.max(), diff.mean())
    capsys.readouterr()
    assert cli.main(["invert", str(run), "--input", str(tmp_path / "in.npz"), "--null-text",
                     "--out", str(noise)]) == 2
    assert "--guidance W > 1" in capsys.readouterr().err
    out = tmp_path / "edit.npz"
    assert cli.main(["edit", str(run), "--input", str(tmp_path / "in.npz"), "--strength",
                     "0.4", "--class", "7", "--steps", "4", "--out", str(out)]) == 0
    assert np.load(out)["images"].shape == digits.shape
    capsys.readouterr()
    assert cli.main(["edit", str(run), "--input", str(tmp_path / "in.npz"), "--method", "p2p",
                     "--out", str(out)]) == 2
    assert "--source-prompt" in capsys.readouterr().err
    assert cli.main(["edit", str(run), "--input", str(tmp_path / "in.npz"), "--method", "p2p",
                     "--source-prompt", "a 3", "--prompt", "a thick 3", "--out", str(out)]) == 2
    assert "needs a text-conditioned run" in capsys.readouterr().err
    np.savez(tmp_path / "big.npz", images=np.zeros((1, 16, 16, 1), np.uint8))
    assert cli.main(["invert", str(run), "--input", str(tmp_path / "big.npz"), "--out",
                     str(noise)]) == 2
    assert "8x8" in capsys.readouterr().err
    assert cli.main(["sample", str(run), "--noise", str(tmp_path / "in.npz"), "--out",
                     str(rec)]) == 2
    assert "not a NOISE.npz" in capsys.readouterr().err


def _two_class_images():
    """Two classes of 1x2x4 'images' that differ only in their top row (+1 vs -1); the
    bottom row is shared (two patterns, in both classes)."""
    from sfumato.mixture import GaussianMixture

    g = torch.Generator().manual_seed(0)
    bottoms = torch.randn(2, 4, generator=g, dtype=torch.float64)
    means = torch.stack([torch.cat([torch.full((4,), top), b]) for top in (1.0, -1.0)
                         for b in bottoms])
    return GaussianMixture(means, torch.full((4,), 0.01), event_shape=(1, 2, 4),
                           classes=torch.tensor([0, 0, 1, 1]))


def test_diffedit_edits_where_the_classes_differ_and_nowhere_else():
    from sfumato.edit import diffedit, diffedit_mask, partial_grid

    gm = _two_class_images()
    x0 = gm.sample(8, generator=torch.Generator().manual_seed(1),
                   class_labels=torch.zeros(8, dtype=torch.long))
    src, tgt = {"class_labels": torch.zeros(8, dtype=torch.long)}, \
        {"class_labels": torch.ones(8, dtype=torch.long)}
    sig = partial_grid(0.7, 20, 0.002, 80.0)
    mask = diffedit_mask(gm, x0, float(sig[0]), src, tgt, n=4,
                         generator=torch.Generator().manual_seed(2))
    assert torch.equal(mask[:, 0, 0], torch.ones(8, 4, dtype=mask.dtype))  # the top row
    assert not mask[:, 0, 1].any()
    out = diffedit(gm, x0, mask, sig, src, tgt, sampler="heun")
    assert torch.equal(out[:, :, 1], x0[:, :, 1])  # untouched, exactly
    assert (out[:, 0, 0] < -0.5).all()  # the top row now says class 1
    with pytest.raises(UsageError, match="threshold"):
        diffedit_mask(gm, x0, 1.0, src, tgt, threshold=1.5, generator=torch.Generator())


def test_cli_diffedit(tiny_run, tmp_path, capsys):
    from sfumato.data import get_dataset, to_uint8

    run = tiny_run
    digits = to_uint8(get_dataset({"name": "digits"}).heldout[:3]).numpy()
    np.savez(tmp_path / "in.npz", images=digits)
    out, masks = tmp_path / "out.npz", tmp_path / "mask.npz"
    assert cli.main(["edit", str(run), "--input", str(tmp_path / "in.npz"), "--method",
                     "diffedit", "--source-class", "1", "--class", "7", "--steps", "5",
                     "--out", str(out), "--mask-out", str(masks)]) == 0
    got, m = np.load(out)["images"], np.load(masks)["images"]
    keep = m == 0
    assert np.array_equal(got[keep], digits[keep]) and 0 < (~keep).sum() < keep.size
    capsys.readouterr()
    assert cli.main(["edit", str(run), "--input", str(tmp_path / "in.npz"), "--method",
                     "diffedit", "--out", str(out)]) == 2
    assert "target" in capsys.readouterr().err


def test_sample_from_given_noise(gm):
    from sfumato.samplers import sample

    z = torch.randn(5, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    a = sample(gm, (5, 4), sampler="heun", steps=6, noise=z, dtype=torch.float64)
    b = sample_heun(gm, 80.0 * z, get_sigmas("karras", 6, sigma_min=0.002, sigma_max=80.0))
    assert torch.equal(a, b)
    with pytest.raises(UsageError, match="noise must have the sample shape"):
        sample(gm, (5, 4), noise=z[:2])


TINY_TEXT = {"data": {"name": "digits"},
             "model": {"type": "text_conditioned", "encoder": {"depth": 1},
                       "backbone": {"type": "unet", "image_size": 8, "in_channels": 1,
                                    "model_channels": 8, "channel_mult": [1, 2],
                                    "num_res_blocks": 1, "attention_resolutions": [4],
                                    "mid_attention": False, "norm_groups": 4,
                                    "context_dim": 16}},
             "text": {"encoder": "tiny"},
             "train": {"steps": 20, "batch_size": 16, "checkpoint_every": 0, "num_threads": 1,
                       "precision": "fp32"},
             "sample": {"sampler": "euler", "steps": 4, "n_grid": 4}}


def test_prompt_to_prompt_on_a_text_run(tmp_path, capsys):
    """A real image inverted under the source prompt comes back as the source image (null-text
    at guidance 3, exact at 1); the control changes the target; the CLI writes the edit."""
    from sfumato.data import to_uint8
    from sfumato.model import load
    from sfumato.train.trainer import train

    train(TINY_TEXT, out=tmp_path / "text", progress=False)
    m = load(tmp_path / "text")
    from sfumato.nets.context import CrossAttention

    for layer in (mod for mod in m.denoiser.modules() if isinstance(mod, CrossAttention)):
        torch.nn.init.normal_(layer.proj.weight, std=0.3,
                              generator=torch.Generator().manual_seed(0))  # attention matters
    x, _ = _heldout(3)
    for w in (1.0, 3.0):
        src, tgt = m.prompt_to_prompt("a thin 3", "a bold 3", x=x, guidance=w, steps=6)
        assert float((src - x).abs().max()) < (1e-3 if w == 1.0 else 0.05)
        assert float((tgt - x).abs().max()) > 1e-3
    free = m.prompt_to_prompt("a thin 3", "a bold 3", x=x, steps=6, cross_replace=0.0)[1]
    held = m.prompt_to_prompt("a thin 3", "a bold 3", x=x, steps=6, cross_replace=1.0)[1]
    assert not torch.allclose(free, held)
    with pytest.raises(UsageError, match="same number of tokens"):
        m.prompt_to_prompt("a thin 3", "a thick 3", n=2, steps=3)
    refined = m.prompt_to_prompt("a thin 3", "a thick 3", n=2, steps=3, mode="refine",
                                 reweight=("thick", 2.0))[1]
    assert refined.shape == (2, 1, 8, 8) and torch.isfinite(refined).all()
    np.savez(tmp_path / "in.npz", images=to_uint8(x).numpy())
    out = tmp_path / "p2p.npz"
    assert cli.main(["edit", str(tmp_path / "text"), "--input", str(tmp_path / "in.npz"),
                     "--method", "p2p", "--source-prompt", "a thin 3", "--prompt", "a thick 3",
                     "--p2p-mode", "refine", "--reweight", "thick=1.5", "--steps", "4",
                     "--out", str(out)]) == 0
    assert np.load(out)["images"].shape == (3, 8, 8, 1)
    capsys.readouterr()
    assert cli.main(["edit", str(tmp_path / "text"), "--input", str(tmp_path / "in.npz"),
                     "--method", "p2p", "--source-prompt", "a 3", "--prompt", "a 4",
                     "--reweight", "four", "--out", str(out)]) == 2
    assert "WORD=C" in capsys.readouterr().err

