"""Personalised runs (sfumato.personalize): fine-tuning a base on a folder of images with LoRA,
DreamBooth (full) and textual inversion, the class slot of a class base, the prior-image
cache, exact resume, small files, merge / zip, the CLI, and the refusals."""

from __future__ import annotations

import shutil

import pytest
import torch
from _util import TINY_TEACHER, train_runs, write_bars

import sfumato
from sfumato.cli import main
from sfumato.errors import CheckpointError, DataError, RunReferenceError, UsageError
from sfumato.personalize.lora import load_lora
from sfumato.run import Run

UNET = {"type": "unet", "image_size": 8, "in_channels": 1, "model_channels": 16,
        "channel_mult": [1, 2], "num_res_blocks": 1, "attention_resolutions": [4],
        "mid_attention": False, "norm_groups": 8}
TEXT_BASE = {"data": {"name": "digits"}, "model": {**UNET, "context_dim": 384},
             "text": {"encoder": "minilm", "n_variants": 1, "keep": 0.0},
             "train": {"steps": 20, "batch_size": 16, "checkpoint_every": 0, "num_threads": 1},
             "sample": {"sampler": "euler", "steps": 3, "n_grid": 4}}
FAST = {"prior_images": 8}


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """A tiny class base, a tiny MiniLM text base, and a folder of five 'bar' images (plus
    one corrupt file)."""
    root = tmp_path_factory.mktemp("bases")
    train_runs(root, cls=TINY_TEACHER, text=TEXT_BASE)
    imgs = write_bars(root / "imgs", 5, (20, 24), (3, 17), 8, 6)
    (imgs / "broken.png").write_bytes(b"not an image")
    return root


def _tune(bases, base, out, method="lora", steps=4, **kw):
    return sfumato.finetune(bases / base, bases / "imgs", out=out, method=method, steps=steps,
                            progress=False, **{**FAST, **kw})


def test_lora_on_text_base_small_exact_and_portable(bases, tmp_path, capsys):
    _tune(bases, "text", tmp_path / "p", lora={"rank": 2, "alpha": 2})
    assert "skipped 1 unreadable file(s)" in capsys.readouterr().out
    run = Run(tmp_path / "p")
    assert run.kind == "personalized" and run.resolve("base").path == bases / "text"
    ema = run.weights()
    assert ema and all(".lora_" in k for k in ema)  # only the adapters are stored
    base_bytes = (Run(bases / "text").checkpoint / "ema.safetensors").stat().st_size
    assert (tmp_path / "p" / "lora.safetensors").stat().st_size < 0.2 * base_bytes
    # the LoRA file alone on a fresh base network gives the run's network
    net = Run(bases / "text").network()
    load_lora(net, tmp_path / "p" / "lora.safetensors")
    mine = run.network()
    x, s = torch.randn(3, 1, 8, 8), torch.tensor([0.3, 1.0, 5.0])
    ctx = {"context": torch.randn(3, 5, 384), "context_mask": torch.ones(3, 5, dtype=bool)}
    assert torch.allclose(net(x, s, **ctx), mine(x, s, **ctx), atol=1e-6)
    # and the adapters moved it away from the base
    assert not torch.allclose(Run(bases / "text").network()(x, s, **ctx), mine(x, s, **ctx))
    m = sfumato.load(tmp_path / "p")
    assert m.sample(2, prompt="a sks", steps=2).x.shape == (2, 1, 8, 8)


