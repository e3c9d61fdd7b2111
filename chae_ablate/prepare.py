"""Get image data into the class-per-folder layout the folder source reads, and check it.

`prepare_best_artworks` turns Kaggle's "Best Artworks of All Time" (the CHAE paper's data; a zip or
its extracted folder) into one folder per artist with more than `min_paintings` paintings (11 at the
paper's 200). It trusts nothing in the archive: members with absolute paths or '..' are refused
before anything is written, files it does not recognise and artists whose folder it cannot find are
reported rather than guessed at, and the output appears only when complete.

`check_dataset` summarises any class-per-folder tree (images per class, sizes, modes, unreadable
files) for `chae-ablate data check`.
"""
from __future__ import annotations

import csv
import io
import os
import re
import shutil
import unicodedata
import zipfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import IO, Callable, Iterator

from .data import describe_error, open_image, scan_folder
from .errors import DataError

Opener = Callable[[], IO[bytes]]


@dataclass(frozen=True)
class PrepareResult:
    out: Path  # the class-per-folder tree written
    classes: dict[str, int]  # kept artist folder -> images written
    below_threshold: tuple[str, ...]  # artists with min_paintings paintings or fewer (not written)
    mismatched: tuple[str, ...]  # kept artists without a matching folder, and folders without an artist
    unrecognised: tuple[str, ...]  # archive files that are not part of the Kaggle layout
    ignored: int = 0  # files deliberately not copied: resized/ duplicates, artists below threshold

    def format(self) -> str:
        lines = [f"wrote {sum(self.classes.values())} images of {len(self.classes)} artists to {self.out}"]
        lines += [f"  {name:<32} {n:>6}" for name, n in self.classes.items()]
        lines.append(f"left out {len(self.below_threshold)} artists below the threshold, "
                     f"{self.ignored} files not copied")
        lines += [f"mismatch: {m}" for m in self.mismatched]
        lines += [f"unrecognised: {u}" for u in self.unrecognised]
        return "\n".join(lines)

    __str__ = format


def prepare_best_artworks(source: Path, out: Path, min_paintings: int = 200) -> PrepareResult:
    """Write out/<Artist_Name>/<file> for every artist with more than `min_paintings` paintings."""
    source, out = Path(source), Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"{out} already exists and is not empty; remove it or choose another --out")
    with _archive(source) as members:
        artists = _read_artists(source, members)
        folders, unrecognised, ignored = _image_folders(members)
        kept = {name: n for name, n in artists.items() if n > min_paintings}
        wanted = {_nfc(name.replace(" ", "_")): name for name in kept}
        mismatched = [f"artist {name!r} ({kept[name]} paintings): no folder images/images/{folder}"
                      for folder, name in wanted.items() if folder not in folders]
        known = {_nfc(name.replace(" ", "_")) for name in artists}
        strays = sorted(set(folders) - known)
        if strays:
            mismatched.append(f"folders matching no artist in artists.csv: {', '.join(strays)} "
                              f"(rename a folder to its artist's name with spaces as underscores)")
        matched = sorted(f for f in wanted if f in folders)
        if not matched:
            raise DataError(f"{source}: none of the {len(kept)} artists with more than {min_paintings} "
                            f"paintings has a folder under images/images/; nothing was written")
        ignored += sum(len(files) for f, files in folders.items() if f not in wanted)
        counts = _write_tree(out, {f: folders[f] for f in matched})
    return PrepareResult(out=out, classes=counts, below_threshold=tuple(sorted(set(artists) - set(kept))),
                         mismatched=tuple(mismatched), unrecognised=tuple(unrecognised), ignored=ignored)


@contextmanager
def _archive(source: Path) -> Iterator[dict[str, Opener]]:
    """Every file in a zip or folder as {relative name (NFC): opener}; unsafe zip members refused."""
    if source.is_dir():
        yield {_nfc(p.relative_to(source).as_posix()): partial(p.open, "rb") for p in sorted(source.rglob("*"))
               if p.is_file()}
    elif zipfile.is_zipfile(source):
        with zipfile.ZipFile(source) as zf:
            for info in zf.infolist():
                if _unsafe(info.filename):
                    raise DataError(f"{source}: refusing archive member {info.filename!r} (absolute "
                                    f"path or '..'); nothing was written")
            yield {_member_name(info): (lambda info=info: zf.open(info))
                   for info in zf.infolist() if not info.is_dir()}
    else:
        what = "is neither a zip archive nor a folder" if source.exists() else "does not exist"
        raise DataError(f"{source} {what}; download 'Best Artworks of All Time' from Kaggle and pass "
                        f"the zip (or its extracted folder)")


def _unsafe(name: str) -> bool:
    path = name.replace("\\", "/")
    return path.startswith("/") or bool(re.match(r"[A-Za-z]:", path)) or ".." in path.split("/")


def _member_name(info: zipfile.ZipInfo) -> str:
    """A member's real name. Zip names without the UTF-8 flag are cp437 by the spec, but the Kaggle
    archive stores UTF-8 bytes there (Albrecht_Du\u0308rer shows as 'Albrecht_Du╠êrer'): re-decode
    those bytes as UTF-8 when they are valid UTF-8. NFC makes 'u' + combining diaeresis equal 'ü'."""
    name = info.filename
    if not info.flag_bits & 0x800:
        try:
            name = name.encode("cp437").decode("utf-8")
        except UnicodeError:
            pass
    return _nfc(name)


def _nfc(text: str) -> str:
    return unicodedata.normalize("NFC", text)


