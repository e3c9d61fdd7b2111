"""The study plan: every cell's shape and cost, computed without training or allocating a model.

Costs come from the meta device (~0.1 s a model, whatever its size), once per distinct model:
a 999-variant study plans in under two minutes, with a progress bar on a terminal.
"""
from __future__ import annotations

import sys

import pandas as pd
from tqdm import tqdm

from .config import DataConfig, ModelConfig
from .model import forward_flops, parameter_count
from .sources import SOURCES
from .study import Study, changed_paths

PROGRESS_FROM = 50  # variants; smaller studies plan in a few seconds


def expected_classes(data: DataConfig) -> tuple[int, str]:
    """Number of classes the data will have, and where that number comes from."""
    return SOURCES[data.source].classes(data)


def model_cost(model: ModelConfig, num_classes: int) -> tuple[int, float]:
    """Trainable parameters and forward MFLOPs per image, both counted on the meta device."""
    return parameter_count(model, num_classes), forward_flops(model, num_classes) / 1e6


def plan_table(study: Study) -> tuple[pd.DataFrame, str]:
    """One row per variant (params, MFLOPs, tokens) and a footer line with the cell count."""
    num_classes, origin = expected_classes(study.baseline.config.data)
    costs: dict[ModelConfig, tuple[int, float]] = {}  # variants that change only data or protocol share one
    rows = []
    quiet = len(study.variants) <= PROGRESS_FROM or not sys.stderr.isatty()
    for v in tqdm(study.variants, desc=f"plan {study.name}", unit="variant", file=sys.stderr,
                  disable=quiet, leave=False):
        m = v.config.model
        if m not in costs:
            costs[m] = model_cost(m, num_classes)
        rows.append({
            "variant": v.name,
            "changes": changed_paths(v),
            "resolution": m.resolution,
            "tokens": m.tokens,
            "params": costs[m][0],
            "MFLOPs/img": costs[m][1],
            "seeds": len(study.seeds(v)),
        })
    table = pd.DataFrame(rows)
    a = study.analysis
    if a.adaptive:
        table["seeds"] = f"{a.min_seeds}-{a.max_seeds}"
        count = f"{a.min_seeds * len(rows)} to {a.max_seeds * len(rows)} cells (adaptive seeds)"
    else:
        count = f"{int(table['seeds'].sum())} cells"
    footer = (f"{len(rows)} variants x seeds = {count}, {study.baseline.config.protocol.epochs} epochs each; "
              f"classes: {num_classes} ({origin})")
    return table, footer


def format_plan(table: pd.DataFrame) -> str:
    return table.to_string(index=False, formatters={
        "params": "{:,}".format, "MFLOPs/img": "{:,.1f}".format})
