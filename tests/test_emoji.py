"""The emoji data set without network or npm: a small fake package tarball is checked,
unpacked safely and turned into arrays (base emoji only, exact compositing, captions,
labels); a wrong checksum or a path-traversing member changes nothing; npm missing names the
manual route; the loader splits by category; the CLI prints the counts."""

import io
import json
import shutil
import subprocess
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

import sfumato.data.emoji as E
from sfumato.cli import main
from sfumato.data import EMOJI_CATEGORIES, fetch_emoji, get_dataset, load_emoji
from sfumato.errors import DataError
from sfumato.files import sha256_file

#: the known pixel: RGBA (200, 100, 0, 128) at (0, 0) of every fake image
PIXEL = (200, 100, 0, 128)
#: (name, short name, category, image stem, skin variation stems)
FAKE = [
    ("SMILING FACE WITH SUNGLASSES", "sunglasses", "Smileys & Emotion", "1f60e", ()),
    ("GRINNING FACE", "grinning", "Smileys & Emotion", "1f600", ()),
    ("WAVING HAND SIGN", "wave", "People & Body", "1f44b", ("1f44b-1f3fb", "1f44b-1f3ff")),
    ("", "thumbsup", "People & Body", "1f44d", ("1f44d-1f3fc",)),
    ("DOG FACE", "dog", "Animals & Nature", "1f436", ()),
    ("CAT FACE", "cat", "Animals & Nature", "1f431", ()),
    ("Japan Flag", "flag-jp", "Flags", "1f1ef-1f1f5", ()),
    ("France Flag", "flag-fr", "Flags", "1f1eb-1f1f7", ()),
    ("EMOJI MODIFIER FITZPATRICK TYPE-3", "skin-tone-3", "Component", "1f3fc", ()),
]
BASE = [f for f in FAKE if f[2] != "Component"]


def _png(i: int) -> bytes:
    """A 64 x 64 RGBA PNG: transparent, one opaque colour patch (depends on i), PIXEL at
    (0, 0)."""
    a = np.zeros((64, 64, 4), np.uint8)
    a[16:48, 16:48] = (10 * i % 256, 255 - 20 * i % 256, 60, 255)
    a[0, 0] = PIXEL
    buf = io.BytesIO()
    Image.fromarray(a, "RGBA").save(buf, format="PNG")
    return buf.getvalue()


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime = len(data), 0
    tf.addfile(info, io.BytesIO(data))


def make_tarball(path, *, extra: dict | None = None, version: str = E.VERSION):
    """A fake ``npm pack`` tarball of the package at ``path``; ``extra``: more members."""
    entries, files = [], {}
    for i, (name, short, category, stem, skins) in enumerate(FAKE):
        entries.append({"name": name, "unified": stem.upper(), "image": f"{stem}.png",
                        "short_name": short, "short_names": [short, short + "_alt"],
                        "category": category, "sort_order": i, "has_img_twitter": True,
                        **({"skin_variations": {s[-5:].upper(): {"image": f"{s}.png"}
                                                for s in skins}} if skins else {})})
        files[f"{stem}.png"] = _png(i)
        for j, s in enumerate(skins):
            files[f"{s}.png"] = _png(50 + j)
    with tarfile.open(path, "w:gz") as tf:
        _add(tf, "package/package.json",
             json.dumps({"name": E.PACKAGE, "version": version}).encode())
        _add(tf, "package/emoji.json", json.dumps(entries).encode())
        _add(tf, "package/LICENSE", b"MIT")
        _add(tf, "package/img/twitter/sheets/64.png", b"not unpacked")
        for fname, data in files.items():
            _add(tf, f"package/img/twitter/64/{fname}", data)
        for name, data in (extra or {}).items():
            _add(tf, name, data)
    return path


@pytest.fixture
def tgz(tmp_path):
    p = make_tarball(tmp_path / "emoji-datasource-twitter.tgz")
    return p, sha256_file(p)


@pytest.fixture
def fetched(tmp_path, tgz):
    p, sha = tgz
    return fetch_emoji(tmp_path / "cache", tarball=p, sha256=sha)


