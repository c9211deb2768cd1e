"""ZipLoRA (sfumato.personalize.ziplora): m = 1 is the sum of the two LoRAs and the naive
average is both at scale 0.5; the exported single LoRA file reproduces the merged network
(Linear and Conv2d layers); training lowers L_merge and its cosine term is the hand-computed
one; on LoRAs reading disjoint input channels the merge keeps each LoRA's own output (the
average does not); LoRA files from different bases are refused, leaving the network alone."""

import math

import pytest
import torch
from _util import gen, perturb_
from torch import nn

from sfumato import personalize as P
from sfumato.errors import CheckpointError, UsageError
from sfumato.nets import UNet
from sfumato.personalize.ziplora import ZipLoRA, cosine_penalty, naive_merge, zip_loras

pytestmark = pytest.mark.usefixtures("one_thread_module")


def unet() -> nn.Module:
    """The same perturbed tiny U-Net (attention at 4x4) every time."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = UNet(8, 1, model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                   attention_resolutions=(4,), num_heads=2, norm_groups=8)
    return perturb_(net).eval()


def call(net: nn.Module) -> torch.Tensor:
    g = gen(3)
    x, c_noise = torch.randn(2, 1, 8, 8, generator=g), torch.randn(2, generator=g)
    with torch.no_grad():
        return net(x, c_noise)


def lora_file(path, net: nn.Module, seed: int, meta=None, **kw):
    """Inject a LoRA into ``net`` (non-zero B), save it to ``path``; returns the path."""
    P.inject_lora(net, generator=gen(seed), **kw)
    g = gen(seed + 100)
    with torch.no_grad():
        for w in P.trainable_lora_parameters(net)[1::2]:
            w.copy_(0.1 * torch.randn(w.shape, generator=g))
    return P.save_lora(net, path, meta=meta)


@pytest.fixture(scope="module")
def unet_files(tmp_path_factory):
    """Subject: rank 2 on qkv and every conv; style: rank 3 on qkv and proj (so some layers
    have both LoRAs, some only one)."""
    d = tmp_path_factory.mktemp("loras")
    s = lora_file(d / "subject.safetensors", unet(), 0, rank=2, alpha=3.0, targets="qkv",
                  include_conv=True)
    t = lora_file(d / "style.safetensors", unet(), 1, rank=3, alpha=1.5,
                  targets=["qkv", "proj"])
    return s, t


def close(a: torch.Tensor, b: torch.Tensor, tol: float) -> bool:
    return (a - b).abs().max().item() <= tol * max(1.0, b.abs().max().item())


def test_unit_mergers_are_the_sum_and_the_average_is_half_scale(unet_files):
    s, t = unet_files
    z = ZipLoRA(unet(), s, t)
    y_sum = call(z.net)  # outside use(): both adapters at scale 1
    with z.use("merged"):
        y_m = call(z.net)
    assert (y_sum - call(unet())).abs().max() > 1e-2  # the LoRAs act
    assert close(y_m, y_sum, 1e-6)
    alone = unet()
    P.load_lora(alone, s)
    with z.use("subject"):
        assert torch.equal(call(z.net), call(alone))
    assert torch.equal(call(z.net), y_sum)  # use() restores the scales
    avg = naive_merge(unet(), s, t)
    with avg.use("merged"):
        y_avg = call(avg.net)
    P.set_lora_scale(avg.net, 0.5)
    assert close(y_avg, call(avg.net), 1e-6)
    assert (y_avg - y_sum).abs().max() > 1e-2
    with pytest.raises(UsageError, match="'merged', 'subject' or 'style'"):
        with z.use("both"):
            pass


@pytest.mark.parametrize("how", ["zip", "average"])
def test_exported_file_reproduces_the_merged_network(unet_files, tmp_path, how):
    s, t = unet_files
    if how == "zip":
        z = ZipLoRA(unet(), s, t)
        g = gen(7)
        with torch.no_grad():
            for m in z.parameters():  # arbitrary mergers, not 1
                m.copy_(1 + torch.randn(m.shape, generator=g))
    else:
        z = naive_merge(unet(), s, t)
    with z.use("merged"):
        y = call(z.net)
    f = z.save(tmp_path / "zipped.safetensors", meta={"note": "test"})
    assert not any("zipped" in m.lora_A for m in P.lora_layers(z.net).values())
    fresh = unet()
    P.load_lora(fresh, f)
    assert close(call(fresh), y, 1e-5)
    assert (call(fresh) - call(unet())).abs().max() > 1e-2
    info = P.read_lora_metadata(f)
    layers = info["layers"]
    assert info["adapter"] == "zipped" and info["rank"] is None  # per-layer ranks differ
    assert layers["mid.1.qkv"] == {"rank": 5, "alpha": 5.0, "dropout": 0.0}  # 2 + 3
    assert layers["mid.1.proj"]["rank"] == 3 and layers["conv_in"]["rank"] == 2
    assert set(layers) == set(P.read_lora_metadata(s)["layers"]) | set(
        P.read_lora_metadata(t)["layers"])
    assert info["meta"] == {"note": "test", "merged_from": [s.name, t.name]}


def test_cosine_penalty_by_hand():
    v = lambda *xs: torch.tensor(xs)  # noqa: E731
    mergers = {"a": {"subject": v(1.0, 0.0, 1.0), "style": v(1.0, 1.0, 0.0)},  # cos 1/2
               "b": {"subject": v(1.0, 2.0), "style": v(-2.0, 1.0)},  # cos 0
               "c": {"subject": v(1.0, 1.0), "style": v(-3.0, -3.0)},  # cos -1
               "d": {"style": v(3.0, 4.0)}}  # one LoRA only: no term
    assert cosine_penalty(mergers).item() == pytest.approx(1.5, abs=1e-6)
    assert cosine_penalty({"d": mergers["d"]}).item() == 0.0


def toy() -> nn.Module:
    """Conv2d (3 -> 6) -> SiLU -> Conv2d 1x1 (6 -> 6) -> flatten -> Linear (6*4*4 -> 5)."""
    with torch.random.fork_rng():
        torch.manual_seed(1)
        return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.SiLU(), nn.Conv2d(6, 6, 1),
                             nn.Flatten(), nn.Linear(96, 5)).eval()


def test_training_lowers_the_merge_loss(tmp_path):
    s = lora_file(tmp_path / "s.safetensors", toy(), 0, rank=2, targets=["0", "4"])
    t = lora_file(tmp_path / "t.safetensors", toy(), 1, rank=2, targets=["2", "4"])
    # the two LoRAs' inputs overlap: the plain sum (m = 1) interferes
    w_s, w_t = torch.tensor([1.0, 1.0, 0.2]), torch.tensor([0.2, 1.0, 1.0])

    def forward(w):
        return lambda net, g: net(w.view(1, 3, 1, 1) * torch.randn(8, 3, 4, 4, generator=g))

    z = zip_loras(toy(), s, t, forward(w_s), forward(w_t), steps=40, lr=0.05, generator=gen(0))
    assert len(z.history) == 40 and all(math.isfinite(v) for v in z.history)
    assert z.history[-1] < 0.5 * z.history[0]
    assert set(z.mergers) == {"0", "2", "4"} and set(z.mergers["4"]) == {"subject", "style"}
    assert z.mergers["0"]["subject"].shape == (3,) and z.mergers["4"]["style"].shape == (96,)
    assert not any(p.grad is not None for p in z.net.parameters())  # only m is trained


def test_disjoint_channels_zip_beats_the_average(tmp_path):
    def files(d):
        out = []
        for i, cols in enumerate((slice(4, 8), slice(0, 4))):  # subject reads 0-3, style 4-7
            net = nn.Sequential(nn.Linear(8, 6))
            P.inject_lora(net, targets="0", rank=2, generator=gen(i))
            layer = P.lora_layers(net)["0"]
            with torch.no_grad():
                layer.lora_A["default"].weight[:, cols] = 0
                nn.init.normal_(layer.lora_B["default"].weight, generator=gen(10 + i))
            out.append(P.save_lora(net, d / f"{i}.safetensors"))
        return out

    s, t = files(tmp_path)
    base = lambda: perturb_(nn.Sequential(nn.Linear(8, 6)), seed=2)  # noqa: E731

    def forward(own):
        mask = torch.zeros(8)
        mask[own] = 1
        return lambda net, g: net(mask * torch.randn(16, 8, generator=g))

    fs, ft = forward(slice(0, 4)), forward(slice(4, 8))
    z = zip_loras(base(), s, t, fs, ft, generator=gen(0))  # defaults: 100 steps, lambda 0.01
    assert z.history[0] == pytest.approx(0.01, abs=1e-7)  # sum exact at m = 1; |cos| = 1

    def errors(merged: ZipLoRA) -> float:
        err = 0.0
        for which, fwd in (("subject", fs), ("style", ft)):
            with torch.no_grad(), merged.use(which):
                want = fwd(merged.net, gen(5))
            with torch.no_grad(), merged.use("merged"):
                err += (fwd(merged.net, gen(5)) - want).square().mean().item()
        return err

    err_zip, err_avg = errors(z), errors(naive_merge(base(), s, t))
    assert err_avg > 1e-2
    assert err_zip < 0.01 * err_avg
    # the penalty made the merger vectors nearly orthogonal (|cos| = 1 at m = 1) while each
    # LoRA's own channels kept m ~ 1
    assert cosine_penalty(z.mergers).item() < 0.1
    m_s, m_t = (z.mergers["0"][n].detach() for n in ("subject", "style"))
    assert (m_s[:4] - 1).abs().max() < 0.05 and (m_t[4:] - 1).abs().max() < 0.05


def test_mismatched_files_refused_naming_the_layer(tmp_path):
    def mlp(out=4, depth=2):
        layers = [nn.Linear(8, 4)]
        for i in range(1, depth):
            layers += [nn.SiLU(), nn.Linear(4, out if i == depth - 1 else 4)]
        return nn.Sequential(*layers)

    s = lora_file(tmp_path / "s.safetensors", mlp(), 0, targets=["0", "2"])
    wider = lora_file(tmp_path / "w.safetensors", mlp(out=5), 1, targets=["0", "2"])
    deeper = lora_file(tmp_path / "d.safetensors", mlp(depth=3), 1, targets=["0", "4"])
    other = lora_file(tmp_path / "o.safetensors", mlp(), 1, targets="0",
                      meta={"base_config_sha256": "b" * 64})
    s_hash = lora_file(tmp_path / "sh.safetensors", mlp(), 0, targets="0",
                       meta={"base_config_sha256": "a" * 64})
    for sub, sty, match in ((s, wider, r"different base networks: layer '2' has A \(4, 4\), "
                             r"B \(4, 4\) in the subject file and A \(4, 4\), B \(5, 4\)"),
                            (s, deeper, r"no Linear or Conv2d layer .*model\.4\.lora_A"),
                            (s_hash, other, "base_config_sha256 differs")):
        net = mlp()
        with pytest.raises(CheckpointError, match=match):
            zip_loras(net, sub, sty, lambda n, g: n(torch.zeros(1, 8)),
                      lambda n, g: n(torch.zeros(1, 8)), steps=1)
        assert not any(isinstance(m, P.LoRA) for m in net.modules())  # net left alone
        assert all(p.requires_grad for p in net.parameters())


def test_failed_save_keeps_the_old_file(unet_files, tmp_path):
    s, t = unet_files
    z = naive_merge(unet(), s, t)
    f = tmp_path / "zipped.safetensors"
    f.write_bytes(b"old")
    with pytest.raises(UsageError, match="JSON-serialisable"):
        z.save(f, meta={"bad": object()})
    assert f.read_bytes() == b"old"
    assert not any("zipped" in m.lora_A for m in P.lora_layers(z.net).values())
    z.save(f)
    assert P.read_lora_metadata(f)["meta"]["merged_from"] == [s.name, t.name]
