"""The paper's study on one GPU: does the CUDA path work, how fast is it, how long would paper11 take?

Run on a GPU machine as `bash benchmarks/gpu_check.sh` (it installs the missing wheels first). In
order, each stage under its own time limit inside --budget-s, so a failure or an overrun costs only
that stage:
  1. images with artists11's shape (11 classes of 877 ... 153, 3,902 in all, 224 px RGB JPEG),
     drawn by chae_ablate.sources.render_synthetic under runs/gpu-check/: step time does not depend
     on pixel content, so rates carry over to artists11, losses and accuracies do not;
  2. `pytest -v -rs -m "not slow" tests/test_gpu.py` (its CUDA cases: bf16, channels_last, compile,
     device-side augmentation, CUDA vs CPU metrics);
  3. a slice of studies/paper11.yaml on those images, every cell a train_cell in its own process
     (a checkpoint every epoch as in a study; no MLflow, which the GPU machine lacks):
     baseline and res384 alone for 20 epochs, then the baseline in 2 and 3 concurrent processes
     (as `--workers 2|3` runs cells), each process killed at its phase's deadline; a cell that
     did not finish is projected from its epochs (first + (20 - 1) x median later epoch);
  4. benchmarks/throughput.py --device cuda --res 256 384 on the same images;
  5. paper11's minutes for 1 and 3 seeds: measured cells as measured, the other variants as the
     baseline's time x their forward-FLOP ratio (chae_ablate.builders.forward_flops), divided by the
     measured gain of concurrent processes.
GPU utilisation and memory are sampled every 500 ms (nvidia-smi, else pynvml) through it all.
Writes benchmarks/results/gpu-check-<device>[-dryrun].json (and copies to $OUT when set).

    python benchmarks/gpu_check.py --device cpu --quick   # the same code at tiny sizes, < 2 min
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
from common import REPO, RESULTS, provenance, write_json  # noqa: E402

from chae_ablate.config import ExperimentConfig  # noqa: E402
from chae_ablate.data import load_dataset  # noqa: E402
from chae_ablate.sources import render_synthetic  # noqa: E402
from chae_ablate.errors import ChaeError  # noqa: E402
from chae_ablate.builders import forward_flops, training_memory  # noqa: E402
from chae_ablate.study import load_study  # noqa: E402
from chae_ablate.train import NullTracker, pick_device, train_cell  # noqa: E402

ARTISTS11_COUNTS = (877, 600, 336, 328, 302, 291, 262, 259, 255, 239, 153)  # ../shared/data/artists11: 3,902
KAGGLE_IMAGES = 4299  # the paper's data: Kaggle's artists with > 200 paintings
PAPER11 = REPO / "studies" / "paper11.yaml"
TIMED = ("baseline", "res384")  # the cells timed alone; the others are projected by FLOPs
FLOOR_S = {"tests": 60, "alone": 45, "together": 25, "throughput": 45}  # the least each stage gets
NOTE = ("Timed on generated images with artists11's shape (11 classes of {counts}, {n} images, "
        "{px}x{px} RGB JPEG q90, drawn by chae_ablate.sources.render_synthetic), not on artists11 "
        "itself: step time does not depend on pixel content, so images/s, minutes and GPU "
        "utilisation carry over to artists11; losses and accuracies here mean nothing.")


@dataclass(frozen=True)
class Sizes:
    """Everything that differs between the real check and the CPU dry run."""

    counts: tuple[int, ...]  # generated images per class
    image_px: int  # side of the generated JPEGs
    res_scale: float  # paper11's resolutions times this (the dry run shrinks 256 -> 32)
    epochs: int  # epochs per timed cell
    alone_s: dict  # deadline of each TIMED cell trained alone
    together_s: float  # deadline of each concurrent phase
    throughput_args: tuple[str, ...]


FULL = Sizes(ARTISTS11_COUNTS, 224, 1.0, 20, {"baseline": 100, "res384": 140}, 35,
             ("--res", "256", "384", "--workers", "4"))
QUICK = Sizes(tuple(n // 20 for n in ARTISTS11_COUNTS), 48, 1 / 8, 2, {"baseline": 60, "res384": 60}, 30,
              ("--res", "32", "48", "--steps", "3", "--warmup", "1", "--repeats", "1", "--no-profile",
               "--workers", "0"))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", help="cuda | cpu | ... (default: cuda)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: the CPU dry run of this script")
    ap.add_argument("--budget-s", type=float, default=460, help="wall-clock budget of all stages (default 460)")
    ap.add_argument("--concurrency", type=int, nargs="*", default=[2, 3],
                    help="processes per GPU timed together (default: 2 3)")
    ap.add_argument("--runs", type=Path, default=REPO / "runs" / "gpu-check", help="generated data, caches, logs")
    ap.add_argument("--skip", nargs="*", default=[], choices=["tests", "slice", "throughput"])
    # one timed cell in a child process (internal)
    ap.add_argument("--cell", help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--log", type=Path, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


class Budget:
    """Seconds left of the run's wall-clock budget, shared out between stages."""

    def __init__(self, total_s: float):
        self.total_s, self.start = total_s, time.monotonic()

    def left(self) -> float:
        return self.total_s - (time.monotonic() - self.start)

    def cap(self, want_s: float, keep_s: float = 0, floor_s: float = 20) -> float:
        """`want_s`, cut so that `keep_s` stays for later stages, but never under `floor_s`."""
        return max(floor_s, min(want_s, self.left() - keep_s))


