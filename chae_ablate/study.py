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
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from .config import AnalysisConfig, ExperimentConfig, Knob, SearchConfig, did_you_mean, key_text, parse, short, to_dict
from .errors import ConfigError
from .space import parse_space

BASELINE = "baseline"
STUDY_KEYS = ("name", "description", "base", "data", "model", "protocol", "analysis", "search", "variants")
VARIANT_KEYS = ("description", "set")
NAME_RULE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
INDEX_RULE = re.compile(r"0|[1-9][0-9]{0,5}")  # one spelling per list item: not 00, not '²'
NAME_HELP = "1-64 letters, digits, '-', '_' or '.', starting with a letter or digit"
MAX_FILE_BYTES = 2**19  # a page of YAML; 999 variants take ~150 kB; parsing 512 kB of `1,1,...` ~2 s
MAX_VALUES = 200_000  # values in a study once YAML aliases are expanded (a billion-laughs guard)
MAX_VARIANTS = 1000
MAX_BASE_DEPTH = 8  # levels of base: (each error names every file on the way, so keep it short)


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
    config: ExperimentConfig  # the variant's config, with this seed's split when the split varies
    hash: str  # content hash of the resolved config and seed

    @property
    def label(self) -> str:
        return f"{self.variant.name}/seed{self.seed}"


@dataclass(frozen=True)
class Study:
    name: str
    description: str
    variants: tuple[Variant, ...]  # the baseline first
    source: Path | None = None  # the YAML file it came from
    analysis: AnalysisConfig = AnalysisConfig()  # how the study decides; see analysis.py
    search: SearchConfig | None = None  # `chae-ablate search` settings, when the file has search:
    space: tuple[Knob, ...] = ()  # the search space
    base_data: dict = field(default_factory=dict, repr=False, compare=False)  # the baseline as plain data

    def config_with(self, overrides: dict[str, Any], where: str = "trial") -> ExperimentConfig:
        """The baseline with dotted-path overrides, validated (ConfigError when the builder rejects it)."""
        return parse(ExperimentConfig, with_overrides(self.base_data, overrides, where), where)

    @property
    def baseline(self) -> Variant:
        return self.variants[0]

    def seeds(self, variant: Variant) -> list[int]:
        """The seeds a variant may use, in draw order: its protocol.seeds, or for an adaptive study
        the baseline's protocol.seeds extended with the next unused integers to max_seeds."""
        if self.analysis.adaptive:
            return seed_sequence(self.baseline.config.protocol.seeds, self.analysis.max_seeds)
        return list(variant.config.protocol.seeds)

    def cells(self) -> list[Cell]:
        """Every cell the study may run (an adaptive study runs only some), baseline first, in a
        stable order."""
        out = []
        for v in self.variants:
            for seed in self.seeds(v):
                config = v.config
                if self.analysis.vary_split:  # the seed draws the split too
                    config = replace(config, data=replace(config.data, split_seed=seed))
                out.append(Cell(v, seed, config, cell_hash(config, seed)))
        return out


def seed_sequence(first: Sequence[int], length: int) -> list[int]:
    """`first`, then the integers after its largest, `length` seeds in all (so a sequence that
    starts at fresh seeds, e.g. a confirmation's 1000, stays fresh)."""
    out = list(dict.fromkeys(first))[:length]
    return out + list(range(max(out, default=-1) + 1, max(out, default=-1) + 1 + length - len(out)))


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


def shown(path: Path) -> str:
    """A file path as errors show it: as given, or as a short repr when it is long or unprintable."""
    text = str(path)
    return text if text.isprintable() and len(text) <= 200 else short(text, 200)


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


def _read_with_bases(path: Path, chain: tuple[Path, ...] = ()) -> dict:
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
        parent = _read_with_bases(base_path, chain)
    except ConfigError as err:  # name the file whose base: it is
        raise ConfigError(f"{shown(path)}: base: {err}") from None
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
            raise ConfigError(f"{key_text(key)}: unknown key{did_you_mean(str(key), STUDY_KEYS)}")
    name = check_name(raw.get("name"), "name: ")
    base = to_dict(ExperimentConfig())
    for section in ("data", "model", "protocol"):
        if raw.get(section) is not None:  # a copy: --set must not write through YAML aliases into variants
            base[section] = _deep_merge(base[section], copy.deepcopy(raw[section]))
    analysis = copy.deepcopy(raw.get("analysis") or {})
    for dotted, value in overrides.items():
        if isinstance(dotted, str) and dotted.startswith("analysis."):
            set_dotted(analysis, dotted.removeprefix("analysis."), value, prefix="analysis.")
        else:
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
    _refuse_same_names(variants)
    _refuse_identical(variants)
    analysis_config = parse(AnalysisConfig, analysis, "analysis")
    if analysis_config.adaptive:
        _refuse_own_seeds(variants)
    search, space = _search(raw.get("search"), base)
    return Study(name, _text(raw.get("description", ""), "description"), tuple(variants), source, analysis_config,
                 search, space, base)


def _search(raw: Any, base: dict) -> tuple[SearchConfig | None, tuple[Knob, ...]]:
    """The search: section, if any: its settings and its space."""
    if raw is None:
        return None, ()
    if not isinstance(raw, dict):
        raise ConfigError(f"search: expected a mapping with a space: and settings, got {short(raw)}")
    settings = {k: v for k, v in raw.items() if k != "space"}
    return parse(SearchConfig, settings, "search"), parse_space(raw.get("space"), base)


