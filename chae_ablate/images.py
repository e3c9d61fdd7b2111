"""Reading image files and folders safely: scan a class-per-folder tree, decode its images once.

A folder may come from an untrusted archive, so the scan reads only what lies below the root:
- a symlink (file or class folder) is followed only when its target is below the root itself;
  symlinked sub-folders inside a class are never entered (os.walk's rule, which also rules out loops);
- fifos, sockets and devices, broken links, unreadable folders and names that are not UTF-8 are left
  out. Each of these is listed (by the folder source's DataWarning and by `chae-ablate data check`),
  not read, and not part of the fingerprint, the manifest or the split, so ordinary folders keep theirs.
- Images over PIL's decompression-bomb limit (Image.MAX_IMAGE_PIXELS, 89.5 Mpx) are listed as
  "unreadable: too large". Those near it are reduced a strip at a time before their RGB copy exists,
  and decoded one at a time, so building a cache needs about one such decoded image of memory.

Folder images are decoded, converted to RGB and squashed to R x R once, then cached under
runs/cache/ keyed by a stat fingerprint of the folder (relative path, size, mtime_ns of every file),
the resolution and the resize method; later loads read one tensor file and decode nothing.
Files that cannot be decoded are recorded with their reason, never fatal.
"""
from __future__ import annotations

import contextlib
import hashlib
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

from .errors import DataError
from .files import atomic_write, shown

RESIZE_METHOD = "pil-jpegdraft-bilinear-rg3"  # in every cache key: change it when resizing changes
REDUCING_GAP = 3.0  # PIL reduces by whole factors first when the source is > 3x the target
CACHE_VERSION = 1
STRIP_PIXELS = 1 << 20  # non-RGB images are converted to RGB this many source pixels at a time
LARGE_PIXELS = 4096 * 4096  # images that decode to more pixels than this are decoded one at a time
T = TypeVar("T")
MISSING_ROOT_HINT = ("get the paper's data with `chae-ablate data prepare best-artworks ARCHIVE "
                     "--out data/artworks` (Kaggle's 'Best Artworks of All Time'), or use `source: digits`")


def digest(text: str | bytes) -> str:
    """sha256 of text (UTF-8) or bytes, as hex."""
    return hashlib.sha256(text.encode() if isinstance(text, str) else text).hexdigest()


# --- scanning a folder ------------------------------------------------------------------------

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
            raise DataError(f"data root {shown(str(root), width=None)} {what}; {MISSING_ROOT_HINT}")
        with os.scandir(root) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError as e:  # unreadable, or a name too long
        raise DataError(f"cannot read the data root {shown(str(root), width=None)}: {e.strerror}") from None
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


# --- the decode-once cache ---------------------------------------------------------------------

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
    return digest("".join(lines))


@dataclass(frozen=True)
class Decoded:
    """A folder's files decoded at one resolution. Per file: content hash, error ('' if readable)."""

    images: torch.Tensor  # uint8 (M, 3, R, R), the M readable files in the order given
    hashes: list[str]
    errors: list[str]
    fingerprint: str  # folder_fingerprint of the files
    name: str  # the folder in file names (its name and a hash of its path): cache, manifest
    decoded: int  # image files decoded by this call (0 on a cache hit)


def decode_folder(root: Path, files: list[tuple[str, int]], resolution: int, cache_dir: Path,
                  progress: bool = True) -> Decoded:
    """`files` (as scan_tree lists them) at `resolution`, from the decode-once cache when the folder
    is unchanged; otherwise decoded and cached, replacing this folder's older cache files."""
    fingerprint = folder_fingerprint(root, files)
    name = f"{_slug(root.resolve().name)}-{digest(str(root.resolve()))[:8]}"
    key = digest(f"v{CACHE_VERSION}|{fingerprint}|{resolution}|{RESIZE_METHOD}")
    path = cache_dir / f"{name}-{resolution}px-{key[:16]}.pt"
    cached, decoded = _read_cache(path), 0
    if cached is None:
        cached, decoded = _decode_files(root, files, resolution, progress), len(files)
        atomic_write(path, lambda f: torch.save(cached, f))
        for stale in cache_dir.glob(f"{name}-{resolution}px-*.pt"):  # older versions of this folder
            if stale != path:
                with contextlib.suppress(OSError):  # e.g. open in another process on Windows
                    stale.unlink()
    return Decoded(images=cached["images"], hashes=cached["hashes"], errors=cached["errors"],
                   fingerprint=fingerprint, name=name, decoded=decoded)


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


def _decode_files(root: Path, files: list[tuple[str, int]], resolution: int, progress: bool) -> dict:
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
    sha = digest(b"")
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
