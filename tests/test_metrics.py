"""Metrics: the Fréchet distance matches its closed forms; SW / MMD separate equal from
shifted distributions against their floors; the digits classifier is accurate, cached
safely (checksummed safetensors, never unpickled) and its FD grows with corruption."""

import json
import math
import os
import pickle
import sys

import numpy as np
import pytest
import torch
from _util import gen

import sfumato.metrics.classifier as clf_mod
from sfumato.accuracy import sliced_wasserstein
from sfumato.data import ImageData, get_dataset, sample_toy
from sfumato.files import sha256_file
from sfumato.metrics import (
    FeatureExtractor,
    evaluate_2d,
    evaluate_images,
    frechet_distance,
    frechet_from_stats,
    gaussian_stats,
    get_classifier,
    mmd,
)


# -- Fréchet distance -------------------------------------------------------------------------
def test_fd_same_gaussian_is_small_and_shift_is_mean_distance():
    g = np.random.default_rng(0)
    d, n = 6, 40000
    a = g.normal(size=(n, d)) * np.linspace(0.5, 2, d)
    b = g.normal(size=(n, d)) * np.linspace(0.5, 2, d)
    assert frechet_distance(a, b) < 2e-3
    shift = np.array([1.0, -0.5, 0, 0, 2.0, 0])
    assert frechet_distance(b, b + shift) == pytest.approx(shift @ shift, rel=1e-9)
    fd = frechet_distance(a, b + shift)  # equal covariances: FD = |dmu|^2
    assert fd == pytest.approx(shift @ shift, rel=0.05)
    mu, cov = gaussian_stats(a)
    assert frechet_from_stats(mu, cov, mu + shift, cov) == pytest.approx(shift @ shift, rel=1e-9)


def test_fd_closed_form_for_diagonal_covariances():
    sa, sb = np.array([0.5, 1.0, 2.0, 3.0]), np.array([1.5, 1.0, 0.5, 3.5])
    mua, mub = np.array([0.0, 1.0, 0.0, -1.0]), np.array([0.5, 0.0, 0.0, 1.0])
    exact = ((mua - mub) ** 2).sum() + ((sa - sb) ** 2).sum()
    assert frechet_from_stats(mua, np.diag(sa**2), mub, np.diag(sb**2)) == \
        pytest.approx(exact, rel=1e-12)
    g = np.random.default_rng(1)
    a = mua + sa * g.normal(size=(100000, 4))
    b = mub + sb * g.normal(size=(100000, 4))
    assert frechet_distance(torch.from_numpy(a), b) == pytest.approx(exact, rel=0.02)


def test_fd_full_covariances_match_scipy_sqrtm_and_survive_rank_deficiency():
    linalg = pytest.importorskip("scipy.linalg")
    g = np.random.default_rng(2)
    ma, mb = g.normal(size=(5, 5)), g.normal(size=(5, 5))
    ca, cb = ma @ ma.T, mb @ mb.T + 0.1 * np.eye(5)
    mu_a, mu_b = g.normal(size=5), g.normal(size=5)
    ref = ((mu_a - mu_b) ** 2).sum() + np.trace(ca + cb) \
        - 2 * np.trace(linalg.sqrtm(ca @ cb)).real
    assert frechet_from_stats(mu_a, ca, mu_b, cb) == pytest.approx(ref, rel=1e-8)
    # more dimensions than samples: singular covariances, still finite and >= 0
    fd = frechet_distance(g.normal(size=(20, 64)), g.normal(size=(20, 64)))
    assert math.isfinite(fd) and fd >= 0
    with pytest.raises(ValueError, match="equal D"):
        frechet_distance(np.zeros((5, 3)), np.zeros((5, 4)))