def test_kill_and_resume_is_exact(bases, tmp_path):
    _tune(bases, "text", tmp_path / "once", steps=6, config={"train": {"checkpoint_every": 3}})
    _tune(bases, "text", tmp_path / "twice", steps=3, config={"train": {"checkpoint_every": 3}})
    _tune(bases, "text", tmp_path / "twice", steps=6, config={"train": {"checkpoint_every": 3}})
    a, b = Run(tmp_path / "once").weights("model"), Run(tmp_path / "twice").weights("model")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_class_slot_methods(bases, tmp_path):
    base = Run(bases / "cls")
    k = base.num_classes
    _tune(bases, "cls", tmp_path / "ti", method="textual-inversion", steps=3)
    run = Run(tmp_path / "ti")
    assert run.num_classes == k + 1 and run.state["class_names"][-1] == "sks"
    assert list(run.weights()) == ["cond.label.new"]  # one embedding row is all it learns
    from sfumato.personalize.finetune import METHOD_TRAIN, SLOT_TRAIN, finetune_config

    assert run.config["train"]["lr"] == SLOT_TRAIN["lr"] != METHOD_TRAIN[
        "textual-inversion"]["lr"]  # a class slot's row takes larger steps than a token's
    mine = finetune_config(base, bases / "imgs", tmp_path / "x", method="textual-inversion",
                           config={"train": {"lr": 1e-3}})
    assert mine["train"]["lr"] == 1e-3  # the user's setting wins
    net, bnet = run.network(), base.network()
    rows = net.cond.label.weight
    assert torch.equal(rows[:k], bnet.cond.label.weight[:k])      # the classes as they were
    assert torch.equal(rows[k + 1], bnet.cond.label.weight[k])     # the null moved to k + 1
    x, s = torch.randn(2, 1, 8, 8), torch.tensor([0.5, 2.0])
    y = torch.tensor([3, 7])
    assert torch.equal(net(x, s, class_labels=y), bnet(x, s, class_labels=y))
    assert torch.equal(net(x, s), bnet(x, s))  # the null label
    m = sfumato.load(tmp_path / "ti")
    assert m.sample(2, class_labels=k, steps=2).x.shape == (2, 1, 8, 8)
    # LoRA on a class base without attention: the convolutions, on request
    with pytest.raises(sfumato.errors.ConfigError, match="include_conv|targets|match"):
        _tune(bases, "cls", tmp_path / "l0")
    _tune(bases, "cls", tmp_path / "l", lora={"include_conv": True}, steps=2)
    keys = list(Run(tmp_path / "l").weights())
    assert "cond.label.new" in keys and any(".lora_" in q for q in keys)


def test_dreambooth_and_prior_cache(bases, tmp_path):
    out = tmp_path / "db"
    _tune(bases, "text", out, method="dreambooth", steps=2)
    run = Run(out)
    assert set(run.weights()) == set(Run(bases / "text").weights())  # the whole network
    prior = out / "prior.safetensors"
    stamp = prior.stat().st_mtime_ns
    _tune(bases, "text", out, method="dreambooth", steps=4)  # resume: the cache is reused
    assert prior.stat().st_mtime_ns == stamp and Run(out).step == 4
    _tune(bases, "text", tmp_path / "np", method="dreambooth", steps=2,
          prior_preservation=False)
    assert not (tmp_path / "np" / "prior.safetensors").exists()


def test_textual_inversion_on_text_base(bases, tmp_path):
    _tune(bases, "text", tmp_path / "ti", method="textual-inversion", steps=3,
          class_word="bar")
    run = Run(tmp_path / "ti")
    assert list(run.weights()) == ["token_embedding.vectors"]
    assert run.config["train"]["lr"] == 5e-3  # a MiniLM token vector's step size
    assert (tmp_path / "ti" / "token.safetensors").is_file()
    m, b = sfumato.load(tmp_path / "ti"), sfumato.load(bases / "text")
    assert type(m.text).__name__ == "TokenTextConditioner"
    mine, theirs = m.text.prompts(["a sks"]), b.text.prompts(["a sks"])
    assert not torch.allclose(mine["context"], theirs["context"])
    plain = m.text.prompts(["seven"])["context"]
    assert torch.equal(plain, b.text.prompts(["seven"])["context"])


def test_merge_and_zip(bases, tmp_path, capsys):
    _tune(bases, "text", tmp_path / "subj", steps=3, token="sks")
    _tune(bases, "text", tmp_path / "style", steps=3, token="zzq")
    assert main(["lora", "merge", str(bases / "text"), str(tmp_path / "subj"), "--out",
                 str(tmp_path / "merged")]) == 0
    merged = Run(tmp_path / "merged")
    assert merged.kind == "text"
    x, s = torch.randn(2, 1, 8, 8), torch.tensor([0.5, 2.0])
    ctx = {"context": torch.randn(2, 4, 384), "context_mask": torch.ones(2, 4, dtype=bool)}
    assert torch.allclose(merged.network()(x, s, **ctx),
                          Run(tmp_path / "subj").network()(x, s, **ctx), atol=1e-5)
    assert main(["lora", "merge", str(bases / "text"), str(tmp_path / "subj"), "--out",
                 str(tmp_path / "merged")]) != 0
    assert "already holds a run" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match="fine-tuned from"):
        from sfumato.personalize.combine import merge_run

        merge_run(bases / "cls", tmp_path / "subj", tmp_path / "m2")
    assert main(["lora", "zip", str(tmp_path / "subj"), str(tmp_path / "style"), "--steps",
                 "3", "--out", str(tmp_path / "zip")]) == 0
    m = sfumato.load(tmp_path / "zip")
    assert m.kind == "personalized"
    assert m.sample(2, prompt="a sks zzq", steps=2).x.shape == (2, 1, 8, 8)


