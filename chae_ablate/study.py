"""Study files: a baseline plus named variants, each a set of dotted-path overrides.

A study file is read as plain data (`base:` files deep-merged under it, --set overrides applied to
the baseline, each variant's `set:` applied on top), and only then validated, once per variant,
by config.parse: every error has one format, `variants.NAME.model.transformer.heads: ...`.
A study expands into cells (variant x seed); a cell's identity in the ledger is a content hash
of its resolved config and seed.
"""
from __future__ import annotations

import copy
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .config import ExperimentConfig, did_you_mean, parse, short, to_dict
from .errors import ConfigError

BASELINE = "baseline"
STUDY_KEYS = ("name", "description", "base", "data", "model", "protocol", "variants")
VARIANT_KEYS = ("description", "set")
NAME_RULE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
NAME_HELP = "1-64 letters, digits, '-', '_' or '.', starting with a letter or digit"
MAX_FILE_BYTES = 4 * 2**20  # a study file is a page of YAML; this is generous
MAX_VALUES = 200_000  # values in a study once YAML aliases are expanded (a billion-laughs guard)
MAX_VARIANTS = 1000
MAX_BASE_DEPTH = 16


@dataclass(frozen=True)
class Variant:
    name: str  # identifier used in reports, MLflow tags and --set paths
    description: str  # what the change is, in words
    overrides: dict[str, Any]  # dotted path -> value, applied to the baseline
    config: ExperimentConfig  # the resolved configuration


@dataclass(frozen=True)
class Cell:
    variant: Variant
    seed: int
    hash: str  # content hash of the resolved config and seed

    @property
    def config(self) -> ExperimentConfig:
        return self.variant.config

    @property
    def label(self) -> str:
        return f"{self.variant.name}/seed{self.seed}"


@dataclass(frozen=True)
class Study:
    name: str
    description: str
    variants: tuple[Variant, ...]  # the baseline first
    source: Path | None = None  # the YAML file it came from

    @property
    def baseline(self) -> Variant:
        return self.variants[0]

    def cells(self) -> list[Cell]:
        """Every (variant, seed) pair, baseline first, in a stable order."""
        return [Cell(v, seed, cell_hash(v.config, seed))
                for v in self.variants for seed in v.config.protocol.seeds]


def config_key(config: ExperimentConfig) -> dict:
    """What makes two configs train the same cell for a given seed: everything but the seed list.

    The layout is frozen as it was first hashed (augmentation under data), so ledgers and
    checkpoints written by earlier versions keep their cells."""
    data = to_dict(config)
    del data["protocol"]["seeds"]  # a cell's identity is its own seed, not the study's list
    data["data"]["augment"] = data["protocol"].pop("augment")
    return data


