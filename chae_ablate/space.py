"""A search: its settings and its space, knobs over the same dotted paths as variants, validated like
the rest of a study.

    search:
      space:
        model.transformer.depth: [1, 2, 3]                  # categorical: a list of values
        model.conv.stages.0.kernel: {low: 3, high: 7, step: 2}   # int range (both bounds ints)
        protocol.lr: {low: 1.0e-4, high: 1.0e-2, log: true}     # float range, log scale

A path must exist in the baseline (as for `set:`) or name an argument of the builder
(model.kwargs.NAME); a combination the builder rejects (heads not dividing dim, ...) is not an
error here: the search records it as rejected, with its reason.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .config import at_most, did_you_mean, item_index, key_text, number_hint, one_of, positive, seed_range, short
from .errors import ConfigError
from .ledger import PRUNERS, SAMPLERS


@dataclass(frozen=True)
class Knob:
    """One dimension of a search space: a dotted path (as in a variant's set:) and its values."""

    path: str  # e.g. model.transformer.depth
    choices: tuple = ()  # categorical values (scalars); empty for a range
    low: float | None = None  # range bounds, inclusive; ints when both are ints
    high: float | None = None
    step: float | None = None  # range step (ints: default 1; floats: continuous when none)
    log: bool = False  # sample the range on a log scale

    @property
    def integer(self) -> bool:
        return not self.choices and all(isinstance(v, int) and not isinstance(v, bool) for v in (self.low, self.high))


@dataclass(frozen=True)
class SearchConfig:
    """`chae-ablate search`: Optuna explores the knobs, then the best are re-tested on fresh seeds."""

    trials: int = 20  # trials trained (rejected combinations do not count; the report counts them)
    sampler: str = "tpe"  # tpe (multivariate, grouped) | gp | random
    seeds: tuple[int, ...] = (0,)  # seeds of every trial (and of the baseline it is pruned against)
    pruner: str = "baseline"  # baseline (worse than the baseline's curve by > margin) | median | hyperband | none
    top_k: int = 3  # the best configurations, re-tested as variants against the baseline on fresh seeds
    confirm_seed: int = 1000  # first seed of the confirmation study (fresh: never used by a trial)

    def check(self) -> list[tuple[str, str]]:
        errors = positive(self, "trials", "top_k") + at_most(self, trials=10_000, top_k=50)
        errors += one_of(self, "sampler", SAMPLERS) + one_of(self, "pruner", PRUNERS)
        if not self.seeds:
            errors.append(("seeds", "is empty; give at least one seed, e.g. [0]"))
        for i, seed in enumerate(self.seeds):
            errors += seed_range(self, f"seeds.{i}", seed)
        errors += seed_range(self, "confirm_seed", self.confirm_seed)
        if self.confirm_seed <= max(self.seeds, default=0):
            errors.append(("confirm_seed", f"{self.confirm_seed} must be above every search seed "
                           "(the confirmation uses fresh seeds)"))
        return errors


RANGE_KEYS = ("low", "high", "step", "log")
MAX_KNOBS = 32
MAX_CHOICES = 1000


def parse_space(raw: Any, base: dict, where: str = "search.space") -> tuple[Knob, ...]:
    """The knobs of `raw` (the space: mapping), each path checked against the baseline's data."""
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"{where}: expected a mapping of dotted.path -> [values] or {{low, high, step, log}}")
    if len(raw) > MAX_KNOBS:
        raise ConfigError(f"{where}: {len(raw)} knobs; at most {MAX_KNOBS} are supported")
    knobs = []
    for path, spec in raw.items():
        here = f"{where}.{key_text(path)}"
        current = check_path(base, path, here)
        knobs.append(_choices(path, spec, here, current) if isinstance(spec, list) else _range(path, spec, here))
    return tuple(knobs)


def check_path(base: dict, path: Any, where: str) -> Any:
    """`path` names an existing value of the baseline's plain data (a key, or a list index): that
    value (None for a builder's argument)."""
    if not isinstance(path, str) or not path:
        raise ConfigError(f"{where}: expected a dotted path such as model.transformer.depth")
    if path.startswith("model.kwargs.") and "kwargs" in base["model"]:
        return None  # another builder's argument, perhaps left at its default: its signature decides (study._search)
    node: Any = base
    for part in path.split("."):
        if isinstance(node, dict):
            if part not in node:
                raise ConfigError(f"{where}: unknown key {short(part)}{did_you_mean(part, node)}")
            node = node[part]
        elif isinstance(node, list):
            node = node[item_index(part, node, where)]
        else:
            raise ConfigError(f"{where}: {short(part)} goes through a value, not a mapping")
    return node


def _choices(path: str, values: list, where: str, current: Any) -> Knob:
    if not values:
        raise ConfigError(f"{where}: empty list; give at least one value")
    if len(values) > MAX_CHOICES:
        raise ConfigError(f"{where}: {len(values)} values; at most {MAX_CHOICES} are supported")
    numeric = isinstance(current, (int, float)) and not isinstance(current, bool)  # the baseline's value is a number
    for value in values:
        if value is not None and not isinstance(value, (bool, int, float, str)):
            raise ConfigError(f"{where}: {short(value)} is not a single value (numbers, text, true/false)")
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{where}: {value} is not a finite number")
        if numeric and (hint := number_hint(float, value)):
            raise ConfigError(f"{where}: {short(value)} is text, not a number{hint}")
    if len({repr(v) for v in values}) != len(values):
        raise ConfigError(f"{where}: a value appears twice")
    return Knob(path, choices=tuple(values))


def _range(path: str, spec: Any, where: str) -> Knob:
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: expected [values] or {{low: ..., high: ...}}, got {short(spec)}")
    for key in spec:
        if key not in RANGE_KEYS:
            raise ConfigError(f"{where}.{key_text(key)}: unknown key{did_you_mean(str(key), RANGE_KEYS)}")
    for key in ("low", "high"):
        value = spec.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{where}.{key}: expected a finite number, got {short(value)}")
    low, high, step, log = spec["low"], spec["high"], spec.get("step"), spec.get("log", False)
    if not isinstance(log, bool):
        raise ConfigError(f"{where}.log: expected true or false, got {short(log)}")
    if not low < high:
        raise ConfigError(f"{where}: empty range (low {low} must be below high {high})")
    if log and low <= 0:
        raise ConfigError(f"{where}.low: a log range needs low > 0, got {low}")
    if step is not None:
        if isinstance(step, bool) or not isinstance(step, (int, float)) or not 0 < step <= high - low:
            raise ConfigError(f"{where}.step: expected a number in (0, high - low], got {short(step)}")
        if log:
            raise ConfigError(f"{where}: step and log cannot be combined; drop one")
    return Knob(path, low=low, high=high, step=step, log=log)
