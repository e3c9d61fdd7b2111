"""Get image data into the class-per-folder layout the folder source reads, and check it.

`prepare_best_artworks` turns Kaggle's "Best Artworks of All Time" (the CHAE paper's data; a zip or
its extracted folder) into one folder per artist with more than `min_paintings` paintings (11 at the
paper's 200). It trusts nothing in the archive: members with absolute paths or '..' are refused
before anything is written, files it does not recognise and artists whose folder it cannot find are
reported rather than guessed at, and the output appears only when complete. Only regular files are
copied, and only below --out: symlinks (in a folder or a zip) are never followed nor extracted,
fifos and devices, names that cannot be a file name there, members that collide after Unicode
normalisation and members that cannot be read are skipped, each listed with its reason.

`check_dataset` summarises any class-per-folder tree (images per class, sizes, modes, unreadable
files) for `chae-ablate data check`.
"""
from __future__ import annotations

import csv
import io
import os
import re
import shutil
import stat
import unicodedata
import zipfile
import zlib
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import IO, Callable, Iterator

from .errors import DataError
from .files import inside, shown
from .images import Unusable, describe_error, map_images, open_regular, read_image, scan_tree, walk_files

Opener = Callable[[], IO[bytes]]
# what reading a damaged, encrypted or unsupported zip member raises (a folder's file: OSError)
_MEMBER_ERRORS = (zipfile.BadZipFile, RuntimeError, NotImplementedError, EOFError, zlib.error)


@dataclass(frozen=True)
class PrepareResult:
    out: Path  # the class-per-folder tree written
    classes: dict[str, int]  # kept artist folder -> images written
    below_threshold: tuple[str, ...]  # artists with min_paintings paintings or fewer (not written)
    mismatched: tuple[str, ...]  # kept artists without a matching folder, and folders without an artist
    unrecognised: tuple[str, ...]  # archive files that are not part of the Kaggle layout
    ignored: int = 0  # files deliberately not copied: resized/ duplicates, artists below threshold
    skipped: tuple[str, ...] = ()  # "name: reason" for every entry never copied for safety or damage

    def format(self) -> str:
        lines = [f"wrote {sum(self.classes.values())} images of {len(self.classes)} artists to {self.out}"]
        lines += [f"  {name:<32} {n:>6}" for name, n in self.classes.items()]
        lines.append(f"left out {len(self.below_threshold)} artists below the threshold, "
                     f"{self.ignored} files not copied")
        lines += [f"mismatch: {m}" for m in self.mismatched]
        lines += [f"unrecognised: {u}" for u in self.unrecognised]
        lines += [f"skipped: {u}" for u in self.skipped]
        return "\n".join(map(partial(shown, width=None), lines))  # a name with a newline cannot fake a line

    __str__ = format


def prepare_best_artworks(source: Path, out: Path, min_paintings: int = 200) -> PrepareResult:
    """Write out/<Artist_Name>/<file> for every artist with more than `min_paintings` paintings."""
    source, out = Path(source), Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"{out} already exists and is not empty; remove it or choose another --out")
    with _archive(source) as (members, skipped):
        artists = _read_artists(source, members)
        folders, unrecognised, ignored = _image_folders(members, skipped)
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
        counts = _write_tree(out, {f: folders[f] for f in matched}, skipped)
    return PrepareResult(out=out, classes=counts, below_threshold=tuple(sorted(set(artists) - set(kept))),
                         mismatched=tuple(mismatched), unrecognised=tuple(unrecognised), ignored=ignored,
                         skipped=tuple(skipped))


@contextmanager
def _archive(source: Path) -> Iterator[tuple[dict[str, Opener], list[str]]]:
    """Every regular file in a zip or folder as {relative name (NFC): opener}, and "name: reason" for
    every entry left out (symlinks, special files, names that collide); unsafe zip members refused."""
    if source.is_dir():
        files, unread = walk_files(source, hidden=True, follow=False)
        skipped = [f"{shown(name, width=None)}: {reason}" for name, reason in unread]
        yield _unique([(name, partial(open_regular, source / name, follow=False)) for name in files],
                      skipped), skipped
    elif zipfile.is_zipfile(source):
        try:
            zf = zipfile.ZipFile(source)
        except Exception as e:  # zipfile raises many types on a damaged directory (BadZipFile, ...)
            raise DataError(f"cannot read the zip archive {source} ({type(e).__name__}: {e})") from None
        with zf:
            for info in zf.infolist():
                if _unsafe(info.filename):
                    raise DataError(f"{source}: refusing archive member {info.filename!r} (absolute "
                                    f"path or '..'); nothing was written")
            files, skipped = [], []
            for info in zf.infolist():
                kind = stat.S_IFMT(info.external_attr >> 16)  # unix st_mode; 0 from other systems
                if info.is_dir() or kind == stat.S_IFDIR:
                    continue
                if kind == stat.S_IFLNK:
                    skipped.append(f"{_member_name(info)}: symlink member, not extracted")
                elif kind not in (0, stat.S_IFREG):
                    skipped.append(f"{_member_name(info)}: not a regular file (a fifo, socket or device)")
                else:
                    files.append((_member_name(info), partial(zf.open, info)))
            yield _unique(files, skipped), skipped
    else:
        what = "is neither a zip archive nor a folder" if source.exists() else "does not exist"
        raise DataError(f"{source} {what}; download 'Best Artworks of All Time' from Kaggle and pass "
                        f"the zip (or its extracted folder)")


