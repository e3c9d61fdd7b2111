"""Decisive verdicts: error rates and power of the whole adaptive procedure, by simulation.

    .venv/bin/python benchmarks/power.py                   # 20,000 studies per setting, ~25 s on one core
    .venv/bin/python benchmarks/power.py --studies 2000    # quick look

The rule of stats.METHOD (what stats.decide does at each look of analysis.analyse) is written
again here from its description, with numpy and scipy, batched over studies; it calls nothing of
stats but its text. tests/test_power.py replays studies through both and requires the same
verdicts and seeds, so a slip in either shows. The previous method (one own t-interval per
variant at 1 - alpha / (m K)) is written here too, for comparison.

Every simulated study has 11 variants and a baseline; cell values (lower is better)
are value[v, s] = true_v + sd_v e[v, s] with the margin 1 and sd_v = 1 / sqrt 2, so a paired
difference has sd = margin. Looks at 3, 6, 10 seeds; alpha 0.05. Five noise models (MODELS):
normal, Student t with 3 df, 5% of cells diverged (+inf), one variant with 3x the others' cell
sd, and a relative margin (baseline level 10, margin 10% of the baseline's observed mean).

Tables (markdown, also in benchmarks/results/power.json):
  1. TARGETS: each target, this method's figure and the previous method's; the script exits 1,
     naming them, when this method misses one;
  2. per noise model: share of studies with any wrong verdict (with its Monte-Carlo standard
     error) when every true difference is 0 and when every one is exactly 1 margin, the share of
     variants called worse at 2 margins and called equivalent at 0, and cells run at 0;
  3. the mixed study (true differences 0, 0, 0, 0, 0.5, 0.5, 1, 1, 2, 2, 10 margins): each
     verdict's share by true difference, its family error and cells. (Gross effects, 10 margins
     and 10 cell sds, are in table 1: the share of them called worse at the first look.)
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy import stats as sps

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import provenance, write_json  # noqa: E402

from chae_ablate import stats  # noqa: E402  (METHOD's text only)
from chae_ablate.records import DECISIONS, Verdict  # noqa: E402

UNDECIDED, BETTER, WORSE, EQUIVALENT = (DECISIONS.index(v) for v in
                                        (Verdict.UNDECIDED, Verdict.BETTER, Verdict.WORSE, Verdict.EQUIVALENT))
PLAN = (3, 6, 10)  # seeds at each look: 3, doubling, up to 10 (stats.looks(3, 10))
ALPHA = 0.05
VARIANTS = 11
CELL_SD = 1 / math.sqrt(2)  # cell noise, in margins: a paired difference has sd = margin
RELATIVE = 0.1  # the relative model's margin: 10% of the baseline's mean (level 10: 1 in true units)
GUARD_F = 0.10  # as stats.METHOD words it: own spread larger than the shared one by an F-test at 10%,
GUARD_F_SEEDS = 4  # from 4 paired seeds on
POOL_OUT = 0.01  # ... and one beyond it at 1% leaves the shared variance
GUARD_LEVEL = 0.02  # ... and every verdict also holds on the own paired t-interval at 98%
FUTILITY = 3.5  # an undecided variant that would likely need more than 3.5 x max_seeds stops (looks 2..K-1)
MIXED = (0, 0, 0, 0, 0.5, 0.5, 1, 1, 2, 2, 10)  # the mixed study's true differences, in margins


@dataclass(frozen=True)
class Noise:
    """How simulated cell values scatter around their variant's true mean."""
    about: str  # in words, for the tables
    tails: float | None = None  # Student t degrees of freedom, scaled to the same sd; None: normal
    diverged: float = 0.0  # share of cells that diverge (+inf), independently
    wide: float = 1.0  # the first variant's cell sd, in units of the others'
    level: float = 0.0  # every cell's true level (the baseline's mean)
    relative: bool = False  # the margin is RELATIVE x the baseline's observed mean

    def margin(self, scale: float = 1.0) -> float:
        """The margin the rule is given (absolute, or a fraction of the baseline's mean); scale 2:
        a rule whose equivalence is twice too lax."""
        return scale * (RELATIVE if self.relative else 1.0)


