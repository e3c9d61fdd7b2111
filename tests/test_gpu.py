"""The CUDA fast path: bf16 autocast, channels_last, torch.compile, device-side augmentation, workers.

Every test runs on the CPU and, where there is one, on CUDA (the `cuda` cases are marked `gpu`
and skip with the reason when `torch.cuda.is_available()` is false), so the same logic is checked
in CI and on a GPU machine. On the CPU, bf16 autocast is `torch.autocast("cpu", bfloat16)`:
`train.autocast_for` gives full precision there, so those cases patch it in.

    pytest -q -rs tests/test_gpu.py          # CPU cases here (-m "not slow": without the ~40 s compile)
    pytest -q -rs -m gpu tests/test_gpu.py   # only the CUDA cases (skipped, with the reason, without CUDA)

Tolerances (every one compares a run with a reference on the same data, seed and weights):
- bf16 vs fp32 losses: BF16_LOSS_TOL = 0.05 absolute. bf16 keeps 8 significant bits (0.4 % per
  rounding); over 2 epochs of this task the CPU's bf16 run differs from fp32 by at most 0.003, so
  0.05 (4.5 % of ln 3) leaves room for CUDA's other kernels and still catches a broken path.
- accuracies: at most ACC_IMAGES images of a split may flip between the two runs.
- same path, same seed on CUDA: SAME_PATH_TOL = 0.01 (cuDNN's backward kernels are not bitwise
  reproducible run to run; the device-side random streams are, which is what is checked).
"""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from chae_ablate import train
from chae_ablate.augment import augment_batch, to_float
from chae_ablate.config import DataConfig, ExperimentConfig, parse
from chae_ablate.data import Dataset, load_dataset
from chae_ablate.stream import DeviceSplit, TrainingStream

NO_CUDA = (f"no CUDA device: torch.cuda.is_available() is False (torch {torch.__version__}, "
           f"CUDA build {torch.version.cuda})")
CUDA = pytest.param("cuda", id="cuda",
                    marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)])
DEVICES = [pytest.param("cpu", id="cpu"), CUDA]
BF16_LOSS_TOL = 0.05
ACC_IMAGES = 2
SAME_PATH_TOL = 0.01
RES = 16
FP32 = train.autocast_for(torch.device("cpu"))  # full precision: a null context


def tiny_config(copies: int = 0, dropout: float = 0.0) -> ExperimentConfig:
    """A 4,009-parameter CHAE at 16 px for 3 classes (2 conv stages, 1 encoder layer); copies=0 and
    dropout=0 leave the initial weights and the shuffle, both drawn on the host, as the only randomness."""
    return parse(ExperimentConfig, {
        "model": {"resolution": RES, "conv": {"stages": [{"channels": 8}, {"channels": 16}]},
                  "transformer": {"depth": 1, "heads": 2, "dim": 16, "mlp_hidden": [32],
                                  "mlp_dropout": dropout}},
        "protocol": {"epochs": 2, "batch_size": 16, "lr": 3e-3, "augment": {"copies": copies}}})


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One CPU thread for these 4k-parameter models: on a shared 2-core machine two OpenMP threads
    make a 0.2 s cell take 10-20 s while they wait for each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Dataset:
    """180 synthetic images, 3 classes; a 20 % validation split so accuracies are not 1-in-6."""
    cfg = DataConfig(source="synthetic", synthetic_classes=3, synthetic_per_class=60, val_fraction=0.2)
    return load_dataset(cfg, RES, tmp_path_factory.mktemp("runs"), progress=False)


def bf16_autocast(device: torch.device):
    """The trainer's autocast on CUDA (bf16 by design); its CPU equivalent elsewhere."""
    if device.type == "cuda":
        return train.autocast_for(device)
    return lambda: torch.autocast("cpu", dtype=torch.bfloat16)


def fresh(config: ExperimentConfig, data: Dataset, device: torch.device, seed: int = 0):
    """The model and optimizer exactly as train_cell sets them up."""
    model = train.setup_model(config.model, len(data.classes), device, seed)
    return model, train.make_optimizer(config, model.parameters())


