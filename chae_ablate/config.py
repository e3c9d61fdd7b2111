"""Typed, validated configuration: data, model, protocol.

Config is data. Every field's default is the CHAE paper's baseline. Plain dicts (from YAML or
dotted-path overrides) become frozen dataclasses through `parse`, which checks types, unknown keys
and value ranges once, before any training starts, and reports errors as
`model.transformer.heads: 6 does not divide dim 128 (valid: 1, 2, 4, 8, 16, 32, 64, 128)`.
"""
from __future__ import annotations

import collections
import dataclasses
import difflib
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from functools import partial

import torch
from torch import nn

from .errors import ConfigError
from .metrics import LOWER_IS_BETTER, RANKING
from .sources import SOURCES

# Every choice a study file can name is one dict from name to implementation; its keys are what
# the validator accepts. (Data sources, samplers and pruners live with their code: sources.py, ledger.)
ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU}  # model.activation
POOLS = {"max": nn.MaxPool2d, "avg": nn.AvgPool2d, "none": None}  # conv stages' pool, conv.extra_pool
OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW,  # protocol.optimizer
              "sgd": partial(torch.optim.SGD, momentum=0.9)}


@dataclass(frozen=True)
class ConvStage:
    channels: int = 32  # output channels of every conv layer in this stage
    kernel: int = 3  # conv kernel size (odd; 'same' padding)
    layers: int = 1  # conv layers in the stage, each BatchNorm -> Conv -> activation
    pool: str = "max"  # down-sampling after the stage: max | avg | none (2x2, stride 2)

    def check(self) -> list[tuple[str, str]]:
        errors = positive(self, "channels", "kernel", "layers") + at_most(self, channels=4096, kernel=31, layers=16)
        if self.kernel % 2 == 0:
            errors.append(("kernel", f"{self.kernel} is even; use an odd size such as 3 or 5"))
        errors += one_of(self, "pool", POOLS)
        return errors


PAPER_STAGES = (ConvStage(32), ConvStage(32), ConvStage(64), ConvStage(128))


@dataclass(frozen=True)
class ConvConfig:
    stages: tuple[ConvStage, ...] = PAPER_STAGES  # the paper's four stages: 32, 32, 64, 128 channels
    extra_pool: str = "none"  # pooling layer after the last stage: max | avg | none (paper exp. 3)
    extra_pool_size: int = 2  # kernel and stride of that extra pooling layer
    spatial_dropout: float = 0.0  # Dropout2d after every stage (paper: 0)

    def check(self) -> list[tuple[str, str]]:
        errors = positive(self, "extra_pool_size") + probability(self, "spatial_dropout")
        errors += at_most(self, extra_pool_size=64)
        if len(self.stages) > 8:
            errors.append(("stages", f"has {len(self.stages)} stages; at most 8 are supported"))
        if not self.stages:
            errors.append(("stages", "is empty; give at least one stage, e.g. [{channels: 32}]"))
        errors += one_of(self, "extra_pool", POOLS)
        return errors

    @property
    def stride(self) -> int:
        """Total down-sampling factor of the conv trunk."""
        stride = 2 ** sum(POOLS[stage.pool] is not None for stage in self.stages)
        return stride * (self.extra_pool_size if POOLS[self.extra_pool] is not None else 1)


@dataclass(frozen=True)
class TransformerConfig:
    depth: int = 2  # encoder layers
    heads: int = 8  # attention heads; must divide dim (head dim = dim / heads)
    dim: int = 128  # token width; a Linear projection is added when it differs from the conv width
    mlp_hidden: tuple[int, ...] = (256,)  # hidden sizes of each layer's MLP (dim -> ... -> dim)
    mlp_dropout: float = 0.2  # dropout after every MLP linear layer
    attn_dropout: float = 0.0  # dropout on attention weights

    def check(self) -> list[tuple[str, str]]:
        errors = positive(self, "depth", "heads", "dim") + probability(self, "mlp_dropout", "attn_dropout")
        errors += at_most(self, depth=64, dim=4096, heads=4096)
        errors += [(f"mlp_hidden.{i}", f"{h} must be > 0 and at most 16,384")
                   for i, h in enumerate(self.mlp_hidden) if not 0 < h <= 16384]
        if len(self.mlp_hidden) > 8:
            errors.append(("mlp_hidden", f"has {len(self.mlp_hidden)} layers; at most 8 are supported"))
        if 0 < self.dim <= 4096 and self.heads > 0 and self.dim % self.heads:  # (a huge dim: _at_most says so)
            valid = ", ".join(str(h) for h in range(1, self.dim + 1) if self.dim % h == 0)
            errors.append(("heads", f"{self.heads} does not divide dim {self.dim} (valid: {valid})"))
        return errors