def _read_artists(source: Path, members: dict[str, Opener]) -> dict[str, int]:
    """artists.csv as {name: paintings}."""
    found = sorted((n for n in members if n.rsplit("/", 1)[-1] == "artists.csv"), key=lambda n: n.count("/"))
    if not found:
        raise DataError(f"{source} has no artists.csv; is it Kaggle's 'Best Artworks of All Time'?")
    with members[found[0]]() as f:
        rows = list(csv.DictReader(io.TextIOWrapper(f, encoding="utf-8-sig")))
    if not rows or not {"name", "paintings"} <= set(rows[0]):
        raise DataError(f"{source}: {found[0]} lacks the columns 'name' and 'paintings'")
    try:
        return {_nfc(row["name"].strip()): int(row["paintings"]) for row in rows}
    except ValueError as e:
        raise DataError(f"{source}: {found[0]} has a non-integer 'paintings' value ({e})") from None


def _image_folders(members: dict[str, Opener]) -> tuple[dict[str, list[tuple[str, Opener]]], list[str], int]:
    """({artist folder: [(file name, opener)]} from images/images/<folder>/<file>, unrecognised
    names, count of resized/ duplicates ignored)."""
    folders: dict[str, list[tuple[str, Opener]]] = {}
    unrecognised, ignored = [], 0
    for name, opener in members.items():
        parts = name.split("/")
        starts = [i for i in range(len(parts) - 3) if parts[i:i + 2] == ["images", "images"]]
        if starts and len(parts) == starts[0] + 4 and not parts[-1].startswith("."):
            folders.setdefault(parts[-2], []).append((parts[-1], opener))
        elif "resized" in parts[:-1]:
            ignored += 1  # the archive's low-resolution copies of the same paintings
        elif parts[-1] != "artists.csv":
            unrecognised.append(name)
    return folders, sorted(unrecognised), ignored


def _write_tree(out: Path, folders: dict[str, list[tuple[str, Opener]]]) -> dict[str, int]:
    """Copy the files into a hidden sibling folder, then rename it to `out` in one step."""
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for folder, files in folders.items():
            (tmp / folder).mkdir(parents=True)
            for file_name, opener in sorted(files):
                with opener() as src, open(tmp / folder / file_name, "wb") as dst:
                    shutil.copyfileobj(src, dst)
        tmp.mkdir(parents=True, exist_ok=True)
        if out.exists():
            out.rmdir()  # checked empty above
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {folder: len(files) for folder, files in folders.items()}


# --- data check -------------------------------------------------------------------------------

@dataclass(frozen=True)
class ClassCheck:
    name: str
    images: int  # readable images
    smallest: tuple[int, int] | None  # (min width, min height) over the class
    largest: tuple[int, int] | None  # (max width, max height)
    modes: dict[str, int] = field(default_factory=dict)  # PIL mode -> images


@dataclass(frozen=True)
class DatasetCheck:
    root: Path
    classes: tuple[ClassCheck, ...]
    unreadable: tuple[str, ...]  # "relative/path: reason"

    @property
    def images(self) -> int:
        return sum(c.images for c in self.classes)

    @property
    def problems(self) -> tuple[str, ...]:
        """What would stop `load_dataset` from using this folder."""
        found = [f"class {c.name!r} has no readable images" for c in self.classes if not c.images]
        if len(self.classes) < 2:
            found.append(f"{len(self.classes)} class folder(s); a classifier needs at least 2")
        return tuple(found)

    def format(self) -> str:
        width = max([5] + [len(c.name) for c in self.classes])
        lines = [f"{self.root}: {len(self.classes)} classes, {self.images:,} images, "
                 f"{len(self.unreadable)} unreadable",
                 f"{'class':<{width}}  {'images':>7}  {'smallest':>9}  {'largest':>9}  modes"]
        for c in self.classes:
            modes = ", ".join(f"{m} {n}" if len(c.modes) > 1 else m for m, n in sorted(c.modes.items()))
            lines.append(f"{c.name:<{width}}  {c.images:>7,}  {_size(c.smallest):>9}  {_size(c.largest):>9}  {modes}")
        lines += [f"unreadable: {u}" for u in self.unreadable]
        lines += [f"problem: {p}" for p in self.problems]
        return "\n".join(lines)


def check_dataset(root: Path) -> DatasetCheck:
    """Open every file under a class-per-folder tree once and summarise what is there."""
    root = Path(root)
    classes, files = scan_folder(root)
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        results = list(pool.map(_inspect, [root / rel for rel, _ in files]))
    per_class: list[list[tuple[tuple[int, int], str]]] = [[] for _ in classes]
    unreadable = []
    for (rel, label), result in zip(files, results):
        if isinstance(result, str):
            unreadable.append(f"{rel}: {result}")
        else:
            per_class[label].append(result)
    return DatasetCheck(root, tuple(_class_check(n, infos) for n, infos in zip(classes, per_class)),
                        tuple(unreadable))


def _inspect(path: Path) -> tuple[tuple[int, int], str] | str:
    """(stored size, mode) of a fully decodable image, or why it is not one."""
    data = b""
    try:
        data = path.read_bytes()
        _, size, mode = open_image(data, draft=32)  # a reduced-scale JPEG decode still reads it all
        return size, mode
    except Exception as e:  # any failure means "unreadable", reported, never raised
        return describe_error(data, e)


def _class_check(name: str, infos: list[tuple[tuple[int, int], str]]) -> ClassCheck:
    widths, heights = [s[0] for s, _ in infos], [s[1] for s, _ in infos]
    return ClassCheck(name, len(infos),
                      (min(widths), min(heights)) if infos else None,
                      (max(widths), max(heights)) if infos else None,
                      dict(Counter(mode for _, mode in infos)))


def _size(size: tuple[int, int] | None) -> str:
    return f"{size[0]}x{size[1]}" if size else "-"