def close_metrics(got, want, loss_tol: float, n_val: int, n_test: int) -> None:
    """Per-epoch and final metrics of two CellResults agree to `loss_tol` and ACC_IMAGES images."""
    for g, w in zip(got.history, want.history, strict=True):
        for key in ("train_loss", "val_loss"):
            assert abs(g[key] - w[key]) <= loss_tol, (key, g, w)
        assert abs(g["val_acc"] - w["val_acc"]) <= ACC_IMAGES / n_val + 1e-9, (g, w)
    assert abs(got.best_val_loss - want.best_val_loss) <= loss_tol
    assert abs(got.test_loss - want.test_loss) <= loss_tol
    assert abs(got.test_acc - want.test_acc) <= ACC_IMAGES / n_test + 1e-9


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_autocast_trains_and_evaluates_close_to_fp32(device, data):
    """Under bf16 autocast the logits are bf16, the loss, weights and gradients stay fp32, and one
    step and an evaluation land within BF16_LOSS_TOL of the same step in full precision."""
    device, config = torch.device(device), tiny_config()
    x = to_float(data.train.images[:16]).to(device)
    y = data.train.labels[:16].to(device)
    results = {}
    for name, autocast in (("fp32", FP32), ("bf16", bf16_autocast(device))):
        model, optimizer = fresh(config, data, device)
        loss, logits = train.train_step(model, optimizer, x, y, autocast)
        results[name] = loss.item(), logits.dtype, train.evaluate(model, DeviceSplit(data.val, device), autocast)
        assert loss.dtype == torch.float32 and math.isfinite(loss.item())
        assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in model.parameters())
    assert results["fp32"][1] == torch.float32 and results["bf16"][1] == torch.bfloat16
    assert abs(results["bf16"][0] - results["fp32"][0]) <= BF16_LOSS_TOL
    (val_loss, val_acc), (ref_loss, ref_acc) = results["bf16"][2], results["fp32"][2]
    assert abs(val_loss - ref_loss) <= BF16_LOSS_TOL
    assert abs(val_acc - ref_acc) <= ACC_IMAGES / len(data.val.labels) + 1e-9


@pytest.mark.parametrize("device", DEVICES)
def test_channels_last_weights_and_same_outputs(device, data):
    """setup_model stores every conv weight channels_last, a step keeps it so, and the logits
    equal those of the same weights in the default (contiguous) layout."""
    device = torch.device(device)
    model, optimizer = fresh(tiny_config(), data, device)
    convs = [p for p in model.parameters() if p.dim() == 4]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    x = to_float(data.train.images[:16]).to(device)
    train.train_step(model, optimizer, x, data.train.labels[:16].to(device), FP32)
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    assert all(p.grad.is_contiguous(memory_format=torch.channels_last) for p in convs)
    model.eval()
    contiguous = fresh(tiny_config(), data, device)[0].to(memory_format=torch.contiguous_format).eval()
    contiguous.load_state_dict(model.state_dict())
    tol = 1e-2 if device.type == "cuda" else 1e-4  # CUDA convolutions default to TF32 (10-bit mantissa)
    with torch.no_grad():
        torch.testing.assert_close(model(x.contiguous(memory_format=torch.channels_last)), contiguous(x),
                                   rtol=tol, atol=tol)


@pytest.mark.parametrize("device", DEVICES)
def test_device_generator_augmentation_is_deterministic_per_seed(device, data):
    """augment_batch with a generator on the device, and a whole epoch of TrainingStream, repeat
    exactly for a seed and differ for another seed."""
    device = torch.device(device)
    images = data.train.images[:32].to(device)
    cfg = tiny_config(copies=1).protocol.augment

    def augmented(seed: int) -> torch.Tensor:
        return augment_batch(images, cfg, torch.Generator(device=device).manual_seed(seed))
    assert augmented(7).device.type == device.type
    assert torch.equal(augmented(7), augmented(7))
    assert not torch.equal(augmented(7), augmented(8))
    stream = TrainingStream(DeviceSplit(data.train, device), cfg, 16)

    def epoch(seed: int) -> list[torch.Tensor]:
        return [x for x, _ in stream.epoch(seed, epoch=1)]
    first, again, other = epoch(3), epoch(3), epoch(4)
    assert len(first) == stream.batches_per_epoch()
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, other, strict=True))


