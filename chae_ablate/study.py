"""Study files: a baseline plus named variants, each a set of dotted-path overrides.

A study expands into cells (variant x seed). Each cell carries its fully resolved
ExperimentConfig and a content hash of it, which is the cell's identity in the ledger.
"""
from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .config import ExperimentConfig, did_you_mean, parse, to_dict
from .errors import ConfigError

BASELINE = "baseline"
STUDY_KEYS = ("name", "description", "data", "model", "protocol", "variants")
VARIANT_KEYS = ("description", "set")


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


def cell_hash(config: ExperimentConfig, seed: int) -> str:
    """A short, stable hash of everything that determines a cell's result."""
    data = to_dict(config)
    del data["protocol"]["seeds"]  # a cell's identity is its own seed, not the study's list
    payload = json.dumps({"config": data, "seed": seed}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def load_study(path: str | Path, overrides: dict[str, Any] | None = None) -> Study:
    """Read and validate a study YAML; `overrides` (dotted paths) change the baseline."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: study file not found (the studies/ folder has examples)")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{where} is not valid YAML ({getattr(err, 'problem', err)})") from None
    return study_from_dict(raw, overrides or {}, source=path)


def study_from_dict(raw: Any, overrides: dict[str, Any], source: Path | None = None) -> Study:
    if not isinstance(raw, dict):
        raise ConfigError("study: expected a mapping with keys " + ", ".join(STUDY_KEYS))
    for key in raw:
        if key not in STUDY_KEYS:
            raise ConfigError(f"{key}: unknown key{did_you_mean(str(key), STUDY_KEYS)}")
    name = raw.get("name")
    if not isinstance(name, str) or not name.strip() or "/" in name:
        raise ConfigError("name: required, a non-empty string without '/' (e.g. name: paper11)")
    base = to_dict(ExperimentConfig())
    for section in ("data", "model", "protocol"):
        if raw.get(section) is not None:
            base[section] = _merge(base[section], raw[section], section)
    for dotted, value in overrides.items():
        set_dotted(base, dotted, value, prefix="--set ")
    variants = [Variant(BASELINE, "the paper's baseline", {}, parse(ExperimentConfig, base))]
    raw_variants = raw.get("variants") or {}
    if not isinstance(raw_variants, dict):
        raise ConfigError("variants: expected a mapping of name -> {description, set}")
    for vname, spec in raw_variants.items():
        variants.append(_variant(str(vname), spec, base))
    return Study(name.strip(), str(raw.get("description", "")).strip(), tuple(variants), source)


def _variant(name: str, spec: Any, base: dict) -> Variant:
    where = f"variants.{name}"
    if name == BASELINE:
        raise ConfigError(f"{where}: 'baseline' is reserved for the unmodified model; pick another name")
    if not isinstance(spec, dict) or not isinstance(spec.get("set"), dict) or not spec["set"]:
        raise ConfigError(f"{where}: expected {{description: ..., set: {{dotted.path: value}}}}")
    for key in spec:
        if key not in VARIANT_KEYS:
            raise ConfigError(f"{where}.{key}: unknown key{did_you_mean(str(key), VARIANT_KEYS)}")
    resolved = copy.deepcopy(base)
    for dotted, value in spec["set"].items():
        set_dotted(resolved, str(dotted), value, prefix=f"{where}.set.")
    try:
        config = parse(ExperimentConfig, resolved)
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None
    return Variant(name, str(spec.get("description", "")).strip(), dict(spec["set"]), config)


def _merge(default: Any, given: Any, path: str) -> Any:
    """Deep-merge user data over defaults, rejecting unknown keys with their full path."""
    if isinstance(default, dict):
        if not isinstance(given, dict):
            raise ConfigError(f"{path}: expected a mapping, got {type(given).__name__} {given!r}")
        merged = dict(default)
        for key, value in given.items():
            if key not in default:
                raise ConfigError(f"{path}.{key}: unknown key{did_you_mean(str(key), default)}")
            merged[key] = _merge(default[key], value, f"{path}.{key}")
        return merged
    return given


def set_dotted(tree: dict, dotted: str, value: Any, prefix: str = "") -> None:
    """Set `a.b.0.c` in nested dicts/lists; unknown keys and bad indices are errors."""
    parts = dotted.split(".")
    node: Any = tree
    for i, part in enumerate(parts):
        here = prefix + ".".join(parts[: i + 1])
        last = i == len(parts) - 1
        if isinstance(node, dict):
            if part not in node:
                raise ConfigError(f"{here}: unknown key{did_you_mean(part, node)}")
            if last:
                node[part] = _merge(node[part], value, here) if isinstance(node[part], dict) else value
            node = node[part]
        elif isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"{here}: no item {part!r}; valid indices are 0..{len(node) - 1}")
            if last:
                old = node[int(part)]
                node[int(part)] = _merge(old, value, here) if isinstance(old, dict) else value
            node = node[int(part)]
        else:
            raise ConfigError(f"{here}: {'.'.join(parts[:i])} is a value, not a mapping")


def parse_assignments(pairs: list[str]) -> dict[str, Any]:
    """`key=value` strings (CLI --set) into a dict; values are parsed as YAML."""
    result = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {pair}: expected key=value, e.g. model.transformer.depth=3")
        result[key.strip()] = yaml.safe_load(value) if value.strip() else ""
    return result


def changed_paths(variant: Variant, width: int = 48) -> str:
    """The variant's overrides in one short line, for tables."""
    text = ", ".join(f"{k.removeprefix('model.')}={json.dumps(v, separators=(',', ':'))}"
                     for k, v in variant.overrides.items())
    return (text[: width - 3] + "...") if len(text) > width else text or "-"
