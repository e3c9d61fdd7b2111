"""Can the ceiling itself rise? Row (1) of throughput.py — the model alone on a resident batch —
in three forms: eager (contiguous), channels_last (what a study uses), and torch.compile.

    .venv/bin/python benchmarks/ceiling.py --res 64 128

Prints a table and writes benchmarks/results/ceiling-<device>.json. Synthetic pixels: the model's
speed does not depend on what the images show.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import images_per_s, provenance, write_json  # noqa: E402

from chae_ablate.augment import to_float  # noqa: E402
from chae_ablate.config import ModelConfig  # noqa: E402
from chae_ablate.model import build_model  # noqa: E402
from chae_ablate.train import autocast_for, pick_device, train_step  # noqa: E402

FORMS = ("eager", "channels_last", "compile")


def step_for(form: str, res: int, batch: int, device: torch.device):
    torch.manual_seed(0)
    model = build_model(ModelConfig(resolution=res), 11).to(device)
    memory = torch.channels_last if form == "channels_last" else torch.contiguous_format
    model = model.to(memory_format=memory)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    runnable = torch.compile(model) if form == "compile" else model
    images = torch.randint(0, 256, (batch, 3, res, res), dtype=torch.uint8, device=device)
    labels = torch.randint(0, 11, (batch,), device=device)
    autocast = autocast_for(device)

    def step():
        train_step(runnable, optimizer, to_float(images).contiguous(memory_format=memory), labels, autocast)
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--res", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps (compile happens here)")
    args = parser.parse_args()
    device = pick_device(args.device)
    rows = []
    for res in args.res:
        speeds = {f: images_per_s(step_for(f, res, args.batch, device), args.steps, args.warmup,
                                  args.batch, device) for f in FORMS}
        rows.append({"res": res, **{f: round(v, 1) for f, v in speeds.items()},
                     **{f"{f}_vs_eager": round(speeds[f] / speeds["eager"], 3) for f in FORMS[1:]}})
    print(f"{'res':>4} " + " ".join(f"{k:>22}" for k in rows[0] if k != "res"))
    for row in rows:
        print(f"{row['res']:>4} " + " ".join(f"{v:>22}" for k, v in row.items() if k != "res"))
    path = write_json(f"ceiling-{device.type}", {**provenance(device), "batch": args.batch,
                                                  "steps": args.steps, "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
