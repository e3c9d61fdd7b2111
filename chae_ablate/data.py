"""Datasets for ablation studies: every cell sees the same images and the same splits, decoded once.

`load_dataset` turns a DataConfig into uint8 tensors at the study resolution, split into train /
val / test. Three sources:
- folder: a class-per-folder image directory (class names = sorted folder names);
- digits: scikit-learn's bundled 1,797 real 8x8 handwritten digits (no download; the default);
- synthetic: seeded, generated shapes whose class shows in colour, shape and orientation (tests).

Splits are stratified per class and seeded by `split_seed`: within a class, items are ordered by a
seeded hash of their id and cut by per-class rounding, so each class's count in a split is within one
image of (class size x split fraction), and adding a file to one class moves no other class's items.
The split is written as a manifest CSV (file, class, split, sha256) under runs/splits/.

Folder images are decoded, converted to RGB and squashed to R x R once, then cached under
runs/cache/ keyed by a stat fingerprint of the folder (relative path, size, mtime_ns of every file),
the resolution and the resize method; later loads read one tensor file and decode nothing.
Files that cannot be read are skipped with a DataWarning and listed, never fatal. The generated
sources are cheap to rebuild, so they are not cached.
"""
from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import math
import os
import uuid
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from .config import DataConfig
from .errors import DataError

SPLITS = ("train", "val", "test")
RESIZE_METHOD = "pil-jpegdraft-bilinear-rg3"  # in every cache key: change it when resizing changes
REDUCING_GAP = 3.0  # PIL reduces by whole factors first when the source is > 3x the target
CACHE_VERSION = 1
MISSING_ROOT_HINT = ("get the paper's data with `chae-ablate data prepare best-artworks ARCHIVE "
                     "--out data/artworks` (Kaggle's 'Best Artworks of All Time'), or use `source: digits`")


@dataclass(frozen=True)
class Split:
    images: torch.Tensor  # uint8 (N, 3, R, R), on CPU
    labels: torch.Tensor  # int64 (N,)


@dataclass(frozen=True)
class Dataset:
    train: Split
    val: Split
    test: Split
    classes: tuple[str, ...]
    manifest: Path  # the split manifest CSV
    fingerprint: str  # identifies the source data
    skipped: tuple[str, ...]  # files that could not be read (relative to the root)
    decoded: int = 0  # image files decoded by this load call (0 on a cache hit)


class DataWarning(UserWarning):
    """Some files were skipped; the load went on without them."""


@dataclass(frozen=True)
class Items:
    """A whole source before splitting. Per item: id, label, content hash, error ('' if readable)."""

    ids: list[str]
    labels: np.ndarray  # int64 (N,), every item, readable or not
    hashes: list[str]
    errors: list[str]
    images: torch.Tensor  # uint8 (M, 3, R, R), the M readable items in id order
    classes: tuple[str, ...]
    fingerprint: str
    name: str  # prefix for cache and manifest file names
    decoded: int = 0


def load_dataset(cfg: DataConfig, resolution: int, runs_dir: Path = Path("runs"),
                 progress: bool = True) -> Dataset:
    """Load `cfg`'s images at `resolution` px, split train / val / test, write the split manifest."""
    if cfg.source == "folder":
        if not cfg.root:
            raise DataError(f"data.root is required when source is 'folder'; {MISSING_ROOT_HINT}")
        items = load_folder(Path(cfg.root), resolution, Path(runs_dir) / "cache", progress)
    elif cfg.source == "digits":
        items = digits_items(resolution)
    elif cfg.source == "synthetic":
        items = synthetic_items(cfg.synthetic_classes, cfg.synthetic_per_class, resolution)
    else:
        raise DataError(f"data.source: {cfg.source!r} is not one of folder, digits, synthetic")
    readable = np.array([not e for e in items.errors], dtype=bool)
    split = assign_splits(items.ids, items.labels, readable, cfg)
    manifest = write_manifest(items, split, cfg, Path(runs_dir) / "splits")
    skipped = tuple(i for i, e in zip(items.ids, items.errors) if e)
    if skipped:
        reasons = [f"{i} ({e})" for i, e in zip(items.ids, items.errors) if e]
        more = f"; and {len(reasons) - 20} more" if len(reasons) > 20 else ""
        warnings.warn(f"skipped {len(skipped)} unreadable file(s), all listed in {manifest}: "
                      f"{'; '.join(reasons[:20])}{more}", DataWarning, stacklevel=2)
    labels = torch.from_numpy(items.labels[readable])
    parts = [_subset(items.images, labels, split[readable] == s) for s in range(len(SPLITS))]
    return Dataset(*parts, classes=items.classes, manifest=manifest, fingerprint=items.fingerprint,
                   skipped=skipped, decoded=items.decoded)


