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

A folder may come from an untrusted archive, so the scan reads only what lies below the root:
- a symlink (file or class folder) is followed only when its target is below the root itself;
  symlinked sub-folders inside a class are never entered (os.walk's rule, which also rules out loops);
- fifos, sockets and devices, broken links, unreadable folders and names that are not UTF-8 are left
  out. Each of these is listed in one DataWarning (and by `chae-ablate data check`), not read, and
  not part of the fingerprint, the manifest or the split, so ordinary folders keep theirs.
- Images over PIL's decompression-bomb limit (Image.MAX_IMAGE_PIXELS, 89.5 Mpx) are listed as
  "unreadable: too large". Those near it are reduced a strip at a time before their RGB copy exists,
  and decoded one at a time, so building a cache needs about one such decoded image of memory.
"""
from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import math
import os
import re
import stat
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, TypeVar

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from .config import DataConfig
from .errors import DataError
from .files import atomic_write

SPLITS = ("train", "val", "test")
RESIZE_METHOD = "pil-jpegdraft-bilinear-rg3"  # in every cache key: change it when resizing changes
REDUCING_GAP = 3.0  # PIL reduces by whole factors first when the source is > 3x the target
CACHE_VERSION = 1
STRIP_PIXELS = 1 << 20  # non-RGB images are converted to RGB this many source pixels at a time
LARGE_PIXELS = 4096 * 4096  # images that decode to more pixels than this are decoded one at a time
T = TypeVar("T")
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
        atomic_write(path, lambda f: f.write(data))
    return path


def _digest(text: str | bytes) -> str:
    return hashlib.sha256(text.encode() if isinstance(text, str) else text).hexdigest()


# --- folder source ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Scan:
    """A class-per-folder tree as the loader reads it."""

    classes: tuple[str, ...]  # sorted class folder names
    files: list[tuple[str, int]]  # (path relative to the root, label) of every file to read
    skipped: list[tuple[str, str]]  # (path relative to the root, reason) of every entry left unread


def class_names(root: Path) -> tuple[str, ...]:
    """The classes of a class-per-folder tree: its non-hidden sub-folder names (and symlinks to
    folders below it), sorted."""
    return _class_folders(Path(root), [])


def scan_folder(root: Path) -> tuple[tuple[str, ...], list[tuple[str, int]]]:
    """Class names (sorted sub-folder names) and every non-hidden file as (relative path, label)."""
    scan = scan_tree(root)
    return scan.classes, scan.files


def scan_tree(root: Path) -> Scan:
    """Classes, the files to read and the entries left unread, by the rules in the module docstring."""
    root, skipped = Path(root), []
    classes = _class_folders(root, skipped)
    files = []
    for label, name in enumerate(classes):
        paths, unread = walk_files(root, name)
        files += [(path, label) for path in paths]
        skipped += unread
    return Scan(classes, files, skipped)


def _class_folders(root: Path, skipped: list[tuple[str, str]]) -> tuple[str, ...]:
    """Sorted non-hidden folders of root, and symlinks to folders below root; other folder entries
    are appended to skipped. Files at the top are not classes and are ignored unread."""
    try:
        if not root.is_dir():
            what = "is not a directory" if root.exists() else "does not exist"
            raise DataError(f"data root {shown(str(root))} {what}; {MISSING_ROOT_HINT}")
        with os.scandir(root) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError as e:  # unreadable, or a name too long
        raise DataError(f"cannot read the data root {shown(str(root))}: {e.strerror}") from None
    base, classes = root.resolve(), []
    for entry in entries:
        if entry.name.startswith("."):
            continue
        try:
            if not entry.is_dir():  # follows a link: a link to a file is no class either way
                continue
            if not _utf8(entry.name):
                skipped.append((entry.name, "name is not valid UTF-8"))
            elif entry.is_symlink() and base not in Path(os.path.realpath(entry.path)).parents:
                skipped.append((entry.name, "symlink to a folder not below the data root, not followed"))
            else:
                classes.append(entry.name)
        except OSError as e:
            skipped.append((entry.name, f"unreadable: {e.strerror}"))
    return tuple(classes)


def walk_files(root: Path, top: str = "", *, hidden: bool = False, follow: bool = True
               ) -> tuple[list[str], list[tuple[str, str]]]:
    """Regular files below root/top in os.walk's order (a folder's files by name, then its
    sub-folders by name) as '/'-joined paths relative to root, and (path, reason) for every entry
    left unread: a symlink (any, unless `follow`; one to a folder; one leading out of root), a fifo,
    socket or device, a broken link, an unreadable folder, a name that is not UTF-8. Hidden names
    are left out silently unless `hidden`. No file is opened; only symlinks cost an extra stat."""
    base, files, skipped, stack = Path(root).resolve(), [], [], [top]
    while stack:  # depth first without recursion: a hostile tree may nest thousands of folders deep
        rel = stack.pop()
        try:
            with os.scandir(Path(root, rel)) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            skipped.append((rel or ".", f"unreadable folder: {e.strerror}"))
            continue
        folders = []
        for entry in entries:
            if entry.name.startswith(".") and not hidden:
                continue
            path = f"{rel}/{entry.name}" if rel else entry.name
            is_dir, reason = _kind(entry, base, follow)
            if reason:
                skipped.append((path, reason))
            elif is_dir:
                folders.append(path)
            else:
                files.append(path)
        stack += reversed(folders)
    return files, skipped


def _kind(entry: os.DirEntry, base: Path, follow: bool) -> tuple[bool, str]:
    """(is a folder, why it is left unread or '') for one directory entry."""
    try:
        if not _utf8(entry.name):
            return False, "name is not valid UTF-8"
        if entry.is_symlink():
            if not follow:
                return False, "symlink, not followed"
            if not os.path.exists(entry.path):
                return False, "broken symlink"
            if entry.is_dir():
                return True, "symlinked folder, not followed"
            if base not in Path(os.path.realpath(entry.path)).parents:
                return False, "symlink leading out of the data root, not followed"
        if entry.is_dir(follow_symlinks=False):
            return True, ""
        if entry.is_file():  # a symlink's target (below root) or the file itself
            return False, ""
        return False, "not a regular file (a fifo, socket or device)"
    except OSError as e:
        return False, f"unreadable: {e.strerror}"


def _utf8(name: str) -> bool:
    """False for a name whose bytes are not UTF-8 (Python holds those as lone surrogates, which no
    manifest, hash or terminal can take)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def shown(text: str) -> str:
    """Text holding file names as it can be printed on one line: a name's undecodable bytes as
    \\xNN, control and format characters (a newline, a right-to-left override) escaped."""
    try:
        text = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate that no file name produces: escaped below
        pass
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def folder_fingerprint(root: Path, files: list[tuple[str, int]]) -> str:
    """Hash of (relative path, size, mtime_ns) of every file: cheap, no file contents read."""
    lines = []
    for rel, _ in files:
        try:
            st = os.stat(root / rel)
        except OSError:  # gone since the scan: decoding will list it as unreadable
            lines.append(f"{rel}\t-\t-\n")
            continue
        lines.append(f"{rel}\t{st.st_size}\t{st.st_mtime_ns}\n")
    return _digest("".join(lines))