def _unique(files: list[tuple[str, Opener]], skipped: list[str]) -> dict[str, Opener]:
    """{NFC name: opener}; a name met again (a duplicate zip entry, or the other Unicode form of a
    name) is listed in skipped rather than silently overwriting the first."""
    members: dict[str, Opener] = {}
    for name, opener in files:
        name = _nfc(name)
        if name in members:
            skipped.append(f"{name}: same name as another member (after Unicode normalisation)")
        else:
            members[name] = opener
    return members


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
    try:
        with members[found[0]]() as f:
            rows = list(csv.DictReader(io.TextIOWrapper(f, encoding="utf-8-sig")))
    except UnicodeDecodeError:
        raise DataError(f"{source}: {found[0]} is not UTF-8 text") from None
    except (OSError, csv.Error, Unusable, *_MEMBER_ERRORS) as e:
        raise DataError(f"{source}: cannot read {found[0]} ({e})") from None
    if not rows or not {"name", "paintings"} <= set(rows[0]):
        raise DataError(f"{source}: {found[0]} lacks the columns 'name' and 'paintings'")
    artists = {}
    for line, row in enumerate(rows, start=2):
        if row["name"] is None or row["paintings"] is None:
            raise DataError(f"{source}: {found[0]} row {line} lacks 'name' or 'paintings'")
        try:
            artists[_nfc(row["name"].strip())] = int(row["paintings"])
        except ValueError as e:
            raise DataError(f"{source}: {found[0]} has a non-integer 'paintings' value ({e})") from None
    return artists


def _image_folders(members: dict[str, Opener], skipped: list[str]
                   ) -> tuple[dict[str, list[tuple[str, Opener]]], list[str], int]:
    """({artist folder: [(file name, opener)]} from images/images/<folder>/<file>, unrecognised
    names, count of resized/ duplicates ignored); names that cannot be a folder or file name under
    --out ('.', empty, a backslash, over 255 bytes) go to skipped."""
    folders: dict[str, list[tuple[str, Opener]]] = {}
    unrecognised, ignored = [], 0
    for name, opener in members.items():
        parts = name.split("/")
        starts = [i for i in range(len(parts) - 3) if parts[i:i + 2] == ["images", "images"]]
        if starts and len(parts) == starts[0] + 4 and not parts[-1].startswith("."):
            if _usable(parts[-2]) and _usable(parts[-1]):
                folders.setdefault(parts[-2], []).append((parts[-1], opener))
            else:
                skipped.append(f"{name}: unusable folder or file name")
        elif "resized" in parts[:-1]:
            ignored += 1  # the archive's low-resolution copies of the same paintings
        elif parts[-1] != "artists.csv":
            unrecognised.append(name)
    return folders, sorted(unrecognised), ignored


def _usable(part: str) -> bool:
    return part not in ("", ".", "..") and not any(c in part for c in "\\/\0") and len(part.encode()) <= 255


def _write_tree(out: Path, folders: dict[str, list[tuple[str, Opener]]], skipped: list[str]) -> dict[str, int]:
    """Copy the files into a hidden sibling folder, then rename it to `out` in one step. A member that
    cannot be read is left out and listed in skipped; a failed write stops everything."""
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    if tmp.is_symlink():
        tmp.unlink()
    shutil.rmtree(tmp, ignore_errors=True)
    counts = {}
    try:
        tmp.mkdir(parents=True)
        for folder, files in folders.items():
            inside(tmp, folder).mkdir()
            counts[folder] = 0
            for file_name, opener in sorted(files, key=lambda f: f[0]):
                reason = _copy(opener, inside(tmp, folder, file_name))
                if reason:
                    skipped.append(f"images/images/{folder}/{file_name}: {reason}")
                else:
                    counts[folder] += 1
        if out.exists():
            out.rmdir()  # checked empty above
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return counts


