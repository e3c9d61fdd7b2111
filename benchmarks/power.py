"""Decisive verdicts: error rates and power of the whole adaptive procedure, by simulation.

    .venv/bin/python benchmarks/power.py                   # 20,000 studies per cell, ~1 min on one core
    .venv/bin/python benchmarks/power.py --studies 2000    # quick look

Every simulated study has --variants variants whose paired differences (variant - baseline, the
metric's units, lower is better) are normal with the same true mean and spread, given in units of
the margin; differences of two variants on one seed correlate by --corr (0.5: they share the
baseline's cell). The procedure is stats.simulate, i.e. stats.METHOD: --min-seeds for everyone,
then more seeds for undecided variants at each planned look, up to --max-seeds.

Tables (markdown, also in benchmarks/results/power.json):
  1. the probability of each verdict, the share of studies with any wrong claim, the mean seeds a
     variant ran and the seeds saved against running --max-seeds everywhere (variants only, and
     whole studies with the baseline, which runs as many seeds as its longest variant);
  2. seed schedules compared: doubling, +1 seed per round, and --max-seeds at once (one look);
  3. why not Holm: reading verdicts off Holm-level intervals, in studies where no variant differs.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy import stats as sps

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import provenance, write_json  # noqa: E402

from chae_ablate import stats  # noqa: E402
from chae_ablate.records import DECISIONS, Verdict  # noqa: E402

TRUE = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0)  # true mean difference / margin
SPREAD = (0.1, 0.25, 0.5, 1.0)  # sd of the paired differences / margin


def cell(sim: stats.Simulation) -> dict:
    worse = sim.verdict == DECISIONS.index(Verdict.WORSE)
    return {**{str(v): sim.share(v) for v in DECISIONS},
            "worse_within_margin": float((worse & sim.within_margin).mean()),
            "family_error": sim.family_error, "mean_seeds": sim.mean_seeds, "seeds_saved": sim.seeds_saved,
            "study_seeds_saved": sim.study_seeds_saved}


def holm_interval_error(sd: float, args: argparse.Namespace, rng: np.random.Generator) -> float:
    """Share of studies (no variant differs, margin 1, one look at --max-seeds) in which some variant
    is called better or worse when each variant's interval is taken at its Holm step's level
    alpha / (m - rank + 1), ranks ordered by the level at which its interval first decides anything
    (min of the two-sided p and twice the TOST p), as long as every earlier step decided."""
    m, n = args.variants, args.max_seeds
    noise = (math.sqrt(args.corr) * rng.standard_normal((args.studies, 1, n))
             + math.sqrt(1 - args.corr) * rng.standard_normal((args.studies, m, n)))
    d = sd * noise
    mean, se, df = d.mean(-1), d.std(-1, ddof=1) / math.sqrt(n), n - 1
    p_diff = 2 * sps.t.sf(np.abs(mean) / se, df)
    p_equiv = np.maximum(sps.t.sf((mean + 1) / se, df), sps.t.cdf((mean - 1) / se, df))
    order = np.argsort(np.minimum(p_diff, 2 * p_equiv), axis=1)
    first = np.take_along_axis(np.minimum(p_diff, 2 * p_equiv), order, axis=1)
    level = args.alpha / (m - np.arange(m))  # Holm: alpha/m, alpha/(m-1), ..., alpha
    decided = np.cumprod(first <= level, axis=1).astype(bool)
    called = decided & (np.take_along_axis(p_diff, order, axis=1) < level)
    return float(called.any(axis=1).mean())


def markdown(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=20_000, help="simulated studies per cell")
    parser.add_argument("--variants", type=int, default=11)
    parser.add_argument("--alpha", type=float, default=0.05)
    parser.add_argument("--min-seeds", type=int, default=3)
    parser.add_argument("--max-seeds", type=int, default=10)
    parser.add_argument("--step", type=int, default=None, help="seeds added per round (default: doubling)")
    parser.add_argument("--corr", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    start = time.perf_counter()
    common = dict(n_variants=args.variants, alpha=args.alpha, n_studies=args.studies, corr=args.corr)
    schedules = {  # name -> (min_seeds, step) at the same max_seeds
        "adaptive": (args.min_seeds, args.step),
        "+1 seed": (args.min_seeds, 1),
        "fixed": (args.max_seeds, None),
    }
    results, seed = [], args.seed
    for true in TRUE:
        for sd in SPREAD:
            row = {"true_over_margin": true, "sd_over_margin": sd}
            for name, (lo, step) in schedules.items():
                seed += 1
                sim = stats.simulate(true, sd, 1.0, min_seeds=lo, max_seeds=args.max_seeds, step=step,
                                     seed=seed, **common)
                row[name] = cell(sim)
            results.append(row)
    rng = np.random.default_rng(args.seed)
    holm = [{"sd_over_margin": sd, "holm_levels": holm_interval_error(sd, args, rng),
             "bonferroni": stats.simulate(0.0, sd, 1.0, min_seeds=args.max_seeds, max_seeds=args.max_seeds,
                                          seed=seed + i + 1, **common).family_error}
            for i, sd in enumerate(SPREAD)]
    seconds = time.perf_counter() - start

    plan = {name: stats.looks(lo, args.max_seeds, step) for name, (lo, step) in schedules.items()}
    pct = lambda x: f"{100 * x:.1f}"  # noqa: E731
    table1 = markdown(
        ["true/margin", "sd/margin", "better %", "worse %", "of which < margin %", "equivalent %",
         "undecided %", "any wrong claim %", "mean seeds", "seeds saved %", "with baseline %"],
        [[r["true_over_margin"], r["sd_over_margin"], *(pct(r["adaptive"][k]) for k in
          ("better", "worse", "worse_within_margin", "equivalent", "undecided", "family_error")),
          f"{r['adaptive']['mean_seeds']:.2f}", pct(r["adaptive"]["seeds_saved"]),
          pct(r["adaptive"]["study_seeds_saved"])] for r in results])
    table2 = markdown(
        ["true/margin", "sd/margin", *(f"{name} {plan[name]}: decided % / seeds" for name in schedules)],
        [[r["true_over_margin"], r["sd_over_margin"],
          *(f"{pct(1 - r[name]['undecided'])} / {r[name]['mean_seeds']:.2f}" for name in schedules)]
         for r in results])
    table3 = markdown(["sd/margin", "Holm-level intervals: false better/worse %", "this method (one look) %"],
                      [[h["sd_over_margin"], pct(h["holm_levels"]), pct(h["bonferroni"])] for h in holm])
    worst = max(r[name]["family_error"] for r in results for name in schedules)
    print(f"{args.studies} studies per cell, {args.variants} variants, alpha {args.alpha}, corr {args.corr}, "
          f"looks {plan['adaptive']}; level of every interval "
          f"{stats.interval_level(args.alpha, args.variants, len(plan['adaptive'])):.5f}; {seconds:.1f} s\n")
    print(table1, "", table2, "", table3, "", f"largest share of studies with a wrong claim: {pct(worst)}%",
          sep="\n")
    path = write_json("power", {
        **provenance(torch.device("cpu")), "args": vars(args), "looks": plan, "method": stats.METHOD,
        "seconds": round(seconds, 1), "cells": results, "holm_levels_vs_bonferroni": holm,
        "largest_family_error": worst})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
