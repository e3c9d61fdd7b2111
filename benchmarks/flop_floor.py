"""The FLOP floor of a study: how long each cell would take at a device's peak, beside how long it does.

Per cell: forward FLOPs per image (torch's flop counter: convolutions, matmuls, attention; a
multiply-add counts 2; norms and activations are not counted) x 3 (forward + backward) x training
images per epoch (training split x (augmented copies + 1)) x epochs = training FLOPs; divided by
the peak FLOP/s, the floor time no implementation can beat. Given a measured rate, the cell's
measured (or estimated) training time and its fraction of peak are printed beside it.

    python benchmarks/flop_floor.py                                   # paper11, FLOPs only
    python benchmarks/flop_floor.py --peak-tflops 989                 # + floor on an H100 (bf16 dense)
    python benchmarks/flop_floor.py --peak-tflops matmul --measure-steps 8 --device cpu
    python benchmarks/flop_floor.py --set model.resolution=64 --images-per-s 450

Prints a table and writes benchmarks/results/flop-floor-<study>[-<name>].json.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from common import images_per_s, provenance, synchronize, write_json

from chae_ablate.augment import to_float
from chae_ablate.config import DataConfig
from chae_ablate.data import assign_splits
from chae_ablate.images import scan_folder
from chae_ablate.errors import ChaeError
from chae_ablate.builders import forward_flops
from chae_ablate.plan import expected_classes
from chae_ablate.study import Study, load_study, parse_assignments
from chae_ablate.train import autocast_for, make_optimizer, pick_device, setup_model, train_step

# Images per artist in the paper's task (Kaggle "Best Artworks of All Time", > 200 paintings).
PAPER_CLASS_SIZES = (877, 702, 439, 336, 328, 311, 291, 262, 259, 255, 239)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("study", nargs="?", type=Path, default=Path("studies/paper11.yaml"))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override the baseline (as `chae-ablate run --set`), e.g. model.resolution=64")
    ap.add_argument("--data", type=Path,
                    help="count the training split of this folder (default: the study's data.root if it "
                         "exists, else the paper's 4,299 images in 11 classes)")
    ap.add_argument("--train-images", type=int, help="training-split size, instead of counting one")
    ap.add_argument("--peak-tflops", help="the device's peak in TFLOP/s, or 'matmul' to measure a large "
                                          "matrix product on --device and use that")
    ap.add_argument("--images-per-s", type=float,
                    help="a measured training rate of the baseline cell (e.g. throughput.py row 2 at the "
                         "same resolution); other cells are estimated from it by their FLOPs")
    ap.add_argument("--measure-steps", type=int, default=0,
                    help="measure every cell here: this many timed training steps on a resident batch")
    ap.add_argument("--device", default="cpu", help="for --measure-steps and 'matmul' (default: cpu)")
    ap.add_argument("--batch", type=int, help="batch for --measure-steps (default: the study's)")
    ap.add_argument("--name", help="suffix of the results file name")
    return ap.parse_args(argv)


def train_split_size(cfg: DataConfig, root: Path | None) -> tuple[int, str]:
    """Images in the training split, computed with the tool's own stratified split (nothing decoded)."""
    if root is not None:
        classes, files = scan_folder(root)
        ids, labels, origin = [rel for rel, _ in files], np.array([lab for _, lab in files]), str(root)
    else:
        labels = np.repeat(np.arange(len(PAPER_CLASS_SIZES)), PAPER_CLASS_SIZES)
        ids, origin = [f"{k}/{i}" for i, k in enumerate(labels)], "the paper's 4,299 Kaggle images"
    split = assign_splits(ids, labels, np.ones(len(ids), dtype=bool), cfg)
    return int((split == 0).sum()), origin


def matmul_tflops(device: torch.device, n: int = 4096, repeats: int = 10) -> float:
    """Achieved TFLOP/s of an n x n matrix product (bf16 on CUDA, fp32 elsewhere)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    a @ b
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    synchronize(device)
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e12


def measure_cell(config, num_classes: int, batch: int, steps: int, device: torch.device) -> float:
    """Training images/s of one cell's model on a resident random uint8 batch (throughput.py row 1)."""
    model = setup_model(config.model, num_classes, device, seed=0).train()
    optimizer = make_optimizer(config, model.parameters())
    autocast = autocast_for(device)
    r = config.model.resolution
    images = torch.randint(0, 256, (batch, 3, r, r), dtype=torch.uint8, device=device)
    labels = torch.randint(0, num_classes, (batch,), device=device)
    return images_per_s(lambda: train_step(model, optimizer, to_float(images), labels, autocast),
                        steps, min(2, steps), batch, device)