@dataclass(frozen=True)
class ModelConfig:
    resolution: int = 256  # input images are resolution x resolution x 3
    conv: ConvConfig = field(default_factory=ConvConfig)  # the CNN trunk
    transformer: TransformerConfig = field(default_factory=TransformerConfig)  # the encoder
    activation: str = "gelu"  # activation in conv stages and MLPs: gelu | relu | silu

    def check(self) -> list[tuple[str, str]]:
        errors = positive(self, "resolution") + at_most(self, resolution=2048)
        errors += one_of(self, "activation", ACTIVATIONS)
        stride = self.conv.stride
        if self.resolution > 0 and self.conv.stages:
            if self.resolution % stride:
                lower = max(stride, self.resolution // stride * stride)
                errors.append(("resolution", f"{self.resolution} is not a multiple of the total stride "
                               f"{stride}; use e.g. {lower} or {lower + stride}"))
            elif self.resolution // stride < 1:
                errors.append(("resolution", f"{self.resolution} pools away to nothing (stride {stride})"))
        return errors

    @property
    def grid(self) -> int:
        """Side of the token grid after the conv trunk."""
        return self.resolution // self.conv.stride

    @property
    def tokens(self) -> int:
        """Sequence length seen by the transformer, CLS included."""
        return self.grid**2 + 1


CHAE = "chae"  # model.builder of the paper's model (builders.py has the others)


@dataclass(frozen=True, eq=False)
class OtherModel:
    """A model from another builder than CHAE (builders.py): its knobs are the builder's keyword
    arguments, model.kwargs.NAME; the builder's own signature says which names it accepts."""

    builder: str  # timm:NAME | module:function (module.py beside the study, or an importable module)
    resolution: int = 256  # input images are resolution x resolution x 3 (passed to the builder)
    kwargs: dict[str, Any] = field(default_factory=dict)  # the builder's keyword arguments: the knobs
    source_sha: str = ""  # set when the study is loaded: sha256 of a user builder's file (in the cell hash)
    source_file: str = ""  # set when the study is loaded: where this machine found that file (not hashed)

    def check(self) -> list[tuple[str, str]]:
        errors = positive(self, "resolution") + at_most(self, resolution=2048)
        if not isinstance(self.kwargs, dict):
            errors.append(("kwargs", f"expected a mapping of argument -> value, got {describe(self.kwargs)}"))
        else:
            errors += [(f"kwargs.{key_text(k)}", "expected an argument name") for k in self.kwargs
                       if not (isinstance(k, str) and k.isidentifier())]
        return errors

    def _key(self) -> str:  # kwargs may hold lists: the config is compared and hashed by its JSON
        return json.dumps(to_dict(self), sort_keys=True, default=repr)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, OtherModel) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())


@dataclass(frozen=True)
class AugmentConfig:
    copies: int = 4  # augmented copies of each training image per epoch, plus the original (0 = off)
    rotation: float = 30.0  # rotation range, +- degrees (Keras rotation_range)
    shear: float = 0.2  # shear range, +- degrees (Keras shear_range is applied in degrees)
    zoom: tuple[float, float] = (0.8, 1.2)  # independent x/y zoom range (Keras zoom_range=0.2)
    flip: bool = True  # random horizontal flip, p = 0.5

    def check(self) -> list[tuple[str, str]]:
        errors = at_most(self, copies=64, rotation=180, shear=89)
        if self.copies < 0:
            errors.append(("copies", f"{self.copies} must be >= 0 (0 turns augmentation off)"))
        if self.rotation < 0 or self.shear < 0:
            errors.append(("rotation" if self.rotation < 0 else "shear", "must be >= 0"))
        if len(self.zoom) != 2 or not 0 < self.zoom[0] <= self.zoom[1]:
            errors.append(("zoom", f"{list(self.zoom)} must be [low, high] with 0 < low <= high"))
        return errors