# --- 1. generated images -----------------------------------------------------------------------

def make_images(root: Path, sizes: Sizes, chunk: int = 64) -> dict:
    """A class-per-folder JPEG set of `sizes.counts` images per class (made once, then reused),
    drawn and encoded `chunk` images per task on every core (numpy and PIL release the GIL)."""
    spec = {"counts": list(sizes.counts), "px": sizes.image_px, "images": sum(sizes.counts), "root": str(root)}
    done = root / "DONE.json"
    if done.exists() and all(json.loads(done.read_text()).get(k) == spec[k] for k in ("counts", "px")):
        return json.loads(done.read_text())
    shutil.rmtree(root, ignore_errors=True)
    start = time.perf_counter()

    def draw(label: int, first: int) -> None:
        count = min(chunk, sizes.counts[label] - first)
        pixels = render_synthetic(np.full(count, label), len(sizes.counts), sizes.image_px,
                                  np.random.default_rng([label, first]))  # (n, 3, R, R) uint8
        for i, image in enumerate(pixels):
            Image.fromarray(image.transpose(1, 2, 0)).save(root / f"artist{label:02d}" / f"{first + i:04d}.jpg",
                                                           quality=90)
    for label in range(len(sizes.counts)):
        (root / f"artist{label:02d}").mkdir(parents=True)
    with ThreadPoolExecutor(os.cpu_count()) as pool:
        jobs = [pool.submit(draw, label, first) for label, n in enumerate(sizes.counts) for first in range(0, n, chunk)]
        for job in jobs:
            job.result()
    spec["creation_s"] = round(time.perf_counter() - start, 1)
    done.write_text(json.dumps(spec))
    return spec


# --- subprocesses ------------------------------------------------------------------------------

QUICK_THREADS = "1"  # the dry run's torch threads per child: on a shared 2-core VM two OpenMP
                    # threads per process wait for each other and a 1 s epoch takes a minute