def cell_hash(config: ExperimentConfig, seed: int) -> str:
    """A short, stable hash of everything that determines a cell's result."""
    payload = json.dumps({"config": config_key(config), "seed": seed}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


# --- reading YAML safely ----------------------------------------------------------------------

class _StrictLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses duplicate keys (YAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
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


def read_yaml(path: Path) -> Any:
    """A YAML file as plain data, with one-line errors for every way it can be unusable."""
    if not path.is_file():
        what = "is not a file" if path.exists() else "study file not found (the studies/ folder has examples)"
        raise ConfigError(f"{path}: {what}")
    if path.stat().st_size > MAX_FILE_BYTES:
        raise ConfigError(f"{path}: {path.stat().st_size:,} bytes; a study file must be under {MAX_FILE_BYTES:,}")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte {err.start}); is it really a study file?") from None
    try:
        raw = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        problem = str(getattr(err, "problem", None) or err).splitlines()[0][:200]
        raise ConfigError(f"{path}:{where} is not valid YAML ({problem})") from None
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply to be a study file") from None
    _check_size(raw, path)
    return raw


def _check_size(raw: Any, path: Path) -> None:
    """Refuse data that expands to more than MAX_VALUES values or nests deeper than 64 levels.

    YAML aliases share one object, so a 'billion laughs' file loads small and explodes only
    when walked; this walk stops at the limit instead."""
    stack, count = [(raw, 0)], 0
    while stack:
        node, depth = stack.pop()
        count += 1
        if count > MAX_VALUES or depth > 64:
            why = f"expands to more than {MAX_VALUES:,} values" if count > MAX_VALUES else "nests deeper than 64 levels"
            raise ConfigError(f"{path}: {why} (YAML aliases or anchors?); a study file is a few dozen lines")
        if isinstance(node, dict):
            stack += [(v, depth + 1) for v in node.values()] + [(k, depth + 1) for k in node]
        elif isinstance(node, list):
            stack += [(v, depth + 1) for v in node]


def _read_with_bases(path: Path, chain: tuple[Path, ...] = ()) -> dict:
    """The study file with its `base:` studies (relative to the file) deep-merged under it."""
    resolved = path.resolve()
    if resolved in chain:
        cycle = " -> ".join(p.name for p in (*chain, resolved))
        raise ConfigError(f"{path}: base: studies form a cycle ({cycle}); remove one base:")
    if len(chain) >= MAX_BASE_DEPTH:
        raise ConfigError(f"{path}: more than {MAX_BASE_DEPTH} levels of base: studies")
    raw = read_yaml(path)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping with keys {', '.join(STUDY_KEYS)}, got {short(raw)}")
    base = raw.get("base")
    if base is None:
        return raw
    if not isinstance(base, str) or not base.strip():
        raise ConfigError(f"{path}: base: expected a study file name, e.g. base: paper11.yaml")
    base_path = path.parent / base
    if not base_path.is_file():
        raise ConfigError(f"{path}: base: {base_path} not found (relative to the study file)")
    parent = _read_with_bases(base_path, (*chain, resolved))
    parent.pop("name", None)  # a study's name is its own, never inherited
    parent.pop("base", None)
    child = {k: v for k, v in raw.items() if k != "base"}
    return merge_studies(parent, child)


def merge_studies(parent: dict, child: dict) -> dict:
    """Deep-merge child over parent; under `variants:`, a variant set to null is dropped."""
    merged = _deep_merge(parent, child)
    variants = child.get("variants")
    if isinstance(variants, dict) and isinstance(merged.get("variants"), dict):
        merged["variants"] = {k: v for k, v in merged["variants"].items()
                              if not (k in variants and variants[k] is None)}
    return merged


def _deep_merge(base: Any, over: Any) -> Any:
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for key, value in over.items():
            out[key] = _deep_merge(base[key], value) if key in base else value
        return out
    return over


# --- from data to a validated study -------------------------------------------------------------

def load_study(path: str | Path, overrides: dict[str, Any] | None = None) -> Study:
    """Read and validate a study YAML (with its bases); `overrides` (dotted paths) change the baseline."""
    path = Path(path)
    return study_from_dict(_read_with_bases(path), overrides or {}, source=path)


def study_from_dict(raw: Any, overrides: dict[str, Any], source: Path | None = None) -> Study:
    if not isinstance(raw, dict):
        raise ConfigError(f"study: expected a mapping with keys {', '.join(STUDY_KEYS)}, got {short(raw)}")
    for key in raw:
        if key not in STUDY_KEYS:
            raise ConfigError(f"{short(key)}: unknown key{did_you_mean(str(key), STUDY_KEYS)}")
    name = raw.get("name")
    if not isinstance(name, str) or not NAME_RULE.fullmatch(name):
        raise ConfigError(f"name: {short(name)} is not a study name; use {NAME_HELP} (e.g. name: paper11)")
    base = to_dict(ExperimentConfig())
    for section in ("data", "model", "protocol"):
        if raw.get(section) is not None:
            base[section] = _deep_merge(base[section], raw[section])
    for dotted, value in overrides.items():
        set_dotted(base, dotted, value)
    variants = [Variant(BASELINE, "the paper's baseline", {}, parse(ExperimentConfig, base))]
    raw_variants = raw.get("variants") or {}
    if not isinstance(raw_variants, dict):
        raise ConfigError("variants: expected a mapping of name -> {description, set}")
    if len(raw_variants) >= MAX_VARIANTS:
        raise ConfigError(f"variants: {len(raw_variants):,} variants; at most {MAX_VARIANTS - 1:,} are "
                          "supported in one study (split it into several)")
    for vname, spec in raw_variants.items():
        variants.append(_variant(vname, spec, base))
    _refuse_identical(variants)
    return Study(name, _text(raw.get("description", ""), "description"), tuple(variants), source)


def _variant(name: Any, spec: Any, base: dict) -> Variant:
    where = f"variants.{short(name) if not isinstance(name, str) else name[:64]}"
    if not isinstance(name, (str, int)) or isinstance(name, bool) or not NAME_RULE.fullmatch(str(name)):
        raise ConfigError(f"{where}: not a variant name; use {NAME_HELP}")
    name = str(name)
    if name == BASELINE:
        raise ConfigError(f"{where}: 'baseline' is reserved for the unmodified model; pick another name")
    if not isinstance(spec, dict) or not isinstance(spec.get("set"), dict) or not spec["set"]:
        raise ConfigError(f"{where}: expected {{description: ..., set: {{dotted.path: value}}}}")
    for key in spec:
        if key not in VARIANT_KEYS:
            raise ConfigError(f"{where}.{short(key)}: unknown key{did_you_mean(str(key), VARIANT_KEYS)}")
    resolved = copy.deepcopy(base)
    for dotted, value in spec["set"].items():
        set_dotted(resolved, dotted, value, prefix=f"{where}.")
    config = parse(ExperimentConfig, resolved, where)
    return Variant(name, _text(spec.get("description", ""), f"{where}.description"), dict(spec["set"]), config)


def _text(value: Any, where: str) -> str:
    if not isinstance(value, (str, int, float)) or isinstance(value, bool):
        raise ConfigError(f"{where}: expected text, got {short(value)}")
    return str(value).strip()


def _refuse_identical(variants: list[Variant]) -> None:
    """Two rows of a study that would train the same cells are an error naming both: otherwise
    one would silently take the other's results (and the baseline could lose its cells)."""
    seen: dict[str, str] = {}
    for v in variants:
        key = json.dumps(config_key(v.config), sort_keys=True)
        if key in seen:
            raise ConfigError(f"variants.{v.name}: the same configuration as {seen[key]} (after overrides); "
                              f"a variant must change something — remove it or change its set:")
        seen[key] = v.name


def set_dotted(tree: dict, dotted: Any, value: Any, prefix: str = "") -> None:
    """Set `a.b.0.c` in nested plain data (missing keys are created: config.parse names unknown
    ones); a list index that does not exist, or a path through a value, is an error."""
    if not isinstance(dotted, str) or not dotted:
        raise ConfigError(f"{prefix}{short(dotted)}: expected a dotted path such as model.transformer.depth")
    parts = dotted.split(".")
    node: Any = tree
    for i, part in enumerate(parts):
        here = prefix + ".".join(parts[: i + 1])
        last = i == len(parts) - 1
        if isinstance(node, dict):
            if last:
                node[part] = _deep_merge(node[part], value) if isinstance(node.get(part), dict) else value
            node = node.setdefault(part, {})
        elif isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"{here}: no item {short(part)}; valid indices are 0..{len(node) - 1}")
            if last:
                old = node[int(part)]
                node[int(part)] = _deep_merge(old, value) if isinstance(old, dict) else value
            node = node[int(part)]
        else:
            raise ConfigError(f"{here}: {prefix}{'.'.join(parts[:i])} is a value, not a mapping")


def parse_assignments(pairs: list[str]) -> dict[str, Any]:
    """`key=value` strings (CLI --set) into a dict; values are parsed as YAML."""
    result = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {pair}: expected key=value, e.g. model.transformer.depth=3")
        try:
            result[key.strip()] = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError:
            raise ConfigError(f"--set {pair}: the value is not valid YAML") from None
    return result


def changed_paths(variant: Variant, width: int = 48) -> str:
    """The variant's overrides in one short line, for tables."""
    text = ", ".join(f"{k.removeprefix('model.')}={json.dumps(v, separators=(',', ':'))}"
                     for k, v in variant.overrides.items())
    return (text[: width - 3] + "...") if len(text) > width else text or "-"
