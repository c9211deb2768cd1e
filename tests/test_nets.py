"""Networks: shapes, zero-initialisation, conditioning hooks, gradient flow, determinism,
a tiny overfit run, build_net errors, and the diffusers adapter behind sfumato's samplers."""

import pytest
import torch
from _util import perturb_

from sfumato.denoiser import Denoiser, EDMDenoiser
from sfumato.nets import (
    DiT,
    FourierEmbedding,
    PositionalEmbedding,
    UNet,
    build_net,
    count_params,
)
from sfumato.nets.dit import DiTBlock, sincos_pos_embed_2d
from sfumato.nets.unet import AttentionBlock, ResBlock
from sfumato.process import VPDiscrete
from sfumato.samplers import sample, sample_euler

B = 3



def tiny_unet(size=8, ch=1, **kw):
    cfg = dict(image_size=size, in_channels=ch, model_channels=16, channel_mult=(1, 2),
               num_res_blocks=1, attention_resolutions=(size // 2,), num_heads=2,
               norm_groups=8)
    return UNet(**{**cfg, **kw})


def tiny_dit(size=8, ch=1, **kw):
    cfg = dict(image_size=size, in_channels=ch, patch_size=2, hidden_size=32, depth=2,
               num_heads=2, freq_dim=32)
    return DiT(**{**cfg, **kw})


def tiny_mlp(**kw):
    return build_net({"type": "mlp", "dim": 2, "hidden": 32, "num_blocks": 2, **kw})


MAKERS = {
    "mlp": (tiny_mlp, (B, 2)),
    "unet8": (lambda **kw: tiny_unet(8, 1, **kw), (B, 1, 8, 8)),
    "unet28": (lambda **kw: tiny_unet(28, 1, channel_mult=(1, 2, 2),
                                      attention_resolutions=(7,), **kw), (B, 1, 28, 28)),
    "unet28patch2": (lambda **kw: tiny_unet(28, 1, patch_size=2, attention_resolutions=(7,),
                                            **kw), (B, 1, 28, 28)),
    "unet16rgb": (lambda **kw: tiny_unet(16, 3, **kw), (B, 3, 16, 16)),
    "dit8": (lambda **kw: tiny_dit(8, 1, **kw), (B, 1, 8, 8)),
    "dit16rgb": (lambda **kw: tiny_dit(16, 3, patch_size=4, **kw), (B, 3, 16, 16)),
}



def inputs(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randn(shape[0], generator=g)


@pytest.mark.parametrize("name", list(MAKERS))
@pytest.mark.parametrize("embedding", ["positional", "fourier"])
def test_output_shape_and_fresh_net_is_zero(name, embedding):
    make, shape = MAKERS[name]
    torch.manual_seed(0)
    net = make(embedding=embedding)
    x, c = inputs(shape)
    y = net(x, c)
    assert y.shape == x.shape
    # zero-initialised output layers: a fresh network is exactly the zero function
    assert torch.equal(y, torch.zeros_like(y))
    perturb_(net)
    y = net(x, c)
    assert y.shape == x.shape and torch.isfinite(y).all() and y.abs().max() > 0


def test_residual_blocks_start_as_identity():
    torch.manual_seed(0)
    h, emb = torch.randn(2, 16, 4, 4), torch.randn(2, 8)
    torch.testing.assert_close(ResBlock(16, 16, 8, norm_groups=4)(h, emb), h, rtol=0, atol=0)
    torch.testing.assert_close(AttentionBlock(16, 2, norm_groups=4)(h), h, rtol=0, atol=0)
    tokens, c = torch.randn(2, 5, 32), torch.randn(2, 32)
    torch.testing.assert_close(DiTBlock(32, 4)(tokens, c), tokens, rtol=0, atol=0)


def test_out_channels_and_scalar_c_noise():
    torch.manual_seed(0)
    net = perturb_(tiny_unet(8, 1, out_channels=2))
    x = torch.randn(B, 1, 8, 8)
    y = net(x, 0.3)
    assert y.shape == (B, 2, 8, 8)
    torch.testing.assert_close(y, net(x, torch.full((B,), 0.3)))
    with pytest.raises(ValueError, match="c_noise"):
        net(x, torch.zeros(B + 1))


@pytest.mark.parametrize("name", list(MAKERS))
def test_class_labels_and_null_class(name):
    make, shape = MAKERS[name]
    torch.manual_seed(0)
    net = perturb_(make(num_classes=10))
    x, c = inputs(shape)
    y0 = net(x, c, class_labels=torch.zeros(B, dtype=torch.long))
    y1 = net(x, c, class_labels=torch.ones(B, dtype=torch.long))
    assert not torch.allclose(y0, y1)
    # index num_classes is the null class; class_labels=None means the null class
    null = net(x, c, class_labels=torch.full((B,), 10))
    torch.testing.assert_close(net(x, c), null, rtol=0, atol=0)
    assert not torch.allclose(null, y0)
    with pytest.raises(ValueError, match="class_labels"):
        net(x, c, class_labels=torch.zeros(B + 1, dtype=torch.long))
    uncond = make()
    with pytest.raises(ValueError, match="num_classes=None"):
        uncond(x, c, class_labels=torch.zeros(B, dtype=torch.long))


@pytest.mark.parametrize("name", ["mlp", "unet8", "dit8"])
def test_extra_embedding_and_context_hooks(name):
    make, shape = MAKERS[name]
    torch.manual_seed(0)
    net = perturb_(make())
    x, c = inputs(shape)
    extra = torch.randn(B, net.emb_dim)
    assert not torch.allclose(net(x, c, extra_embedding=extra), net(x, c))
    torch.testing.assert_close(net(x, c, extra_embedding=torch.zeros(B, net.emb_dim)),
                               net(x, c))
    with pytest.raises(ValueError, match="extra_embedding"):
        net(x, c, extra_embedding=torch.zeros(B, net.emb_dim + 1))
    with pytest.raises(ValueError, match="context"):
        net(x, c, context=torch.zeros(B, 4, 8))


@pytest.mark.parametrize("name", list(MAKERS))
def test_gradients_reach_every_parameter(name):
    make, shape = MAKERS[name]
    torch.manual_seed(0)
    net = perturb_(make(num_classes=3, dropout=0.1))
    x, c = inputs(shape)
    net(x, c, class_labels=torch.tensor([0, 1, 3])).square().mean().backward()
    for n, p in net.named_parameters():
        assert p.grad is not None and p.grad.abs().max() > 0, f"no gradient reaches {n}"


@pytest.mark.parametrize("name", ["mlp", "unet8", "dit8"])
def test_deterministic_under_seed(name):
    make, shape = MAKERS[name]
    torch.manual_seed(123)
    a = make(embedding="fourier")
    torch.manual_seed(123)
    b = make(embedding="fourier")
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    perturb_(a), perturb_(b)
    x, c = inputs(shape)
    assert torch.equal(a(x, c), b(x, c))
    assert torch.equal(a(x, c), a(x, c))
    torch.manual_seed(124)
    other = make(embedding="fourier")
    assert not all(torch.equal(v, other.state_dict()[k]) for k, v in sa.items())


def test_unet_overfits_a_fixed_batch():
    """100 Adam steps on one fixed noisy batch through the EDM denoiser's training target."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    net = tiny_unet(8, 1)
    den = EDMDenoiser(net)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 8), torch.linspace(-1, 1, 8), indexing="ij")
    f = torch.randn(16, 4, generator=g)
    a, b, ab, d = (f[:, i, None, None, None] for i in range(4))
    x0 = torch.tanh(a * xx + b * yy + ab * xx * yy + d)  # (16, 1, 8, 8) smooth images
    eps = torch.randn(16, 1, 8, 8, generator=g)
    sigma = torch.exp(torch.randn(16, generator=g) * 1.2 - 1.2)
    s = sigma[:, None, None, None]
    _, _, c_in, c_noise = den.precondition(s)
    target = den.raw_target(x0, eps, sigma)
    x_in, c_noise = c_in * (x0 + s * eps), c_noise.reshape(-1)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    losses = []
    for _ in range(100):
        opt.zero_grad()
        loss = (net(x_in, c_noise) - target).square().mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 5, (losses[0], losses[-1])


def test_unet_size_checks():
    with pytest.raises(ValueError, match=r"divisible by patch_size \* 2\*\*\(levels-1\) = 8"):
        UNet(28, 1, channel_mult=(1, 2, 2, 2))
    with pytest.raises(ValueError, match="= 8 for channel_mult \\(1, 2, 2\\), patch_size 2"):
        UNet(28, 1, channel_mult=(1, 2, 2), patch_size=2)
    with pytest.raises(ValueError, match="level sizes are \\[28, 14, 7\\]"):
        UNet(28, 1, model_channels=32, channel_mult=(1, 2, 2), attention_resolutions=(8,))
    with pytest.raises(ValueError, match="norm_groups 32 does not divide"):
        UNet(8, 1, model_channels=16)
    net = tiny_unet(8, 1)
    with pytest.raises(ValueError, match="input size 9x9 is not divisible"):
        net(torch.zeros(1, 1, 9, 9), torch.zeros(1))
    with pytest.raises(ValueError, match="expects x of shape"):
        net(torch.zeros(1, 3, 8, 8), torch.zeros(1))
    # other sizes that divide run fine (non-square too)
    assert net(torch.zeros(2, 1, 12, 16), torch.zeros(2)).shape == (2, 1, 12, 16)


def test_dit_other_sizes_and_position_embedding():
    pe = sincos_pos_embed_2d(8, 2, 3)
    assert pe.shape == (6, 8)
    torch.testing.assert_close(pe[0], torch.tensor([0.0, 0, 1, 1, 0, 0, 1, 1]))
    # second token: same row (row half unchanged), column 1
    torch.testing.assert_close(pe[1, :4], pe[0, :4])
    assert not torch.allclose(pe[1, 4:], pe[0, 4:])
    net = perturb_(tiny_dit(8, 1))
    assert net(torch.randn(2, 1, 12, 8), torch.zeros(2)).shape == (2, 1, 12, 8)
    with pytest.raises(ValueError, match="patch_size"):
        net(torch.zeros(1, 1, 9, 8), torch.zeros(1))


def test_embeddings():
    pos = PositionalEmbedding(6, max_period=100.0)
    e = pos(torch.tensor([0.0, 2.0]))
    torch.testing.assert_close(e[0], torch.tensor([1.0, 1, 1, 0, 0, 0]))
    w = torch.tensor([1.0, 100 ** (-1 / 3), 100 ** (-2 / 3)])
    torch.testing.assert_close(e[1], torch.cat([(2 * w).cos(), (2 * w).sin()]))
    assert PositionalEmbedding(5)(torch.zeros(2)).shape == (2, 5)
    torch.manual_seed(0)
    f = FourierEmbedding(8, scale=16.0)
    assert "freqs" in f.state_dict()  # the random frequencies are saved with the weights
    ef = f(torch.tensor([0.0, 0.5]))
    torch.testing.assert_close(ef[0], torch.tensor([1.0] * 4 + [0.0] * 4))
    arg = 2 * torch.pi * 0.5 * f.freqs
    torch.testing.assert_close(ef[1], torch.cat([arg.cos(), arg.sin()]))
    with pytest.raises(ValueError, match="unknown embedding"):
        tiny_unet(embedding="sinusoidal")


def test_mlp_concat_mode():
    torch.manual_seed(0)
    net = perturb_(tiny_mlp(emb_mode="concat"))
    x, c = inputs((B, 2))
    y = net(x, c)
    assert y.shape == (B, 2)
    assert not torch.allclose(y, net(x, c + 1))
    with pytest.raises(ValueError, match="emb_mode"):
        tiny_mlp(emb_mode="mul")


def test_build_net_and_errors():
    net = build_net({"type": "unet", "image_size": 8, "in_channels": 1, "model_channels": 32,
                     "attention_resolutions": [4]})
    assert isinstance(net, UNet) and count_params(net) > 0
    assert count_params(net, trainable_only=True) == count_params(net)
    cfg = {"type": "unet", "image_size": 8, "in_channels": 1, "model_chanels": 32}
    with pytest.raises(ValueError, match="'model_chanels' \\(did you mean 'model_channels'"):
        build_net(cfg)
    assert "model_chanels" in cfg and cfg["type"] == "unet"  # the config is not modified
    with pytest.raises(ValueError, match="num_res_blocks.*valid keys: .*depth"):
        build_net({"type": "dit", "image_size": 8, "in_channels": 1, "num_res_blocks": 2})
    with pytest.raises(ValueError, match="unknown net type 'unte' \\(did you mean 'unet'\\?\\)"):
        build_net({"type": "unte"})
    with pytest.raises(ValueError, match="needs a 'type'"):
        build_net({"image_size": 8})


def test_unet_samples_through_denoiser():
    torch.manual_seed(0)
    den = EDMDenoiser(perturb_(tiny_unet(8, 1, num_classes=10)))
    with torch.no_grad():
        out = sample(den, (2, 1, 8, 8), steps=4, generator=torch.Generator().manual_seed(0),
                     class_labels=torch.tensor([3, 10]))
    assert out.shape == (2, 1, 8, 8) and torch.isfinite(out).all()


# --- diffusers adapter ---------------------------------------------------------------------

DIFF_CFG = dict(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(32, 64),
                layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=16,
                norm_num_groups=8)


def test_diffusers_unet_is_sampleable_by_sfumato():
    pytest.importorskip("diffusers")
    torch.manual_seed(0)
    net = build_net({"type": "diffusers_unet", "config": DIFF_CFG})
    process = VPDiscrete()
    den = Denoiser(net, target="eps", process=process)
    x, c = inputs((2, 1, 8, 8))
    assert net(x, c * 500 + 500).shape == (2, 1, 8, 8)
    sig = torch.tensor([10.0, 3.0, 1.0, 0.3, 0.0])
    with torch.no_grad():
        out = sample_euler(den, sig[0] * x, sig)
    assert out.shape == (2, 1, 8, 8) and torch.isfinite(out).all()
    # trainable: gradients reach the wrapped model through the denoiser
    den(x, torch.tensor([0.5, 2.0])).square().mean().backward()
    assert net.model.conv_in.weight.grad is not None


def test_diffusers_unet_class_labels_and_errors():
    pytest.importorskip("diffusers")
    from sfumato.nets import DiffusersUNet

    torch.manual_seed(0)
    net = DiffusersUNet({**DIFF_CFG, "num_class_embeds": 11})
    perturb_(net)
    x, c = inputs((2, 1, 8, 8))
    y0 = net(x, c, class_labels=torch.tensor([0, 0]))
    y1 = net(x, c, class_labels=torch.tensor([1, 1]))
    assert not torch.allclose(y0, y1)
    with pytest.raises(ValueError, match="pass class_labels"):
        net(x, c)
    with pytest.raises(ValueError, match="no num_class_embeds"):
        DiffusersUNet(DIFF_CFG)(x, c, class_labels=torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="'block_out_channel' \\(did you mean"):
        DiffusersUNet({**DIFF_CFG, "block_out_channel": (32, 64)})
    with pytest.raises(ValueError, match="fourier"):
        DiffusersUNet({**DIFF_CFG, "time_embedding_type": "fourier"})