MODELS = {
    "normal": Noise("normal"),
    "t3": Noise("Student t, 3 df", tails=3),
    "diverged 5%": Noise("normal, 5% of cells +inf", diverged=0.05),
    "one variant 3x sd": Noise("normal, one variant's cell sd 3x", wide=3.0),
    "one variant 3x paired sd": Noise("normal, one variant's paired-difference sd 3x (cell sd sqrt 17 x)",
                                      wide=math.sqrt(17)),
    "relative margin": Noise("normal, baseline 10, margin 10% of its observed mean", level=10.0, relative=True),
}


def cells(noise: Noise, true: Sequence[float], studies: int, rng: np.random.Generator,
          seeds: int = PLAN[-1]) -> np.ndarray:
    """(studies, 1 + m, seeds) cell values, baseline first; true: the m variants' true differences
    in margins (the relative model's true margin is RELATIVE x level = 1 too)."""
    mean = noise.level + np.concatenate([[0.0], np.asarray(true, dtype=float)])
    sd = np.full(mean.size, CELL_SD)
    sd[1] *= noise.wide
    shape = (studies, mean.size, seeds)
    if noise.tails:
        e = rng.standard_t(noise.tails, shape) / math.sqrt(noise.tails / (noise.tails - 2))
    else:
        e = rng.standard_normal(shape)
    y = mean[None, :, None] + sd[None, :, None] * e
    if noise.diverged:
        y[rng.random(shape) < noise.diverged] = np.inf
    return y


def spending(alpha: float, plan: Sequence[int]) -> np.ndarray:
    """alpha_k of each look: increments of Lan & DeMets' O'Brien-Fleming-type alpha(t) =
    2 - 2 Phi(z_{1 - alpha/2} / sqrt t), t = n_k / n_K, the last exact."""
    z = sps.norm.isf(alpha / 2)
    spent = [2 * sps.norm.sf(z / math.sqrt(n / plan[-1])) for n in plan[:-1]] + [alpha]
    return np.diff([0.0, *spent])