def _refuse_own_seeds(variants: list[Variant]) -> None:
    """An adaptive study draws every variant's seeds from one sequence, so that they pair."""
    for v in variants[1:]:
        if v.config.protocol.seeds != variants[0].config.protocol.seeds:
            raise ConfigError(f"variants.{v.name}.protocol.seeds: cannot differ from the baseline's in an adaptive "
                              "study (analysis.adaptive draws every variant's seeds from one sequence)")


def check_name(name: Any, where: str = "") -> str:
    """A study name, which names folders and the MLflow experiment: NAME_RULE, so never '.' or '..'."""
    if not isinstance(name, str) or not NAME_RULE.fullmatch(name):
        raise ConfigError(f"{where}{short(name)} is not a study name; use {NAME_HELP} (e.g. paper11)")
    return name


def _variant(name: Any, spec: Any, base: dict) -> Variant:
    where = f"variants.{key_text(name)}"
    if not isinstance(name, (str, int)) or isinstance(name, bool) or not NAME_RULE.fullmatch(str(name)):
        raise ConfigError(f"{where}: not a variant name; use {NAME_HELP}")
    name = str(name)
    if name == BASELINE:
        raise ConfigError(f"{where}: 'baseline' is reserved for the unmodified model; pick another name")
    if not isinstance(spec, dict) or not isinstance(spec.get("set"), dict) or not spec["set"]:
        raise ConfigError(f"{where}: expected {{description: ..., set: {{dotted.path: value}}}}")
    for key in spec:
        if key not in VARIANT_KEYS:
            raise ConfigError(f"{where}.{key_text(key)}: unknown key{did_you_mean(str(key), VARIANT_KEYS)}")
    resolved = with_overrides(base, spec["set"], where)
    _refuse_overlaps(list(spec["set"]), f"{where}.set")
    config = parse(ExperimentConfig, resolved, where)
    return Variant(name, _text(spec.get("description", ""), f"{where}.description"), dict(spec["set"]), config)


def _text(value: Any, where: str) -> str:
    if not isinstance(value, (str, int, float)) or isinstance(value, bool):
        raise ConfigError(f"{where}: expected text, got {short(value)}")
    return str(value).strip()


def _refuse_same_names(variants: list[Variant]) -> None:
    """YAML reads `1:` and `'1':` as two keys; as variant names (folders, MLflow tags) they are one."""
    seen: set[str] = set()
    for v in variants:
        if v.name in seen:
            raise ConfigError(f"variants.{v.name}: two variants have this name (1 and '1'?); rename one")
        seen.add(v.name)


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


def _refuse_overlaps(paths: list[str], where: str) -> None:
    """Two paths of one set: where one contains the other (`model.transformer` and
    `model.transformer.depth`) are an error: the later would silently replace part of the earlier,
    and the replaced value would be shown in tables without ever being validated."""
    ordered = sorted(path.split(".") for path in paths)
    for a, b in zip(ordered, ordered[1:]):
        if b[: len(a)] == a:
            a, b = (".".join(map(key_text, p)) for p in (a, b))
            raise ConfigError(f"{where}: {a} and {b} overlap; set one or the other")


def with_overrides(base: dict, overrides: dict, where: str) -> dict:
    """A copy of the baseline's plain data with dotted-path overrides set (not yet validated):
    what a variant's set: and a search trial's knobs both resolve through."""
    data = copy.deepcopy(base)
    for dotted, value in overrides.items():
        set_dotted(data, dotted, value, prefix=f"{where}.")
    return data


def set_dotted(tree: dict, dotted: Any, value: Any, prefix: str = "") -> None:
    """Set `a.b.0.c` in nested plain data (missing keys are created: config.parse names unknown
    ones); a list index that does not exist, or a path through a value, is an error. The value is
    copied in, so later paths never write through a YAML alias into another variant."""
    if not isinstance(dotted, str) or not dotted:
        raise ConfigError(f"{prefix}{short(dotted)}: expected a dotted path such as model.transformer.depth")
    parts = dotted.split(".")

    def here(i: int) -> str:  # built only for an error: a path of 100,000 parts stays linear
        return prefix + ".".join(key_text(p) for p in parts[:i])

    node: Any = tree
    for i, part in enumerate(parts):
        if isinstance(node, list):
            if not INDEX_RULE.fullmatch(part) or int(part) >= len(node):
                valid = f"valid indices are 0..{len(node) - 1}" if node else "the list is empty"
                raise ConfigError(f"{here(i + 1)}: no item {short(part)}; {valid}")
            part = int(part)
        elif not isinstance(node, dict):
            raise ConfigError(f"{here(i + 1)}: {here(i)} is a value, not a mapping")
        if i == len(parts) - 1:
            old = node[part] if isinstance(node, list) else node.get(part)
            node[part] = _deep_merge(old, copy.deepcopy(value)) if isinstance(old, dict) else copy.deepcopy(value)
        elif isinstance(node, dict):
            node = node.setdefault(part, {})
        else:
            node = node[part]


def parse_assignments(pairs: list[str]) -> dict[str, Any]:
    """`key=value` strings (CLI --set) into a dict; values are parsed as YAML."""
    result = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {key_text(pair)}: expected key=value, e.g. model.transformer.depth=3")
        data = value.encode("utf-8", "surrogateescape")  # argv may hold bytes that are not UTF-8
        result[key.strip()] = load_yaml(data, f"--set {key_text(pair)}") if value.strip() else ""
    return result


def changed_paths(variant: Variant, width: int = 48) -> str:
    """The variant's overrides in one short line, for tables."""
    text = ", ".join(f"{k.removeprefix('model.')}={json.dumps(v, separators=(',', ':'))}"
                     for k, v in variant.overrides.items())
    return (text[: width - 3] + "...") if len(text) > width else text or "-"