def floor_table(study: Study, args: argparse.Namespace, device: torch.device) -> dict:
    num_classes, classes_from = expected_classes(study.baseline.config.data)
    root = args.data
    if root is None and study.baseline.config.data.root and Path(study.baseline.config.data.root).is_dir():
        root = Path(study.baseline.config.data.root)
    if root is not None:
        num_classes, classes_from = len(scan_folder(root)[0]), str(root)
    elif study.baseline.config.data.source == "folder":
        num_classes = len(PAPER_CLASS_SIZES)
    peak, peak_from = None, None
    if args.peak_tflops == "matmul":
        peak, peak_from = matmul_tflops(device), f"measured 4096^2 matmul on {device}"
    elif args.peak_tflops:
        peak, peak_from = float(args.peak_tflops), "given"
    rows, baseline_flops = [], None
    for variant in study.variants:
        cfg = variant.config
        if args.train_images:
            n_train, origin = args.train_images, "given"
        else:
            n_train, origin = train_split_size(cfg.data, root)
        fwd = forward_flops(cfg.model, num_classes)
        per_epoch = n_train * (cfg.protocol.augment.copies + 1)
        total = 3 * fwd * per_epoch * cfg.protocol.epochs
        baseline_flops = baseline_flops or fwd
        row = {"variant": variant.name, "resolution": cfg.model.resolution,
               "fwd_mflops_per_image": round(fwd / 1e6, 2), "train_images": n_train, "train_images_from": origin,
               "images_per_epoch": per_epoch, "epochs": cfg.protocol.epochs,
               "train_tflops": round(total / 1e12, 2)}
        if peak:
            row["floor_s"] = round(total / (peak * 1e12), 2)
        rate, how = None, None
        if args.measure_steps:
            rate, how = measure_cell(cfg, num_classes, args.batch or cfg.protocol.batch_size,
                                     args.measure_steps, device), "measured"
        elif args.images_per_s:
            rate = args.images_per_s * baseline_flops / fwd
            how = "given" if variant is study.baseline else "estimated by FLOPs from the baseline"
        if rate:
            seconds = per_epoch * cfg.protocol.epochs / rate
            row.update(images_per_s=round(rate, 1), rate_from=how, time_s=round(seconds, 1),
                       achieved_tflops=round(total / seconds / 1e12, 4))
            if peak:
                row["fraction_of_peak"] = round(row["floor_s"] / seconds, 4)
        rows.append(row)
        print(f"  {variant.name}: {row['fwd_mflops_per_image']} MFLOPs/img"
              + (f", {row['images_per_s']} img/s" if rate else ""), flush=True)
    return {"study": study.name, "classes": num_classes, "classes_from": classes_from,
            "overrides": args.set, "peak_tflops": peak, "peak_from": peak_from,
            "flops_note": "forward FLOPs from torch.utils.flop_counter (conv, matmul, attention; "
                          "multiply-add = 2) x 3 for forward + backward",
            "cells": rows}


def format_table(report: dict) -> str:
    peak = report["peak_tflops"]
    peak_text = f"{peak:.3g} TFLOP/s ({report['peak_from']})" if peak else "not given"
    lines = [f"{report['study']}: {report['classes']} classes; peak {peak_text}; "
             f"{report['date']}, commit {report['git_commit']}, {report['machine']['cpu']} x{report['machine']['cores']}",
             f"{'variant':<22}{'res':>5}{'MFLOPs/img':>11}{'img/epoch':>10}{'ep':>4}{'TFLOPs':>9}"
             f"{'floor s':>10}{'img/s':>9}{'time s':>10}{'of peak':>9}"]
    for r in report["cells"]:
        def cell(key, fmt):
            return format(r[key], fmt) if key in r else "-"
        lines.append(f"{r['variant']:<22}{r['resolution']:>5}{r['fwd_mflops_per_image']:>11.1f}"
                     f"{r['images_per_epoch']:>10}{r['epochs']:>4}{r['train_tflops']:>9.1f}"
                     f"{cell('floor_s', '.1f'):>10}{cell('images_per_s', '.1f'):>9}"
                     f"{cell('time_s', '.0f'):>10}{cell('fraction_of_peak', '.1%'):>9}")
    total = sum(r["train_tflops"] for r in report["cells"])
    lines.append(f"{'all cells':<22}{'':>5}{'':>11}{'':>10}{'':>4}{total:>9.1f}"
                 + (f"{sum(r['floor_s'] for r in report['cells']):>10.1f}" if peak else ""))
    froms = sorted({r["train_images_from"] for r in report["cells"]})
    lines.append(f"training split from: {', '.join(froms)}; time = training steps only (no evaluation)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        device = pick_device(args.device)
        study = load_study(args.study, parse_assignments(args.set))
        report = {**provenance(device), **floor_table(study, args, device)}
    except ChaeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(format_table(report))
    name = f"flop-floor-{study.name}" + (f"-{args.name}" if args.name else "")
    print(f"wrote {write_json(name, report)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