def shared_noise(x: np.ndarray, known: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Residual variance and df of value ~ variant + seed fitted to the known cells of each study.

    x, known: (B, V, n). Least squares by the reduced normal equations: the variant effects
    eliminated, the seed effects (seed 0's fixed at 0) solve (diag(n_s) - W' diag(1/n_v) W) b =
    W-weighted seed totals of the variant-centred values. Every variant has seed 0, so the design
    is connected and its rank is V + n - 1."""
    w = known.astype(float)
    n_v = np.maximum(w.sum(2), 1e-300)  # (B, V) seeds per variant (a variant left out has none)
    x = np.where(known, x, 0.0)
    centred = w * (x - (x.sum(2) / n_v)[..., None])
    c = -np.matmul((w / n_v[..., None]).transpose(0, 2, 1), w)  # (B, n, n)
    c += np.einsum("bs,st->bst", w.sum(1), np.eye(w.shape[2]))
    b = np.linalg.solve(c[:, 1:, 1:], centred.sum(1)[:, 1:, None])[..., 0]
    b = np.concatenate([np.zeros((len(b), 1)), b], axis=1)[:, None, :]  # (B, 1, n)
    effect = (w * (x - b)).sum(2) / n_v  # (B, V)
    residual = w * (x - effect[..., None] - b)
    df = w.sum((1, 2)) - (w.sum(2) > 0).sum(1) - w.shape[2] + 1
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(df >= 1, (residual ** 2).sum((1, 2)) / df, np.nan), df


def without_outliers(x: np.ndarray, known: np.ndarray, var: np.ndarray, df: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The shared noise again without the variants whose own paired spread exceeds the shared
    spread of all the others (the fit without that variant) by an F-test at POOL_OUT, from
    GUARD_F_SEEDS known seeds on, in the studies that have any."""
    d = np.where(known[:, 1:], x[:, 1:] - x[:, :1], np.nan)
    n = known[:, 1:].sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        spread = np.nanvar(d, -1, ddof=1)
    out = np.zeros_like(n, dtype=bool)
    for j in range(1, x.shape[1]):
        alone = known.copy()
        alone[:, j] = False
        var_j, df_j = shared_noise(x, alone)
        with np.errstate(invalid="ignore"):
            out[:, j - 1] = (n[:, j - 1] >= GUARD_F_SEEDS) & (
                spread[:, j - 1] > 2 * var_j * sps.f.isf(POOL_OUT, np.maximum(n[:, j - 1] - 1, 1), np.maximum(df_j, 1)))
    if not out.any():
        return var, df
    keep = known.copy()
    keep[:, 1:] &= ~out[..., None]
    var2, df2 = shared_noise(x, keep)
    some = out.any(1)
    return np.where(some, var2, var), np.where(some, df2, df)


def _half(c: np.ndarray, weight, var: np.ndarray, df: np.ndarray, own_spread: np.ndarray,
          a: float, guard: float) -> np.ndarray:
    """(B, m) half-width of the one-sided bound at level a of the mean of contrast c (B, m, n),
    whose shared-model variance is weight x the cell variance: the shared t-bound, or the wider of
    it and the own one where own_spread, never narrower than the own t-bound at `guard`."""
    n = c.shape[-1]
    own_se = c.std(-1, ddof=1) / math.sqrt(n)
    half = np.maximum(sps.t.isf(max(guard, a), n - 1) * own_se,  # the guard is never stricter than the test
                      sps.t.isf(a, df)[:, None] * np.sqrt(weight * var[:, None] / n))
    return np.where(own_spread, np.maximum(half, sps.t.isf(a, n - 1) * own_se), half)


def _look(y: np.ndarray, y0: np.ndarray, var: np.ndarray, df: np.ndarray, a: float, margin: float,
          relative: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(verdict code, within margin, per-seed sd of the difference the verdict used, margin in
    the metric's units), each (B, m), of variants y (B, m, n) against the baseline y0 (B, 1, n) at
    per-variant level a."""
    n = y.shape[-1]
    d = y - y0
    mean = d.mean(-1)
    own_var = d.var(-1, ddof=1)
    own_spread = (n >= GUARD_F_SEEDS) & (own_var > 2 * var[:, None] * sps.f.isf(GUARD_F, n - 1, df)[:, None])
    half2 = _half(d, 2.0, var, df, own_spread, a / 2, GUARD_LEVEL / 2)  # two-sided 1 - a
    if relative:  # value - (1 +- margin) x baseline per seed
        sign = np.where(y0.mean(-1) >= 0, 1.0, -1.0)  # (B, 1)
        hi, lo = 1 + sign * margin, 1 - sign * margin
        up, down = y - hi[..., None] * y0, y - lo[..., None] * y0
        within = ((up.mean(-1) + _half(up, 1 + hi ** 2, var, df, own_spread, a, GUARD_LEVEL) < 0)
                  & (down.mean(-1) - _half(down, 1 + lo ** 2, var, df, own_spread, a, GUARD_LEVEL) > 0))
        units = margin * np.abs(y0.mean(-1)) * np.ones_like(mean)
    else:
        half1 = _half(d, 2.0, var, df, own_spread, a, GUARD_LEVEL)
        within = (mean + half1 < margin) & (mean - half1 > -margin)
        units = np.full_like(mean, margin)
    code = np.select([mean + half2 < 0, mean - half2 > 0, within], [BETTER, WORSE, EQUIVALENT], UNDECIDED)
    # the spread the verdict stands on: the variant's own where it is larger and its interval the wider
    own_wider = sps.t.isf(a / 2, n - 1) * np.sqrt(own_var) >= sps.t.isf(a / 2, df)[:, None] * np.sqrt(2 * var)[:, None]
    sd = np.where(own_spread & own_wider, np.sqrt(own_var), np.sqrt(2 * var)[:, None])
    return code, within, sd, units


def hopeless(mean: np.ndarray, sd: np.ndarray, margin: np.ndarray, a_last: float, n: int,
             max_seeds: int) -> np.ndarray:
    """Futility, as stats.METHOD words it: the seeds a variant would likely need for a verdict at
    the last look's level, by the normal approximation ((z + z_0.8) sd / distance)^2 from 0 (two-
    sided) or from the margin (one-sided), whichever is fewer, exceed FUTILITY x max_seeds."""
    z_power = sps.norm.isf(0.2)
    with np.errstate(divide="ignore", invalid="ignore"):
        by_effect = np.where(mean != 0, ((sps.norm.isf(a_last / 2) + z_power) * sd / np.abs(mean)) ** 2, np.inf)
        by_margin = np.where(margin > np.abs(mean), ((sps.norm.isf(a_last) + z_power) * sd / (margin - np.abs(mean))) ** 2,
                             np.inf)
    return np.maximum(n + 1, np.ceil(np.minimum(by_effect, by_margin))) > int(FUTILITY * max_seeds)


def this_method(y: np.ndarray, plan: Sequence[int] = PLAN, alpha: float = ALPHA, margin: float = 1.0,
                relative: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """stats.METHOD on (B, 1 + m, seeds) cell values: (verdict code, within margin, seeds run),
    each (B, m). At each look the baseline and the undecided variants run the look's seeds;
    every known cell, decided variants' included, tells the shared noise; a diverged cell counts
    as the largest finite value known at the look."""
    studies, m = y.shape[0], y.shape[1] - 1
    levels = spending(alpha, plan) / m
    code = np.full((studies, m), UNDECIDED)
    within = np.zeros((studies, m), dtype=bool)
    n_run = np.zeros((studies, m), dtype=int)
    active = np.ones((studies, m), dtype=bool)
    for k, n in enumerate(plan):
        rows = np.flatnonzero(active.any(1))
        if not len(rows):
            break
        n_run[rows] = np.where(active[rows], n, n_run[rows])
        seeds = np.concatenate([np.full((len(rows), 1), n), n_run[rows]], axis=1)  # the baseline's: n
        known = np.arange(n) < seeds[..., None]  # (B, V, n)
        x = y[rows, :, :n]
        worst = np.where(known & np.isfinite(x), x, -np.inf).max(axis=(1, 2))
        x = np.where(np.isfinite(x), x, worst[:, None, None])
        var, df = shared_noise(x, known)
        var, df = without_outliers(x, known, var, df)
        c, w, sd, units = _look(x[:, 1:], x[:, :1], var, df, levels[k], margin, relative)
        now = active[rows]
        code[rows] = np.where(now, c, code[rows])
        within[rows] = np.where(now, w, within[rows])
        still = now & (c == UNDECIDED)
        if 0 < k < len(plan) - 1:  # futility, after the first look and before the last
            mean = (x[:, 1:] - x[:, :1]).mean(-1)
            still &= ~hopeless(mean, sd, units, levels[-1], n, plan[-1])
        active[rows] = still
    return code, within, n_run


def previous_method(y: np.ndarray, plan: Sequence[int] = PLAN, alpha: float = ALPHA, margin: float = 1.0,
                    relative: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The method before this one: each variant's own t-interval of its finite paired differences
    (a diverged cell drops its pair) at confidence 1 - alpha / (m K); better/worse when it excludes
    0, equivalent when it lies inside +-margin (relative: margin x the baseline's mean over the
    first look). Same outputs as this_method."""
    studies, m = y.shape[0], y.shape[1] - 1
    a = alpha / (m * len(plan))
    if relative:
        first = y[:, 0, :plan[0]]
        ok = np.isfinite(first)
        with np.errstate(invalid="ignore"):
            margin = margin * np.abs(np.where(ok, first, 0).sum(1) / ok.sum(1))[:, None]
    margin = np.broadcast_to(margin, (studies, 1))
    code = np.full((studies, m), UNDECIDED)
    within = np.zeros((studies, m), dtype=bool)
    n_run = np.zeros((studies, m), dtype=int)
    active = np.ones((studies, m), dtype=bool)
    for n in plan:
        n_run = np.where(active, n, n_run)
        with np.errstate(invalid="ignore", divide="ignore"):
            d = y[:, 1:, :n] - y[:, :1, :n]
            ok = np.isfinite(d)
            count = ok.sum(-1)
            mean = np.where(ok, d, 0).sum(-1) / count
            sd = np.sqrt((np.where(ok, d - mean[..., None], 0) ** 2).sum(-1) / (count - 1))
            half = sps.t.isf(a / 2, np.where(count >= 2, count - 1, np.nan)) * sd / np.sqrt(count)
        low, high = mean - half, mean + half
        w = (low > -margin) & (high < margin)
        c = np.select([high < 0, low > 0, w], [BETTER, WORSE, EQUIVALENT], UNDECIDED)
        c = np.where(np.isfinite(margin) & (margin > 0), c, UNDECIDED)  # no margin: nothing decided
        code, within = np.where(active, c, code), np.where(active, w & (c != UNDECIDED), within)
        active &= c == UNDECIDED
    return code, within, n_run


Rule = Callable[..., tuple[np.ndarray, np.ndarray, np.ndarray]]
RULES: dict[str, Rule] = {"this method": this_method, "previous": previous_method}


@dataclass(frozen=True)
class Studies:
    """Verdicts of simulated studies: one row per study, one column per variant."""
    true: np.ndarray  # (m,) true differences, in margins
    code: np.ndarray  # (studies, m) index into records.DECISIONS
    within: np.ndarray  # (studies, m) the verdict put the difference inside +-margin
    n: np.ndarray  # (studies, m) seeds each variant ran

    def wrong(self) -> np.ndarray:
        """Better when the truth is >= 0, worse when <= 0, inside the margin when |true| >= 1."""
        mu = self.true[None, :]
        return (((self.code == BETTER) & (mu >= 0)) | ((self.code == WORSE) & (mu <= 0))
                | (self.within & (np.abs(mu) >= 1.0)))

    @property
    def family_error(self) -> float:
        """Share of studies with any wrong verdict."""
        return float(self.wrong().any(1).mean())

    @property
    def family_se(self) -> float:
        """Its Monte-Carlo standard error (studies are independent)."""
        p = self.family_error
        return math.sqrt(p * (1 - p) / len(self.code))

    def share(self, code: int, first_look: int | None = None) -> float:
        """Share of all variants ending with this verdict code (at the first_look's seeds, if given)."""
        hit = self.code == code
        return float((hit & (self.n == first_look)).mean() if first_look else hit.mean())

    def share_se(self, code: int) -> float:
        """Standard error of share(code): from the per-study shares, as a study's variants are correlated."""
        per_study = (self.code == code).mean(1)
        return float(per_study.std(ddof=1) / math.sqrt(len(per_study)))

    @property
    def cells(self) -> float:
        """Mean cells a study ran: its variants' seeds and the baseline's (its longest variant's)."""
        return float((self.n.sum(1) + self.n.max(1)).mean())

    def summary(self) -> dict:
        return {"family_error": self.family_error, "family_se": self.family_se,
                **{str(v): self.share(DECISIONS.index(v)) for v in DECISIONS},
                "within_margin": float(self.within.mean()), "cells": self.cells, "mean_seeds": float(self.n.mean())}


def simulate(noise: Noise, true: float | Sequence[float], *, studies: int, seed: int, rule: Rule = this_method,
             variants: int = VARIANTS, alpha: float = ALPHA, margin: float = 1.0) -> Studies:
    """Simulated studies under `noise` through `rule`; the same seed gives the same cells whatever
    the rule. true: one difference for every variant, or one per variant, in margins. margin: the
    rule's margin in units of the true one (2: twice too lax); alpha: the rule's."""
    mu = np.broadcast_to(np.asarray(true, dtype=float), (variants,) if np.ndim(true) == 0 else np.shape(true))
    y = cells(noise, mu, studies, np.random.default_rng(seed))
    return Studies(np.array(mu), *rule(y, PLAN, alpha, noise.margin(margin), noise.relative))


def pct(x: float) -> str:
    return f"{100 * x:.1f}"


def pct_se(s: Studies) -> str:
    return f"{100 * s.family_error:.2f} ± {100 * s.family_se:.2f}"


def markdown(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)


def target_rows(alpha: float) -> list[tuple]:
    """(target, goal, setting, figure, met, figure as text) for every target of the issue; figure
    and met take a setting's Studies."""
    first = PLAN[0]
    worse, equivalent = (lambda s: s.share(WORSE)), (lambda s: s.share(EQUIVALENT))  # noqa: E731
    gross = lambda s: s.share(WORSE, first)  # noqa: E731
    rows = [(f"family error, every true difference {true:g} margin, {model}", f"<= {alpha:g} + 2 s.e.", (model, true),
             lambda s: s.family_error, lambda s: s.family_error <= alpha + 2 * s.family_se, pct_se)
            for model in MODELS for true in (0.0, 1.0)]
    return rows + [
        ("worse at 2 margins, normal", ">= 97%", ("normal", 2.0), worse, lambda s: worse(s) >= 0.97,
         lambda s: pct(worse(s))),
        ("equivalent at 0, normal", ">= 25%", ("normal", 0.0), equivalent, lambda s: equivalent(s) >= 0.25,
         lambda s: pct(equivalent(s))),
        ("cells of the mixed study, normal", "<= 100 of 120", ("mixed",), lambda s: s.cells,
         lambda s: s.cells <= 100, lambda s: f"{s.cells:.1f}"),
        ("gross effect (10 margins) worse at the first look", ">= 95%", ("gross", 10.0), gross,
         lambda s: gross(s) >= 0.95, lambda s: pct(gross(s))),
        (f"(informative: 10 cell sds = {10 * CELL_SD:.2f} margins, worse at the first look)", "–",
         ("gross", 10 * CELL_SD), gross, lambda s: True, lambda s: pct(gross(s))),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=20_000, help="simulated studies per setting")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    start = time.perf_counter()
    settings = {(model, true): (MODELS[model], true) for model in MODELS for true in (0.0, 1.0, 2.0)}
    settings |= {("mixed",): (MODELS["normal"], MIXED),
                 ("gross", 10.0): (MODELS["normal"], 10.0), ("gross", 10 * CELL_SD): (MODELS["normal"], 10 * CELL_SD)}
    runs, seconds = {}, {rule: 0.0 for rule in RULES}
    for i, (key, (noise, true)) in enumerate(settings.items()):
        runs[key] = {}
        for name, rule in RULES.items():  # the same cells for both rules
            tick = time.perf_counter()
            runs[key][name] = simulate(noise, true, studies=args.studies, seed=args.seed * 1000 + i, rule=rule)
            seconds[name] += time.perf_counter() - tick
    total = time.perf_counter() - start

    this, prev = RULES
    both = lambda key, f: f"{f(runs[key][this])} / {f(runs[key][prev])}"  # noqa: E731
    checks = [(what, goal, {rule: (text(s), bool(met(s)), figure(s)) for rule, s in runs[key].items()})
              for what, goal, key, figure, met, text in target_rows(ALPHA)]
    table1 = markdown(["target", "goal", this, prev],
                      [[what, goal, *(f"{t} {'yes' if ok else '**no**'}" for t, ok, _ in res.values())]
                       for what, goal, res in checks])
    table2 = markdown(
        ["noise model", "any wrong verdict at 0 %", "at 1 margin %", "worse at 2 margins %", "equivalent at 0 %",
         "better or worse at 0 %", "cells at 0 (of 120)"],
        [[model, both((model, 0.0), pct_se), both((model, 1.0), pct_se),
          both((model, 2.0), lambda s: pct(s.share(WORSE))), both((model, 0.0), lambda s: pct(s.share(EQUIVALENT))),
          both((model, 0.0), lambda s: pct(s.share(BETTER) + s.share(WORSE))),
          both((model, 0.0), lambda s: f"{s.cells:.1f}")] for model in MODELS])
    mixed = runs[("mixed",)]
    table3 = markdown(
        ["true / margin", *(f"{rule}: better / worse / equivalent / undecided %" for rule in RULES)],
        [[f"{t:g}", *(" / ".join(pct(float((s.code[:, np.asarray(MIXED) == t] == c).mean()))
                                 for c in (BETTER, WORSE, EQUIVALENT, UNDECIDED)) for s in mixed.values())]
         for t in sorted(set(MIXED))]
        + [["any wrong verdict %", *(pct_se(s) for s in mixed.values())],
           ["cells (of 120)", *(f"{s.cells:.1f}" for s in mixed.values())]])
    print(f"{args.studies} studies per setting, {VARIANTS} variants, alpha {ALPHA}, looks {list(PLAN)}, "
          f"alpha_k {np.round(spending(ALPHA, PLAN), 5).tolist()}; {total:.1f} s "
          f"({this} {seconds[this]:.1f} s, {prev} {seconds[prev]:.1f} s)\n")
    print("Targets\n", table1, "\nPer noise model (this method / previous)\n", table2,
          "\nThe mixed study (normal)\n", table3, sep="\n")
    missed = [what for what, _, res in checks if not res[this][1]]
    path = write_json("power", {
        **provenance(torch.device("cpu")), "args": vars(args), "variants": VARIANTS, "alpha": ALPHA, "looks": PLAN,
        "spending": spending(ALPHA, PLAN).tolist(), "models": {k: v.about for k, v in MODELS.items()},
        "method": stats.METHOD, "seconds": {"total": round(total, 1), **{k: round(v, 1) for k, v in seconds.items()}},
        "targets": [{"target": what, "goal": goal, **{rule: x for rule, (_, _, x) in res.items()},
                     **{f"{rule} met": ok for rule, (_, ok, _) in res.items()}} for what, goal, res in checks],
        "settings": [{"setting": " ".join(str(x) for x in key), "true_over_margin": np.atleast_1d(true).tolist(),
                      "model": noise.about, **{rule: s.summary() for rule, s in runs[key].items()}}
                     for key, (noise, true) in settings.items()],
        "missed": missed})
    print(f"\nwrote {path}")
    if missed:
        raise SystemExit("this method misses its targets: " + "; ".join(missed))


if __name__ == "__main__":
    main()
