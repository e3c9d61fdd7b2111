"""prepare_best_artworks on small archives in the Kaggle layout, and check_dataset."""
import csv
import io
import os
import stat
import unicodedata
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from chae_ablate.config import DataConfig
from chae_ablate.data import load_dataset
from chae_ablate.errors import DataError
from chae_ablate.prepare import _copy, check_dataset, prepare_best_artworks

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


# --- hostile archives and folders ---------------------------------------------------------------

SECRET = b"root:x:0:0:root:/root:/bin/bash\n"


def written(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}


def test_prepare_never_follows_symlinks_in_a_folder(tmp_path):
    outside = make_folder(tmp_path / "elsewhere", {"passwd": SECRET} |
                          {f"Beta_Painter/Beta_Painter_{n}.jpg": jpeg(n) for n in (1, 2, 3)})
    members = {k: v for k, v in kaggle_members().items() if not k.startswith("images/images/Beta_Painter/")}
    source = make_folder(tmp_path / "archive", members)
    alpha = source / "images" / "images" / "Alpha_Painter"
    (alpha / "Alpha_Painter_6.jpg").symlink_to(outside / "passwd")
    (alpha / "Alpha_Painter_7.jpg").symlink_to(alpha / "Alpha_Painter_1.jpg")  # inside: still not followed
    (source / "images" / "images" / "Beta_Painter").symlink_to(outside / "Beta_Painter", target_is_directory=True)
    os.mkfifo(alpha / "Alpha_Painter_8.jpg")
    result = prepare_best_artworks(source, tmp_path / "out", min_paintings=2)
    assert result.classes == {"Albrecht_Dürer": 4, "Alpha_Painter": 5}
    files = written(tmp_path / "out")
    assert SECRET not in files.values() and len(files) == 9
    assert set(result.skipped) == {
        "images/images/Alpha_Painter/Alpha_Painter_6.jpg: symlink, not followed",
        "images/images/Alpha_Painter/Alpha_Painter_7.jpg: symlink, not followed",
        "images/images/Alpha_Painter/Alpha_Painter_8.jpg: not a regular file (a fifo, socket or device)",
        "images/images/Beta_Painter: symlink, not followed"}
    assert "skipped: images/images/Beta_Painter: symlink, not followed" in result.format()


def zip_member(name: str, data: bytes, kind: int) -> tuple[zipfile.ZipInfo, bytes]:
    info = zipfile.ZipInfo(name)
    info.create_system = 3  # unix: the high 16 bits of external_attr are st_mode
    info.external_attr = (kind | 0o777) << 16
    return info, data


def test_prepare_skips_zip_symlinks_and_special_files(tmp_path):
    source = make_zip(tmp_path / "archive.zip", kaggle_members())
    with zipfile.ZipFile(source, "a") as zf:
        for name, data, kind in [("Alpha_Painter_6.jpg", b"/etc/passwd", stat.S_IFLNK),
                                 ("Alpha_Painter_7.jpg", b"", stat.S_IFIFO),
                                 ("Alpha_Painter_8.jpg", b"", stat.S_IFCHR),
                                 ("Alpha_Painter_9.jpg", jpeg(9), stat.S_IFREG)]:
            zf.writestr(*zip_member(f"images/images/Alpha_Painter/{name}", data, kind))
    result = prepare_best_artworks(source, tmp_path / "out", min_paintings=2)
    assert result.classes["Alpha_Painter"] == 6
    files = written(tmp_path / "out")
    assert files["Alpha_Painter/Alpha_Painter_9.jpg"] == jpeg(9)
    assert not any(name.endswith(("_6.jpg", "_7.jpg", "_8.jpg")) for name in files)
    assert set(result.skipped) == {
        "images/images/Alpha_Painter/Alpha_Painter_6.jpg: symlink member, not extracted",
        "images/images/Alpha_Painter/Alpha_Painter_7.jpg: not a regular file (a fifo, socket or device)",
        "images/images/Alpha_Painter/Alpha_Painter_8.jpg: not a regular file (a fifo, socket or device)"}


def test_prepare_lists_unusable_duplicate_and_unreadable_members(tmp_path):
    members = kaggle_members()
    members["artists.csv"] += b"9,.,1500,Art,Nowhere,Dot,,9\n"  # an artist whose folder would be '.'
    members |= {f"images/images/./x_{n}.jpg": jpeg(n) for n in range(3)}
    members["images/images/Alpha_Painter/" + unicodedata.normalize("NFD", "é.jpg")] = jpeg(20)
    members["images/images/Alpha_Painter/" + unicodedata.normalize("NFC", "é.jpg")] = jpeg(21)
    members["images/images/Alpha_Painter/damaged.jpg"] = jpeg(22)
    members["images/images/Alpha_Painter/" + "x" * 300 + ".jpg"] = jpeg(23)  # longer than a file name can be
    source = make_zip(tmp_path / "archive.zip", members)
    raw = source.read_bytes()
    at = raw.index(jpeg(22))  # stored uncompressed: flip a byte, and the CRC check fails on reading
    source.write_bytes(raw[:at + 100] + bytes([raw[at + 100] ^ 0xFF]) + raw[at + 101:])
    result = prepare_best_artworks(source, tmp_path / "out", min_paintings=2)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["Albrecht_Dürer", "Alpha_Painter", "Beta_Painter"]
    assert result.classes["Alpha_Painter"] == 6
    assert written(tmp_path / "out")["Alpha_Painter/é.jpg"] == jpeg(20)
    skipped = "\n".join(result.skipped)
    assert "images/images/./x_0.jpg: unusable folder or file name" in skipped
    assert "images/images/Alpha_Painter/é.jpg: same name as another member" in skipped
    assert "images/images/Alpha_Painter/damaged.jpg: cannot read (Bad CRC-32" in skipped
    assert f"images/images/Alpha_Painter/{'x' * 300}.jpg: unusable folder or file name" in skipped
    assert "damaged.jpg" not in written(tmp_path / "out")