@dataclass(frozen=True)
class DataConfig:
    source: str = "digits"  # folder | digits (scikit-learn's bundled images) | synthetic
    root: str | None = None  # folder source: a class-per-folder image directory
    test_fraction: float = 0.15  # held-out test split, stratified, the same for every cell
    val_fraction: float = 0.05  # validation split, taken from what the test split leaves
    split_seed: int = 0  # seeds the splits (not the training)
    synthetic_classes: int = 4  # synthetic source: number of classes
    synthetic_per_class: int = 40  # synthetic source: images per class

    def check(self) -> list[tuple[str, str]]:
        errors = positive(self, "synthetic_classes", "synthetic_per_class")
        errors += seed_range(self, "split_seed", self.split_seed)
        errors += at_most(self, synthetic_classes=1000, synthetic_per_class=10_000)
        errors += one_of(self, "source", SOURCES)
        if self.source in SOURCES and SOURCES[self.source].needs_root and not self.root:
            errors.append(("root", f"is required when source is '{self.source}'"))
        if self.root is not None and (len(self.root) > 4096 or "\0" in self.root):
            errors.append(("root", f"{short(self.root)} is not a usable path (over 4,096 characters or a NUL byte)"))
        for name in ("test_fraction", "val_fraction"):
            if not 0 < getattr(self, name) < 1:
                errors.append((name, f"{getattr(self, name)} must be between 0 and 1"))
        return errors


@dataclass(frozen=True)
class ProtocolConfig:
    epochs: int = 20  # training epochs per cell
    batch_size: int = 32  # images per optimisation step
    optimizer: str = "adam"  # adam | adamw | sgd
    lr: float = 1e-4  # fixed learning rate
    weight_decay: float = 0.0  # optimiser weight decay
    seeds: tuple[int, ...] = (0,)  # one cell per variant and seed
    augment: AugmentConfig = field(default_factory=AugmentConfig)  # the paper's Keras augmentation

    def check(self) -> list[tuple[str, str]]:
        errors = positive(self, "epochs", "batch_size", "lr") + at_most(self, epochs=10_000, batch_size=65_536)
        if self.weight_decay < 0:
            errors.append(("weight_decay", f"{self.weight_decay} must be >= 0"))
        for i, seed in enumerate(self.seeds):
            errors += seed_range(self, f"seeds.{i}", seed)
        if len(self.seeds) > 10_000:
            errors.append(("seeds", f"has {len(self.seeds):,} seeds; at most 10,000 are supported"))
        errors += one_of(self, "optimizer", OPTIMIZERS)
        if not self.seeds:
            errors.append(("seeds", "is empty; give at least one seed, e.g. [0]"))
        repeated = [(seed, n) for seed, n in collections.Counter(self.seeds).items() if n > 1]
        if repeated:
            errors.append(("seeds", f"seed {repeated[0][0]} appears {repeated[0][1]} times; each seed is one cell"))
        return errors


@dataclass(frozen=True)
class AnalysisConfig:
    """How the study decides (a study-level question, not a training setting: no cell hash sees it)."""

    metric: str = RANKING  # best_val_loss | test_loss (lower is better) | test_acc (higher is better)
    margin: float = 0.05  # the smallest difference that matters (a fraction of the baseline's mean if relative)
    relative: bool = True  # margin is a fraction of the baseline's mean over its first look
    alpha: float = 0.05  # family-wise error rate over all variants and looks
    min_seeds: int = 3  # adaptive: seeds every variant runs in the first round
    max_seeds: int = 10  # adaptive: the most seeds an undecided variant gets
    step: int | None = None  # adaptive: seeds added per round (none: doubling; stats.looks)
    adaptive: bool = False  # add seeds only to undecided variants, in rounds (or: run --adaptive)
    vary_split: bool = False  # each seed also draws its own train/val/test split

    def check(self) -> list[tuple[str, str]]:
        errors = []
        errors += one_of(self, "metric", LOWER_IS_BETTER)
        if not self.margin > 0:
            errors.append(("margin", f"{self.margin} must be > 0 (the smallest difference that matters)"))
        elif self.relative and self.margin >= 1:
            errors.append(("margin", f"{self.margin} is a fraction of the baseline's mean (relative: true); "
                           "use e.g. 0.05 for 5%, or set relative: false"))
        if not 0 < self.alpha <= 0.5:
            errors.append(("alpha", f"{self.alpha} must be in (0, 0.5], e.g. 0.05"))
        if not 2 <= self.min_seeds <= 100:
            errors.append(("min_seeds", f"{self.min_seeds} must be between 2 and 100 (one seed has no spread)"))
        elif not self.min_seeds <= self.max_seeds <= 100:
            errors.append(("max_seeds", f"{self.max_seeds} must be between min_seeds ({self.min_seeds}) and 100"))
        if self.step is not None and not 1 <= self.step <= 100:
            errors.append(("step", f"{self.step} must be between 1 and 100, or left out to double"))
        return errors