def _subset(images: torch.Tensor, labels: torch.Tensor, mask: np.ndarray) -> Split:
    index = torch.from_numpy(np.flatnonzero(mask))
    return Split(images[index], labels[index])  # (index_select is many times slower on uint8 here)


# --- splits and manifest ----------------------------------------------------------------------

def assign_splits(ids: list[str], labels: np.ndarray, readable: np.ndarray, cfg: DataConfig) -> np.ndarray:
    """Split index per item (0 train, 1 val, 2 test, -1 unreadable), stratified and seeded.

    Per class of n readable items: round(n x test_fraction) go to test, then
    round(rest x val_fraction) to val, the others to train; which ones is decided by a seeded hash of
    each item's id, so the result depends only on the ids, labels and seed.
    """
    split = np.full(len(ids), -1, dtype=np.int64)
    for label in np.unique(labels):
        members = np.flatnonzero((labels == label) & readable)
        order = sorted(members, key=lambda i: hashlib.sha256(f"{cfg.split_seed}/{ids[i]}".encode()).digest())
        n_test = _round(len(order) * cfg.test_fraction)
        n_val = _round((len(order) - n_test) * cfg.val_fraction)
        split[order[:n_test]] = 2
        split[order[n_test:n_test + n_val]] = 1
        split[order[n_test + n_val:]] = 0
    for index, name in enumerate(SPLITS):
        if readable.any() and not (split == index).any():
            fix = "lower data.test_fraction or data.val_fraction" if name == "train" else f"raise data.{name}_fraction"
            raise DataError(f"the {name} split is empty ({int(readable.sum())} images, test_fraction "
                            f"{cfg.test_fraction}, val_fraction {cfg.val_fraction}); add images or {fix}")
    return split


def _round(x: float) -> int:
    return math.floor(x + 0.5)  # half up, unlike Python's round-half-even


def write_manifest(items: Items, split: np.ndarray, cfg: DataConfig, directory: Path) -> Path:
    """Write (or keep, when identical) the split manifest CSV and return its path."""
    key = _digest(f"{items.fingerprint}|{cfg.split_seed}|{cfg.test_fraction}|{cfg.val_fraction}")
    path = directory / f"{items.name}-{key[:16]}.csv"
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["file", "class", "split", "sha256"])
    for item_id, label, s, sha in zip(items.ids, items.labels, split, items.hashes):
        writer.writerow([item_id, items.classes[label], SPLITS[s] if s >= 0 else "skipped", sha])
    data = buffer.getvalue().encode()
    if not (path.exists() and path.read_bytes() == data):
        _atomic_write(path, lambda f: f.write(data))
    return path