def test_cli_finetune_and_refusals(bases, tmp_path, capsys):
    assert main(["finetune", str(bases / "text"), "--images", str(bases / "imgs"), "--token",
                 "sks", "--steps", "2", "--set", "finetune.prior_images=4", "--no-progress",
                 "--out", str(tmp_path / "c")]) == 0
    assert "sfumato sample" in capsys.readouterr().out
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "junk.png").write_bytes(b"junk")
    for folder, msg in ((empty, "no readable image"), (tmp_path / "nope", "does not exist")):
        with pytest.raises(DataError, match=msg):
            sfumato.finetune(bases / "text", folder, out=tmp_path / "e", steps=1,
                             progress=False)
    with pytest.raises(UsageError, match="already in use"):
        _tune(bases, "text", tmp_path / "t", token="seven")
    with pytest.raises(UsageError, match="unknown fine-tuning method"):
        _tune(bases, "text", tmp_path / "t", method="hypernetwork")
    assert not (tmp_path / "e").exists() and not (tmp_path / "t").exists()  # nothing written
    # a base retrained after the fine-tune: refused, the personalised run left as it is
    run_dir = tmp_path / "c"
    before = sorted(p.name for p in run_dir.rglob("*"))
    base_copy = tmp_path / "basecopy"
    shutil.copytree(bases / "text", base_copy)
    sfumato.finetune(base_copy, bases / "imgs", out=tmp_path / "d", steps=1, progress=False,
                     **FAST)
    sfumato.train({**TEXT_BASE, "train": {**TEXT_BASE["train"], "steps": 22}}, out=base_copy,
                  progress=False)
    with pytest.raises(RunReferenceError):
        sfumato.load(tmp_path / "d")
    assert sorted(p.name for p in run_dir.rglob("*")) == before


def test_caption_files_beside_the_images(bases, tmp_path, capsys):
    """NAME.txt beside NAME.png is that image's caption (it must contain the token); images
    without one keep "a sks"; a class base ignores them, saying so."""
    from sfumato.personalize.finetune import read_subject
    from sfumato.train.trainer import Trainer

    imgs = tmp_path / "imgs"
    shutil.copytree(bases / "imgs", imgs)
    (imgs / "0.txt").write_text("a sks  in\nthick strokes\n")
    (imgs / "3.txt").write_text("a large sks")
    sfumato.finetune(bases / "text", imgs, out=tmp_path / "cap", steps=1, progress=False,
                     **FAST)
    _, own = read_subject(tmp_path / "cap" / "subject.safetensors")
    assert own == ["a sks in thick strokes", None, None, "a large sks", None]
    t = Trainer(Run(tmp_path / "cap").config, tmp_path / "cap", progress=False)
    rows = t.personal.captions()
    assert rows[0] == ["a sks in thick strokes"] * 2 and rows[1] == ["a sks", "sks"]
    assert rows[3] == ["a large sks"] * 2 and rows[5] == rows[0]  # the subject repeated
    (imgs / "1.txt").write_text("a thick bar")
    with pytest.raises(UsageError, match=r"1\.txt .*does not contain the token 'sks'"):
        sfumato.finetune(bases / "text", imgs, out=tmp_path / "bad", steps=1, progress=False)
    assert not (tmp_path / "bad").exists()
    capsys.readouterr()  # (a class base ignores even a caption without the token)
    sfumato.finetune(bases / "cls", imgs, out=tmp_path / "slot", steps=1, progress=False,
                     method="textual-inversion", **FAST)
    assert "ignored the caption files" in capsys.readouterr().out
    assert read_subject(tmp_path / "slot" / "subject.safetensors")[1] == [None] * 5


def test_the_bases_class_prompts_carry_over(bases, tmp_path):
    """A base that records a prompt per class (emoji categories) hands them to its
    personalised runs, so "each class in turn" means the same prompts before and after."""
    import json

    base = tmp_path / "base"
    shutil.copytree(bases / "text", base)
    state_file = base / "checkpoint" / "state.json"
    state = json.loads(state_file.read_text())
    prompts = [f"a kind{k} image" for k in range(3)]
    state_file.write_text(json.dumps({**state, "class_prompts": prompts}))
    _tune(bases, "text", tmp_path / "plain", steps=1)
    sfumato.finetune(base, bases / "imgs", out=tmp_path / "p", steps=1, progress=False, **FAST)
    assert Run(tmp_path / "p").state["class_prompts"] == prompts
    assert "class_prompts" not in Run(tmp_path / "plain").state
