"""Reading a study file as plain data: safe YAML in bounded time and memory, and `base:` studies
deep-merged under it.

Whatever the bytes, reading returns plain data or raises a one-line ConfigError naming the file:
duplicate keys, tags forced onto the wrong type, alias and merge-key bombs, deep nesting, huge or
non-UTF-8 files and cycles of `base:` files are all refused. study.py validates what comes out.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from .config import short
from .errors import ConfigError
from .files import shown

STUDY_KEYS = ("name", "description", "base", "data", "model", "protocol", "analysis", "search", "variants")
MAX_FILE_BYTES = 2**19  # a page of YAML; 999 variants take ~150 kB; parsing 512 kB of `1,1,...` ~2 s
MAX_VALUES = 200_000  # values in a study once YAML aliases are expanded (a billion-laughs guard)
MAX_BASE_DEPTH = 8  # levels of base: (each error names every file on the way, so keep it short)


class _StrictLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # libyaml: fast, bounds nesting
    """A safe YAML loader for study files. A duplicate key is an error (YAML keeps the last one
    silently), a date stays text, and a scalar that an explicit tag forces into the wrong type
    (`!!int abc`, an integer of 5,000 digits) is a one-line error instead of a Python exception."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults`: flatten_mapping's job
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # an unhashable key: the base class raises the YAML error for it
                break
            if duplicate:
                raise ConfigError(f"line {key_node.start_mark.line + 1}: duplicate key {short(key)}; "
                                  "YAML would silently keep only the last one — remove or rename one")
        return super().construct_mapping(node, deep=deep)

    def construct_object(self, node, deep=False):
        try:
            return super().construct_object(node, deep=deep)
        except (ValueError, LookupError) as err:  # PyYAML's scalar constructors trust the tag
            kind = node.tag.rsplit(":", 1)[-1]
            raise ConfigError(f"line {node.start_mark.line + 1}: {short(node.value)} is not a valid {kind} "
                              f"({str(err).split(':')[0][:80]})") from None


_StrictLoader.add_constructor("tag:yaml.org,2002:timestamp", yaml.SafeLoader.construct_yaml_str)


def load_yaml(data: bytes, where: str) -> Any:
    """YAML as plain data. Whatever the bytes, this returns or raises a one-line ConfigError that
    starts with `where`, in bounded time and memory (see _check_size)."""
    loader = _StrictLoader(data)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_size(node)
        return loader.construct_document(node)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        problem = str(getattr(err, "problem", None) or err).splitlines()[0]
        raise ConfigError(f"{where}:{line} is not valid YAML ({problem[:200]})") from None
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None
    except RecursionError:  # pure-Python PyYAML only; libyaml refuses deep nesting itself
        raise ConfigError(f"{where}: nested too deeply to be a study file") from None
    finally:
        loader.dispose()


def read_yaml(path: Path) -> Any:
    """A YAML file as plain data, with one-line errors for every way it can be unusable."""
    where = shown(path)
    try:
        if not path.is_file():
            what = "is not a file" if path.exists() else "study file not found (the studies/ folder has examples)"
            raise ConfigError(f"{where}: {what}")
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise ConfigError(f"{where}: {size:,} bytes; a study file must be under {MAX_FILE_BYTES:,}")
        data = path.read_bytes()
    except OSError as err:  # unreadable, or a name the OS refuses (too long)
        raise ConfigError(f"{where}: cannot be read ({err.strerror or err})") from None
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{where}: not UTF-8 text (byte {err.start}); is it really a study file?") from None
    return load_yaml(data, where)


def _check_size(root: yaml.Node) -> None:
    """Refuse YAML whose nodes, every alias expanded, number more than MAX_VALUES or nest deeper
    than 64 levels. Aliases share one node, so a 'billion laughs' file or a merge-key bomb
    (`<<: [*a, *a]` repeated) is a few lines that would explode once constructed or walked;
    this walk runs before construction and stops at the limit."""
    stack, count = [(root, 0)], 0
    while stack:
        node, depth = stack.pop()
        count += 1
        if count > MAX_VALUES or depth > 64:
            why = f"expands to more than {MAX_VALUES:,} values" if count > MAX_VALUES else "nests deeper than 64 levels"
            raise ConfigError(f"{why} (YAML aliases or anchors?); a study file is a few dozen lines")
        if isinstance(node, yaml.MappingNode):
            stack += [(n, depth + 1) for pair in node.value for n in pair]
        elif isinstance(node, yaml.SequenceNode):
            stack += [(n, depth + 1) for n in node.value]


def read_study_file(path: Path, chain: tuple[Path, ...] = ()) -> dict:
    """The study file with its `base:` studies (relative to the file) deep-merged under it."""
    raw = read_yaml(path)
    if not isinstance(raw, dict):
        raise ConfigError(f"{shown(path)}: expected a mapping with keys {', '.join(STUDY_KEYS)}, got {short(raw)}")
    base = raw.get("base")
    if base is None:
        return raw
    if not isinstance(base, str) or not base.strip() or "\0" in base:
        raise ConfigError(f"{shown(path)}: base: expected a study file name, e.g. base: paper11.yaml")
    chain = (*chain, Path(os.path.realpath(path)))  # realpath: never raises, unlike resolve() on a symlink loop
    base_path = path.parent / base
    if (real := Path(os.path.realpath(base_path))) in chain:
        cycle = " -> ".join(shown(Path(p.name)) for p in (*chain, real))
        raise ConfigError(f"{shown(path)}: base: studies form a cycle ({cycle}); remove one base:")
    if len(chain) >= MAX_BASE_DEPTH:
        raise ConfigError(f"{shown(path)}: more than {MAX_BASE_DEPTH} levels of base: studies")
    try:
        parent = read_study_file(base_path, chain)
    except ConfigError as err:  # name the file whose base: it is
        raise ConfigError(f"{shown(path)}: base: {err}") from None
    parent.pop("name", None)  # a study's name is its own, never inherited
    parent.pop("base", None)
    child = {k: v for k, v in raw.items() if k != "base"}
    return merge_studies(parent, child)


def merge_studies(parent: dict, child: dict) -> dict:
    """Deep-merge child over parent; under `variants:`, a variant set to null is dropped."""
    merged = deep_merge(parent, child)
    variants = child.get("variants")
    if isinstance(variants, dict) and isinstance(merged.get("variants"), dict):
        merged["variants"] = {k: v for k, v in merged["variants"].items()
                              if not (k in variants and variants[k] is None)}
    return merged


def deep_merge(base: Any, over: Any) -> Any:
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for key, value in over.items():
            out[key] = deep_merge(base[key], value) if key in base else value
        return out
    return over
