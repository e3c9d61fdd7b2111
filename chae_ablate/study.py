"""Studies: a baseline plus named variants, each a set of dotted-path overrides, and their cells.

A study file is read as plain data (studyfile.py: `base:` files deep-merged under it), --set
overrides are applied to the baseline and each variant's `set:` on top, and only then is each
variant validated by config.parse: every error has one format, `variants.NAME.model.transformer.heads: ...`.
A study expands into cells (variant x seed); a cell's identity everywhere — ledger, MLflow,
checkpoints, report — is a content hash of its resolved config and seed, and a study's plan
(analysis.Plan) lists its cells by that hash.
"""
from __future__ import annotations

import copy
import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from . import builders
from .analysis import Plan
from .config import (CHAE, AnalysisConfig, ExperimentConfig, OtherModel, did_you_mean, dotted, item_index, key_text,
                     model_defaults, parse, short, to_dict)
from .errors import ConfigError
from .records import BASELINE, PlannedCell, cell_label
from .space import Knob, SearchConfig, parse_space
from .studyfile import STUDY_KEYS, deep_merge, load_yaml, read_study_file

VARIANT_KEYS = ("description", "set")
NAME_RULE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
NAME_HELP = "1-64 letters, digits, '-', '_' or '.', starting with a letter or digit"
MAX_VARIANTS = 1000


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
    cell_hash: str  # content hash of the resolved config and seed: the cell's identity

    @property
    def label(self) -> str:
        return cell_label(self.variant.name, self.seed)


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
        return experiment(with_overrides(self.base_data, overrides, where), where, self.home)

    @property
    def home(self) -> Path | None:
        """The study file's folder, where a user's model builder is looked for first."""
        return study_home(self.source)

    @property
    def baseline(self) -> Variant:
        return self.variants[0]

    def seeds(self, variant: Variant) -> list[int]:
        """The seeds a variant may use, in draw order: its protocol.seeds, or for an adaptive study
        the baseline's protocol.seeds extended with the next unused integers to max_seeds."""
        if self.analysis.adaptive:
            return seed_sequence(self.baseline.config.protocol.seeds, self.analysis.max_seeds)
        return list(variant.config.protocol.seeds)

    def cell(self, variant: Variant, seed: int) -> Cell:
        """The cell that trains `variant` with `seed` (a search trial's too): with the study's rules,
        e.g. the seed also draws the split when analysis.vary_split."""
        config = variant.config
        if self.analysis.vary_split:
            config = replace(config, data=replace(config.data, split_seed=seed))
        return Cell(variant, seed, config, cell_hash(config, seed))

    def cells(self) -> list[Cell]:
        """Every cell the study may run (an adaptive study runs only some), baseline first, in a
        stable order."""
        return [self.cell(v, seed) for v in self.variants for seed in self.seeds(v)]

    def plan(self) -> Plan:
        """This version of the study as analysis.outcome, the report and the version record read it."""
        return Plan(self.name, tuple(PlannedCell(c.cell_hash, c.variant.name, c.seed, c.variant.description)
                                     for c in self.cells()),
                    {v.name: tuple(self.seeds(v)) for v in self.variants}, self.analysis,
                    {v.name: dotted(to_dict(v.config)) for v in self.variants}, self.source_path)

    @property
    def source_path(self) -> str:
        """The study file, resolved, as versions record it ("" for a study built in code)."""
        return str(self.source.resolve()) if self.source else ""


def seed_sequence(first: Sequence[int], length: int) -> list[int]:
    """`first`, then the integers after its largest, `length` seeds in all (so a sequence that
    starts at fresh seeds, e.g. a confirmation's 1000, stays fresh)."""
    out = list(dict.fromkeys(first))[:length]
    return out + list(range(max(out, default=-1) + 1, max(out, default=-1) + 1 + length - len(out)))


