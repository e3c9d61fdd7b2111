"""load_dataset: sources, stratified seeded splits, the decode-once cache and bad files."""
import csv
import hashlib
import io
import os
import struct
import threading
import time
import unicodedata
import warnings
import zlib
from collections import Counter
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from chae_ablate import data as data_module
from chae_ablate import files, images, sources
from chae_ablate.config import DataConfig
from chae_ablate.data import load_dataset
from chae_ablate.sources import DataWarning
from chae_ablate.errors import DataError

R = 16  # small resolution keeps every test fast


def save_image(path: Path, seed: int, size=(20, 14), mode="RGB", fmt=None) -> Path:
    """A random-noise image of `mode` saved at `path` (format from the suffix unless `fmt`)."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).convert(mode).save(path, format=fmt)
    return path


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """Three classes of ten JPEGs each, of assorted sizes."""
    root = tmp_path / "images"
    for c, name in enumerate(["cat", "dog", "owl"]):
        for i in range(10):
            save_image(root / name / f"{i:02d}.jpg", seed=10 * c + i, size=(18 + i, 30 - i))
    return root


def folder_cfg(root: Path, **kw) -> DataConfig:
    return DataConfig(source="folder", root=str(root), val_fraction=kw.pop("val_fraction", 0.2), **kw)


def read_manifest(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_digits_source(tmp_path):
    data = load_dataset(DataConfig(source="digits"), R, tmp_path, progress=False)
    assert data.classes == tuple("0123456789")
    splits = (data.train, data.val, data.test)
    assert sum(len(s.labels) for s in splits) == 1797
    for s in splits:
        assert s.images.dtype == torch.uint8 and s.images.shape[1:] == (3, R, R)
        assert s.labels.dtype == torch.int64 and set(s.labels.tolist()) == set(range(10))
    assert torch.equal(data.train.images[:, 0], data.train.images[:, 2])  # grey in 3 channels
    assert data.train.images.max() == 255 and data.skipped == () and data.decoded == 0


def test_synthetic_source_is_learnable(tmp_path):
    cfg = DataConfig(source="synthetic", synthetic_classes=3, synthetic_per_class=40, val_fraction=0.1)
    data = load_dataset(cfg, 24, tmp_path, progress=False)
    assert data.classes == ("class0", "class1", "class2")
    assert sum(len(s.labels) for s in (data.train, data.val, data.test)) == 120
    assert data.train.images.shape[1:] == (3, 24, 24) and data.train.images.dtype == torch.uint8
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2), torch.nn.ReLU(),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 3))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = data.train.images.float() / 255, data.train.labels
    losses = []
    for _ in range(40):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    accuracy = (model(data.test.images.float() / 255).argmax(1) == data.test.labels).float().mean()
    assert accuracy > 0.8


def test_same_seed_same_manifest_and_stratified(tmp_path):
    cfg = DataConfig(source="digits", split_seed=3)
    first = load_dataset(cfg, 8, tmp_path / "a", progress=False)
    again = load_dataset(cfg, 12, tmp_path / "b", progress=False)  # other run dir and resolution
    other = load_dataset(DataConfig(source="digits", split_seed=4), 8, tmp_path / "a", progress=False)
    assert first.manifest.read_bytes() == again.manifest.read_bytes()
    assert first.manifest.read_bytes() != other.manifest.read_bytes()
    assert torch.equal(first.test.labels, again.test.labels)

    rows = read_manifest(first.manifest)
    assert list(rows[0]) == ["file", "class", "split", "sha256"] and rows[0]["file"] == "digits/000000"
    per_class = Counter(r["class"] for r in rows)
    counts = Counter((r["class"], r["split"]) for r in rows)
    fractions = {"test": cfg.test_fraction, "val": (1 - cfg.test_fraction) * cfg.val_fraction,
                 "train": (1 - cfg.test_fraction) * (1 - cfg.val_fraction)}
    sizes, total = Counter(r["split"] for r in rows), len(rows)
    for c, n in per_class.items():
        for split, fraction in fractions.items():
            assert abs(counts[c, split] - n * fraction) <= 1, (c, split)  # guaranteed by construction
            assert abs(counts[c, split] - n / total * sizes[split]) <= 1, (c, split)  # share of the split
    assert counts["0", "val"] == len(first.val.labels[first.val.labels == 0])


def test_second_load_hits_cache_and_a_changed_file_invalidates_it(folder, tmp_path):
    cfg = folder_cfg(folder)
    first = load_dataset(cfg, R, tmp_path / "runs", progress=False)
    second = load_dataset(cfg, R, tmp_path / "runs", progress=False)
    assert first.decoded == 30 and second.decoded == 0
    assert torch.equal(first.train.images, second.train.images) and first.fingerprint == second.fingerprint
    assert load_dataset(cfg, R * 2, tmp_path / "runs", progress=False).decoded == 30  # new resolution

    save_image(folder / "dog" / "03.jpg", seed=999, size=(40, 40))
    third = load_dataset(cfg, R, tmp_path / "runs", progress=False)
    assert third.decoded == 30 and third.fingerprint != first.fingerprint
    assert first.manifest.read_text() != third.manifest.read_text()  # the new file's hash
    cache = sorted(p.name for p in (tmp_path / "runs" / "cache").iterdir())
    assert len(cache) == 2 and not any(name.endswith(".tmp") for name in cache)  # stale one replaced


def test_bad_files_are_skipped_and_listed(folder, tmp_path):
    good = folder / "cat"
    save_image(good / "cmyk.jpg", 1, mode="CMYK")
    save_image(good / "grey.png", 2, mode="L")
    save_image(good / "rgba.png", 3, mode="RGBA")
    save_image(good / "palette.png", 4, mode="P")
    save_image(good / "pic.webp", 5)
    save_image(good / "pic.bmp", 6)
    jpeg = io.BytesIO()
    Image.fromarray(np.random.default_rng(7).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(jpeg, "JPEG")
    (folder / "dog" / "truncated.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    (folder / "dog" / "empty.jpg").write_bytes(b"")
    (folder / "owl" / "text.jpg").write_text("not an image at all\n")

    with pytest.warns(DataWarning, match="skipped 3 unreadable") as caught:
        data = load_dataset(folder_cfg(folder), R, tmp_path, progress=False)
    assert data.skipped == ("dog/empty.jpg", "dog/truncated.jpg", "owl/text.jpg")
    assert "truncated" in str(caught[0].message) and "empty file" in str(caught[0].message)
    assert sum(len(s.labels) for s in (data.train, data.val, data.test)) == 36
    rows = {r["file"]: r for r in read_manifest(data.manifest)}
    assert {f for f, r in rows.items() if r["split"] == "skipped"} == set(data.skipped)
    assert rows["cat/cmyk.jpg"]["split"] in ("train", "val", "test")


def test_grayscale_becomes_three_equal_channels(tmp_path):
    root = tmp_path / "grey"
    for name in ("a", "b"):
        for i in range(10):
            save_image(root / name / f"{i}.png", seed=i, mode="L")
    data = load_dataset(folder_cfg(root), R, tmp_path, progress=False)
    assert torch.equal(data.train.images[:, 0], data.train.images[:, 1])


def test_missing_root_points_to_prepare_and_digits(tmp_path):
    with pytest.raises(DataError) as error:
        load_dataset(folder_cfg(tmp_path / "nowhere"), R, tmp_path)
    message = str(error.value)
    assert "\n" not in message and "nowhere" in message
    assert "chae-ablate data prepare best-artworks ARCHIVE --out data/artworks" in message
    assert "source: digits" in message


def test_one_class_or_an_empty_class_is_an_error(folder, tmp_path):
    (folder / "empty").mkdir()
    with pytest.raises(DataError, match="empty.*add images"):
        load_dataset(folder_cfg(folder), R, tmp_path)
    root = tmp_path / "single"
    save_image(root / "only" / "1.jpg", seed=1)
    with pytest.raises(DataError, match="at least 2"):
        load_dataset(folder_cfg(root), R, tmp_path)


def test_class_of_only_unreadable_files_is_an_error(folder, tmp_path):
    (folder / "junk").mkdir()
    (folder / "junk" / "a.jpg").write_bytes(b"")
    with pytest.raises(DataError, match="junk.*no readable images"):
        load_dataset(folder_cfg(folder), R, tmp_path, progress=False)


@pytest.mark.parametrize("crash_in", ["torch.save", "os.replace"])
def test_cache_files_are_written_atomically(folder, tmp_path, monkeypatch, crash_in):
    # Both writers go through files.atomic_write: a crash while the cache is written (torch.save) or
    # just before the rename (os.replace) leaves no half file and no temporary behind.
    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(*{"torch.save": (torch, "save"), "os.replace": (files.os, "replace")}[crash_in], crash)
    with pytest.raises(KeyboardInterrupt):
        load_dataset(folder_cfg(folder), R, tmp_path, progress=False)
    assert os.listdir(tmp_path / "cache") == []
    monkeypatch.undo()
    written = []
    for module in (images, data_module):  # the cache, the manifest
        assert module.atomic_write is files.atomic_write and not hasattr(module, "_atomic_write")
        monkeypatch.setattr(module, "atomic_write", lambda path, write: written.append(Path(path).parent.name))
    load_dataset(folder_cfg(folder), R, tmp_path, progress=False)
    assert written == ["cache", "splits"]


# --- hostile and odd input: symlinks, special files, odd names, huge images --------------------

def ppm(seed: int, width: int, height: int) -> bytes:
    """A binary PPM written by hand: its bytes do not depend on the installed PIL."""
    body = bytes((seed * 7 + i * 13) % 256 for i in range(width * height * 3))
    return f"P6\n{width} {height}\n255\n".encode() + body


def test_plain_folder_keeps_its_fingerprint_manifest_and_cache_key(tmp_path):
    # Golden values from before symlink handling and the strip-wise reduce: an ordinary folder must
    # keep its cache key, split and manifest byte for byte.
    root = tmp_path / "ppm"
    for c, name in enumerate(["ant", "bee", "cod"]):
        for i in range(6):
            path = root / name / ("deep/" if i == 5 else "") / f"{i}.ppm"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(ppm(10 * c + i, 9 + i, 7 + c))
            os.utime(path, ns=(1_600_000_000_000_000_000 + i, 1_600_000_000_000_000_000 + 1000 * c + i))
    data = load_dataset(folder_cfg(root, val_fraction=0.25), 8, tmp_path / "runs", progress=False)
    assert data.fingerprint == "7fe93fa7da7d2f38fdf77d4326ebc11770c275d81eb06904783b52384be2cca8"
    assert data.manifest.name.endswith("-86a160dd99f3d65e.csv")
    assert hashlib.sha256(data.manifest.read_bytes()).hexdigest() == \
        "0869ecd2cfc403f7e1d73003d6c28f6f3a9dde7ede3eb428a97cbf1356447a78"
    cache = [p.name for p in (tmp_path / "runs" / "cache").iterdir()]
    assert len(cache) == 1 and cache[0].endswith("-8px-bf7a5d1cc86c9751.pt")


def test_symlinks_out_of_the_root_are_listed_not_followed(folder, tmp_path):
    outside = tmp_path / "outside"
    save_image(outside / "secret.jpg", seed=99)
    for i in range(3):
        save_image(outside / "stolen" / f"{i}.jpg", seed=100 + i)
    (folder / "cat" / "link.jpg").symlink_to(outside / "secret.jpg")
    (folder / "stolen").symlink_to(outside / "stolen", target_is_directory=True)
    (folder / "dog" / "sub").symlink_to(outside / "stolen", target_is_directory=True)
    (folder / "dog" / "twin.jpg").symlink_to(Path("..") / "cat" / "00.jpg")  # stays inside: followed
    with pytest.warns(DataWarning) as caught:
        data = load_dataset(folder_cfg(folder), R, tmp_path / "runs", progress=False)
    assert data.classes == ("cat", "dog", "owl") and data.decoded == 31 and data.skipped == ()
    files = [r["file"] for r in read_manifest(data.manifest)]
    assert "dog/twin.jpg" in files and not any("link" in f or "stolen" in f or "sub" in f for f in files)
    message = " ".join(str(w.message) for w in caught)
    assert "cat/link.jpg (symlink leading out of the data root, not followed)" in message
    assert "stolen (symlink to a folder not below the data root, not followed)" in message
    assert "dog/sub (symlinked folder, not followed)" in message
    assert images.class_names(folder) == ("cat", "dog", "owl")  # what `plan` counts


def test_broken_links_fifos_and_non_utf8_names_are_listed_not_fatal(folder, tmp_path):
    (folder / "cat" / "dangling.jpg").symlink_to(tmp_path / "nowhere.jpg")
    os.mkfifo(folder / "dog" / "pipe.jpg")  # reading it would block forever
    raw = os.fsencode(folder / "owl")
    with open(os.path.join(raw, b"caf\xe9.jpg"), "wb") as f:  # Latin-1 bytes: not a UTF-8 name
        f.write((folder / "owl" / "00.jpg").read_bytes())
    os.mkdir(os.path.join(os.fsencode(folder), b"bad\xffclass"))
    with pytest.warns(DataWarning) as caught:
        data = load_dataset(folder_cfg(folder), R, tmp_path / "runs", progress=False)
    assert data.classes == ("cat", "dog", "owl") and data.decoded == 30
    message = " ".join(str(w.message) for w in caught)
    assert "cat/dangling.jpg (broken symlink)" in message and "dog/pipe.jpg (not a regular file" in message
    assert "owl/caf\\xe9.jpg (name is not valid UTF-8)" in message
    assert "bad\\xffclass (name is not valid UTF-8)" in message


def test_odd_but_valid_names_load_and_round_trip_the_manifest(tmp_path):
    root = tmp_path / "odd"
    names = ["line\nbreak", unicodedata.normalize("NFD", "Dürer"), "comma, \"quoted\""]
    for c, name in enumerate(names):
        for i in range(5):
            save_image(root / name / f"{i} é\t.png", seed=10 * c + i)
    data = load_dataset(folder_cfg(root), R, tmp_path / "runs", progress=False)
    assert data.classes == tuple(sorted(names))
    rows = read_manifest(data.manifest)
    assert {r["class"] for r in rows} == set(names) and len(rows) == 15


def test_a_file_that_vanishes_after_the_scan_is_listed(folder, tmp_path, monkeypatch):
    scan = sources.scan_tree

    def scan_then_delete(root):
        found = scan(root)
        (root / "dog" / "04.jpg").unlink()
        return found

    monkeypatch.setattr(sources, "scan_tree", scan_then_delete)
    with pytest.warns(DataWarning, match="dog/04.jpg \\(unreadable: No such file or directory\\)"):
        data = load_dataset(folder_cfg(folder), R, tmp_path / "runs", progress=False)
    assert data.skipped == ("dog/04.jpg",)


def test_unreadable_folders_are_listed_and_an_unreadable_root_is_a_data_error(folder, tmp_path, monkeypatch):
    denied, scandir = set(), os.scandir

    def scandir_or_deny(path):
        if Path(path).name in denied:
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", scandir_or_deny)
    denied.add("owl")
    with pytest.raises(DataError, match="owl under .* have no files"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            load_dataset(folder_cfg(folder), R, tmp_path / "runs", progress=False)
    assert "owl (unreadable folder: Permission denied)" in str(caught[0].message)
    denied.add("images")
    with pytest.raises(DataError, match="cannot read the data root .*: Permission denied"):
        load_dataset(folder_cfg(folder), R, tmp_path / "runs", progress=False)
    with pytest.raises(DataError, match="cannot read the data root .*a{300}: File name too long"):
        images.class_names(tmp_path / ("a" * 300))  # what `plan` calls on data.root


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares width x height RGB pixels but holds almost no data: cheap to write."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_images_over_pils_pixel_limit_are_listed_too_large_without_warnings(folder, tmp_path):
    assert Image.MAX_IMAGE_PIXELS == 89_478_485  # PIL's default: warns above it, refuses above twice it
    (folder / "cat" / "warns.png").write_bytes(png_header(10_000, 10_000))  # 100 Mpx
    (folder / "dog" / "bomb.png").write_bytes(png_header(20_000, 20_000))  # 400 Mpx
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = load_dataset(folder_cfg(folder), R, tmp_path / "runs", progress=False)
    assert [w.category for w in caught] == [DataWarning]
    assert data.skipped == ("cat/warns.png", "dog/bomb.png")
    message = str(caught[0].message)
    assert "cat/warns.png (unreadable: too large: 10000x10000 = 100,000,000 pixels" in message
    assert "dog/bomb.png (unreadable: too large: 400,000,000 pixels" in message


MODES = ["RGB", "L", "P", "P+transparency", "RGBA", "LA", "CMYK", "I;16", "1", "F"]


def image_in(mode: str, size: tuple[int, int], seed: int = 0) -> Image.Image:
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    noise = np.random.default_rng(seed).integers(0, 40, (h, w, 3))
    ramps = np.stack([x * 255 // w, y * 255 // h, (x + y) % 256], -1)  # (H, W, 3)
    rgb = Image.fromarray((ramps + noise).clip(0, 255).astype(np.uint8))
    if mode == "P+transparency":
        image = rgb.convert("P")
        image.info["transparency"] = 3
        return image
    if mode == "RGBA":
        image = rgb.copy()
        image.putalpha(Image.fromarray(((x * 7 + y) % 256).astype(np.uint8)))
        return image
    if mode == "I;16":
        return Image.fromarray((np.asarray(rgb.convert("L"), dtype=np.uint16) * 257 + noise[..., 0]).astype(np.uint16))
    return rgb.convert(mode)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("size", [(20, 14), (97, 61), (700, 500), (1000, 30), (30, 1000)])
def test_to_pixels_equals_convert_then_resize(mode, size, monkeypatch):
    # The cached pixels must stay those of the plain pipeline (RGB copy, then PIL's resize with a
    # reducing gap of 3), also when a big image is reduced a strip at a time before its RGB copy.
    monkeypatch.setattr(images, "STRIP_PIXELS", 9_000)  # many strips, a ragged last one
    image = image_in(mode, size)
    for resolution in (8, 16, 33):
        plain = images.to_rgb(image).resize((resolution, resolution), Image.Resampling.BILINEAR,
                                            reducing_gap=3.0)
        assert np.array_equal(images.to_pixels(image, resolution), np.asarray(plain).transpose(2, 0, 1))


def test_big_images_are_reduced_before_their_rgb_copy(monkeypatch):
    # Memory: a non-RGB image is converted STRIP_PIXELS at a time, an RGB one not copied at all.
    converted = []
    convert = Image.Image.convert

    def spy(self, *args, **kwargs):
        converted.append(self.size[0] * self.size[1])
        return convert(self, *args, **kwargs)

    monkeypatch.setattr(images, "STRIP_PIXELS", 20_000)
    for mode in ("L", "P", "RGBA", "I;16", "RGB"):
        image = image_in(mode, (600, 400))
        monkeypatch.setattr(Image.Image, "convert", spy)
        converted.clear()
        images.to_pixels(image, 32)
        monkeypatch.setattr(Image.Image, "convert", convert)
        assert 0 < max(converted, default=1) <= 20_000, mode  # never all 240,000 pixels at once


def test_huge_decodes_run_one_at_a_time(tmp_path, monkeypatch):
    for i in range(8):
        save_image(tmp_path / "big" / f"{i}.png", seed=i, size=(60, 50))
    active, most = [0], [0]
    lock = threading.Lock()
    load = ImageFile.ImageFile.load

    def slow_load(self):
        with lock:
            active[0] += 1
            most[0] = max(most[0], active[0])
        time.sleep(0.05)
        try:
            return load(self)
        finally:
            with lock:
                active[0] -= 1

    monkeypatch.setattr(ImageFile.ImageFile, "load", slow_load)
    monkeypatch.setattr(images.os, "cpu_count", lambda: 4)
    paths = sorted((tmp_path / "big").iterdir())
    monkeypatch.setattr(images, "LARGE_PIXELS", 60 * 50 - 1)
    list(images.map_images(partial(images.decode_file, resolution=8), paths))
    assert most[0] == 1
    monkeypatch.setattr(images, "LARGE_PIXELS", 60 * 50)  # not large: decoded side by side
    most[0] = 0
    list(images.map_images(partial(images.decode_file, resolution=8), paths))
    assert most[0] > 1