# -- 2-D: sliced Wasserstein and MMD ----------------------------------------------------------
@pytest.mark.parametrize("toy", ["moons", "8gaussians"])
def test_2d_metrics_near_floor_for_the_truth_and_far_for_a_shift(toy):
    good = sample_toy(toy, 1000, gen(123))
    r = evaluate_2d(good, toy, seed=0)
    assert set(r) == {"sw", "sw_floor", "mmd", "mmd_floor", "n", "n_mmd"} and r["n"] == 1000
    # two independent draws differ by chance: the ratio to a (3-draw mean) floor stays < 2.5
    assert r["sw"] < 2.5 * r["sw_floor"] and r["mmd"] < 2.5 * r["mmd_floor"]
    for wrong in (good + torch.tensor([0.75, 0.0]), 1.5 * good):  # shifted, too wide
        bad = evaluate_2d(wrong, toy, seed=0)
        assert bad["sw"] > 4 * bad["sw_floor"] and bad["mmd"] > 4 * bad["mmd_floor"]


def test_2d_reuses_check_sliced_wasserstein_and_median_mmd():
    x = sample_toy("swissroll", 500, gen(1))
    ref = sample_toy("swissroll", 500, gen(0))
    r = evaluate_2d(x, "swissroll", seed=0)
    assert r["sw"] == sliced_wasserstein(x, ref, 256, generator=gen(0))
    assert mmd(x, x) == 0.0
    assert mmd(x, ref, "median") < mmd(x + 1.0, ref, "median")
    with pytest.raises(ValueError, match="did you mean 'moons'"):
        evaluate_2d(x, "mons")


# -- the digits classifier --------------------------------------------------------------------
@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("sfumato-cache")


@pytest.fixture(scope="module")
def digits():
    return get_dataset("digits")


@pytest.fixture(scope="module")
def clf(cache):
    c = get_classifier("digits", cache=cache)
    print(f"digits classifier: held-out accuracy {c.test_acc:.4f}, trained in "
          f"{c.meta['train_seconds']} s", file=sys.stderr)
    return c


def test_digits_classifier_accuracy(clf, digits):
    assert clf.test_acc >= 0.95
    assert (clf.predict(digits.heldout) == digits.heldout_labels).double().mean() >= 0.95
    f = clf(digits.heldout[:10])
    assert f.shape == (10, 128) and isinstance(clf, FeatureExtractor)