def child_env(quick: bool) -> dict:
    env = dict(os.environ, TQDM_DISABLE="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    if quick:
        env["OMP_NUM_THREADS"] = QUICK_THREADS
    return env


def start(cmd: list[str], log: Path, quick: bool) -> subprocess.Popen:
    """A child in its own process group (so a deadline ends it and whatever it started)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        return subprocess.Popen(cmd, cwd=REPO, env=child_env(quick), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def wait_all(procs: list[subprocess.Popen], deadline_s: float) -> list[bool]:
    """Wait for every child until the deadline; end the group of each one still running.
    Returns, per child, whether it was killed."""
    end = time.monotonic() + deadline_s
    while any(p.poll() is None for p in procs) and time.monotonic() < end:
        time.sleep(0.25)
    killed = [p.poll() is None for p in procs]
    for p, k in zip(procs, killed):
        if k:
            os.killpg(p.pid, signal.SIGKILL)  # the child's own group: it and its compile workers
        p.wait()
    return killed


def run_stage(name: str, cmd: list[str], timeout_s: float, logs: Path, quick: bool) -> dict:
    """Run one stage's command under a time limit; its rc, seconds and the tail of its output."""
    log, started = logs / f"{name}.log", time.monotonic()
    proc = start(cmd, log, quick)
    killed = wait_all([proc], timeout_s)[0]
    text = log.read_text(errors="replace")
    return {"command": " ".join(cmd[1:]), "rc": proc.returncode, "timed_out": killed,
            "limit_s": round(timeout_s), "seconds": round(time.monotonic() - started, 1),
            "output_tail": text[-3000:], "log": str(log)}


# --- 2. tests ----------------------------------------------------------------------------------

def run_tests(timeout_s: float, logs: Path, quick: bool) -> dict:
    """tests/test_gpu.py without the CPU-only slow compile case: each test's outcome, read from
    pytest's verbose lines, so a run cut short by its time limit still reports what finished."""
    stage = run_stage("pytest", [sys.executable, "-m", "pytest", "-v", "-rs", "-p", "no:cacheprovider",
                                 "-m", "not slow", "tests/test_gpu.py"], timeout_s, logs, quick)
    text = Path(stage["log"]).read_text(errors="replace")
    stage["outcomes"] = dict(re.findall(r"::(\S+) (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)", text))
    stage["counts"] = dict(collections.Counter(stage["outcomes"].values()))
    stage["output_tail"] = stage["output_tail"][-1500:]
    return stage


# --- 3. the timed slice ------------------------------------------------------------------------

def paper11_configs(root: Path, sizes: Sizes) -> dict[str, ExperimentConfig]:
    """paper11's cells on the generated images, resolutions scaled and epochs set for this run."""
    study = load_study(PAPER11, {"data.root": str(root)})
    out = {}
    for v in study.variants:
        model = replace(v.config.model, resolution=int(v.config.model.resolution * sizes.res_scale))
        out[v.name] = replace(v.config, model=model, protocol=replace(v.config.protocol, epochs=sizes.epochs))
    return out


class EpochLog(NullTracker):
    """train_cell's tracker in a timed child: one JSON line per epoch, stamped with the wall clock."""

    def __init__(self, path: Path):
        self.path = path

    def write(self, event: str, **fields) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"event": event, "t": time.time(), **fields}) + "\n")

    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
        self.write("epoch", epoch=epoch, peak_memory_mb=peak, **metrics)


def checkpoints(log: Path) -> Path:
    """A timed cell's checkpoint folder: written every epoch as in a study, cleared before each run
    (a left-over checkpoint would resume the cell instead of timing it)."""
    return log.with_name(log.stem + "-checkpoint")


def child(args: argparse.Namespace) -> int:
    """One timed cell (--cell VARIANT --seed S): load the cached images, train, log every epoch."""
    log = EpochLog(args.log)
    log.write("start")
    torch.set_num_threads(args.threads)
    config = paper11_configs(args.runs / "images", QUICK if args.quick else FULL)[args.cell]
    data = load_dataset(config.data, config.model.resolution, args.runs, progress=False)
    estimate = training_memory(config.model, len(data.classes), config.protocol.batch_size, config.protocol.optimizer)
    log.write("loaded", images_per_epoch=len(data.train.labels) * (config.protocol.augment.copies + 1),
              memory_estimate_mb=estimate / 2**20)  # `plan`'s figure (float32), against CUDA's peak per epoch
    result = train_cell(config=config, seed=args.seed, data=data, device=pick_device(args.device), tracker=log,
                        checkpoint_dir=checkpoints(args.log))
    log.write("done", best_val_loss=result.best_val_loss, test_acc=result.test_acc,
              images_per_s=result.images_per_s, wall_time_s=result.wall_time_s)
    return 0


