"""ControlNet: a fresh one leaves the frozen base exactly unchanged, training moves only the
ControlNet, the U-Net's residual hooks check their inputs. The hints it is trained on are
tested in test_control.py."""

import json

import pytest
import torch
from _util import perturb_

from sfumato.denoiser import EDMDenoiser
from sfumato.nets import DiT, UNet
from sfumato.nets.context import prepare_context
from sfumato.nets.controlnet import ControlledUNet, ControlNet

pytestmark = pytest.mark.usefixtures("one_thread")

B = 3



def tiny_unet(size=8, **kw):
    cfg = dict(image_size=size, in_channels=1, model_channels=16, channel_mult=(1, 2),
               num_res_blocks=1, attention_resolutions=(size // 2,), num_heads=2,
               norm_groups=8)
    return UNet(**{**cfg, **kw})



def batch(size, seed=0, channels=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, channels, size, size, generator=g)
    c = torch.randn(B, generator=g)
    hint = torch.randn(B, 1, size, size, generator=g).sign()
    return x, c, hint


BASES = {
    "patch1": (lambda: tiny_unet(8), 8, {}),
    "patch2_28": (lambda: tiny_unet(28, patch_size=2, attention_resolutions=(7,)), 28,
                  {"hint_embed_channels": (8,)}),
    "classes_3levels": (lambda: tiny_unet(8, num_classes=10, channel_mult=(1, 2, 2),
                                          num_res_blocks=2),
                        8, {"hint_embed_channels": (8, 16, 16)}),
    "text": (lambda: tiny_unet(8, context_dim=8), 8, {}),
}


@pytest.mark.parametrize("name", list(BASES))
def test_fresh_controlnet_leaves_the_base_exactly_unchanged(name):
    make, size, cfg = BASES[name]
    torch.manual_seed(0)
    base = perturb_(make())
    net = ControlledUNet(base, **cfg)
    x, c, hint = batch(size)
    kw = {"class_labels": torch.tensor([0, 3, 10])} if base.num_classes else {}
    if base.context_dim:
        kw["context"] = torch.randn(B, 5, 8)
        kw["context_mask"] = torch.arange(5) < torch.tensor([[5], [2], [0]])
    ref = base(x, c, **kw)
    assert ref.abs().max() > 0
    assert torch.equal(net(x, c, hint=hint, **kw), ref)  # zero convs: eq. (2) = eq. (1)
    assert torch.equal(net(x, c, **kw), ref)  # hint=None is the base
    # the residuals match the skip features and middle output of the base's encoder
    down, mid = net.controlnet(x, c, hint, **kw)
    emb, ctx = prepare_context(base.context_embed, "UNet",
                               base.cond(c, B, x.device, kw.get("class_labels")),
                               kw.get("context"), kw.get("context_mask"))
    hs, h_mid = base.encode(x, emb, ctx)
    assert [d.shape for d in down] == [h.shape for h in hs] and mid.shape == h_mid.shape
    assert all(torch.equal(d, torch.zeros_like(d)) for d in [*down, mid])
    # through the Denoiser: the hint rides in **cond and is not scaled by c_in
    sigma = torch.tensor([0.1, 1.0, 10.0])
    torch.testing.assert_close(EDMDenoiser(net)(x, sigma, hint=hint, **kw),
                               EDMDenoiser(base)(x, sigma, **kw), rtol=0, atol=0)


def test_training_moves_only_the_controlnet_and_the_hint_takes_effect():
    torch.manual_seed(0)
    base = perturb_(tiny_unet(8))
    before = {k: v.clone() for k, v in base.state_dict().items()}
    net = ControlledUNet(base)
    cn = net.controlnet
    assert {id(p) for p in net.trainable_parameters()} == {id(p) for p in cn.parameters()}
    assert not any(p.requires_grad for p in base.parameters())
    assert all(p.requires_grad for p in cn.parameters())
    x, c, hint = batch(8)
    target = torch.randn_like(x)
    opt = torch.optim.SGD(net.trainable_parameters(), lr=0.5)

    def step():
        opt.zero_grad()
        torch.nn.functional.mse_loss(net(x, c, hint=hint), target).backward()
        grads = {n: p.grad for n, p in cn.named_parameters()}
        opt.step()
        return grads

    grads = step()
    for k, v in base.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in base.parameters())
    zero_conv_grads = [g for n, g in grads.items() if "zero_conv" in n]
    assert len(zero_conv_grads) == 2 * (len(base.down) + 2)  # weight + bias of each
    assert all(g is not None and g.abs().max() > 0 for g in zero_conv_grads)
    # the zero convs now pass the copy's features: control changes the output, None does not
    assert not torch.allclose(net(x, c, hint=hint), base(x, c))
    assert torch.equal(net(x, c), base(x, c))
    # the hint encoder's own zero conv only gets gradient once the output zero convs are
    # non-zero (step 2); from then on the hint itself steers the output
    assert not grads["hint_encoder.conv_out.weight"].any()
    step()
    other = -hint
    assert not torch.allclose(net(x, c, hint=hint), net(x, c, hint=other))
    for k, v in base.state_dict().items():
        assert torch.equal(v, before[k]), k
    # control_scale multiplies every residual: 0 is the base, 2 doubles them
    assert torch.equal(net(x, c, hint=hint, control_scale=0.0), base(x, c))
    d1, m1 = cn(x, c, hint)
    d2, m2 = cn(x, c, hint, conditioning_scale=2.0)
    torch.testing.assert_close(m2, 2 * m1)
    for a, b in zip(d1, d2, strict=True):
        torch.testing.assert_close(b, 2 * a)
    # a hint with leading dim 1 is shared by the batch
    torch.testing.assert_close(net(x, c, hint=hint[:1]), net(x, c, hint=hint[:1].expand_as(x)))


