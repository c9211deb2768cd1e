"""InstructPix2Pix: the measured attribute edits move their attribute, the training pairs and
their drop rates, the two-scale guidance's algebra, the image-conditioned network, and the
run / API / CLI path."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import sfumato
from sfumato.cli import main
from sfumato.data import get_dataset, to_uint8
from sfumato.edit.attributes import EDITS, INSTRUCTIONS, apply_edit, edit_moved
from sfumato.edit.instruct import InstructGuidance, InstructionPairs
from sfumato.errors import UsageError
from sfumato.nets import build_net
from sfumato.train.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread_module")

UNET = {"type": "unet", "image_size": 8, "in_channels": 1, "model_channels": 16,
        "channel_mult": [1, 2], "num_res_blocks": 1, "attention_resolutions": [4],
        "mid_attention": False, "norm_groups": 8, "context_dim": 384}
INSTRUCT = {"data": {"name": "digits"}, "model": {"type": "image_conditioned", "base": UNET},
            "text": {"encoder": "minilm"}, "instruct": {"edits": list(EDITS)},
            "train": {"steps": 3, "batch_size": 16, "checkpoint_every": 0, "num_threads": 1},
            "sample": {"sampler": "euler", "steps": 3, "n_grid": 6, "guidance": 2.0}}


@pytest.fixture(scope="module")
def digits():
    return get_dataset({"name": "digits"}).heldout[:100]


@pytest.mark.parametrize("name", list(EDITS))
def test_each_edit_moves_its_attribute(name, digits):
    out = apply_edit(name, digits)
    assert out.shape == digits.shape and out.min() >= -1 and out.max() <= 1
    assert bool(edit_moved(name, digits, out).all())
    assert not bool(edit_moved(name, out, digits).any())  # undoing moves it back
    assert float((out - digits).abs().max()) > 0.1


def test_unknown_edit_and_shape_errors(digits):
    with pytest.raises(UsageError, match="thicker"):
        apply_edit("thick", digits)
    with pytest.raises(UsageError, match=r"\(B, 1, H, W\)"):
        apply_edit("bigger", digits[:, 0])


def _fake_encoder(prompts):
    g = torch.Generator().manual_seed(len(prompts))
    return {"context": torch.randn(len(prompts), 4, 8, generator=g),
            "context_mask": torch.ones(len(prompts), 4, dtype=torch.bool)}


def test_pairs_are_the_edits_with_the_drop_rates(digits):
    null = {"context_mask": torch.zeros(1, 4, dtype=torch.bool)}
    pairs = InstructionPairs(["thicker", "smaller"], _fake_encoder, null, drop=0.1)
    assert len(pairs.phrases) == len(INSTRUCTIONS["thicker"]) + len(INSTRUCTIONS["smaller"])
    x0 = digits.repeat(40, 1, 1, 1)  # 4000 rows
    x1, cond = pairs.batch(x0, torch.Generator().manual_seed(0))
    thick, small = apply_edit("thicker", x0), apply_edit("smaller", x0)
    is_thick = (x1 - thick).flatten(1).abs().amax(1) < 1e-6
    is_small = (x1 - small).flatten(1).abs().amax(1) < 1e-6
    assert bool((is_thick | is_small).all()) and 0.45 < float(is_thick.float().mean()) < 0.55
    no_image = cond["image"].flatten(1).abs().amax(1) == 0
    no_text = ~cond["context_mask"].any(1)
    for frac in (float((no_image & no_text).float().mean()),
                 float((no_image & ~no_text).float().mean()),
                 float((~no_image & no_text).float().mean())):
        assert frac == pytest.approx(0.1, abs=0.02)
    kept = ~no_image
    assert torch.equal(cond["image"][kept], x0[kept])
    with pytest.raises(UsageError, match="instruct.edits"):
        InstructionPairs(["sharper"], _fake_encoder, null)


def test_two_scale_guidance_is_eq_3():
    """D̃ = D(∅,∅) + s_I (D(I,∅) − D(∅,∅)) + s_T (D(I,T) − D(I,∅)), in one call."""
    calls = []

    def den(x, sigma, image, context, context_mask):
        calls.append(x.shape[0])
        t = (context * context_mask[..., None]).sum((1, 2))[:, None, None, None]
        return 0.3 * x + 2.0 * image + t + image * t

    g = torch.Generator().manual_seed(1)
    x, img = torch.randn(3, 1, 4, 4, generator=g), torch.randn(3, 1, 4, 4, generator=g)
    ctx, mask = torch.randn(3, 5, 2, generator=g), torch.ones(3, 5, dtype=torch.bool)
    null = {"context_mask": torch.zeros(1, 5, dtype=torch.bool)}
    zero, off = torch.zeros_like(img), torch.zeros_like(mask)
    d00, d10, d11 = den(x, 1.0, zero, ctx, off), den(x, 1.0, img, ctx, off), den(x, 1.0, img,
                                                                                ctx, mask)
    calls.clear()
    for s_i, s_t in ((1.0, 1.0), (0.0, 0.0), (1.5, 7.5), (2.0, 0.0)):
        got = InstructGuidance(den, s_i, s_t, null_text=null)(x, 1.0, image=img, context=ctx,
                                                               context_mask=mask)
        want = d00 + s_i * (d10 - d00) + s_t * (d11 - d10)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert calls == [9, 9, 9, 9]


def test_image_conditioned_network():
    torch.manual_seed(0)
    net = build_net({"type": "image_conditioned", "base": {**UNET, "context_dim": None}})
    assert net.base.in_channels == 2 and net.base.out_channels == 1
    torch.nn.init.normal_(net.base.conv_out.weight, std=0.1)
    x, img = torch.randn(2, 1, 8, 8), torch.randn(2, 1, 8, 8)
    c = torch.zeros(2)
    assert torch.equal(net(x, c), net(x, c, image=torch.zeros_like(x)))
    assert not torch.allclose(net(x, c), net(x, c, image=img))  # the image reaches the output
    with pytest.raises(UsageError, match="image must have"):
        net(x, c, image=torch.zeros(2, 1, 4, 4))
    with pytest.raises(UsageError, match="in_channels"):
        build_net({"type": "image_conditioned", "base": {"type": "unet"}})


def test_instruct_run_trains_edits_and_refuses_misuse(tmp_path, capsys, monkeypatch, digits):
    pytest.importorskip("transformers", reason="the 'text' extra is not installed")
    monkeypatch.setenv("SFUMATO_CACHE", str(tmp_path / "cache"))
    Trainer(INSTRUCT, tmp_path / "run", progress=False).run()
    model = sfumato.load(tmp_path / "run")
    assert model.kind == "instruct"
    x = digits[:4]
    a = model.instruct(x, "make it thicker", steps=3)
    b = model.instruct(x, "make it smaller", steps=3)
    c = model.instruct(x, "make it thicker", steps=3, image_guidance=0.0)
    assert a.shape == x.shape and torch.isfinite(a).all()
    assert not torch.equal(a, b) and not torch.equal(a, c)  # instruction and image both count
    assert torch.equal(a, model.instruct(x, "make it thicker", steps=3))  # deterministic
    np.savez(tmp_path / "in.npz", images=to_uint8(x).numpy())
    out = tmp_path / "out.npz"
    assert main(["edit", str(tmp_path / "run"), "--input", str(tmp_path / "in.npz"),
                 "--instruction", "make it thicker", "--steps", "3", "--out", str(out)]) == 0
    assert np.load(out)["images"].shape == (4, 8, 8, 1)
    capsys.readouterr()
    assert main(["edit", str(tmp_path / "run"), "--input", str(tmp_path / "in.npz"),
                 "--out", str(out)]) == 2
    assert "--instruction TEXT" in capsys.readouterr().err
    with pytest.raises(ValueError, match="minilm"):
        Trainer({**INSTRUCT, "text": {"encoder": "tiny"}}, tmp_path / "t", progress=False)
    with pytest.raises(ValueError, match="text encoder"):
        Trainer({**INSTRUCT, "text": {"encoder": None}}, tmp_path / "t", progress=False)
