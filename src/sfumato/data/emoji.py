"""Emoji: the Twemoji art, 64 x 64 RGBA, from the npm package ``emoji-datasource-twitter``,
as an RGB data set with 9 category labels and a caption (the emoji's name) per image.

Fetch it once (``npm pack`` of the pinned version, SHA-256 checked, unpacked and turned into
arrays under ``cache_dir() / "emoji"``), then load it like any other data set::

    sfumato data fetch emoji              # or: sfumato data fetch emoji --tarball FILE.tgz
    data = get_dataset({"name": "emoji", "size": 32})
    data.train, data.labels, data.captions    # (N, 3, 32, 32) in [-1, 1], (N,), N strings

What is kept. Every emoji of the package's ``emoji.json`` in its base form: the skin-tone
variants (``skin_variations``) are left out, and so is the category ``Component`` (the five
bare skin-tone swatches, no emoji of their own). The flags are kept: 270 of the 1906 images
of version 16.0.0, a category of their own that is easy to tell apart, but whose captions
("japan flag") name the one thing in them a text-conditioned model has to get right. Class k
is ``EMOJI_CATEGORIES[k]``; version 16.0.0 has 169 / 386 / 159 / 131 / 218 / 85 / 264 /
224 / 270 of them.

The arrays. ``emoji-white.npz`` and ``emoji-black.npz`` hold the images composited on a white
or black background (:func:`composite`) as uint8 (N, 64, 64, 3), ``labels`` (N,) int64,
``categories`` (9,), ``captions`` (N,) (the lower-cased ``name``, e.g. "smiling face with
sunglasses"; the first short name where the name is empty), ``short_names`` (N,)
(comma-separated), ``unified`` (N,) (the code points), and the package's ``version`` and
``sha256``; strings are fixed-width unicode arrays, so the file is read with
``allow_pickle=False``.

Scores. The :mod:`sfumato.metrics` classifier of the default 32 x 32 white set (its default
recipe, about two CPU-minutes) puts 64% of the 191 held-out emoji in the right category (flags
100%, people 92%, symbols 86%, food 8%): categories are semantic, not visual. The FD floor
against those 191 is about 820 at n = 191 (spread 180) and 350 at n = 1000 (spread 18); the
small reference makes it large and noisy, so compare samples with it, not across data sets.

Credit. Twemoji by Twitter, Inc and other contributors, licensed CC-BY 4.0
(https://creativecommons.org/licenses/by/4.0/), via the npm package
``emoji-datasource-twitter`` by iamcal (MIT). Samples of a model trained on it are derived
from CC-BY art: give the same credit.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

import numpy as np
import torch

from ..errors import DataError
from ..files import atomic_write, sha256_file, write_json_atomic
from ._config import unknown
from .base import ImageData, from_uint8
from .images import _resized, _split_data

__all__ = ["BACKGROUNDS", "EMOJI_CATEGORIES", "PACKAGE", "SHA256", "VERSION", "build_emoji",
           "composite", "emoji_dir", "fetch_emoji", "load_emoji"]

PACKAGE = "emoji-datasource-twitter"
#: the pinned package version :func:`fetch_emoji` packs
VERSION = "16.0.0"
#: SHA-256 of the ``npm pack`` tarball of each pinned version (the registry's tarball, byte for
#: byte: its sha512 is the registry's ``dist.integrity``)
SHA256 = {"16.0.0": "f64a530c63bca463bd8317fdc4615ce63a53a0c65018e4ce2d848aaba7a28877"}
#: the categories in Unicode's order; class k is ``EMOJI_CATEGORIES[k]``
EMOJI_CATEGORIES = ("Smileys & Emotion", "People & Body", "Animals & Nature", "Food & Drink",
                    "Travel & Places", "Activities", "Objects", "Symbols", "Flags")
#: categories left out: the bare skin-tone modifiers
SKIPPED_CATEGORIES = ("Component",)
#: background name -> its grey level (0..255)
BACKGROUNDS = {"white": 255, "black": 0}
SIZE = 64
_IMAGES = "img/twitter/64"
#: files of the package that are unpacked (besides the 64 x 64 images)
_KEEP = ("package.json", "emoji.json", "LICENSE", "README.md")
_SOURCE = "SOURCE.json"
_NPZ_KEYS = {"images", "labels", "categories", "captions", "short_names", "unified", "version",
             "sha256"}


def _registry_url(version: str) -> str:
    return f"https://registry.npmjs.org/{PACKAGE}/-/{PACKAGE}-{version}.tgz"


def _manual_hint(version: str) -> str:
    return (f"download the tarball where npm works ('npm pack {PACKAGE}@{version}', or "
            f"{_registry_url(version)}), copy it here and run: sfumato data fetch emoji "
            f"--tarball FILE.tgz")


def emoji_dir(cache: str | os.PathLike | None = None) -> Path:
    """The emoji folder: ``cache`` if given, else ``cache_dir() / "emoji"``
    (:func:`sfumato.metrics.classifier.cache_dir`: ``$SFUMATO_CACHE``, ...)."""
    if cache is not None:
        return Path(cache)
    from ..files import cache_dir

    return cache_dir() / "emoji"


def composite(rgba: np.ndarray, background: int) -> np.ndarray:
    """Straight-alpha RGBA uint8 (..., 4) over a grey ``background`` (0..255) -> RGB uint8
    (..., 3): ``(rgb * a + background * (255 - a)) / 255``, rounded half up, in integers (so
    exact: a = 255 keeps the pixel, a = 0 gives the background)."""
    a = rgba[..., 3:].astype(np.uint32)
    out = (rgba[..., :3].astype(np.uint32) * a + int(background) * (255 - a) + 127) // 255
    return out.astype(np.uint8)


# -- download, check, unpack ---------------------------------------------------------------------
def _npm_pack(version: str, folder: Path) -> Path:
    """``npm pack PACKAGE@version`` in ``folder``; the tarball it wrote."""
    npm = shutil.which("npm")
    if npm is None:
        raise DataError(f"fetching the emoji needs npm (to run 'npm pack {PACKAGE}@{version}'), "
                        f"which is not on PATH: install Node.js/npm, or {_manual_hint(version)}")
    cmd = [npm, "pack", f"{PACKAGE}@{version}", "--ignore-scripts", "--silent"]
    try:
        proc = subprocess.run(cmd, cwd=folder, capture_output=True, text=True, timeout=1800)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise DataError(f"'{' '.join(cmd[1:])}' failed ({e}); {_manual_hint(version)}") from e
    tarballs = sorted(folder.glob("*.tgz"))
    if proc.returncode != 0 or len(tarballs) != 1:
        tail = (proc.stderr or proc.stdout or "").strip()[-500:]
        raise DataError(f"'npm {' '.join(cmd[2:])}' failed (exit status {proc.returncode}"
                        f"{': ' + tail if tail else ''}); check the network, or "
                        f"{_manual_hint(version)}")
    return tarballs[0]


def _check_sha256(tarball: Path, expected: str, version: str, folder: Path) -> str:
    actual = sha256_file(tarball)
    if actual != expected.lower():
        raise DataError(f"{tarball}: SHA-256 {actual}, expected {expected} ({PACKAGE} "
                        f"{version}); the file is damaged or not that package version. Nothing "
                        f"in {folder} was changed: fetch it again (sfumato data fetch emoji), "
                        f"or, for a tarball you trust of another version, pass its checksum "
                        f"(sha256=... / --sha256)")
    return actual


def _members(tf: tarfile.TarFile, tarball: Path) -> list[tarfile.TarInfo]:
    """The members to unpack (the kept files and the 64 x 64 images); DataError for any
    member that is absolute, climbs out with '..', or is a link or special file."""
    keep = []
    for m in tf.getmembers():
        p = PurePosixPath(m.name)
        if p.is_absolute() or ".." in p.parts or m.name.startswith(("/", "\\")):
            raise DataError(f"refusing to unpack {tarball}: member {m.name!r} points outside "
                            f"the folder; this is no npm package tarball")
        if not (m.isfile() or m.isdir()):
            raise DataError(f"refusing to unpack {tarball}: member {m.name!r} is a link or a "
                            f"special file; an npm package tarball holds only files")
        parts = p.parts[1:] if p.parts and p.parts[0] == "package" else None
        if m.isfile() and parts and ("/".join(parts) in _KEEP or (
                "/".join(parts[:-1]) == _IMAGES and parts[-1].endswith(".png"))):
            keep.append(m)
    return keep


def _unpack(tarball: Path, folder: Path, sha256: str) -> Path:
    """Unpack the package into ``folder / PACKAGE`` (a temporary folder renamed into place;
    an older unpacked package is replaced only once the new one is complete)."""
    if not hasattr(tarfile, "data_filter"):  # pragma: no cover - Python < 3.10.12 / 3.11.4
        raise DataError("unpacking the emoji needs tarfile's 'data' extraction filter: "
                        "Python >= 3.10.12 or >= 3.11.4")
    tmp = Path(tempfile.mkdtemp(dir=folder, prefix=".unpack-"))
    try:
        try:
            with tarfile.open(tarball, "r:*") as tf:
                members = _members(tf, tarball)
                tf.extractall(tmp, members=members, filter="data")
        except (tarfile.TarError, OSError, EOFError) as e:
            raise DataError(f"{tarball}: not a readable .tgz tarball ({e})") from e
        root = tmp / "package"
        try:
            meta = json.loads((root / "package.json").read_text())
        except (OSError, ValueError) as e:
            raise DataError(f"{tarball}: no readable package/package.json ({e}); this is no "
                            f"npm package tarball") from e
        if not isinstance(meta, dict) or meta.get("name") != PACKAGE:
            name = meta.get("name") if isinstance(meta, dict) else None
            raise DataError(f"{tarball} is the npm package {name!r}, not {PACKAGE!r}")
        if not (root / "emoji.json").is_file() or not (root / _IMAGES).is_dir():
            raise DataError(f"{tarball}: lacks package/emoji.json or package/{_IMAGES}/")
        write_json_atomic(root / _SOURCE, {"package": PACKAGE, "version": meta.get("version"),
                                           "sha256": sha256, "tarball": tarball.name})
        target = folder / PACKAGE
        old = None
        if target.exists():
            old = Path(tempfile.mkdtemp(dir=folder, prefix=".old-"))
            os.replace(target, old / PACKAGE)
        os.replace(root, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return target
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _unpacked(folder: Path, sha256: str) -> Path | None:
    """``folder / PACKAGE`` if it holds the package with this checksum, else None."""
    with contextlib.suppress(OSError, ValueError):
        source = json.loads((folder / PACKAGE / _SOURCE).read_text())
        if isinstance(source, dict) and source.get("sha256") == sha256.lower():
            return folder / PACKAGE
    return None


# -- building the arrays -------------------------------------------------------------------------
def _caption(entry: dict) -> str:
    name = entry.get("name")
    if isinstance(name, str) and name.strip():
        return " ".join(name.lower().split())
    short = entry.get("short_names") or [entry.get("short_name") or ""]
    return " ".join(str(short[0]).replace("_", " ").replace("-", " ").split())


def build_emoji(package: str | os.PathLike, backgrounds: Sequence[str] = ("white", "black"),
                ) -> dict[str, dict[str, np.ndarray]]:
    """The arrays of the unpacked package folder (holding ``emoji.json`` and
    ``img/twitter/64/``), one dict per background: ``images`` uint8 (N, 64, 64, 3) and the
    other keys listed in the module docstring. Base emoji only, in ``emoji.json``'s order."""
    from PIL import Image

    package = Path(package)
    for b in backgrounds:
        if b not in BACKGROUNDS:
            raise unknown("emoji background", b, BACKGROUNDS)
    try:
        entries = json.loads((package / "emoji.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"{package / 'emoji.json'}: not readable JSON ({e})") from e
    try:
        source = json.loads((package / _SOURCE).read_text())
    except (OSError, ValueError):
        source = {}
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise DataError(f"{package / 'emoji.json'}: expected a list of emoji objects")
    rgba, labels, captions, short_names, unified = [], [], [], [], []
    for entry in entries:
        category = entry.get("category")
        if category in SKIPPED_CATEGORIES or entry.get("has_img_twitter") is False:
            continue
        if category not in EMOJI_CATEGORIES:
            raise DataError(f"{package / 'emoji.json'}: emoji {entry.get('name')!r} has the "
                            f"unknown category {category!r} (known: "
                            f"{', '.join(EMOJI_CATEGORIES)}); this package version needs a "
                            f"newer sfumato")
        image = entry.get("image")
        if not isinstance(image, str) or image in ("", ".", "..") or \
                PurePosixPath(image).name != image or "\\" in image:
            raise DataError(f"{package / 'emoji.json'}: bad image file name {image!r}")
        path = package / _IMAGES / image
        try:
            with Image.open(path) as im:
                a = np.asarray(im.convert("RGBA"), dtype=np.uint8)
        except OSError as e:
            raise DataError(f"{path}: missing or not a readable PNG ({e}); unpack the package "
                            f"again (sfumato data fetch emoji)") from e
        if a.shape != (SIZE, SIZE, 4):
            raise DataError(f"{path}: {a.shape[1]}x{a.shape[0]} image, expected {SIZE}x{SIZE}")
        rgba.append(a)
        labels.append(EMOJI_CATEGORIES.index(category))
        captions.append(_caption(entry))
        short_names.append(",".join(str(s) for s in entry.get("short_names") or []))
        unified.append(str(entry.get("unified", "")))
    if not rgba:
        raise DataError(f"{package / 'emoji.json'}: no emoji with images")
    stack = np.stack(rgba)
    common = {"labels": np.asarray(labels, dtype=np.int64),
              "categories": np.asarray(EMOJI_CATEGORIES, dtype=str),
              "captions": np.asarray(captions, dtype=str),
              "short_names": np.asarray(short_names, dtype=str),
              "unified": np.asarray(unified, dtype=str),
              "version": np.asarray(str(source.get("version", "")), dtype=str),
              "sha256": np.asarray(str(source.get("sha256", "")), dtype=str)}
    return {b: {"images": composite(stack, BACKGROUNDS[b]), **common} for b in backgrounds}


def fetch_emoji(cache: str | os.PathLike | None = None, *, version: str = VERSION,
                tarball: str | os.PathLike | None = None, sha256: str | None = None,
                backgrounds: Sequence[str] = ("white", "black")) -> Path:
    """Download (``npm pack``), check, unpack the emoji package and write
    ``emoji-<background>.npz`` for each of ``backgrounds``; returns the folder.

    ``cache``: the folder (default :func:`emoji_dir`). ``tarball``: a ``.tgz`` of the package
    downloaded by hand, used instead of npm. ``sha256``: the tarball's expected SHA-256
    (default: the pinned ``SHA256[version]``); a mismatch is a DataError and leaves the folder
    as it was. The package is unpacked with tarfile's ``data`` filter (members that are
    absolute, climb out with '..' or are links are refused), into a temporary folder renamed
    into place. A package already unpacked with the same checksum is reused (no download).
    Arrays are written atomically.
    """
    for b in backgrounds:
        if b not in BACKGROUNDS:
            raise unknown("emoji background", b, BACKGROUNDS)
    expected = sha256 if sha256 is not None else SHA256.get(version)
    if expected is None:
        raise DataError(f"no pinned checksum for {PACKAGE} {version} (pinned: "
                        f"{', '.join(SHA256)}); pass the SHA-256 of a tarball you trust "
                        f"(sha256=... / --sha256)")
    folder = emoji_dir(cache)
    folder.mkdir(parents=True, exist_ok=True)
    package = _unpacked(folder, expected) if tarball is None else None
    if package is None:
        if tarball is not None:
            tarball = Path(tarball)
            if not tarball.is_file():
                raise DataError(f"--tarball {str(tarball)!r} does not exist or is no file")
            sha = _check_sha256(tarball, expected, version, folder)
            package = _unpack(tarball, folder, sha)
        else:
            tmp = Path(tempfile.mkdtemp(dir=folder, prefix=".npm-pack-"))
            try:
                packed = _npm_pack(version, tmp)
                sha = _check_sha256(packed, expected, version, folder)
                package = _unpack(packed, folder, sha)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    for background, arrays in build_emoji(package, backgrounds).items():
        with atomic_write(folder / f"emoji-{background}.npz") as tmp_npz:
            np.savez_compressed(tmp_npz, **arrays)
    _read_npz.cache_clear()
    return folder


# -- loading -------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=2)
def _read_npz(path: str, mtime_ns: int) -> dict[str, np.ndarray]:
    again = "build it again: sfumato data fetch emoji"
    try:
        with np.load(path, allow_pickle=False) as z:
            keys = set(z.files)
            a = {k: z[k] for k in _NPZ_KEYS & keys}
    except (OSError, ValueError) as e:  # ValueError also for object arrays (pickle refused)
        raise DataError(f"{path}: not a readable emoji .npz ({e}); {again}") from e
    if not _NPZ_KEYS <= keys:
        raise DataError(f"{path}: lacks {', '.join(sorted(_NPZ_KEYS - keys))}; {again}")
    x, y, cats = a["images"], a["labels"], a["categories"]
    n = x.shape[0] if x.ndim == 4 else -1
    if not (x.dtype == np.uint8 and x.ndim == 4 and x.shape[1:] == (SIZE, SIZE, 3) and n > 0
            and y.shape == (n,) and np.issubdtype(y.dtype, np.integer) and cats.ndim == 1
            and y.min() >= 0 and y.max() < cats.size and a["captions"].shape == (n,)):
        raise DataError(f"{path}: expected uint8 images (N, {SIZE}, {SIZE}, 3), labels (N,) "
                        f"indexing 'categories', captions (N,); {again}")
    return a


def load_emoji(*, size: int | tuple[int, int] | None = 32, background: str = "white",
               heldout: int | float = 0.1, seed: int = 0,
               path: str | os.PathLike | None = None) -> ImageData:
    """The emoji (fetched by ``sfumato data fetch emoji``): RGB (N, 3, size, size) in [-1, 1],
    composited on a white or black ``background``, resized from 64 (bilinear, antialiased;
    ``size=None`` keeps 64), ``labels`` the category (``class_names``:
    :data:`EMOJI_CATEGORIES`), ``captions`` / ``heldout_captions`` the emoji names. A seeded
    split stratified by category holds out ``heldout`` (a count or fraction; default 10%).
    ``path``: the folder ``fetch_emoji`` wrote (default :func:`emoji_dir`) or an ``.npz``."""
    if background not in BACKGROUNDS:
        raise unknown("emoji background", background, BACKGROUNDS)
    folder = emoji_dir(path)
    npz = folder if folder.suffix == ".npz" else folder / f"emoji-{background}.npz"
    if not npz.is_file():
        where = "" if path is None else f" --cache {folder}"
        raise DataError(f"{npz} not found: fetch the emoji first with: sfumato data fetch "
                        f"emoji{where}")
    a = _read_npz(str(npz), npz.stat().st_mtime_ns)
    names = [str(c) for c in a["categories"]]
    info = {"source": PACKAGE, "version": str(a["version"]), "sha256": str(a["sha256"]),
            "background": background, "path": str(npz)}
    data = _split_data("emoji", from_uint8(a["images"]),
                       torch.from_numpy(a["labels"].astype(np.int64)), heldout, seed, info,
                       captions=[str(c) for c in a["captions"]], num_classes=len(names),
                       class_names=names)
    return _resized(data, size)