def config_key(config: ExperimentConfig) -> dict:
    """What makes two configs train the same cell for a given seed: everything but the seed list
    (and where this machine found a builder's file: its content, source_sha, is the identity).

    The layout is frozen as it was first hashed (augmentation under data, CHAE's model section
    without a builder key), so ledgers and checkpoints written by earlier versions keep their cells."""
    data = to_dict(config)
    del data["protocol"]["seeds"]  # a cell's identity is its own seed, not the study's list
    data["data"]["augment"] = data["protocol"].pop("augment")
    data["model"].pop("source_file", None)
    return data


def study_home(source: Path | None) -> Path | None:
    """A study file's folder, where a user's model builder is looked for first."""
    return source.resolve().parent if source else None


def experiment(data: dict, where: str, home: Path | None) -> ExperimentConfig:
    """Plain data as a validated config whose model is checked against its builder (a user
    builder's file found, hashed and loaded from `home`, the study's folder, first)."""
    config = parse(ExperimentConfig, data, where)
    return replace(config, model=builders.bind(config.model, home, where))


def cell_hash(config: ExperimentConfig, seed: int) -> str:
    """A short, stable hash of everything that determines a cell's result."""
    payload = json.dumps({"config": config_key(config), "seed": seed}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def load_study(path: str | Path, overrides: dict[str, Any] | None = None) -> Study:
    """Read and validate a study YAML (with its bases); `overrides` (dotted paths) change the baseline."""
    path = Path(path)
    return study_from_dict(read_study_file(path), overrides or {}, source=path)


def study_from_dict(raw: Any, overrides: dict[str, Any], source: Path | None = None) -> Study:
    if not isinstance(raw, dict):
        raise ConfigError(f"study: expected a mapping with keys {', '.join(STUDY_KEYS)}, got {short(raw)}")
    for key in raw:
        if key not in STUDY_KEYS:
            raise ConfigError(f"{key_text(key)}: unknown key{did_you_mean(str(key), STUDY_KEYS)}")
    name = check_name(raw.get("name"), "name: ")
    base = to_dict(ExperimentConfig())
    if isinstance(raw.get("model"), dict) and raw["model"].get("builder", CHAE) != CHAE:
        base["model"] = model_defaults(raw["model"]["builder"])  # another builder: none of CHAE's knobs
    for section in ("data", "model", "protocol"):
        if raw.get(section) is not None:  # a copy: --set must not write through YAML aliases into variants
            base[section] = deep_merge(base[section], copy.deepcopy(raw[section]))
    analysis = copy.deepcopy(raw.get("analysis") or {})
    for path, value in overrides.items():
        if isinstance(path, str) and path.startswith("analysis."):
            set_dotted(analysis, path.removeprefix("analysis."), value, prefix="analysis.")
        else:
            set_dotted(base, path, value)
    home = study_home(source)
    baseline = experiment(base, "", home)
    about = f"the baseline ({baseline.model.builder})" if isinstance(baseline.model, OtherModel) else "the paper's baseline"
    variants = [Variant(BASELINE, about, {}, baseline)]
    raw_variants = raw.get("variants") or {}
    if not isinstance(raw_variants, dict):
        raise ConfigError("variants: expected a mapping of name -> {description, set}")
    if len(raw_variants) >= MAX_VARIANTS:
        raise ConfigError(f"variants: {len(raw_variants):,} variants; at most {MAX_VARIANTS - 1:,} are "
                          "supported in one study (split it into several)")
    for vname, spec in raw_variants.items():
        variants.append(_variant(vname, spec, base, home))
    _refuse_same_names(variants)
    _refuse_identical(variants)
    analysis_config = parse(AnalysisConfig, analysis, "analysis")
    if analysis_config.adaptive:
        _refuse_own_seeds(variants)
    search, space = _search(raw.get("search"), base, home)
    return Study(name, _text(raw.get("description", ""), "description"), tuple(variants), source, analysis_config,
                 search, space, base)


def _search(raw: Any, base: dict, home: Path | None) -> tuple[SearchConfig | None, tuple[Knob, ...]]:
    """The search: section, if any: its settings and its space (a knob of a builder's kwargs is
    checked against the builder's signature here, not found rejected in every trial)."""
    if raw is None:
        return None, ()
    if not isinstance(raw, dict):
        raise ConfigError(f"search: expected a mapping with a space: and settings, got {short(raw)}")
    settings = {k: v for k, v in raw.items() if k != "space"}
    space = parse_space(raw.get("space"), base)
    names = {knob.path.removeprefix(KWARGS).split(".")[0]: None for knob in space if knob.path.startswith(KWARGS)}
    if names:  # the names alone: the builder's signature decides, whatever values a trial draws
        builders.bind(parse(OtherModel, {**base["model"], "kwargs": names}, "search.space.model"), home, "search.space")
    return parse(SearchConfig, settings, "search"), space


KWARGS = "model.kwargs."  # where a non-CHAE builder's knobs live


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


def _variant(name: Any, spec: Any, base: dict, home: Path | None) -> Variant:
    where = f"variants.{key_text(name)}"
    if not isinstance(name, (str, int)) or isinstance(name, bool) or not NAME_RULE.fullmatch(str(name)):
        raise ConfigError(f"{where}: not a variant name; use {NAME_HELP}")
    name = str(name)
    if name == BASELINE:
        raise ConfigError(f"{where}: '{BASELINE}' is reserved for the unmodified model; pick another name")
    if not isinstance(spec, dict) or not isinstance(spec.get("set"), dict) or not spec["set"]:
        raise ConfigError(f"{where}: expected {{description: ..., set: {{dotted.path: value}}}}")
    for key in spec:
        if key not in VARIANT_KEYS:
            raise ConfigError(f"{where}.{key_text(key)}: unknown key{did_you_mean(str(key), VARIANT_KEYS)}")
    resolved = with_overrides(base, spec["set"], where)
    _refuse_overlaps(list(spec["set"]), f"{where}.set")
    config = experiment(resolved, where, home)
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
    for path, value in overrides.items():
        set_dotted(data, path, value, prefix=f"{where}.")
    return data


def set_dotted(tree: dict, path: Any, value: Any, prefix: str = "") -> None:
    """Set `a.b.0.c` in nested plain data (missing keys are created: config.parse names unknown
    ones); a list index that does not exist, or a path through a value, is an error. The value is
    copied in, so later paths never write through a YAML alias into another variant."""
    if not isinstance(path, str) or not path:
        raise ConfigError(f"{prefix}{short(path)}: expected a dotted path such as model.transformer.depth")
    parts = path.split(".")

    def here(i: int) -> str:  # built only for an error: a path of 100,000 parts stays linear
        return prefix + ".".join(key_text(p) for p in parts[:i])

    if path == "model.builder" and isinstance(tree.get("model"), dict):
        _switch_builder(tree, value)
    node: Any = tree
    for i, part in enumerate(parts):
        if isinstance(node, list):
            part = item_index(part, node, here(i + 1))
        elif not isinstance(node, dict):
            raise ConfigError(f"{here(i + 1)}: {here(i)} is a value, not a mapping")
        if i == len(parts) - 1:
            old = node[part] if isinstance(node, list) else node.get(part)
            node[part] = deep_merge(old, copy.deepcopy(value)) if isinstance(old, dict) else copy.deepcopy(value)
        elif isinstance(node, dict):
            node = node.setdefault(part, {})
        else:
            node = node[part]


def _switch_builder(tree: dict, builder: Any) -> None:
    """A variant (or --set) that names another builder starts from that builder's defaults: none of
    the other's knobs carry over, only the input resolution."""
    model = tree["model"]
    if isinstance(builder, str) and builder != model.get("builder", CHAE):
        tree["model"] = {**model_defaults(builder), "resolution": model.get("resolution", 256)}


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