@pytest.mark.parametrize("device", DEVICES)
def test_train_cell_in_bf16_matches_the_cpu_fp32_run(device, data, monkeypatch):
    """2 epochs of train_cell in bf16 (CUDA's own autocast, or the CPU's patched in) match the
    CPU's full-precision run: same weights and shuffle, no augmentation or dropout, so only the
    arithmetic differs."""
    config = tiny_config()
    reference = train.train_cell(config=config, seed=0, data=data, device=torch.device("cpu"))
    if device == "cpu":
        monkeypatch.setattr(train, "autocast_for", bf16_autocast)
    got = train.train_cell(config=config, seed=0, data=data, device=torch.device(device))
    assert [h["val_loss"] for h in got.history] != [h["val_loss"] for h in reference.history]  # bf16 ran
    close_metrics(got, reference, BF16_LOSS_TOL, len(data.val.labels), len(data.test.labels))


@pytest.mark.parametrize("device", DEVICES)
def test_full_protocol_cell_repeats_for_a_seed(device, data):
    """With augmentation on the device and dropout, the same seed gives the same cell (exactly on
    the CPU, within SAME_PATH_TOL on CUDA) and another seed a different one."""
    config, device = tiny_config(copies=1, dropout=0.2), torch.device(device)
    runs = [train.train_cell(config=config, seed=s, data=data, device=device) for s in (0, 0, 1)]
    tol = SAME_PATH_TOL if device.type == "cuda" else 0.0
    close_metrics(runs[1], runs[0], tol, len(data.val.labels), len(data.test.labels))
    assert runs[2].history[0]["train_loss"] != runs[0].history[0]["train_loss"]
    assert all(math.isfinite(h["train_loss"]) for r in runs for h in r.history)


def test_workers_are_spread_over_the_visible_gpus(monkeypatch):
    """runner.child_device: worker i gets cuda:(i mod GPUs) when several GPUs are visible and the
    device is auto or cuda; an explicit cuda:N, a single GPU or the CPU is left as asked."""
    runner = pytest.importorskip("chae_ablate.runner", reason="chae_ablate.runner needs optuna and mlflow")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)

    def devices(name: str) -> list[str]:
        return [str(runner.child_device(runner.RunOptions(device=name), i)) for i in range(5)]
    assert devices("auto") == devices("cuda") == ["cuda:0", "cuda:1", "cuda:2", "cuda:0", "cuda:1"]
    assert devices("cuda:1") == ["cuda:1"] * 5
    assert devices("cpu") == ["cpu"] * 5
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert devices("auto") == ["cuda"] * 5


COMPILE_CPU = pytest.param("cpu", id="cpu", marks=pytest.mark.slow)  # ~40 s of compilation on 2 cores


@pytest.fixture(scope="module")
def whole_batches(tmp_path_factory) -> tuple[ExperimentConfig, Dataset]:
    """tiny_config at batch 15 and 198 synthetic images whose 135 training images make 9 whole
    batches: inductor compiles one training and one evaluation graph, not also a partial batch's."""
    cfg = DataConfig(source="synthetic", synthetic_classes=3, synthetic_per_class=66, val_fraction=0.2)
    data = load_dataset(cfg, RES, tmp_path_factory.mktemp("runs"), progress=False)
    config = tiny_config()
    config = dataclasses.replace(config, protocol=dataclasses.replace(config.protocol, batch_size=15))
    assert len(data.train.labels) % config.protocol.batch_size == 0
    return config, data


@pytest.mark.parametrize("device", [COMPILE_CPU, CUDA])
def test_compiled_model_matches_eager(device, whole_batches):
    """train_cell(compile_model=True) trains to the eager run's metrics (fp32 on the CPU to 1e-3;
    bf16 on CUDA, where fusion changes rounding, to BF16_LOSS_TOL). Marked slow on the CPU:
    inductor compiles the training and evaluation graphs, ~40 s on 2 cores.
    Last in the file, so a time limit on a GPU run cuts no other test short."""
    (config, data), device = whole_batches, torch.device(device)
    eager = train.train_cell(config=config, seed=0, data=data, device=device)
    compiled = train.train_cell(config=config, seed=0, data=data, device=device, compile_model=True)
    tol = BF16_LOSS_TOL if device.type == "cuda" else 1e-3
    close_metrics(compiled, eager, tol, len(data.val.labels), len(data.test.labels))