def load_folder(root: Path, resolution: int, cache_dir: Path, progress: bool = True) -> Items:
    """Folder images at `resolution`, from the decode-once cache when the folder is unchanged."""
    scan = scan_tree(root)
    classes, files = scan.classes, scan.files
    if scan.skipped:
        reasons = [f"{shown(path)} ({reason})" for path, reason in scan.skipped]
        more = f"; and {len(reasons) - 20} more" if len(reasons) > 20 else ""
        warnings.warn(f"left {len(reasons)} entr{'y' if len(reasons) == 1 else 'ies'} under {root} unread: "
                      f"{'; '.join(reasons[:20])}{more}", DataWarning, stacklevel=3)
    _require_classes(root, classes, [label for _, label in files], "no files")
    fingerprint = folder_fingerprint(root, files)
    name = f"{_slug(root.resolve().name)}-{_digest(str(root.resolve()))[:8]}"
    key = _digest(f"v{CACHE_VERSION}|{fingerprint}|{resolution}|{RESIZE_METHOD}")
    path = cache_dir / f"{name}-{resolution}px-{key[:16]}.pt"
    cached, decoded = _read_cache(path), 0
    if cached is None:
        cached, decoded = _decode_folder(root, files, resolution, progress), len(files)
        atomic_write(path, lambda f: torch.save(cached, f))
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
    results = map_images(partial(decode_file, resolution=resolution), [root / rel for rel, _ in files])
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


def map_images(fn: Callable[[Path], T], paths: list[Path]) -> Iterator[T]:
    """fn(path) for every path, in order (deterministic), on up to 4 threads. PIL's
    decompression-bomb warnings are silenced meanwhile: read_image lists those images itself, and
    one warning per huge image would bury the one DataWarning that lists them all."""
    with warnings.catch_warnings(), ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        yield from pool.map(fn, paths)


# --- decoding ---------------------------------------------------------------------------------

class Unusable(ValueError):
    """A file the loader does not decode; its message is the reason listed."""


def _start_large_image_thread() -> None:
    """The one thread that decodes images over LARGE_PIXELS (see read_image); started lazily."""
    global _LARGE_IMAGES
    _LARGE_IMAGES = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chae-large-image")


_start_large_image_thread()
if hasattr(os, "register_at_fork"):  # a forked child inherits the executor but not its thread
    os.register_at_fork(after_in_child=_start_large_image_thread)


def decode_file(path: Path, resolution: int) -> tuple[np.ndarray | None, str, str]:
    """(uint8 (3, R, R) pixels or None, sha256 of the file, error message or '')."""
    sha = _digest(b"")
    try:
        with open_regular(path) as f:
            sha = hashlib.file_digest(f, "sha256").hexdigest()
            f.seek(0)
            pixels, _, _ = read_image(f, partial(to_pixels, resolution=resolution), draft=resolution)
            return pixels, sha, ""
    except Exception as e:  # PIL raises many types on corrupt input; a bad file must not stop a study
        return None, sha, describe_error(e)


