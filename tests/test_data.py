"""load_dataset: sources, stratified seeded splits, the decode-once cache and bad files."""
import csv
import io
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from chae_ablate.config import DataConfig
from chae_ablate.data import DataWarning, load_dataset
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


def test_cache_files_are_written_atomically(folder, tmp_path, monkeypatch):
    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        load_dataset(folder_cfg(folder), R, tmp_path, progress=False)
    assert os.listdir(tmp_path / "cache") == []  # no half file, no temporary left behind
