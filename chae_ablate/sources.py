"""The data sources, one registry: `SOURCES` maps every name data.source accepts to the code that loads it.

- folder: a class-per-folder image directory (class names = sorted folder names), read by the rules
  of images.py and decoded once into its cache;
- digits: scikit-learn's bundled 1,797 real 8x8 handwritten digits (no download; the default);
- synthetic: seeded, generated shapes whose class shows in colour, shape and orientation (tests).

A source turns a DataConfig (config.py, passed in: this module does not import it) into Items, the
whole source before data.py splits it, and tells `plan` how many classes it will have without
loading anything. Folder entries the scan leaves unread are listed in one DataWarning, never fatal.
The generated sources are cheap to rebuild, so they are not cached.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image

from .errors import DataError
from .files import shown
from .images import MISSING_ROOT_HINT, class_names, decode_folder, digest, scan_tree, to_pixels

PAPER_CLASSES = 11  # the CHAE paper's artists: assumed for a folder that is not there yet
DIGIT_CLASSES = tuple(str(c) for c in range(10))


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


class Source(Protocol):
    """What a source provides; `cfg` is the study's DataConfig."""

    needs_root: bool  # data.root must name its folder

    def origin(self, cfg: Any) -> tuple[str, str, str]:
        """(name, where it comes from, MLflow source type) of the data, for the runs' dataset inputs."""

    def items(self, cfg: Any, resolution: int, cache_dir: Path, progress: bool) -> Items:
        """Every item at `resolution` px (the folder source caches its decoded images in cache_dir)."""

    def classes(self, cfg: Any) -> tuple[int, str]:
        """How many classes the items will have, and where that number comes from; reads no image."""


# --- folder -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Folder:
    """data.root, a class-per-folder image directory, from the decode-once cache when unchanged."""

    needs_root = True

    def origin(self, cfg: Any) -> tuple[str, str, str]:
        return Path(cfg.root).name, str(Path(cfg.root).resolve()), "local"

    def items(self, cfg: Any, resolution: int, cache_dir: Path, progress: bool) -> Items:
        if not cfg.root:
            raise DataError(f"data.root is required when source is 'folder'; {MISSING_ROOT_HINT}")
        root = Path(cfg.root)
        scan = scan_tree(root)
        if scan.skipped:
            reasons = [f"{shown(path, width=None)} ({reason})" for path, reason in scan.skipped]
            more = f"; and {len(reasons) - 20} more" if len(reasons) > 20 else ""
            warnings.warn(f"left {len(reasons)} entr{'y' if len(reasons) == 1 else 'ies'} under {root} unread: "
                          f"{'; '.join(reasons[:20])}{more}", DataWarning, stacklevel=3)
        labels = np.array([label for _, label in scan.files], dtype=np.int64)
        _require_classes(root, scan.classes, labels, "no files")
        decoded = decode_folder(root, scan.files, resolution, cache_dir, progress)
        readable = [label for label, e in zip(labels, decoded.errors) if not e]
        _require_classes(root, scan.classes, readable, "no readable images")
        return Items(ids=[rel for rel, _ in scan.files], labels=labels, hashes=decoded.hashes,
                     errors=decoded.errors, images=decoded.images, classes=scan.classes,
                     fingerprint=decoded.fingerprint, name=decoded.name, decoded=decoded.decoded)

    def classes(self, cfg: Any) -> tuple[int, str]:
        """The class folders, counted by the loader's own rule; the paper's 11 while there is no folder."""
        root = Path(cfg.root or "")
        try:
            if root.is_dir():
                return len(class_names(root)), shown(root)
            why = "not found"
        except OSError as err:  # a name the OS refuses (a component over 255 bytes), a folder we may not read
            why = f"unreadable ({err.strerror})"
        return PAPER_CLASSES, f"{shown(root)} {why}; the paper's {PAPER_CLASSES} classes assumed"


def _require_classes(root: Path, classes: tuple[str, ...], labels: list[int], empty: str) -> None:
    if len(classes) < 2:
        raise DataError(f"{root} has {len(classes)} class folder(s); a classifier needs at least 2: "
                        f"put each class's images in its own sub-folder, {root}/<class>/<image>")
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=len(classes))
    empty_classes = [c for c, n in zip(classes, counts) if n == 0]
    if empty_classes:
        raise DataError(f"class folder(s) {', '.join(empty_classes)} under {root} have {empty}; "
                        f"add images or remove the folder(s)")


# --- generated sources ------------------------------------------------------------------------

@dataclass(frozen=True)
class Digits:
    """scikit-learn's handwritten digits (0..16 ink) as 0..255 RGB images, upscaled to R x R."""

    needs_root = False

    def origin(self, cfg: Any) -> tuple[str, str, str]:
        return "digits", "chae-ablate:digits", "code"

    def items(self, cfg: Any, resolution: int, cache_dir: Path, progress: bool) -> Items:
        from sklearn.datasets import load_digits  # a second of imports, paid only by studies on digits

        digits = load_digits()
        pixels = np.rint(digits.images * (255 / 16)).astype(np.uint8)  # (N, 8, 8)
        images = np.stack([to_pixels(Image.fromarray(p, "L"), resolution) for p in pixels])
        return _generated("digits", pixels, images, digits.target.astype(np.int64), DIGIT_CLASSES,
                          fingerprint=digest(pixels.tobytes()))

    def classes(self, cfg: Any) -> tuple[int, str]:
        return len(DIGIT_CLASSES), "digits"


@dataclass(frozen=True)
class Synthetic:
    """cfg.synthetic_classes x cfg.synthetic_per_class seeded images; see `render_synthetic`."""

    seed: int = 0  # the same images for every study
    needs_root = False

    def origin(self, cfg: Any) -> tuple[str, str, str]:
        return "synthetic", "chae-ablate:synthetic", "code"

    def items(self, cfg: Any, resolution: int, cache_dir: Path, progress: bool) -> Items:
        classes, per_class = cfg.synthetic_classes, cfg.synthetic_per_class
        labels = np.repeat(np.arange(classes, dtype=np.int64), per_class)
        images = render_synthetic(labels, classes, resolution, np.random.default_rng(self.seed))
        width = len(str(classes - 1))
        names = tuple(f"class{k:0{width}d}" for k in range(classes))
        fingerprint = digest(f"synthetic-v1|{classes}|{per_class}|{resolution}|{self.seed}")
        return _generated("synthetic", images, images, labels, names, fingerprint)

    def classes(self, cfg: Any) -> tuple[int, str]:
        return cfg.synthetic_classes, "synthetic"


def _generated(name: str, native: np.ndarray, images: np.ndarray, labels: np.ndarray,
               classes: tuple[str, ...], fingerprint: str) -> Items:
    return Items(ids=[f"{name}/{i:06d}" for i in range(len(labels))], labels=labels,
                 hashes=[digest(p.tobytes()) for p in native], errors=[""] * len(labels),
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


SOURCES: dict[str, Source] = {"folder": Folder(), "digits": Digits(), "synthetic": Synthetic()}  # data.source