def open_regular(path: Path, follow: bool = True) -> BinaryIO:
    """Open a regular file for reading. A fifo (which would block), socket or device put in its place
    since the scan raises Unusable instead; with follow=False, a symlink raises OSError."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    fd = os.open(path, flags | (0 if follow else getattr(os, "O_NOFOLLOW", 0)))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise Unusable("not a regular file (a fifo, socket or device)")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_image(f: BinaryIO, use: Callable[[Image.Image], T], draft: int | None = None
               ) -> tuple[T, tuple[int, int], str]:
    """Fully decode an image file (raises on truncated data); returns use(image) and the image's
    stored size and mode.

    JPEGs are decoded at a reduced DCT scale when that still covers draft x draft, which makes large
    sources fast to shrink. Images over PIL's pixel limit raise Unusable before any pixel is decoded.
    Images that decode to more than LARGE_PIXELS are decoded and used on one shared thread: one at a
    time, and in one malloc arena, so the memory freed by one is reused by the next instead of being
    kept by every worker thread (glibc keeps freed memory in the arena of the thread that used it).
    """
    if not f.read(1):
        raise Unusable("empty file")
    f.seek(0)
    image = Image.open(f)  # reads the header only
    size, mode, limit = image.size, image.mode, Image.MAX_IMAGE_PIXELS
    if limit and size[0] * size[1] > limit:
        raise Unusable(_too_large(f"{size[0]}x{size[1]} = {size[0] * size[1]:,}"))
    if draft and image.format == "JPEG":
        image.draft("RGB", (draft, draft))

    def decode() -> T:
        try:
            image.load()
            return use(image)
        finally:
            image.close()  # frees the pixels here and now, before this thread takes the next image

    if image.size[0] * image.size[1] > LARGE_PIXELS:
        return _LARGE_IMAGES.submit(decode).result(), size, mode
    return decode(), size, mode


def to_pixels(image: Image.Image, resolution: int) -> np.ndarray:
    """Any PIL image -> RGB, squashed to R x R (bilinear, antialiased) -> uint8 (3, R, R).

    Pixel for pixel to_rgb(image).resize((R, R), BILINEAR, reducing_gap=REDUCING_GAP): PIL's resize
    first reduces by whole factors (box averages), then resamples. Doing those two steps here lets a
    large image be reduced STRIP_PIXELS at a time, so its full-size RGB copy never exists.
    """
    w, h = image.size
    size = (resolution, resolution)
    factor = (int(w / resolution / REDUCING_GAP) or 1, int(h / resolution / REDUCING_GAP) or 1)
    if factor == (1, 1):
        image = to_rgb(image)
        if image.size != size:
            image = image.resize(size, Image.Resampling.BILINEAR)
    else:  # PIL's own steps for a whole-image box: reduce, then resample the matching box
        box = (0, 0, w / factor[0], h / factor[1])
        image = _reduced_rgb(image, factor).resize(size, Image.Resampling.BILINEAR, box=box)
    return np.asarray(image).transpose(2, 0, 1).copy()


def _reduced_rgb(image: Image.Image, factor: tuple[int, int]) -> Image.Image:
    """to_rgb(image).reduce(factor), converting whole multiples of factor[1] rows at a time (conversion
    is per pixel, reduction per block, so strips give the same pixels)."""
    if image.mode == "RGB":
        return image.reduce(factor)
    w, h = image.size
    rows = max(1, STRIP_PIXELS // (w * factor[1])) * factor[1]
    if rows >= h:
        return to_rgb(image).reduce(factor)
    out = Image.new("RGB", (-(-w // factor[0]), -(-h // factor[1])))
    for top in range(0, h, rows):
        strip = to_rgb(image.crop((0, top, w, min(h, top + rows))))
        out.paste(strip.reduce(factor), (0, top // factor[1]))
    return out


def to_rgb(image: Image.Image) -> Image.Image:
    """Grayscale, palette, alpha (dropped, as Keras' load_img does), CMYK, 16-bit -> 8-bit RGB."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):  # 16-bit grey: keep the top byte
        image = Image.fromarray((np.asarray(image, dtype=np.float64) / 257).clip(0, 255).astype(np.uint8))
    elif image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return image.convert("RGB")


def describe_error(error: Exception) -> str:
    """A short, stable reason why a file is not a usable image."""
    if isinstance(error, Unusable):
        return str(error)
    if isinstance(error, Image.DecompressionBombError):  # over twice the limit: PIL refuses to open it
        found = re.search(r"\((\d+) pixels\)", str(error))
        return _too_large(f"{int(found[1]):,}") if found else f"unreadable: too large: {error}"
    if isinstance(error, OSError) and error.filename:  # the read itself failed
        return f"unreadable: {error.strerror}"
    if isinstance(error, UnidentifiedImageError):
        return "not an image"
    return f"corrupt image: {error}".splitlines()[0][:200]


def _too_large(pixels: str) -> str:
    return (f"unreadable: too large: {pixels} pixels, over PIL's limit (PIL.Image.MAX_IMAGE_PIXELS) "
            f"of {Image.MAX_IMAGE_PIXELS:,}")


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