def test_cache_hit_loads_identical_weights_without_training(clf, cache, digits, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("trained although cached")

    monkeypatch.setattr(clf_mod, "train_classifier", boom)
    again = get_classifier("digits", cache=cache)
    assert torch.equal(again(digits.heldout), clf(digits.heldout))
    files = sorted(p.suffix for p in (cache / "classifiers").iterdir())
    assert files == [".json", ".safetensors"]  # no temporary files left behind
    meta = json.loads(next((cache / "classifiers").glob("*.json")).read_text())
    assert meta["test_acc"] == clf.test_acc and len(meta["sha256"]) == 64


FAST = {**clf_mod.RECIPES["digits"], "epochs": 2}


def test_corrupt_cache_is_detected_and_retrained_never_unpickled(tmp_path, digits):
    first = get_classifier("digits", cache=tmp_path, recipe=FAST)
    weights = next((tmp_path / "classifiers").glob("*.safetensors"))
    sidecar = weights.with_suffix(".json")
    blob = bytearray(weights.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    weights.write_bytes(bytes(blob))
    with pytest.warns(UserWarning, match="checksum"):
        second = get_classifier("digits", cache=tmp_path, recipe=FAST)
    assert torch.equal(second(digits.heldout), first(digits.heldout))  # deterministic retrain
    # a pickle planted as the weights, with a matching checksum, is still refused
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    weights.write_bytes(pickle.dumps(Evil()))
    meta = json.loads(sidecar.read_text())
    meta["sha256"] = sha256_file(weights)
    sidecar.write_text(json.dumps(meta))
    with pytest.warns(UserWarning, match="unusable"):
        third = get_classifier("digits", cache=tmp_path, recipe=FAST)
    assert not marker.exists()
    assert torch.equal(third(digits.heldout), first(digits.heldout))
    sidecar.write_text("{not json")
    with pytest.warns(UserWarning, match="unusable"):
        get_classifier("digits", cache=tmp_path, recipe=FAST)


# -- evaluate_images on digits ----------------------------------------------------------------
def test_fd_floor_uses_the_generated_set_size(clf, cache, digits):
    idx = torch.randperm(len(digits), generator=gen(1))
    small = evaluate_images(digits.train[idx[:100]], digits, cache=cache)
    full = evaluate_images(digits.train[idx[:300]], digits, cache=cache)
    assert (small["n"], small["n_ref"], full["n"], full["n_ref"]) == (100, 100, 300, 300)
    assert small["fd_floor"] > 1.5 * full["fd_floor"]  # the estimator's bias shrinks with n
    sub = evaluate_images(digits.train[idx[:300]], digits, n=100, cache=cache)
    assert sub["n"] == 100 and sub["fd_floor"] == small["fd_floor"]
    for r in (small, full):
        assert 0.4 < r["fd_ratio"] < 2.5  # real images score about the floor
        assert r["classifier_test_acc"] == clf.test_acc


def test_fd_grows_with_noise_and_accuracy_uses_conditioning_labels(clf, cache, digits):
    idx = torch.randperm(len(digits), generator=gen(2))[:300]
    x, y = digits.train[idx], digits.labels[idx]
    noise = torch.randn(x.shape, generator=gen(3))
    fds = []
    for s in (0.0, 0.2, 0.4, 0.8):
        r = evaluate_images((x + s * noise).clamp(-1, 1), digits, labels=y, cache=cache)
        fds.append(r["fd"])
        if s == 0:
            assert r["accuracy"] >= 0.95
    assert fds[0] < fds[1] < fds[2] < fds[3]
    assert fds[2] > 2 * r["fd_floor"]
    wrong = evaluate_images(x, digits, labels=(y + 1) % 10, cache=cache)
    assert wrong["accuracy"] < 0.1
    # unconditional: class histogram and its entropy
    assert sum(wrong["class_hist"]) == pytest.approx(1, abs=1e-4)
    assert wrong["class_entropy"] > 0.95 * wrong["class_entropy_max"]
    zeros = digits.train[digits.labels == 0][:100]
    one_class = evaluate_images(zeros, digits, cache=cache)
    assert one_class["class_entropy"] < 0.3 and one_class["fd_ratio"] > 3


def test_any_feature_extractor_and_upsampled_data(clf, cache, digits):
    idx = torch.randperm(len(digits), generator=gen(4))[:200]
    pixels = lambda im: im.flatten(1)  # noqa: E731
    clean = evaluate_images(digits.train[idx], digits, feature_extractor=pixels, cache=cache)
    noisy = evaluate_images((digits.train[idx] + 0.5 * torch.randn(200, 1, 8, 8,
                                                                   generator=gen(5))),
                            digits, feature_extractor=pixels, cache=cache)
    assert clean["features"] == "function" and noisy["fd"] > 3 * clean["fd"]
    up = get_dataset({"name": "digits", "size": 16})
    r = evaluate_images(up.train[idx], up, cache=cache)  # the native 8x8 classifier, resized
    assert 0.4 < r["fd_ratio"] < 2.5 and r["classifier_test_acc"] == clf.test_acc
    with pytest.raises(ValueError, match="shape"):
        evaluate_images(digits.train[:50], up, cache=cache)
    unlabelled = ImageData("mine", digits.train, heldout=digits.heldout)
    with pytest.raises(ValueError, match="feature_extractor"):
        evaluate_images(digits.train[:50], unlabelled, cache=cache)
    r = evaluate_images(digits.train[:50], unlabelled, feature_extractor=clf, cache=cache)
    assert "classifier_test_acc" not in r and r["features"] == "Classifier"
    with pytest.raises(ValueError, match="held-out"):
        evaluate_images(digits.train[:50], ImageData("x", digits.train), feature_extractor=clf)


@pytest.mark.skipif(not os.environ.get("SFUMATO_TEST_MNIST"),
                    reason="MNIST classifier training takes about a minute on 2 CPU cores; "
                           "set SFUMATO_TEST_MNIST=1")
def test_mnist_classifier_and_floor():
    from sfumato.data import mnist_path

    try:
        mnist_path()
    except ImportError as e:
        pytest.skip(str(e))
    data = get_dataset("mnist")
    c = get_classifier(data)
    assert c.test_acc >= 0.98
    idx = torch.randperm(len(data), generator=gen(0))[:1000]
    r = evaluate_images(data.train[idx], data, labels=data.labels[idx])
    assert r["accuracy"] >= 0.98 and 0.4 < r["fd_ratio"] < 2.5
