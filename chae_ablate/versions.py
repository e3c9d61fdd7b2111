"""A study's versions: each run records the plan it ran (by fingerprint); a later run of a changed
study goes on and says what changed, a second file under the same name is refused, and analysis
settings changed after results were seen are kept with the version, so the report says so.

Pure functions on plans and version records; the ledger and MLflow store the records (runner.py).
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

from .analysis import Plan
from .config import dotted, to_dict
from .errors import ChaeError
from .files import shown
from .records import CellRecord, CellState

DECISION_SETTINGS = ("metric", "margin", "relative", "alpha", "min_seeds", "max_seeds", "step", "adaptive")
# analysis settings that decide verdicts: changed once results are in, they void the error guarantee


@dataclass(frozen=True)
class Version:
    """One recorded version of a study."""

    fingerprint: str  # analysis.Plan.fingerprint
    source: str  # the study file it was run from ("" for a study built in code)
    recorded_at: str  # ISO time, UTC, of its first run
    results_seen: int = 0  # cells of its plan already finished when it was first recorded
    analysis_changed: tuple[str, ...] = ()  # decision settings changed after those results: "analysis.margin 0.05 -> 0.1"
    decision: dict[str, Any] = field(default_factory=dict, compare=False)  # its DECISION_SETTINGS, kept by every store
    plan: Plan | None = field(default=None, compare=False)  # the whole plan (MLflow keeps it; the ledger does not)

    def to_json(self, with_plan: bool = True) -> dict:
        data = {k: v for k, v in asdict(self).items() if k != "plan"}
        if with_plan and self.plan is not None:
            data["plan"] = self.plan.to_json()
        return data

    @classmethod
    def from_json(cls, data: dict) -> Version:
        plan = Plan.from_json(data["plan"]) if data.get("plan") else None
        return cls(data["fingerprint"], data.get("source", ""), data.get("recorded_at", ""),
                   int(data.get("results_seen", 0)), tuple(data.get("analysis_changed", ())),
                   data.get("decision") or (_decision(plan) if plan else {}), plan)


def merged(*stores: Iterable[Version]) -> list[Version]:
    """The versions several stores recorded, one per fingerprint (the one with its plan kept),
    oldest first."""
    by_fp: dict[str, Version] = {}
    for versions in stores:
        for v in versions:
            if v.fingerprint not in by_fp or (by_fp[v.fingerprint].plan is None and v.plan is not None):
                by_fp[v.fingerprint] = v
    return sorted(by_fp.values(), key=lambda v: v.recorded_at)


def refuse_other_file(plan: Plan, versions: list[Version], where: str) -> None:
    """A study name already used in `where` by another study file (with other contents) is refused:
    the two would share one ledger, one MLflow experiment and one report, and mix their results.
    The same contents from another path (a moved file, another machine's checkout) are the same study."""
    if not any(v.fingerprint == plan.fingerprint for v in versions):
        refuse_other_source(plan.study, plan.source, versions, where)


def refuse_other_source(name: str, source: str, versions: list[Version], where: str) -> None:
    """The name `name` recorded in `where` by other study files only (a study built in code, source
    "", is never refused nor refuses)."""
    sources = {v.source for v in versions}
    if source and sources and source not in sources and "" not in sources:
        raise ChaeError(f"study name '{name}' is already used in {where} by {shown(sorted(sources)[-1])}, and "
                        f"{shown(source)} is a different study; give one of them its own `name:` "
                        f"(e.g. name: {name}-2), or run it with another --runs-dir and MLflow store")


def latest(versions: list[Version], plan: Plan) -> Version | None:
    """The version run last before this plan (None for a study's first run)."""
    earlier = [v for v in versions if v.fingerprint != plan.fingerprint]
    return earlier[-1] if earlier else None


def new_version(plan: Plan, previous: Version | None, results_seen: int, now: datetime | None = None) -> Version:
    """The record of `plan`'s first run. Its decision settings count as changed after results were
    seen when some of its cells had finished and they differ from the previous version's (or the
    previous version was itself such a change, and these settings keep it)."""
    changed: tuple[str, ...] = ()
    if results_seen and previous is not None and previous.decision:
        diff = tuple(_changes(previous.decision, _decision(plan)))
        changed = diff or previous.analysis_changed
    stamp = (now or datetime.now(timezone.utc)).isoformat(timespec="seconds")
    return Version(plan.fingerprint, plan.source, stamp, results_seen, changed, _decision(plan), plan)


def first_run(plan: Plan, known: list[Version], records: Iterable[CellRecord]) -> Version:
    """The record of `plan`'s first run, after the versions `known`, with the results already seen:
    those of the stores' records that are this plan's cells, done."""
    planned = {c.cell_hash for c in plan.cells}
    seen = sum(r.state == CellState.DONE and r.cell_hash in planned for r in records)
    return new_version(plan, latest(known, plan), seen)


def _decision(plan: Plan) -> dict[str, Any]:
    analysis = to_dict(plan.analysis)
    return {f"analysis.{k}": analysis[k] for k in DECISION_SETTINGS}


def changes(old: Plan, new: Plan) -> list[str]:
    """What differs between two versions of a study, one short line each: settings every common
    variant changed alike once ("protocol.epochs 2 -> 6"), others per variant, variants added or
    removed, analysis settings."""
    common = [v for v in new.variants if v in old.settings and v in new.settings]
    per_variant = {v: dict(_changes(old.settings[v], new.settings[v], pairs=True)) for v in common}
    shared = set.intersection(*(set(d.items()) for d in per_variant.values())) if per_variant else set()
    lines = [f"{path} {_text(a)} -> {_text(b)}" for path, (a, b) in sorted(shared, key=str)]
    for v in common:
        own = {p: ab for p, ab in per_variant[v].items() if (p, ab) not in shared}
        lines += [f"variant {v}: {p} {_text(a)} -> {_text(b)}" for p, (a, b) in own.items()]
    lines += [f"variant {v} added" for v in new.variants if v not in old.variants]
    lines += [f"variant {v} removed" for v in old.variants if v not in new.variants]
    lines += list(_changes(dotted({"analysis": to_dict(old.analysis)}), dotted({"analysis": to_dict(new.analysis)})))
    return lines


def _changes(old: Mapping[str, Any], new: Mapping[str, Any], pairs: bool = False):
    """Paths whose values differ: "path a -> b" lines, or (path, (a, b)) pairs."""
    for path in sorted(set(old) | set(new)):
        a, b = old.get(path, "(unset)"), new.get(path, "(unset)")
        if a != b:
            yield (path, (_hashable(a), _hashable(b))) if pairs else f"{path} {_text(a)} -> {_text(b)}"


def _hashable(value: Any) -> Any:
    return json.dumps(value, sort_keys=True) if isinstance(value, (list, dict)) else value


def _text(value: Any) -> str:
    text = value if isinstance(value, str) and value.startswith(("[", "{")) else json.dumps(value, default=str)
    return text if len(text) <= 40 else text[:37] + "..."