def _copy(opener: Opener, dst: Path) -> str:
    """Copy one member to dst (a new file) and return ''; or return why it was not copied. Errors
    writing dst (a full disk) propagate."""
    try:
        src = opener()
    except (OSError, Unusable, *_MEMBER_ERRORS) as e:
        return f"cannot read ({e.strerror if isinstance(e, OSError) and e.strerror else e})"
    with src:
        try:
            out = open(dst, "xb")
        except FileExistsError:  # 'A.jpg' after 'a.jpg' on a file system that ignores case
            return "same name as another file here, apart from letter case"
        try:
            with out:
                shutil.copyfileobj(src, out)
        except _MEMBER_ERRORS as e:  # a bad CRC or a broken stream shows only while reading
            dst.unlink()
            return f"cannot read ({e})"
    return ""


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
    unreadable: tuple[str, ...]  # "relative/path: reason", files that are no usable image
    skipped: tuple[str, ...] = ()  # "relative/path: reason", entries the loader leaves unread (symlinks
    # out of the root, fifos, broken links, unreadable folders, names that are not UTF-8)

    @property
    def images(self) -> int:
        return sum(c.images for c in self.classes)

    @property
    def problems(self) -> tuple[str, ...]:
        """What would stop `load_dataset` from using this folder (unreadable and skipped entries do
        not: the loader leaves them out, listed); `chae-ablate data check` fails when there are any."""
        found = [f"class {c.name!r} has no readable images" for c in self.classes if not c.images]
        if len(self.classes) < 2:
            found.append(f"{len(self.classes)} class folder(s); a classifier needs at least 2")
        return tuple(found)

    def format(self) -> str:
        width = max([5] + [len(c.name) for c in self.classes])
        skipped = f", {len(self.skipped)} skipped" if self.skipped else ""
        lines = [f"{self.root}: {len(self.classes)} classes, {self.images:,} images, "
                 f"{len(self.unreadable)} unreadable{skipped}",
                 f"{'class':<{width}}  {'images':>7}  {'smallest':>9}  {'largest':>9}  modes"]
        for c in self.classes:
            modes = ", ".join(f"{m} {n}" if len(c.modes) > 1 else m for m, n in sorted(c.modes.items()))
            lines.append(f"{c.name:<{width}}  {c.images:>7,}  {_size(c.smallest):>9}  {_size(c.largest):>9}  {modes}")
        lines += [f"unreadable: {u}" for u in self.unreadable]
        lines += [f"skipped: {u}" for u in self.skipped]
        lines += [f"problem: {p}" for p in self.problems]
        return "\n".join(map(partial(shown, width=None), lines))  # a name with a newline cannot fake a line


def check_dataset(root: Path) -> DatasetCheck:
    """Open every file under a class-per-folder tree once and summarise what is there."""
    root = Path(root)
    scan = scan_tree(root)
    results = list(map_images(_inspect, [root / rel for rel, _ in scan.files]))
    per_class: list[list[tuple[tuple[int, int], str]]] = [[] for _ in scan.classes]
    unreadable = []
    for (rel, label), result in zip(scan.files, results):
        if isinstance(result, str):
            unreadable.append(f"{rel}: {result}")
        else:
            per_class[label].append(result)
    return DatasetCheck(root, tuple(_class_check(n, infos) for n, infos in zip(scan.classes, per_class)),
                        tuple(unreadable), tuple(f"{shown(rel, width=None)}: {reason}" for rel, reason in scan.skipped))


def _inspect(path: Path) -> tuple[tuple[int, int], str] | str:
    """(stored size, mode) of a fully decodable image, or why it is not one."""
    try:
        with open_regular(path) as f:
            _, size, mode = read_image(f, lambda image: None, draft=32)  # a reduced-scale JPEG decode
            return size, mode  # still reads it all
    except Exception as e:  # any failure means "unreadable", reported, never raised
        return describe_error(e)


def _class_check(name: str, infos: list[tuple[tuple[int, int], str]]) -> ClassCheck:
    widths, heights = [s[0] for s, _ in infos], [s[1] for s, _ in infos]
    return ClassCheck(name, len(infos),
                      (min(widths), min(heights)) if infos else None,
                      (max(widths), max(heights)) if infos else None,
                      dict(Counter(mode for _, mode in infos)))


def _size(size: tuple[int, int] | None) -> str:
    return f"{size[0]}x{size[1]}" if size else "-"
