"""Files on disk: one atomic writer, paths that cannot leave their folder, file locks, and the
database file of a sqlite URL.

Every file the tool writes that another process may read while it is written (caches, manifests,
checkpoints, report files) goes through `atomic_write`; every path built from a study name, a cell
hash or any other user-influenced name goes through `inside`; every path a message prints goes
through `shown`.
"""
from __future__ import annotations

import fcntl
import os
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

from sqlalchemy.engine import make_url

from .errors import ChaeError


def atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> Path:
    """Call write(file) on a temporary file in path's folder, then os.replace it onto path: a
    reader, or a kill at any moment, sees the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "xb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: Path, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def shown(name: str | Path, width: int | None = 200) -> str:
    """A path or file name as messages print it: on one line (control and format characters such as
    a newline or a right-to-left override escaped, so a name cannot fake a line), a name's
    undecodable bytes as \\xNN, cut to `width` characters (None: whole, as data listings print
    names, so that a deep path stays findable)."""
    text = str(name)
    try:
        text = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate that no file name produces: escaped below
        pass
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return text if width is None or len(text) <= width else text[: width - 3] + "..."


def inside(parent: Path, *parts: str) -> Path:
    """parent / parts..., refused unless it stays strictly below parent (no '..', no absolute part,
    no symlink that leads out). Raises ChaeError naming the part."""
    parent = Path(parent)
    path = parent.joinpath(*parts)
    for part in parts:
        if not part or part in (".", "..") or "/" in part or "\\" in part or "\0" in part:
            raise ChaeError(f"{part!r} cannot be used as a file or folder name under {parent}")
    base, resolved = parent.resolve(), path.resolve()
    if resolved == base or base not in resolved.parents:
        raise ChaeError(f"{path} leaves its folder {parent}; refusing to use it")
    return path


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on `path` (created if missing) for the duration of the block:
    processes that start at the same moment on one machine take turns (e.g. creating the tables of
    a fresh sqlite database, which sqlite's own locking does not serialise)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def sqlite_file(url: str) -> Path | None:
    """The database file a sqlite URL names (an Optuna ledger's, or MLflow's store), else None (a
    server, a journal file, sqlite in memory, a URL that does not parse)."""
    if not url.startswith("sqlite"):
        return None
    try:
        database = make_url(url).database
    except Exception:
        return None
    return Path(database) if database and database != ":memory:" else None
