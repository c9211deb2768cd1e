"""Control hints: Sobel edge maps, coarse masks, their IoU, make_hint and reading a hint
image."""

import numpy as np
import pytest
import torch

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

pytestmark = pytest.mark.usefixtures("one_thread")


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