def _atomic_write(path: Path, write) -> None:
    """Write via a temporary file in the same folder and os.replace: never a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "xb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _digest(text: str | bytes) -> str:
    return hashlib.sha256(text.encode() if isinstance(text, str) else text).hexdigest()


# --- folder source ----------------------------------------------------------------------------

def class_names(root: Path) -> tuple[str, ...]:
    """The classes of a class-per-folder tree: its non-hidden sub-folder names, sorted."""
    if not root.is_dir():
        what = "is not a directory" if root.exists() else "does not exist"
        raise DataError(f"data root {root} {what}; {MISSING_ROOT_HINT}")
    return tuple(sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")))


def scan_folder(root: Path) -> tuple[tuple[str, ...], list[tuple[str, int]]]:
    """Class names (sorted sub-folder names) and every non-hidden file as (relative path, label)."""
    classes = class_names(root)
    files = []
    for label, name in enumerate(classes):
        for folder, dirs, names in os.walk(root / name):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            rel = Path(folder).relative_to(root).as_posix()
            files += [(f"{rel}/{n}", label) for n in sorted(names) if not n.startswith(".")]
    return classes, files


def folder_fingerprint(root: Path, files: list[tuple[str, int]]) -> str:
    """Hash of (relative path, size, mtime_ns) of every file: cheap, no file contents read."""
    lines = []
    for rel, _ in files:
        st = os.stat(root / rel)
        lines.append(f"{rel}\t{st.st_size}\t{st.st_mtime_ns}\n")
    return _digest("".join(lines))


def load_folder(root: Path, resolution: int, cache_dir: Path, progress: bool = True) -> Items:
    """Folder images at `resolution`, from the decode-once cache when the folder is unchanged."""
    classes, files = scan_folder(root)
    _require_classes(root, classes, [label for _, label in files], "no files")
    fingerprint = folder_fingerprint(root, files)
    name = f"{_slug(root.resolve().name)}-{_digest(str(root.resolve()))[:8]}"
    key = _digest(f"v{CACHE_VERSION}|{fingerprint}|{resolution}|{RESIZE_METHOD}")
    path = cache_dir / f"{name}-{resolution}px-{key[:16]}.pt"
    cached, decoded = _read_cache(path), 0
    if cached is None:
        cached, decoded = _decode_folder(root, files, resolution, progress), len(files)
        _atomic_write(path, lambda f: torch.save(cached, f))
        for stale in cache_dir.glob(f"{name}-{resolution}px-*.pt"):  # older versions of this folder
            if stale != path:
                with contextlib.suppress(OSError):  # e.g. open in another process on Windows
                    stale.unlink()
    labels = np.array([label for _, label in files], dtype=np.int64)
    readable = [label for label, e in zip(labels, cached["errors"]) if not e]
    _require_classes(root, classes, readable, "no readable images")
    return Items(ids=[rel for rel, _ in files], labels=labels, hashes=cached["hashes"],
                 errors=cached["errors"], images=cached["images"], classes=classes,
                 fingerprint=fingerprint, name=name, decoded=decoded)


def _require_classes(root: Path, classes: tuple[str, ...], labels: list[int], empty: str) -> None:
    if len(classes) < 2:
        raise DataError(f"{root} has {len(classes)} class folder(s); a classifier needs at least 2: "
                        f"put each class's images in its own sub-folder, {root}/<class>/<image>")
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=len(classes))
    empty_classes = [c for c, n in zip(classes, counts) if n == 0]
    if empty_classes:
        raise DataError(f"class folder(s) {', '.join(empty_classes)} under {root} have {empty}; "
                        f"add images or remove the folder(s)")


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in text) or "data"


def _read_cache(path: Path) -> dict | None:
    if not path.exists():
        return None
    try:
        cached = torch.load(path, weights_only=True, mmap=True)  # pages are read once, when split
    except Exception:  # a cache from another torch version or a damaged disk: rebuild it
        return None
    return cached if isinstance(cached, dict) and cached.get("version") == CACHE_VERSION else None


def _decode_folder(root: Path, files: list[tuple[str, int]], resolution: int, progress: bool) -> dict:
    """Decode every file once, on a few threads (PIL releases the GIL while decoding and resizing)."""
    images = np.empty((len(files), 3, resolution, resolution), dtype=np.uint8)
    hashes, errors, n = [], [], 0
    decode = partial(decode_file, resolution=resolution)
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        results = pool.map(decode, [root / rel for rel, _ in files])  # in order: deterministic
        for pixels, sha, error in tqdm(results, total=len(files), disable=not progress, unit="img",
                                       desc=f"decoding {root.name} at {resolution}px", leave=False):
            hashes.append(sha)
            errors.append(error)
            if pixels is not None:
                images[n] = pixels  # numpy: torch's parallel copy contends with the decoding threads
                n += 1
    images = images[:n].copy() if n < len(files) else images  # torch.save writes a view's whole buffer
    return {"version": CACHE_VERSION, "images": torch.from_numpy(images), "hashes": hashes,
            "errors": errors, "resize": RESIZE_METHOD}


# --- decoding ---------------------------------------------------------------------------------

def decode_file(path: Path, resolution: int) -> tuple[np.ndarray | None, str, str]:
    """(uint8 (3, R, R) pixels or None, sha256 of the file, error message or '')."""
    data = b""
    try:
        data = path.read_bytes()
        image, _, _ = open_image(data, draft=resolution)
        return to_pixels(image, resolution), _digest(data), ""
    except Exception as e:  # PIL raises many types on corrupt input; a bad file must not stop a study
        return None, _digest(data), describe_error(data, e)


def open_image(data: bytes, draft: int | None = None) -> tuple[Image.Image, tuple[int, int], str]:
    """Fully decode image bytes (raises on truncated data); also returns the stored size and mode.

    JPEGs are decoded at a reduced DCT scale when that still covers draft x draft, which makes large
    sources fast to shrink.
    """
    image = Image.open(io.BytesIO(data))
    size, mode = image.size, image.mode
    if draft and image.format == "JPEG":
        image.draft("RGB", (draft, draft))
    image.load()
    return image, size, mode


def to_pixels(image: Image.Image, resolution: int) -> np.ndarray:
    """Any PIL image -> RGB, squashed to R x R (bilinear, antialiased) -> uint8 (3, R, R)."""
    image = to_rgb(image)
    if image.size != (resolution, resolution):
        image = image.resize((resolution, resolution), Image.Resampling.BILINEAR, reducing_gap=REDUCING_GAP)
    return np.asarray(image).transpose(2, 0, 1).copy()


def to_rgb(image: Image.Image) -> Image.Image:
    """Grayscale, palette, alpha (dropped, as Keras' load_img does), CMYK, 16-bit -> 8-bit RGB."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):  # 16-bit grey: keep the top byte
        image = Image.fromarray((np.asarray(image, dtype=np.float64) / 257).clip(0, 255).astype(np.uint8))
    elif image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return image.convert("RGB")


def describe_error(data: bytes, error: Exception) -> str:
    """A short, stable reason why `data` (the file's bytes, if read) is not a usable image."""
    if isinstance(error, OSError) and error.filename:  # the read itself failed
        return f"unreadable: {error.strerror}"
    if not data:
        return "empty file"
    if isinstance(error, UnidentifiedImageError):
        return "not an image"
    return f"corrupt image: {error}".splitlines()[0][:200]


# --- built-in sources -------------------------------------------------------------------------

def digits_items(resolution: int) -> Items:
    """scikit-learn's handwritten digits (0..16 ink) as 0..255 RGB images, upscaled to R x R."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = np.rint(digits.images * (255 / 16)).astype(np.uint8)  # (N, 8, 8)
    images = np.stack([to_pixels(Image.fromarray(p, "L"), resolution) for p in pixels])
    return _generated("digits", pixels, images, digits.target.astype(np.int64),
                      tuple(str(c) for c in range(10)), fingerprint=_digest(pixels.tobytes()))


def synthetic_items(classes: int, per_class: int, resolution: int, seed: int = 0) -> Items:
    """`classes` x `per_class` seeded images at `resolution` px; see `render_synthetic`."""
    labels = np.repeat(np.arange(classes, dtype=np.int64), per_class)
    images = render_synthetic(labels, classes, resolution, np.random.default_rng(seed))
    width = len(str(classes - 1))
    names = tuple(f"class{k:0{width}d}" for k in range(classes))
    fingerprint = _digest(f"synthetic-v1|{classes}|{per_class}|{resolution}|{seed}")
    return _generated("synthetic", images, images, labels, names, fingerprint)


def _generated(name: str, native: np.ndarray, images: np.ndarray, labels: np.ndarray,
               classes: tuple[str, ...], fingerprint: str) -> Items:
    return Items(ids=[f"{name}/{i:06d}" for i in range(len(labels))], labels=labels,
                 hashes=[_digest(p.tobytes()) for p in native], errors=[""] * len(labels),
                 images=torch.from_numpy(images), classes=classes, fingerprint=fingerprint, name=name)


def render_synthetic(labels: np.ndarray, classes: int, resolution: int, rng: np.random.Generator,
                     chunk: int = 64) -> np.ndarray:
    """uint8 (N, 3, R, R): a class-coloured shape (ellipse, bar or cross by class), turned to a
    class-specific angle, on a complementary background, with random position, size and noise."""
    out = np.empty((len(labels), 3, resolution, resolution), dtype=np.uint8)
    axis = (np.arange(resolution) + 0.5) / resolution * 2 - 1
    y, x = np.meshgrid(axis, axis, indexing="ij")  # (R, R) in [-1, 1]
    for start in range(0, len(labels), chunk):
        k = labels[start:start + chunk]
        n = len(k)
        cx, cy = rng.uniform(-0.25, 0.25, (2, n, 1, 1))
        size = rng.uniform(0.35, 0.6, (n, 1, 1))
        angle = (np.pi * k / classes + rng.normal(0, 0.1, n))[:, None, None]
        u = ((x - cx) * np.cos(angle) + (y - cy) * np.sin(angle)) / size  # (n, R, R) shape frame
        v = (-(x - cx) * np.sin(angle) + (y - cy) * np.cos(angle)) / size
        bar = (np.abs(u) < 1) & (np.abs(v) < 0.3)
        shapes = np.stack([u**2 + (2 * v) ** 2 < 1, bar, bar | ((np.abs(v) < 1) & (np.abs(u) < 0.3))])
        mask = shapes[k % 3, np.arange(n)]  # (n, R, R)
        fg, bg = _palette(k / classes), 0.35 * _palette(k / classes + 0.5)  # (n, 3)
        image = np.where(mask[:, None], fg[:, :, None, None], bg[:, :, None, None]).astype(np.float32)
        image += 0.08 * rng.standard_normal(image.shape, dtype=np.float32)
        out[start:start + n] = np.rint(np.clip(image, 0, 1) * 255)
    return out


def _palette(hue: np.ndarray) -> np.ndarray:
    """(n,) hue in turns -> (n, 3) distinct saturated colours in [0.1, 0.9]."""
    return 0.5 + 0.4 * np.cos(2 * np.pi * (hue[:, None] + np.array([0.0, 1 / 3, 2 / 3])))