def _snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def test_builder_counts_labels_captions_and_no_skin_variants(fetched):
    for bg in ("white", "black"):
        with np.load(fetched / f"emoji-{bg}.npz", allow_pickle=False) as z:
            a = {k: z[k] for k in z.files}
        assert a["images"].shape == (len(BASE), 64, 64, 3) and a["images"].dtype == np.uint8
        assert list(a["categories"]) == list(EMOJI_CATEGORIES)
        assert [EMOJI_CATEGORIES[k] for k in a["labels"]] == [f[2] for f in BASE]
        assert list(a["unified"]) == [f[3].upper() for f in BASE]  # base images, no variants
        assert a["captions"][0] == "smiling face with sunglasses"
        assert a["captions"][3] == "thumbsup"  # empty name: the first short name
        assert a["captions"][6] == "japan flag"
        assert a["short_names"][0] == "sunglasses,sunglasses_alt"
        assert str(a["version"]) == E.VERSION
    unpacked = fetched / E.PACKAGE
    assert not (unpacked / "img" / "twitter" / "sheets").exists()  # only what is needed
    assert not any(p.name.startswith(".") for p in fetched.iterdir())  # no temporary leftovers


def test_compositing_is_exact_on_white_and_black(fetched):
    white = np.load(fetched / "emoji-white.npz", allow_pickle=False)["images"]
    black = np.load(fetched / "emoji-black.npz", allow_pickle=False)["images"]
    r, g, b, a = PIXEL  # (rgb * a + bg * (255 - a)) / 255, rounded
    assert tuple(white[0, 0, 0]) == (227, 177, 127)
    assert tuple(black[0, 0, 0]) == (100, 50, 0)
    assert round((r * a + 255 * (255 - a)) / 255) == 227 and round(r * a / 255) == 100
    assert (white[:, 1, 1] == 255).all() and (black[:, 1, 1] == 0).all()  # transparent
    assert np.array_equal(white[:, 20, 20], black[:, 20, 20])  # opaque: no background
    rgba = np.array([[0, 0, 0, 0], [9, 8, 7, 255], [255, 255, 255, 0]], np.uint8)
    assert E.composite(rgba, 255).tolist() == [[255] * 3, [9, 8, 7], [255] * 3]


def test_wrong_checksum_changes_nothing(tmp_path, fetched, tgz):
    before = _snapshot(fetched)
    other = make_tarball(tmp_path / "other.tgz", version="0.0.1")
    with pytest.raises(DataError, match="SHA-256") as e:
        fetch_emoji(fetched, tarball=other, sha256=tgz[1])
    assert tgz[1] in str(e.value) and sha256_file(other) in str(e.value)
    assert "Nothing in" in str(e.value)
    assert _snapshot(fetched) == before
    assert sorted(p.name for p in fetched.iterdir()) == sorted(
        [E.PACKAGE, "emoji-black.npz", "emoji-white.npz"])


@pytest.mark.parametrize("bad", ["package/../evil.txt", "/tmp/evil.txt"])
def test_path_traversal_is_refused(tmp_path, bad):
    p = make_tarball(tmp_path / "bad.tgz", extra={bad: b"pwned"})
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match="refusing to unpack"):
        fetch_emoji(cache, tarball=p, sha256=sha256_file(p))
    assert list(cache.iterdir()) == []
    assert not (tmp_path / "evil.txt").exists()


def test_links_are_refused(tmp_path):
    p = tmp_path / "link.tar"
    with tarfile.open(p, "w") as tf:
        info = tarfile.TarInfo("package/emoji.json")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(info)
    with pytest.raises(DataError, match="link"):
        fetch_emoji(tmp_path / "cache", tarball=p, sha256=sha256_file(p))


def test_unreadable_tarball(tmp_path):
    p = tmp_path / "junk.tgz"
    p.write_bytes(b"this is no tarball")
    with pytest.raises(DataError, match="not a readable"):
        fetch_emoji(tmp_path / "cache", tarball=p, sha256=sha256_file(p))
    assert list((tmp_path / "cache").iterdir()) == []


def test_npm_missing_names_the_manual_route(tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda *a, **k: None)
    with pytest.raises(DataError) as e:
        fetch_emoji(tmp_path / "cache")
    msg = str(e.value)
    assert "npm" in msg and "--tarball" in msg and "sfumato data fetch emoji" in msg
    assert f"registry.npmjs.org/{E.PACKAGE}/-/{E.PACKAGE}-{E.VERSION}.tgz" in msg


def test_npm_pack_route_checks_and_cleans_up(tmp_path, tgz, monkeypatch):
    calls = []

    def fake_run(cmd, cwd, **kwargs):
        calls.append(cmd)
        shutil.copy(tgz[0], cwd)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(shutil, "which", lambda *a, **k: "/usr/bin/npm")
    monkeypatch.setattr(E.subprocess, "run", fake_run)
    monkeypatch.setitem(E.SHA256, E.VERSION, tgz[1])
    cache = tmp_path / "cache"
    assert fetch_emoji(cache, backgrounds=("black",)) == cache
    assert calls[0][1:3] == ["pack", f"{E.PACKAGE}@{E.VERSION}"]
    assert sorted(p.name for p in cache.iterdir()) == sorted([E.PACKAGE, "emoji-black.npz"])
    fetch_emoji(cache, backgrounds=("white",))  # unpacked with that checksum: no npm
    assert len(calls) == 1 and (cache / "emoji-white.npz").is_file()