def read_log(path: Path) -> dict:
    """{'start'/'loaded'/'done': event, 'epochs': [epoch events]} from a child's JSON lines (a
    line cut short by a kill at the deadline is dropped)."""
    events = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    out = {e["event"]: e for e in events if e["event"] != "epoch"}
    out["epochs"] = [e for e in events if e["event"] == "epoch"]
    return out


def summarise_child(log: dict, launched: float, epochs: int) -> dict:
    """Startup, first and steady epoch, images/s and the cell's training time (measured when it
    finished, else first + (epochs - 1) x steady)."""
    if "loaded" not in log:
        return {"error": "the child did not load its data (see its log)"}
    stamps = [log["loaded"]["t"]] + [e["t"] for e in log["epochs"]]
    durations = [b - a for a, b in zip(stamps, stamps[1:])]
    steady = statistics.median(durations[1:] or durations) if durations else None
    out = {"startup_s": round(log["loaded"]["t"] - launched, 1), "epochs_done": len(durations),
           "finished": "done" in log, "first_epoch_s": round(durations[0], 2) if durations else None,
           "steady_epoch_s": round(steady, 3) if steady else None,
           "images_per_epoch": log["loaded"]["images_per_epoch"],
           "steady_images_per_s": round(log["loaded"]["images_per_epoch"] / steady, 1) if steady else None,
           "memory_estimate_mb": round(log["loaded"].get("memory_estimate_mb", float("nan")), 1),
           "cuda_peak_memory_mb": max((e["peak_memory_mb"] for e in log["epochs"] if e.get("peak_memory_mb")),
                                      default=None)}
    if "done" in log:
        out.update(train_s=round(log["done"]["t"] - log["loaded"]["t"], 1), train_s_is="measured",
                   best_val_loss=round(log["done"]["best_val_loss"], 4))
    elif steady:
        out.update(train_s=round(durations[0] + (epochs - 1) * steady, 1),
                   train_s_is=f"projected from {len(durations)} of {epochs} epochs")
    return out