def test_controlnet_state_dict_and_config_rebuild_it():
    torch.manual_seed(0)
    base = perturb_(tiny_unet(8))
    net = ControlledUNet(base, hint_embed_channels=(8, 16))
    perturb_(net.controlnet, seed=2)
    sd = net.controlnet.state_dict()
    assert sd and not any(k.startswith("base") for k in sd)
    cfg = json.loads(json.dumps(net.controlnet_config))
    assert cfg == {"hint_channels": 1, "hint_embed_channels": [8, 16]}
    again = ControlNet.from_unet(base, **cfg)
    again.load_state_dict(sd)
    rebuilt = ControlledUNet(base, controlnet=again)
    x, c, hint = batch(8)
    assert torch.equal(rebuilt(x, c, hint=hint), net(x, c, hint=hint))
    with pytest.raises(ValueError, match="either a controlnet or its config"):
        ControlledUNet(base, controlnet=again, hint_channels=1)


def test_hooks_and_inputs_are_checked():
    torch.manual_seed(0)
    base = perturb_(tiny_unet(8))
    x, c, hint = batch(8)
    hs, h_mid = base.encode(x, base.cond(c, B, x.device))
    zeros = [torch.zeros_like(h) for h in hs]
    assert torch.equal(base(x, c, down_residuals=zeros, mid_residual=torch.zeros_like(h_mid)),
                       base(x, c))
    with pytest.raises(ValueError, match=f"one tensor per skip feature: {len(hs)} for this"):
        base(x, c, down_residuals=zeros[:-1])
    bad = [*zeros[:2], torch.zeros(B, 3, 2, 2), *zeros[3:]]
    with pytest.raises(ValueError, match=r"down_residuals\[2\] has shape \(3, 3, 2, 2\)"):
        base(x, c, down_residuals=bad)
    with pytest.raises(ValueError, match="mid_residual has shape"):
        base(x, c, mid_residual=torch.zeros(B, 1, 1, 1))
    net = ControlledUNet(base)
    with pytest.raises(ValueError, match=r"hint must have shape \(B, 1, H, W\) = \(3, 1, 8, 8\)"):
        net(x, c, hint=hint[:, :, :4])
    with pytest.raises(ValueError, match="hint must have shape"):
        net(x, c, hint=hint[:2])
    with pytest.raises(ValueError, match="expects x of shape"):
        net.controlnet(x.expand(B, 2, 8, 8), c, hint)
    with pytest.raises(ValueError, match="no cross-attention"):
        net(x, c, hint=hint, context=torch.zeros(B, 4, 8))
    dit = DiT(image_size=8, in_channels=1, patch_size=2, hidden_size=32, depth=1, num_heads=2)
    with pytest.raises(TypeError, match="needs a sfumato UNet .* got DiT"):
        ControlNet.from_unet(dit)
    with pytest.raises(TypeError, match="got EDMDenoiser \\(it wraps one: pass its .net\\)"):
        ControlNet.from_unet(EDMDenoiser(base))