@dataclass(frozen=True)
class ExperimentConfig:
    """Everything one training run depends on."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig | OtherModel = field(default_factory=ModelConfig)  # CHAE's knobs, or another builder's
    protocol: ProtocolConfig = field(default_factory=ProtocolConfig)


def positive(obj: Any, *names: str) -> list[tuple[str, str]]:
    return [(n, f"{getattr(obj, n)} must be > 0") for n in names if getattr(obj, n) <= 0]


def at_most(obj: Any, **limits: int) -> list[tuple[str, str]]:
    """Upper bounds that keep one cell within what a single GPU can hold: a typo such as
    resolution 160000 fails here, not as a 51 GB allocation."""
    return [(n, f"{getattr(obj, n)} is larger than the supported maximum {limit:,}")
            for n, limit in limits.items() if getattr(obj, n) > limit]


MAX_SEED = 2**31 - 1
MAX_INT = 2**63 - 1  # any int setting: bounding it in _convert keeps every later message short


def seed_range(obj: Any, name: str, seed: int) -> list[tuple[str, str]]:
    if 0 <= seed <= MAX_SEED:
        return []
    return [(name, f"{short(seed)} is out of range; seeds are integers from 0 to {MAX_SEED:,}")]


def one_of(obj: Any, name: str, choices) -> list[tuple[str, str]]:
    """A setting that must name one of `choices` (a registry's keys)."""
    value = getattr(obj, name)
    if value in choices:
        return []
    return [(name, f"{short(value)} is not one of {', '.join(choices)}{did_you_mean(str(value), choices, quiet=True)}")]


def probability(obj: Any, *names: str) -> list[tuple[str, str]]:
    return [(n, f"{getattr(obj, n)} must be in [0, 1)") for n in names if not 0 <= getattr(obj, n) < 1]


# --- dict <-> dataclass ---------------------------------------------------------------------

def to_dict(config: Any) -> Any:
    """A dataclass as plain YAML/JSON-friendly data (tuples become lists)."""
    if dataclasses.is_dataclass(config):
        return {f.name: to_dict(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, (list, tuple)):
        return [to_dict(v) for v in config]
    if isinstance(config, dict):
        return {k: to_dict(v) for k, v in config.items()}
    return config


def dotted(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested plain data as {dotted.path: value}, the paths overrides use: a list of mappings item by
    item (model.conv.stages.0.kernel), any other list as one value (protocol.seeds)."""
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, list) and tree and all(isinstance(v, dict) for v in tree):
        items = ((str(i), v) for i, v in enumerate(tree))
    else:
        return {prefix[:-1]: tree}
    out: dict[str, Any] = {}
    for key, value in items:
        out.update(dotted(value, f"{prefix}{key}."))
    return out


def parse(cls: type, data: Any, path: str = "") -> Any:
    """Build dataclass `cls` from plain data, validating types, keys and values.

    The one validator of the project: study files, variants and --set overrides are merged as
    plain data first, then parsed here. Raises ConfigError naming the dotted path of the first
    problem, e.g. `variants.k5.model.conv.stages.0.kernal: unknown key (did you mean 'kernel'?)`.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'}: expected a mapping, got {describe(data)}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            full = _join(path, key)
            moved = next((why for old, why in MOVED.items() if full == old or full.endswith("." + old)), None)
            raise ConfigError(f"{full}: {moved or 'unknown key' + did_you_mean(str(key), names)}")
    config = cls(**{k: _convert(hints[k], v, _join(path, k)) for k, v in data.items()})
    for key, message in getattr(config, "check", list)():
        raise ConfigError(f"{_join(path, key)}: {message}")
    return config


CHAE_KNOBS = tuple(f.name for f in dataclasses.fields(ModelConfig)  # the fields that only CHAE has
                   if f.name not in {g.name for g in dataclasses.fields(OtherModel)})


def parse_model(value: Any, path: str) -> ModelConfig | OtherModel:
    """A model section: `builder: chae` (or none) is the CHAE config, anything else another builder's."""
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: expected a mapping, got {describe(value)}")
    builder = value.get("builder", CHAE)
    if builder == CHAE:
        return parse(ModelConfig, {k: v for k, v in value.items() if k != "builder"}, path)
    if not isinstance(builder, str):
        raise ConfigError(f"{path}.builder: expected text such as chae, timm:resnet18 or mymodel:build, "
                          f"got {describe(builder)}")
    for key in value:
        if key in CHAE_KNOBS:
            raise ConfigError(f"{path}.{key}: a knob of the chae builder; {short(builder)} takes its knobs as "
                              f"{path}.kwargs.NAME")
    return parse(OtherModel, value, path)


def model_defaults(builder: str) -> dict:
    """A model section's plain data before a study's settings: CHAE's paper baseline, or for another
    builder its name and no kwargs (the builder's own defaults)."""
    return to_dict(ModelConfig()) if builder == CHAE else to_dict(OtherModel(builder))


# Keys that moved, and where to: a one-line migration error instead of a bare "unknown key".
MOVED = {"data.augment": "moved to protocol.augment (augmentation is part of the training protocol); "
                         "move this block under protocol:"}


def did_you_mean(word: str, options: typing.Iterable[str], quiet: bool = False) -> str:
    """' (did you mean 'X'?)' for the closest option, else the valid ones (nothing when quiet)."""
    options = [str(o) for o in options]
    close = difflib.get_close_matches(str(word)[:100], options, n=1)
    if close:
        return f" (did you mean '{close[0]}'?)"
    return "" if quiet else f" (valid: {', '.join(options)})"


def _join(path: str, key: Any) -> str:
    return f"{path}.{key_text(key)}" if path else key_text(key)


def key_text(key: Any) -> str:
    """A key or name as an error path shows it: as written when it is a short printable string,
    else its short repr (so a key with a newline or 10,000 characters keeps the error one line)."""
    return key if isinstance(key, str) and key.isprintable() and 0 < len(key) <= 64 else short(key)


def short(value: Any, width: int = 60) -> str:
    """repr of a value cut to `width` characters: error messages stay one short line whatever the
    input (a huge or deeply shared YAML structure is never expanded, a huge integer never printed)."""
    if isinstance(value, (dict, list, tuple, set)):
        text = f"{type(value).__name__} of {len(value)}"
    elif isinstance(value, int) and value.bit_length() > 3 * width:
        text = f"{'-' if value < 0 else ''}{int(value.bit_length() * math.log10(2)) + 1:,}-digit integer"
    else:
        text = repr(value[: width + 1] if isinstance(value, (str, bytes)) else value)
    return text if len(text) <= width else text[: width - 3] + "..."


def describe(value: Any) -> str:
    return short(value) if isinstance(value, (dict, list, tuple, set)) else f"{type(value).__name__} {short(value)}"


def _convert(hint: Any, value: Any, path: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return parse(hint, value, path)
    if OtherModel in args:  # model: CHAE's typed knobs, or another builder's kwargs
        return parse_model(value, path)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        return _convert(next(a for a in args if a is not type(None)), value, path)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {describe(value)}")
        items = args[:1] * len(value) if args[-1] is Ellipsis else args
        if len(items) != len(value):
            raise ConfigError(f"{path}: expected a list of {len(items)} values, got {len(value)}")
        return tuple(_convert(h, v, f"{path}.{i}") for i, (h, v) in enumerate(zip(items, value)))
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value) if abs(value) < 1e300 else math.inf
    if hint in (int, float, str, bool) and not (isinstance(value, hint) and
                                                 not (hint is int and isinstance(value, bool))):
        raise ConfigError(f"{path}: expected {hint.__name__}, got {describe(value)}{number_hint(hint, value)}")
    if hint is float and not math.isfinite(value):
        raise ConfigError(f"{path}: {value} is not a finite number")
    if hint is int and not -MAX_INT <= value <= MAX_INT:
        raise ConfigError(f"{path}: {short(value)} is out of range for a setting (|value| <= 2**63 - 1)")
    return value


INDEX_RULE = re.compile(r"0|[1-9][0-9]{0,5}")  # one spelling per list item in a dotted path: not 00, not '²'


def item_index(part: str, items: list, where: str) -> int:
    """The list index that one part of a dotted path names (`stages.0`); a ConfigError starting with
    `where` when it names no item of `items`."""
    if not INDEX_RULE.fullmatch(part) or int(part) >= len(items):
        valid = f"valid indices are 0..{len(items) - 1}" if items else "the list is empty"
        raise ConfigError(f"{where}: no item {short(part)}; {valid}")
    return int(part)


def number_hint(hint: Any, value: Any) -> str:
    """YAML 1.1 reads 1e-3 (no dot) as text: say how to write it as a number."""
    if hint in (int, float) and isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return ""
        if not math.isfinite(number):
            return ""
        spelled = repr(number)  # 0.001, or 1e-07: YAML 1.1 needs a dot before the exponent
        if "e" in spelled and "." not in spelled:
            spelled = spelled.replace("e", ".0e", 1)
        return f" (YAML reads {short(value)} as text; write it as {spelled})"
    return ""