def run_phase(name: str, cells: list[tuple[str, int]], deadline_s: float, args, sizes: Sizes,
              sampler: "GpuSampler") -> dict:
    """Train `cells` (variant, seed) at once, one process each, until they finish or the deadline."""
    logs = [args.runs / "slice" / f"{name}-{i}.jsonl" for i in range(len(cells))]
    for log in logs:
        log.unlink(missing_ok=True)
        shutil.rmtree(checkpoints(log), ignore_errors=True)
    threads = QUICK_THREADS if args.quick else str(max(1, (os.cpu_count() or 1) // len(cells)))
    launched = time.time()
    procs = [start([sys.executable, __file__, "--cell", v, "--seed", str(s), "--device", args.device,
                    "--threads", threads, "--runs", str(args.runs), "--log", str(log)]
                   + (["--quick"] if args.quick else []), log.with_suffix(".out"), args.quick)
             for (v, s), log in zip(cells, logs)]
    killed = wait_all(procs, deadline_s)
    ended = time.time()
    per = [{"cell": f"{v}/seed{s}", "rc": p.returncode, "killed_at_deadline": k,
            **summarise_child(read_log(log), launched, sizes.epochs)}
           for (v, s), p, k, log in zip(cells, procs, killed, logs)]
    for entry, log in zip(per, logs):
        if entry["rc"] and not entry["killed_at_deadline"]:
            entry["output_tail"] = log.with_suffix(".out").read_text(errors="replace")[-2000:]
    rates = [p.get("steady_images_per_s") for p in per]
    return {"phase": name, "processes": len(cells), "deadline_s": round(deadline_s),
            "wall_s": round(ended - launched, 1), "gpu": sampler.window(launched, ended),
            "aggregate_images_per_s": round(sum(rates), 1) if all(rates) else None, "per_process": per}


def run_slice(args, sizes: Sizes, budget: Budget, sampler: "GpuSampler", report: dict) -> list[dict]:
    """TIMED cells alone, then the baseline in each --concurrency; each deadline cut so that the
    later phases and the throughput stage keep at least their FLOOR_S."""
    plan = [(f"{v}-alone", [(v, 0)], sizes.alone_s[v], FLOOR_S["alone"]) for v in TIMED]
    plan += [(f"baseline-x{k}", [("baseline", s) for s in range(k)], sizes.together_s, FLOOR_S["together"])
             for k in args.concurrency]
    phases = report.setdefault("slice", [])
    for i, (name, cells, want_s, floor_s) in enumerate(plan):
        keep = sum(f for *_, f in plan[i + 1:]) + FLOOR_S["throughput"]
        phases.append(run_phase(name, cells, budget.cap(want_s, keep_s=keep, floor_s=floor_s), args, sizes, sampler))
        save(report)  # what is measured so far survives a later stage's crash or the command's limit
    return phases


# --- 5. projection -----------------------------------------------------------------------------

def project(configs: dict[str, ExperimentConfig], phases: list[dict], num_classes: int) -> dict:
    """paper11's minutes: TIMED cells as measured (startup included), every other cell as the
    baseline's training time x its forward-FLOP ratio plus the baseline's startup; divided by the
    baseline's aggregate rate in k processes over its rate alone."""
    alone = {p["phase"].removesuffix("-alone"): p["per_process"][0] for p in phases if p["phase"].endswith("-alone")}
    base = alone.get("baseline", {})
    if "train_s" not in base:
        return {"error": "the baseline was not timed; nothing to project from"}
    flops = {name: forward_flops(cfg.model, num_classes) for name, cfg in configs.items()}
    cells = {}
    for name in configs:
        timed = alone.get(name, {})
        ratio = flops[name] / flops["baseline"]
        if "train_s" in timed:
            seconds, source = timed["startup_s"] + timed["train_s"], f"timed ({timed['train_s_is']})"
        else:
            seconds, source = base["startup_s"] + base["train_s"] * ratio, f"baseline x FLOP ratio {ratio:.3f}"
        cells[name] = {"seconds": round(seconds, 1), "from": source, "mflops_per_image": round(flops[name] / 1e6, 1)}
    total_s = sum(c["seconds"] for c in cells.values())
    gains = {1: 1.0} | {p["processes"]: p["aggregate_images_per_s"] / base["steady_images_per_s"]
                       for p in phases if p["phase"].startswith("baseline-x") and p["aggregate_images_per_s"]}
    minutes = {f"{k}_process{'es' if k > 1 else ''}": {f"{s}_seed{'s' if s > 1 else ''}": round(s * total_s / g / 60, 1)
                                                       for s in (1, 3)} for k, g in gains.items()}
    out = {"cells": cells, "concurrency_gain_vs_1_process": {k: round(g, 2) for k, g in gains.items()},
           "minutes": minutes, "paper_kaggle_images_scale": round(KAGGLE_IMAGES / sum(ARTISTS11_COUNTS), 3),
           "best_minutes_1_seed": round(min(total_s / g for g in gains.values()) / 60, 1),
           "assumes": "every cell gains from concurrent processes as the baseline does (res384 likely less); "
                      "on the paper's 4,299 Kaggle images multiply by paper_kaggle_images_scale"}
    if "res384" in alone and "train_s" in alone["res384"]:
        out["res384_time_ratio_vs_flop_ratio"] = [round(alone["res384"]["train_s"] / base["train_s"], 2),
                                                  round(flops["res384"] / flops["baseline"], 2)]
    return out


# --- GPU utilisation ---------------------------------------------------------------------------

def _numbers(line: str) -> tuple[float, float] | None:
    """'37, 1234' -> (37.0, 1234.0); None for anything else (a header, '[N/A]')."""
    try:
        util, mem = (float(x) for x in line.split(","))
    except ValueError:
        return None
    return util, mem


class GpuSampler:
    """(time, utilisation %, memory MiB) every 500 ms in a thread: nvidia-smi, else pynvml, else
    (the CPU dry run) a stub that says so, so the aggregation below still runs."""

    def __init__(self, device_index: int = 0):
        self.samples: list[tuple[float, float, float]] = []
        self.source, self.proc, self._stop = "none", None, threading.Event()
        self.index = device_index

    def __enter__(self) -> "GpuSampler":
        readings = self._nvidia_smi() or self._nvml() or self._stub()
        threading.Thread(target=self._collect, args=(readings,), daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self.proc:
            self.proc.terminate()
            self.proc.wait()

    def _collect(self, readings) -> None:
        for util, mem in readings:
            if self._stop.is_set():
                return
            self.samples.append((time.time(), util, mem))

    def _nvidia_smi(self):
        if not shutil.which("nvidia-smi"):
            return None
        query = ["--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits", "-lms", "500"]
        self.proc = subprocess.Popen(["nvidia-smi", "-i", str(self.index), *query], stdout=subprocess.PIPE, text=True)
        self.source = "nvidia-smi -lms 500"
        return filter(None, map(_numbers, self.proc.stdout))

    def _nvml(self):
        try:
            import pynvml
            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(self.index)
        except Exception:
            return None
        self.source = "pynvml every 500 ms"

        def poll():
            while not self._stop.wait(0.5):
                yield (pynvml.nvmlDeviceGetUtilizationRates(handle).gpu,
                       pynvml.nvmlDeviceGetMemoryInfo(handle).used / 2**20)
        return poll()

    def _stub(self):
        self.source = "stub (no nvidia-smi or NVML here): constant 0 %, not a measurement"

        def poll():
            while not self._stop.wait(0.5):
                yield 0.0, 0.0
        return poll()

    def window(self, t0: float, t1: float) -> dict:
        """Utilisation (mean, median, share of samples >= 90 %) and peak memory between t0 and t1."""
        inside = [(u, m) for t, u, m in self.samples if t0 <= t <= t1]
        if not inside:
            return {"samples": 0, "source": self.source}
        util = [u for u, _ in inside]
        return {"samples": len(inside), "source": self.source, "util_mean_pct": round(statistics.mean(util), 1),
                "util_median_pct": statistics.median(util),
                "util_ge_90_share": round(sum(u >= 90 for u in util) / len(util), 2),
                "memory_max_mib": max(m for _, m in inside)}


# --- main --------------------------------------------------------------------------------------

def throughput(args, sizes: Sizes, name: str, timeout_s: float) -> dict:
    """benchmarks/throughput.py on the generated images; its JSON folded in."""
    cmd = [sys.executable, str(REPO / "benchmarks" / "throughput.py"), "--device", args.device, "--data",
           str(args.runs / "images"), "--runs", str(args.runs), "--name", name, *sizes.throughput_args]
    stage = run_stage("throughput", cmd, timeout_s, args.runs / "logs", args.quick)
    path = RESULTS / f"{name}.json"
    if stage["rc"] == 0 and path.exists():
        report = json.loads(path.read_text())
        stage["file"] = str(path)
        keys = ("resolution", "images_per_s", "ratio_pipeline_to_model", "cache_build_s")
        stage["results"] = [{k: r[k] for k in keys} for r in report["results"]]
        del stage["output_tail"]
    return stage


def run(args: argparse.Namespace) -> dict:
    device, sizes, budget = pick_device(args.device), QUICK if args.quick else FULL, Budget(args.budget_s)
    suffix = f"{device.type}{'-dryrun' if args.quick else ''}"
    report = {"name": f"gpu-check-{suffix}", **provenance(device), "budget_s": args.budget_s}
    report["images"] = make_images(args.runs / "images", sizes)
    report["note"] = NOTE.format(counts=", ".join(map(str, sizes.counts)), n=sum(sizes.counts), px=sizes.image_px)
    print(f"{report['name']}: {report['machine'].get('gpu', device)}; images {report['images']}", flush=True)
    configs = paper11_configs(args.runs / "images", sizes)
    report["slice_settings"] = {"epochs": sizes.epochs, "alone_deadline_s": sizes.alone_s,
                                "together_deadline_s": sizes.together_s, "concurrency": args.concurrency,
                                "protocol": "paper11's: batch 32, Adam 1e-4, 4 augmented copies + 1"}
    with GpuSampler(device.index or 0) as sampler:
        if "tests" not in args.skip:
            later = 2 * FLOOR_S["alone"] + len(args.concurrency) * FLOOR_S["together"] + FLOOR_S["throughput"]
            report["tests"] = run_tests(budget.cap(120, keep_s=later, floor_s=FLOOR_S["tests"]), args.runs / "logs",
                                        args.quick)
            print(f"tests: {report['tests']['counts']} in {report['tests']['seconds']} s", flush=True)
            save(report)
        started = time.time()
        for variant in TIMED:  # the caches, so no timed child decodes images
            load_dataset(configs[variant].data, configs[variant].model.resolution, args.runs, progress=False)
        report["cache_build_s"] = round(time.time() - started, 1)
        if "slice" not in args.skip:
            run_slice(args, sizes, budget, sampler, report)
            report["projection"] = project(configs, report["slice"], len(sizes.counts))
            save(report)
        if "throughput" not in args.skip:
            report["throughput"] = throughput(args, sizes, f"artists11-shaped-{suffix}",
                                              budget.cap(90, floor_s=FLOOR_S["throughput"]))
        report["gpu_whole_run"] = sampler.window(0, time.time())
    report["seconds"] = round(time.monotonic() - budget.start, 1)
    return report


def format_summary(report: dict) -> str:
    lines = [f"{report['name']} ({report['date']}, {report['machine'].get('gpu', report['machine']['device'])}), "
             f"{report['seconds']} s of {report['budget_s']:.0f}"]
    for p in report.get("slice", []):
        cells = "; ".join(f"{c['cell']} {c.get('epochs_done')} ep, steady {c.get('steady_images_per_s')} img/s, "
                          f"train {c.get('train_s')} s ({c.get('train_s_is', c.get('error'))})"
                          for c in p["per_process"])
        lines.append(f"  {p['phase']}: {cells}; GPU util mean {p['gpu'].get('util_mean_pct')} %")
    for r in report.get("throughput", {}).get("results", []):
        lines.append(f"  throughput {r['resolution']} px: {r['images_per_s']}")
    proj = report.get("projection", {})
    if "minutes" in proj:
        lines.append(f"  paper11 minutes: {proj['minutes']} (gains {proj['concurrency_gain_vs_1_process']})")
    return "\n".join(lines)


def save(report: dict) -> list[Path]:
    """The JSON in benchmarks/results/ and, with the throughput JSON and the logs, under $OUT if set."""
    paths = [write_json(report["name"], report)]
    if os.environ.get("OUT"):
        out = Path(os.environ["OUT"])
        logs = Path(report["images"]["root"]).parent / "logs"
        extra = [Path(report.get("throughput", {}).get("file", "")), *logs.glob("*.log")]
        for path in [paths[0], *(p for p in extra if p.is_file())]:
            shutil.copy(path, out / path.name)
            paths.append(out / path.name)
    return paths


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.runs = args.runs.resolve()
    if args.cell:
        return child(args)
    try:
        report = run(args)
    except ChaeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(format_summary(report))
    print("wrote " + ", ".join(map(str, save(report))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
