"""What every benchmark records beside its numbers: machine, versions, date, commit; and the timer."""
from __future__ import annotations

import datetime
import json
import os
import platform
import time
from pathlib import Path
from typing import Callable

import torch

from chae_ablate.provenance import git_state

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str:
    """Short commit of the repository, with '+dirty' when tracked files have changes."""
    commit, dirty = git_state(REPO)
    return commit[:7] + ("+dirty" if dirty else "")


def machine(device: torch.device) -> dict:
    """CPU, cores, threads, accelerator, versions and the load average (other work on the machine)."""
    info = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_avg_1_5_15": [round(x, 2) for x in os.getloadavg()],
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def provenance(device: torch.device) -> dict:
    return {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "git_commit": git_commit(), "machine": machine(device)}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def images_per_s(step: Callable[[], None], steps: int, warmup: int, batch: int,
                 device: torch.device) -> float:
    """Run `warmup` untimed steps, then time `steps` steps of `batch` images each."""
    for _ in range(warmup):
        step()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    return steps * batch / (time.perf_counter() - start)


def write_json(name: str, payload: dict, directory: Path = RESULTS) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path