def test_prepare_turns_broken_archives_and_tables_into_data_errors(tmp_path):
    members = kaggle_members()
    latin1 = make_zip(tmp_path / "latin1.zip",
                      members | {"artists.csv": "name,paintings\nDürer,5\n".encode("latin-1")})
    with pytest.raises(DataError, match="artists.csv is not UTF-8"):
        prepare_best_artworks(latin1, tmp_path / "out")
    short = make_zip(tmp_path / "short.zip", members | {"artists.csv": b"name,paintings\nAlpha Painter\n"})
    with pytest.raises(DataError, match="row 2 lacks"):
        prepare_best_artworks(short, tmp_path / "out")
    bad_name = make_zip(tmp_path / "name.zip", {"images/images/A/\u00ff\u00fe.jpg": b"x"})  # flagged UTF-8 ...
    utf8 = "\u00ff\u00fe".encode()
    bad_name.write_bytes(bad_name.read_bytes().replace(utf8, b"\xff" * len(utf8)))  # ... but is not
    with pytest.raises(DataError, match="cannot read the zip archive"):
        prepare_best_artworks(bad_name, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_check_dataset_counts_skipped_entries_and_lists_problems(tmp_path):
    outside = make_folder(tmp_path / "elsewhere", {"secret.jpg": jpeg(9), "d/1.jpg": jpeg(8)})
    root = make_folder(tmp_path / "tree", {"a/1.jpg": jpeg(1), "a/2.jpg": jpeg(2), "b/1.jpg": jpeg(3)})
    (root / "a" / "link.jpg").symlink_to(outside / "secret.jpg")
    (root / "c").symlink_to(outside / "d", target_is_directory=True)
    (root / "e").mkdir()
    (root / "e" / "only-link.jpg").symlink_to(outside / "secret.jpg")
    check = check_dataset(root)
    assert [(c.name, c.images) for c in check.classes] == [("a", 2), ("b", 1), ("e", 0)]
    assert check.skipped == ("c: symlink to a folder not below the data root, not followed",
                             "a/link.jpg: symlink leading out of the data root, not followed",
                             "e/only-link.jpg: symlink leading out of the data root, not followed")
    assert check.problems == ("class 'e' has no readable images",)
    text = check.format()
    assert "3 classes, 3 images, 0 unreadable, 3 skipped" in text
    assert "skipped: a/link.jpg: symlink leading out of the data root, not followed" in text
    assert check_dataset(make_folder(tmp_path / "fine", {"a/1.jpg": jpeg(1), "b/1.jpg": jpeg(2)})).problems == ()


def test_check_dataset_lists_too_large_images(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 150)  # 16 x 12 = 192 pixels is over it
    root = make_folder(tmp_path / "tree", {"a/1.jpg": jpeg(1), "b/1.jpg": jpeg(2)})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DecompressionBombWarning either
        check = check_dataset(root)
    assert check.unreadable == ("a/1.jpg: unreadable: too large: 16x12 = 192 pixels, over PIL's limit "
                                "(PIL.Image.MAX_IMAGE_PIXELS) of 150",
                                "b/1.jpg: unreadable: too large: 16x12 = 192 pixels, over PIL's limit "
                                "(PIL.Image.MAX_IMAGE_PIXELS) of 150")


def test_prepare_lists_a_file_that_collides_on_a_case_insensitive_file_system(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"first")  # as if 'A.jpg' were written where 'a.jpg' is
    assert _copy(lambda: io.BytesIO(b"second"), tmp_path / "a.jpg") == \
        "same name as another file here, apart from letter case"
    assert (tmp_path / "a.jpg").read_bytes() == b"first"


def test_reports_escape_control_characters_in_names(tmp_path):
    root = make_folder(tmp_path / "tree", {"a/1.jpg": jpeg(1), "line\nbreak/1.jpg": jpeg(2),
                                           "a/x\nproblem: fake.jpg": b"not an image"})
    lines = check_dataset(root).format().splitlines()
    assert not any(line.startswith("problem:") for line in lines)
    assert "unreadable: a/x\\nproblem: fake.jpg: not an image" in lines
    assert any(line.startswith("line\\nbreak ") for line in lines)
