"""Autoencoders: the KL term, vector quantisation, the adaptive GAN weight, the latent scale,
float32 under autocast, learning, exact resume with the discriminator, `sfumato reconstruct`."""

import pytest
import torch
from _util import tiny_autoencoder
from safetensors.torch import load_file

import sfumato
from sfumato.autoencoder import AutoencoderModel, latent_stats
from sfumato.autoencoder.objective import AutoencoderObjective
from sfumato.cli import main
from sfumato.errors import ConfigError, UsageError
from sfumato.metrics import psnr
from sfumato.nets import build_net
from sfumato.nets.autoencoder import Autoencoder, VectorQuantizer
from sfumato.run import Run
from sfumato.train.trainer import Trainer, train

pytestmark = pytest.mark.usefixtures("one_thread_module")

GAN = {"gan": 0.5, "gan_start": 3, "disc_channels": 8, "disc_layers": 1}


def _cfg(**sections):
    """The tiny autoencoder with the GAN on from step 3 (and ``sections`` updated)."""
    return tiny_autoencoder(**{**sections, "reconstruction": {**GAN, **sections.get(
        "reconstruction", {})}})


def test_kl_term_is_the_closed_form_gaussian_kl():
    net = Autoencoder(1, "kl", 2, channels=4, latent_channels=2, norm_groups=2)
    x = torch.rand(3, 1, 8, 8) * 2 - 1
    _, aux = net(x, torch.Generator().manual_seed(0))
    mean, logvar = net.moments(x)
    q = torch.distributions.Normal(mean, (0.5 * logvar).exp())
    p = torch.distributions.Normal(torch.zeros_like(mean), torch.ones_like(mean))
    expect = torch.distributions.kl_divergence(q, p).reshape(3, -1).sum(1)
    torch.testing.assert_close(aux["kl"], expect, rtol=1e-5, atol=1e-5)
    # the posterior sample uses the generator: same seed, same reconstruction
    a = net(x, torch.Generator().manual_seed(1))[0]
    assert torch.equal(a, net(x, torch.Generator().manual_seed(1))[0])
    assert torch.equal(net.encode(x), mean)


def test_vector_quantizer_picks_the_nearest_code_and_passes_gradients_straight_through():
    vq = VectorQuantizer(16, 3).eval()
    z = torch.randn(2, 3, 4, 5, requires_grad=True)
    zq, commit, idx = vq(z)
    flat = z.detach().permute(0, 2, 3, 1).reshape(-1, 3)
    brute = torch.cdist(flat, vq.codebook.detach()).argmin(1)
    assert torch.equal(idx.reshape(-1), brute)
    torch.testing.assert_close(zq.detach().permute(0, 2, 3, 1).reshape(-1, 3),
                               vq.codebook.detach()[brute])
    torch.testing.assert_close(commit, (z.detach() - zq.detach()).pow(2).reshape(2, -1).mean(1))
    zq.sum().backward()
    assert torch.equal(z.grad, torch.ones_like(z))  # straight-through: d zq / d z = I


def test_ema_codebook_update_moves_codes_to_their_cluster_means_and_restarts_dead_ones():
    vq = VectorQuantizer(4, 2, decay=0.0, restart_below=0.5).train()
    vq.generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        vq.codebook.copy_(torch.tensor([[0.0, 0.0], [10.0, 10.0], [-10.0, 10.0], [50.0, 50.0]]))
    pts = torch.tensor([[0.1, 0.0], [-0.1, 0.2], [9.0, 11.0], [11.0, 10.0], [-9.0, 9.0]])
    z = pts.T.reshape(1, 2, 5, 1)
    vq(z)
    cb = vq.codebook.detach()
    # decay 0: each used code is exactly its cluster's mean (eps-smoothing aside)
    torch.testing.assert_close(cb[0], pts[:2].mean(0), atol=1e-4, rtol=0)
    torch.testing.assert_close(cb[1], pts[2:4].mean(0), atol=1e-4, rtol=0)
    torch.testing.assert_close(cb[2], pts[4], atol=1e-4, rtol=0)
    # code 3 was never used: restarted at one of the batch's vectors
    assert any(torch.allclose(cb[3], p) for p in pts)
    s = VectorQuantizer.stats(torch.tensor([0, 0, 1, 1]), 4)
    assert s["codes_used"] == 0.5 and s["perplexity"] == pytest.approx(2.0)