def test_unpinned_version_needs_a_checksum(tmp_path):
    with pytest.raises(DataError, match="no pinned checksum"):
        fetch_emoji(tmp_path, version="0.0.1")


def test_load_emoji_shapes_range_split_and_captions(fetched):
    d = load_emoji(path=fetched, size=32, heldout=3, seed=1)
    assert d.shape == (3, 32, 32) and len(d) == len(BASE) - 3 and d.heldout.shape[0] == 3
    assert d.train.min() >= -1 and d.train.max() <= 1 and d.train.dtype == torch.float32
    assert d.num_classes == len(EMOJI_CATEGORIES) and d.class_names == list(EMOJI_CATEGORIES)
    names = [f[0].lower() or f[1] for f in BASE]
    idx = d.split_indices
    assert d.captions == [names[i] for i in idx["train"]]
    assert d.heldout_captions == [names[i] for i in idx["heldout"]]
    assert torch.equal(d.heldout_labels.bincount(minlength=9).clamp(max=1),
                       d.heldout_labels.bincount(minlength=9))  # stratified: one per class
    full = load_emoji(path=fetched, size=None, heldout=0, background="black")
    assert full.shape == (3, 64, 64) and full.heldout is None and len(full.captions) == 8
    assert full.train[:, :, 1, 1].eq(-1).all()  # black background
    g = get_dataset({"name": "emoji", "path": str(fetched / "emoji-white.npz"), "size": 16})
    assert g.shape == (3, 16, 16) and g.info["background"] == "white"


def test_load_emoji_missing_and_bad(tmp_path):
    with pytest.raises(DataError, match="sfumato data fetch emoji --cache"):
        load_emoji(path=tmp_path)
    with pytest.raises(DataError, match="background"):
        load_emoji(path=tmp_path, background="grey")
    np.savez(tmp_path / "emoji-white.npz", images=np.zeros((2, 64, 64, 3), np.uint8))
    with pytest.raises(DataError, match="lacks"):
        load_emoji(path=tmp_path)


def test_cli_fetch_with_tarball_and_pinned_checksum(tmp_path, tgz, monkeypatch, capsys):
    monkeypatch.setitem(E.SHA256, E.VERSION, tgz[1])
    cache = tmp_path / "cache"
    assert main(["data", "fetch", "emoji", "--cache", str(cache), "--tarball", str(tgz[0]),
                 "--background", "white"]) == 0
    out = capsys.readouterr().out
    assert f"{len(BASE)} emoji in 9 categories" in out and tgz[1] in out
    assert "Smileys & Emotion      2" in out and "Flags                  2" in out
    assert "Symbols                0" in out and str(cache / "emoji-white.npz") in out
    assert not (cache / "emoji-black.npz").exists()
    monkeypatch.setitem(E.SHA256, E.VERSION, "0" * 64)
    assert main(["data", "fetch", "emoji", "--cache", str(cache), "--tarball",
                 str(tgz[0])]) == 2
    assert "SHA-256" in capsys.readouterr().err


def test_a_text_run_on_emoji_learns_from_the_captions_and_names_categories(fetched, tmp_path):
    import sfumato
    from sfumato.train.trainer import train

    out = tmp_path / "run"
    unet = {"type": "unet", "image_size": 16, "in_channels": 3, "model_channels": 16,
            "channel_mult": [1], "num_res_blocks": 1, "attention_resolutions": [16],
            "norm_groups": 8, "context_dim": 32}
    train({"data": {"name": "emoji", "path": str(fetched / "emoji-white.npz"), "size": 16,
                    "heldout": 0},
           "model": {"type": "text_conditioned", "backbone": unet, "encoder": {"depth": 1}},
           "text": {"encoder": "tiny", "max_length": 32},
           "train": {"steps": 2, "batch_size": 4, "checkpoint_every": 0, "num_threads": 1},
           "sample": {"n_grid": 4, "steps": 2}}, out=out, progress=False)
    m = sfumato.load(out)
    assert m.state["class_prompts"][0] == "a smileys & emotion image"
    s = m.sample(10, steps=2)                       # no prompt: the categories in turn
    assert s.prompts[8] == "a flags image" and s.labels.tolist() == [*range(9), 0]
    s = m.sample(2, steps=2, prompt="a flags image", guidance=2.0)
    assert s.labels.tolist() == [8, 8] and s.x.shape == (2, 3, 16, 16)
    assert m.sample(1, steps=2, prompt="japan flag").labels is None
