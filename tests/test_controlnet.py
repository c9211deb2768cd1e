"""ControlNet: a fresh one leaves the frozen base exactly unchanged, training moves only the
ControlNet, the U-Net's residual hooks check their inputs; hints (Sobel edges, coarse masks),
their IoU and reading a hint image."""

import json

import numpy as np
import pytest
import torch
from _util import perturb_

from sfumato.control import (
    HINTS,
    SOBEL_MAX,
    coarse_mask,
    edge_map,
    hint_iou,
    load_hint,
    make_hint,
)
from sfumato.data.base import from_uint8
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


# -- hints ---------------------------------------------------------------------------------------
def square(size, lo, hi, channels=1):
    """Images (1, C, size, size): -1 background, +1 on rows/cols lo..hi (inclusive)."""
    x = -torch.ones(1, channels, size, size)
    x[..., lo:hi + 1, lo:hi + 1] = 1
    return x


def on(size, lo, hi):
    """bool (size, size) True on rows/cols lo..hi (inclusive)."""
    m = torch.zeros(size, size, dtype=torch.bool)
    if hi >= lo:
        m[lo:hi + 1, lo:hi + 1] = True
    return m


@pytest.mark.parametrize("size,lo,hi", [(8, 2, 5), (28, 9, 18), (28, 0, 10)])
def test_edge_map_of_a_square_is_its_outline(size, lo, hi):
    e = edge_map(square(size, lo, hi, channels=3))
    assert e.shape == (1, 1, size, size) and set(e.unique().tolist()) == {-1.0, 1.0}
    # the two-pixel band: the 3x3 dilation minus the 3x3 erosion; the border is replicated,
    # so a square touching it has no edge there (it does not erode from that side)
    eroded = on(size, lo + 1 if lo > 0 else 0, hi - 1 if hi < size - 1 else hi)
    expected = on(size, max(lo - 1, 0), min(hi + 1, size - 1)) & ~eroded
    assert torch.equal(e[0, 0] > 0, expected)
    assert torch.equal(hint_iou(e, e), torch.ones(1))
    # flat images have no edges; the threshold is relative to SOBEL_MAX = sqrt(20)
    assert (edge_map(torch.full((2, 1, size, size), 0.3)) == -1).all()
    assert SOBEL_MAX == pytest.approx(20**0.5)
    # outer corners have magnitude sqrt(2) = 0.316 SOBEL_MAX: gone at threshold 0.35
    e35 = edge_map(square(size, lo, hi), threshold=0.35)[0, 0] > 0
    for i, j in [(lo - 1, lo - 1), (lo - 1, hi + 1), (hi + 1, lo - 1), (hi + 1, hi + 1)]:
        if 0 <= min(i, j) and max(i, j) < size:
            expected[i, j] = False
    assert torch.equal(e35, expected)
    with pytest.raises(ValueError, match="relative to SOBEL_MAX"):
        edge_map(square(size, lo, hi), threshold=4.0)


def test_coarse_mask_of_a_blob():
    x = square(8, 1, 5)  # a 5x5 blob, not aligned to the 2x2 blocks
    m = coarse_mask(x, factor=2)
    assert m.shape == (1, 1, 8, 8) and set(m.unique().tolist()) == {-1.0, 1.0}
    # blocks fully inside are on; half-covered blocks (mean exactly 0) and the corner block
    # (1 of 4 pixels) are off
    assert torch.equal(m[0, 0] > 0, on(8, 2, 5))
    # a lower threshold also takes the half-covered blocks
    assert torch.equal(coarse_mask(x, 2, threshold=-0.1)[0, 0] > 0,
                       on(8, 2, 5) | (on(8, 0, 5) & ~on(8, 0, 1)))
    big = coarse_mask(square(28, 4, 19, channels=3), factor=4)
    assert torch.equal(big[0, 0] > 0, on(28, 4, 19))
    with pytest.raises(ValueError, match="divide the image size 8x8"):
        coarse_mask(x, factor=3)


def test_hint_iou_exact_values():
    a = on(8, 2, 3)[None, None]  # 4 pixels
    shifted = torch.zeros_like(a)
    shifted[..., 2:4, 3:5] = True  # 4 pixels, 2 shared with a
    far = on(8, 6, 7)[None, None]
    empty = torch.zeros_like(a)
    hints = torch.cat([a, a, a, empty, empty])
    others = torch.cat([a, far, shifted, empty, a])
    iou = hint_iou(hints, others)
    torch.testing.assert_close(iou, torch.tensor([1.0, 0.0, 2 / 6, 1.0, 0.0]), rtol=0, atol=0)
    # {-1, 1} floats give the same
    torch.testing.assert_close(hint_iou(hints.float() * 2 - 1, others.float() * 2 - 1), iou)
    with pytest.raises(ValueError, match="same shape"):
        hint_iou(a, a[..., :4])


def test_make_hint():
    x = square(8, 2, 5)
    assert set(HINTS) == {"edges", "mask"}
    assert torch.equal(make_hint("edges", x), edge_map(x))
    assert torch.equal(make_hint("mask", x, factor=4), coarse_mask(x, 4))
    with pytest.raises(ValueError, match="unknown hint 'edge' \\(did you mean 'edges'\\?\\)"):
        make_hint("edge", x)


def test_load_hint_round_trip_and_errors(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (8, 8), dtype=np.uint8)
    Image.fromarray(a).save(tmp_path / "hint.png")
    h = load_hint(tmp_path / "hint.png", 8)
    assert h.shape == (1, 1, 8, 8) and h.dtype == torch.float32
    assert torch.equal(h, from_uint8(a[None]))  # exact: no resampling at the file's size
    rgb = load_hint(tmp_path / "hint.png", (8, 8), channels=3)
    assert rgb.shape == (1, 3, 8, 8) and torch.equal(rgb[:, :1], h)
    binary = load_hint(tmp_path / "hint.png", 8, threshold=0.0)
    assert torch.equal(binary, (h > 0).float() * 2 - 1)
    # a larger drawing is resized; an edge map of a square round-trips through a PNG
    e = edge_map(square(28, 9, 18))
    Image.fromarray(((e[0, 0] + 1) * 127.5).round().byte().numpy()).save(tmp_path / "e.png")
    assert torch.equal(load_hint(tmp_path / "e.png", 28), e)
    small = load_hint(tmp_path / "e.png", 14)
    assert small.shape == (1, 1, 14, 14) and -1 <= small.min() <= small.max() <= 1
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(ValueError, match="not a readable image"):
        load_hint(tmp_path / "bad.png", 8)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="not a readable image"):
        load_hint(tmp_path / "notes.txt", 8)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_hint(tmp_path / "missing.png", 8)