def test_adaptive_weight_is_the_ratio_of_last_layer_gradient_norms(tmp_path):
    t = Trainer(_cfg(), tmp_path / "run", progress=False)
    obj, net = t.objective, t.net
    x = t.x_train[:4]
    recon, _ = net(x, torch.Generator().manual_seed(0))
    rec = (recon - x).abs().mean()
    g = -obj.disc(recon).mean()
    lam = obj._adaptive_weight(rec, g)
    w = net.last_layer()
    expect = torch.autograd.grad(rec, w, retain_graph=True)[0].norm() / \
        (torch.autograd.grad(g, w, retain_graph=True)[0].norm() + 1e-4)
    torch.testing.assert_close(lam, expect)
    assert isinstance(obj, AutoencoderObjective) and lam > 0


def test_clear_errors_for_bad_autoencoder_configs(tmp_path):
    with pytest.raises(ConfigError, match="power of 2"):
        build_net({"type": "autoencoder", "factor": 3})
    with pytest.raises(ConfigError, match="channel_mult needs"):
        build_net({"type": "autoencoder", "factor": 4, "channel_mult": [1, 2]})
    with pytest.raises(ConfigError, match="'kl' or 'vq'"):
        build_net({"type": "autoencoder", "kind": "gauss"})
    with pytest.raises(ConfigError, match="divisible by 4"):
        build_net({"type": "autoencoder", "factor": 4, "channels": 4, "norm_groups": 2})(
            torch.zeros(1, 1, 10, 10))
    with pytest.raises(ConfigError, match="reconstruction.kll"):
        Trainer(_cfg(reconstruction={"kll": 1.0}), tmp_path / "x", progress=False)


@pytest.fixture(scope="module")
def ae_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ae") / "run"
    train(_cfg(train={"steps": 150, "checkpoint_every": 30, "keep_last": 5},
               reconstruction={"gan_start": 100}),
          out=out, progress=False)
    return out


def test_autoencoder_learns_and_stores_its_latent_scale(ae_run):
    run = Run(ae_run)
    assert run.kind == "autoencoder"
    ae = sfumato.load(ae_run)
    assert isinstance(ae, AutoencoderModel)
    data = sfumato.data.get_dataset({"name": "digits"})
    x = data.heldout[:100]
    first = AutoencoderModel(Run(run.checkpoints(every=True)[0]))
    p0, p1 = psnr(first.reconstruct(x), x).mean(), psnr(ae.reconstruct(x), x).mean()
    assert p1 > p0 + 1.0, (p0, p1)   # learning curve: later checkpoint reconstructs better
    assert p1 > 17.0
    # the stored scale makes the training latents unit-variance, mean zero
    stats = latent_stats(ae.net, data.train[:256])
    assert stats["scale"] == pytest.approx(ae.scale, rel=1e-5)
    z = ae.encode(data.train[:256])
    assert float(z.double().std()) == pytest.approx(1.0, abs=1e-4)
    assert abs(float(z.double().mean())) < 1e-4
    assert z.shape[1:] == (2, 4, 4) == ae.latent_shape
    torch.testing.assert_close(ae.decode(z), ae.reconstruct(data.train[:256]))
    with pytest.raises(UsageError, match="shape"):
        ae.encode(torch.zeros(2, 1, 16, 16))
    assert (ae_run / "samples").is_dir()


