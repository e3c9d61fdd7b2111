"""prepare_best_artworks on small archives in the Kaggle layout, and check_dataset."""
import csv
import io
import shutil
import unicodedata
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from chae_ablate.config import DataConfig
from chae_ablate.data import load_dataset
from chae_ablate.errors import DataError
from chae_ablate.prepare import check_dataset, prepare_best_artworks

ARTISTS11 = Path(__file__).resolve().parents[2] / "shared/data/artists11"

# name in artists.csv -> (paintings in artists.csv, folder in images/images/, files in it)
KAGGLE = {
    "Alpha Painter": (5, "Alpha_Painter", 5),
    "Beta Painter": (3, "Beta_Painter", 3),
    "Albrecht Dürer": (4, unicodedata.normalize("NFD", "Albrecht_Dürer"), 4),  # as the archive spells it
    "Gamma Painter": (2, "Gamma_Painter", 2),  # exactly at the threshold: left out
    "Delta Painter": (3, "Delta_Paintr", 3),  # folder does not match the name: reported
}


def jpeg(seed: int) -> bytes:
    buffer = io.BytesIO()
    pixels = np.random.default_rng(seed).integers(0, 256, (12, 16, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, "JPEG")
    return buffer.getvalue()


def kaggle_members() -> dict[str, bytes]:
    """The archive's files: artists.csv, images/images/<folder>/<folder>_N.jpg, resized/ copies."""
    table = io.StringIO()
    writer = csv.writer(table)
    writer.writerow(["id", "name", "years", "genre", "nationality", "bio", "wikipedia", "paintings"])
    for i, (name, (paintings, _, _)) in enumerate(KAGGLE.items()):
        writer.writerow([i, name, "1500 - 1600", "Art", "Nowhere", "A painter, of note.", "", paintings])
    members = {"artists.csv": table.getvalue().encode(), "notes.txt": b"what is this?"}
    for paintings, folder, files in KAGGLE.values():
        for n in range(1, files + 1):
            members[f"images/images/{folder}/{folder}_{n}.jpg"] = jpeg(n)
            members[f"resized/resized/{folder}_{n}.jpg"] = jpeg(n)
    return members


def make_zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(zipfile.ZipInfo(name), data)
    return path


def make_folder(path: Path, members: dict[str, bytes]) -> Path:
    for name, data in members.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_bytes(data)
    return path


@pytest.mark.parametrize("make", [make_zip, make_folder])
def test_prepare_keeps_artists_over_threshold(tmp_path, make):
    source = make(tmp_path / "archive", kaggle_members())
    result = prepare_best_artworks(source, tmp_path / "out", min_paintings=2)
    expected = {"Albrecht_Dürer": 4, "Alpha_Painter": 5, "Beta_Painter": 3}
    assert result.classes == expected
    assert {p.name: len(list(p.iterdir())) for p in (tmp_path / "out").iterdir()} == expected
    assert (tmp_path / "out" / "Alpha_Painter" / "Alpha_Painter_1.jpg").read_bytes() == jpeg(1)
    assert result.below_threshold == ("Gamma Painter",)
    assert any("Delta Painter" in m for m in result.mismatched)
    assert any("Delta_Paintr" in m for m in result.mismatched)
    assert result.unrecognised == ("notes.txt",)
    assert "wrote 12 images of 3 artists" in result.format()
    data = load_dataset(DataConfig(source="folder", root=str(tmp_path / "out"), val_fraction=0.3),
                        8, tmp_path / "runs", progress=False)
    assert len(data.classes) == 3


def test_prepare_reads_utf8_names_stored_without_the_utf8_flag(tmp_path, monkeypatch):
    # The real archive stores Albrecht_Du\u0308rer as UTF-8 bytes without the zip UTF-8 flag, so
    # zipfile decodes it as cp437 ('Albrecht_Du╠êrer'). Write such an archive here.
    members = {name.encode().decode("cp437"): data for name, data in kaggle_members().items()}
    monkeypatch.setattr(zipfile.ZipInfo, "_encodeFilenameFlags",
                        lambda info: (info.filename.encode("cp437"), info.flag_bits))
    source = make_zip(tmp_path / "legacy.zip", members)
    monkeypatch.undo()
    assert any("\u2560" in n for n in zipfile.ZipFile(source).namelist())  # mojibake, as in the wild
    result = prepare_best_artworks(source, tmp_path / "out", min_paintings=2)
    assert result.classes["Albrecht_Dürer"] == 4
    assert (tmp_path / "out" / "Albrecht_Dürer" / "Albrecht_Dürer_4.jpg").read_bytes() == jpeg(4)


@pytest.mark.parametrize("bad", ["../evil.txt", "images/images/A/../../../evil.txt", "/tmp/evil.txt"])
def test_prepare_refuses_unsafe_members(tmp_path, bad):
    members = kaggle_members() | {bad: b"gotcha"}
    source = make_zip(tmp_path / "archive.zip", members)
    assert bad in zipfile.ZipFile(source).namelist()
    before = sorted(tmp_path.parent.rglob("*"))
    with pytest.raises(DataError, match="refusing archive member"):
        prepare_best_artworks(source, tmp_path / "work" / "out", min_paintings=2)
    assert sorted(tmp_path.parent.rglob("*")) == before  # nothing written anywhere
    assert not Path("/tmp/evil.txt").exists()


def test_prepare_refuses_a_non_empty_out(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(DataError, match="not empty"):
        prepare_best_artworks(make_zip(tmp_path / "a.zip", kaggle_members()), tmp_path / "out")


def test_prepare_without_artists_csv_or_matching_artists_is_an_error(tmp_path):
    source = make_zip(tmp_path / "a.zip", {"images/images/A/A_1.jpg": jpeg(1)})
    with pytest.raises(DataError, match="no artists.csv"):
        prepare_best_artworks(source, tmp_path / "out")
    with pytest.raises(DataError, match="none of the 0 artists with more than 5 paintings"):
        prepare_best_artworks(make_zip(tmp_path / "b.zip", kaggle_members()), tmp_path / "out", min_paintings=5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.zip", "b.zip"]


def test_check_dataset_reports_classes_sizes_and_unreadable(tmp_path):
    root = make_folder(tmp_path / "tree", {"a/1.jpg": jpeg(1), "a/2.jpg": jpeg(2), "b/1.jpg": jpeg(3),
                                           "b/bad.jpg": b"nope", "c/empty.jpg": b""})
    check = check_dataset(root)
    assert [(c.name, c.images) for c in check.classes] == [("a", 2), ("b", 1), ("c", 0)]
    assert check.classes[0].smallest == (16, 12) and check.classes[0].modes == {"RGB": 2}
    assert check.unreadable == ("b/bad.jpg: not an image", "c/empty.jpg: empty file")
    text = check.format()
    assert "3 classes, 3 images, 2 unreadable" in text and "class 'c' has no readable images" in text


def test_check_dataset_on_artists11():
    if not ARTISTS11.is_dir():
        pytest.skip(f"{ARTISTS11} is absent (the shared real-data folder; see shared/data/README.md)")
    check = check_dataset(ARTISTS11)
    assert len(check.classes) == 11 and check.images == 3902 and check.unreadable == ()
    assert "11 classes, 3,902 images, 0 unreadable" in check.format()