def test_encode_and_decode_stay_float32_under_bf16_autocast(ae_run):
    ae = sfumato.load(ae_run)
    x = sfumato.data.get_dataset({"name": "digits"}).heldout[:8]
    z = ae.encode(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z_bf = ae.encode(x)
        x_bf = ae.decode(z)
    assert z_bf.dtype == torch.float32 and x_bf.dtype == torch.float32
    assert torch.equal(z_bf, z) and torch.equal(x_bf, ae.decode(z))


class _Killed(Exception):
    pass


@pytest.mark.parametrize("kind", ["kl", "vq"])
def test_killed_and_resumed_autoencoder_is_bitwise_the_uninterrupted_one(tmp_path, monkeypatch,
                                                                         kind):
    cfg = _cfg(model={"kind": kind, "codebook_size": 16})
    train(cfg, out=tmp_path / "ref", progress=False)
    original = AutoencoderObjective.at_step

    def killing(self, step):  # dies after the step-3 checkpoint, with the GAN running
        if step == 4:
            raise _Killed
        original(self, step)

    monkeypatch.setattr(AutoencoderObjective, "at_step", killing)
    with pytest.raises(_Killed):
        train(cfg, out=tmp_path / "cut", progress=False)
    monkeypatch.setattr(AutoencoderObjective, "at_step", original)
    train(cfg, out=tmp_path / "cut", progress=False)
    for stem in ("model", "ema", "optimizer", "objective"):
        a = load_file(str(tmp_path / "ref" / "checkpoint" / f"{stem}.safetensors"))
        b = load_file(str(tmp_path / "cut" / "checkpoint" / f"{stem}.safetensors"))
        assert a.keys() == b.keys() and a
        for k in a:
            assert torch.equal(a[k], b[k]), f"{stem}/{k} differs after resume"


def test_vq_autoencoder_reports_codebook_use(tmp_path):
    out = tmp_path / "vq"
    train(_cfg(model={"kind": "vq", "codebook_size": 32}, train={"steps": 20}), out=out,
          progress=False)
    m = sfumato.load(out).evaluate(n=64)
    assert 0 < m["codes_used"] <= 1 and 1 <= m["perplexity"] <= 32
    assert m["psnr"] > 0 and m["rfd"] > 0 and m["fd_floor"] > 0


def test_perceptual_loss_is_zero_on_equal_images_and_grows_with_distortion(tmp_path):
    from sfumato.autoencoder.perceptual import PerceptualLoss

    data = sfumato.data.get_dataset({"name": "digits"})
    loss = PerceptualLoss.for_data(data, cache=str(tmp_path))
    x = data.heldout[:16]
    g = torch.Generator().manual_seed(0)
    small = (x + 0.1 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    big = (x + 0.5 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    assert torch.equal(loss(x, x), torch.zeros(16))
    assert (loss(small, x) < loss(big, x)).float().mean() > 0.9
    y = small.clone().requires_grad_()
    loss(y, x).sum().backward()
    assert y.grad.abs().sum() > 0 and not any(p.requires_grad for p in loss.parameters())
    unlabelled = sfumato.data.get_dataset({"name": "moons"})
    with pytest.raises(ConfigError, match="perceptual 0"):
        PerceptualLoss.for_data(unlabelled)


def test_cli_reconstruct_and_info(ae_run, tmp_path, capsys):
    import numpy as np

    from sfumato.data import to_uint8

    x = sfumato.data.get_dataset({"name": "digits"}).heldout[:6]
    np.savez(tmp_path / "in.npz", images=to_uint8(x).numpy())
    assert main(["reconstruct", str(ae_run), "--input", str(tmp_path / "in.npz"),
                 "--out", str(tmp_path / "rec.npz")]) == 0
    out = capsys.readouterr().out
    assert "PSNR" in out
    rec = np.load(tmp_path / "rec.npz", allow_pickle=False)["images"]
    assert rec.shape == (6, 8, 8, 1) and rec.dtype == np.uint8
    assert main(["reconstruct", str(ae_run), "--input", str(tmp_path / "in.npz"),
                 "--out", str(tmp_path / "rec.png")]) == 0
    assert (tmp_path / "rec.png").is_file()
    assert main(["info", str(ae_run)]) == 0
    out = capsys.readouterr().out
    assert "autoencoder" in out and "latent" in out and "scale" in out
