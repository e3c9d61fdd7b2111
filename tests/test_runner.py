"""The runner: MLflow layout, the Optuna ledger, resume after SIGKILL, several workers."""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import mlflow
import optuna
import pytest
import torch
from typer.testing import CliRunner

from chae_ablate.cli import app
from chae_ablate.data import load_dataset
from chae_ablate.runner import RunOptions, run_study
from chae_ablate.study import load_study
from chae_ablate.train import NullTracker, train_cell

from conftest import STUDIES, slow_study, chae as cli, chae_here, undisturbed_metrics

TINY = STUDIES / "synthetic-tiny.yaml"


def cell_runs(study_name: str):
    client = mlflow.tracking.MlflowClient(f"sqlite:///{Path('mlflow.db').resolve()}")
    exp = client.get_experiment_by_name(study_name)
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("chae.role") == "study"]
    cells = [r for r in runs if r.data.tags.get("chae.role") == "cell"]
    return client, parents, cells


def complete_trials(study, runs_dir: Path) -> list:
    """The finished trials of the study's Optuna ledger, read with Optuna itself."""
    storage = RunOptions(runs_dir=runs_dir).storage_url
    return optuna.load_study(study_name=study.name, storage=storage).get_trials(
        states=(optuna.trial.TrialState.COMPLETE,))


def test_tiny_study_logs_one_parent_and_one_nested_run_per_cell_and_a_rerun_skips_them(workdir):
    """One run of the tiny study: its MLflow layout and ledger; then a rerun trains nothing and
    --fresh starts over (one test, so the study is trained once for both)."""
    study = load_study(TINY)
    summary = run_study(study, RunOptions(progress=False), report=False)
    assert [c.state for c in summary.cells] == ["done"] * 4
    client, parents, cells = cell_runs("synthetic-tiny")
    assert len(parents) == 1 and len(cells) == 4
    assert {(r.data.tags["variant"], r.data.tags["seed"]) for r in cells} == {
        ("baseline", "0"), ("baseline", "1"), ("depth2", "0"), ("depth2", "1")}
    for run in cells:
        assert run.info.status == "FINISHED"
        assert run.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        for tag in ("cell_hash", "git_commit", "git_dirty", "torch_version", "cuda_version", "device"):
            assert run.data.tags[tag]
        history = client.get_metric_history(run.info.run_id, "val_loss")
        assert sorted(m.step for m in history) == [1, 2]
        for key in ("best_val_loss", "best_epoch", "test_loss", "test_acc", "n_params", "mflops",
                    "images_per_s", "wall_time_s"):
            assert key in run.data.metrics
        assert run.data.metrics["best_val_loss"] == min(m.value for m in history)
        assert run.data.params["model.transformer.depth"] in ("1", "2")
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"config.json", "learning_curve.png"} <= artifacts and any(a.endswith(".csv") for a in artifacts)
    trials = complete_trials(study, Path("runs"))
    assert sorted(t.user_attrs["cell_hash"] for t in trials) == sorted(c.cell_hash for c in study.cells())
    assert all(len(t.intermediate_values) == 2 for t in trials)
    assert Path("mlflow.db").exists() and not Path("mlruns").exists()

    # a rerun skips the finished cells; --fresh forgets them and starts over
    run_study(study, RunOptions(progress=False), report=False)
    assert len(cell_runs("synthetic-tiny")[2]) == 4
    assert len(complete_trials(study, Path("runs"))) == 4
    run_study(study, RunOptions(progress=False, fresh=True), report=False)
    assert len(cell_runs("synthetic-tiny")[2]) == 4  # the old runs were deleted
    assert len(complete_trials(study, Path("runs"))) == 4


def test_same_seed_gives_identical_metrics_and_resume_matches(workdir):
    study = load_study(TINY, {"protocol.epochs": 3})
    cell = study.cells()[0]
    data = load_dataset(cell.config.data, cell.config.model.resolution, Path("runs"), progress=False)
    device = torch.device("cpu")
    first = train_cell(config=cell.config, seed=cell.seed, data=data, device=device)
    second = train_cell(config=cell.config, seed=cell.seed, data=data, device=device)
    strip = lambda h: [{k: v for k, v in e.items() if k != "images_per_s"} for e in h]  # noqa: E731
    assert strip(first.history) == strip(second.history)

    class Crash(Exception):
        pass

    class CrashAfterEpoch2(NullTracker):
        def log_missed_epochs(self, history):
            self.restored = len(history)

        def log_epoch(self, epoch, metrics):
            if epoch == 2:
                raise Crash

    with pytest.raises(Crash):
        train_cell(config=cell.config, seed=cell.seed, data=data, device=device, checkpoint_dir=Path("ckpt"),
                   tracker=CrashAfterEpoch2())
    tracker = CrashAfterEpoch2()
    resumed = train_cell(config=cell.config, seed=cell.seed, data=data, device=device,
                         checkpoint_dir=Path("ckpt"), tracker=tracker)
    assert tracker.restored == 2 and resumed.resumed_from == 2
    assert strip(resumed.history) == strip(first.history)
    assert (resumed.best_val_loss, resumed.test_loss, resumed.test_acc) == (
        first.best_val_loss, first.test_loss, first.test_acc)


def test_missing_paper_dataset_is_one_clear_line(workdir):
    result = CliRunner().invoke(app, ["run", str(STUDIES / "paper11.yaml"), "--no-progress"])
    assert result.exit_code == 1
    assert "data/artworks" in result.output and "chae-ablate data prepare" in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1


SLOW_STUDY = slow_study("killme")



def final_metrics(cwd: Path) -> dict:
    client = mlflow.tracking.MlflowClient(f"sqlite:///{cwd}/mlflow.db")
    exp = client.get_experiment_by_name("killme")
    runs = client.search_runs([exp.experiment_id], "tags.`chae.role` = 'cell'")
    return {r.data.tags["variant"]: r for r in runs}, client


def test_default_threads_are_omp_num_threads_or_the_cores_this_process_may_use(monkeypatch):
    """Under taskset or SLURM's task affinity a worker may use fewer cores than os.cpu_count()
    says; a torch thread per machine core would then wait on the others (a 0.2 s cell took 10-20 s).
    OMP_NUM_THREADS, set, is the thread count of each process, as torch itself reads it."""
    from chae_ablate.runner import set_threads
    threads = torch.get_num_threads()
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    try:
        for allowed, workers, expected in (({3}, 1, 1), ({5}, 2, 1), ({0, 1, 2, 3}, 2, 2), ({0, 1, 2, 3}, 1, 4)):
            monkeypatch.setattr(os, "sched_getaffinity", lambda pid, allowed=allowed: set(allowed), raising=False)
            set_threads(RunOptions(), workers)
            assert torch.get_num_threads() == expected, (allowed, workers)
        monkeypatch.setenv("OMP_NUM_THREADS", "1")  # per process, as torch reads it: not 4 cores
        set_threads(RunOptions(), 1)
        assert torch.get_num_threads() == 1
        set_threads(RunOptions(threads=3), 2)
        assert torch.get_num_threads() == 3  # --threads wins
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
def test_sigkill_mid_cell_then_rerun_resumes_with_identical_metrics(tmp_path, monkeypatch):
    (tmp_path / "s.yaml").write_text(SLOW_STUDY)
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    straight.mkdir(), killed.mkdir()
    reference = cli("run", "../s.yaml", "--no-report", "--device", "cpu", "--threads", "1", cwd=straight)

    victim = cli("run", "../s.yaml", "--no-report", "--device", "cpu", "--threads", "1", cwd=killed, start_new_session=True)
    checkpoints = killed / "runs" / "checkpoints" / "killme"
    deadline = time.time() + 180
    while time.time() < deadline and not any(checkpoints.glob("*/last.pt")):
        time.sleep(0.2)
    time.sleep(0.5)
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL
    interrupted = [p.parent.name for p in checkpoints.glob("*/last.pt")]
    assert interrupted, "the run was killed before its first checkpoint"
    killed_cells = [t.user_attrs["cell_hash"] for t in optuna.load_study(
        study_name="killme", storage=f"sqlite:///{killed}/runs/optuna.db").get_trials()
        if t.state == optuna.trial.TrialState.RUNNING]

    monkeypatch.chdir(killed)  # the rerun goes in this process: no interpreter to start
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    rerun = chae_here("run", "../s.yaml", "--no-report", "--device", "cpu", "--threads", "1")
    assert rerun.exit_code == 0 and "done" in rerun.output, rerun.output
    ref_out, _ = reference.communicate(timeout=600)
    assert reference.returncode == 0, ref_out

    resumed, client = final_metrics(killed)
    expected, ref_client = final_metrics(straight)
    assert set(resumed) == set(expected) == {"baseline", "depth2"}
    all_runs = client.search_runs([client.get_experiment_by_name("killme").experiment_id],
                                  "tags.`chae.role` = 'cell'")
    assert len(all_runs) == 2  # the interrupted cell continued its own run: no duplicates
    for variant, run in resumed.items():
        assert run.info.status == "FINISHED"
        for key in ("best_val_loss", "best_epoch", "test_loss", "test_acc"):
            assert run.data.metrics[key] == expected[variant].data.metrics[key], (variant, key)
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_loss")]
        assert sorted(steps) == list(range(1, 7))
    tagged = {r.data.tags["cell_hash"]: int(r.data.tags["resumed_from_epoch"]) for r in resumed.values()
              if "resumed_from_epoch" in r.data.tags}
    assert list(tagged) == killed_cells and all(epoch >= 1 for epoch in tagged.values())  # it, and only it, says so
    assert not any(r.data.tags.get("resumed_from_epoch") for r in expected.values())
    ledger = optuna.load_study(study_name="killme", storage=f"sqlite:///{killed}/runs/optuna.db")
    complete = [t for t in ledger.get_trials() if t.state == optuna.trial.TrialState.COMPLETE]
    assert sorted(t.user_attrs["variant"] for t in complete) == ["baseline", "depth2"]


@pytest.mark.slow
def test_two_workers_on_one_storage_run_every_cell_once(workdir):
    """The concurrent path (--workers N: N processes, on one GPU or dividing the CPU cores) gives
    each cell the metrics it gets alone (conftest.undisturbed_metrics: the cell trained by itself in
    this process): same seeds, same data order and augmentation. Tolerance: 1e-5 relative, for
    reductions that may be split otherwise in another process."""
    study = load_study(TINY, {"protocol.seeds": [0, 1, 2]})
    run_study(study, RunOptions(progress=False, workers=2), report=False)
    _, _, cells = cell_runs("synthetic-tiny")
    assert len(cells) == 6 and all(r.info.status == "FINISHED" for r in cells)
    assert len({r.data.tags["cell_hash"] for r in cells}) == 6
    alone = undisturbed_metrics(TINY, workdir / "alone", {"protocol.seeds": [0, 1, 2]})
    for run in cells:
        expected = alone[(run.data.tags["variant"], int(run.data.tags["seed"]))]
        for key in ("best_val_loss", "best_epoch", "test_loss", "test_acc"):
            assert run.data.metrics[key] == pytest.approx(expected[key], rel=1e-5), key
    trials = complete_trials(study, Path("runs"))  # the two workers' ledger: every cell once
    assert sorted(t.user_attrs["cell_hash"] for t in trials) == sorted(c.cell_hash for c in study.cells())


def test_a_worker_whose_cell_was_taken_over_stops_and_writes_nothing_more(workdir, capsys):
    """A live worker thought dead (late heartbeats on a loaded machine) kept training and finished
    the cell a second time: a second FINISHED run and an overwritten checkpoint. It now checks
    before each epoch's checkpoint, stops, says why, and leaves the run and the checkpoint to the
    cell's new holder."""
    from chae_ablate.ledger.claims import requeue
    from chae_ablate.runner import Worker, checkpoint_dir, start_study
    from chae_ablate.train import pick_device
    study = load_study(TINY, {"protocol.seeds": [0], "protocol.epochs": 3})
    options = RunOptions(progress=False)
    session = start_study(study, options)
    worker = Worker(study, options, pick_device("cpu"), session)
    claim = session.ledger.claim(worker.cells)
    cell = worker.cells[claim.cell_hash]
    report = claim.report

    def report_then_lose_the_cell(epoch: int, loss: float) -> bool:
        report(epoch, loss)
        if epoch == 1:  # another worker judges this one dead and re-queues its cell
            trial = session.ledger.study.get_trials()[claim.number]
            assert requeue(session.ledger.study, trial, "silent", died=True, retries=3) == "requeued"
        return False
    claim.report = report_then_lose_the_cell
    assert worker.run_cell(cell, claim) == "taken over by another worker"
    assert "stopped here, writing nothing more" in capsys.readouterr().err
    saved = torch.load(checkpoint_dir(options, study, cell) / "last.pt", weights_only=True)
    assert len(saved["state"]["history"]) == 1  # epoch 2's checkpoint was never written
    client, _, runs = cell_runs(study.name)
    mine = [r for r in runs if r.data.tags["cell_hash"] == cell.cell_hash]
    assert [r.info.status for r in mine] == ["RUNNING"]  # left for the new holder to continue, not FINISHED
    assert sorted(m.step for m in client.get_metric_history(mine[0].info.run_id, "val_loss")) == [1]
    states = [t.state.name for t in session.ledger.study.get_trials() if t.user_attrs["cell_hash"] == cell.cell_hash]
    assert states == ["FAIL", "WAITING"]  # the copy waits for its next holder
    worker.run()  # ... which resumes it from epoch 1 and finishes it, in the same run
    _, _, runs = cell_runs(study.name)
    mine = [r for r in runs if r.data.tags["cell_hash"] == cell.cell_hash]
    assert [r.info.status for r in mine] == ["FINISHED"] and mine[0].data.tags["resumed_from_epoch"] == "1"


def test_ctrl_c_hands_the_cell_back_to_the_queue_at_once(workdir, capsys):
    """Ctrl-C, SIGTERM (the CLI raises SystemExit for it) or SLURM's preemption signal mid-cell: the
    cell used to stay RUNNING until the grace period passed; it goes back to the queue at once, not
    counted as a death, and a rerun resumes it from its checkpoint."""
    from chae_ablate.ledger.claims import DEATHS
    from chae_ablate.runner import Worker, start_study
    from chae_ablate.train import pick_device
    study = load_study(TINY, {"protocol.seeds": [0], "protocol.epochs": 2})
    options = RunOptions(progress=False)
    session = start_study(study, options)
    claim_one = session.ledger.claim

    def claim_then_interrupt(hashes):
        claim = claim_one(hashes)
        report = claim.report

        def interrupted(epoch, loss):
            report(epoch, loss)
            raise KeyboardInterrupt
        claim.report = interrupted
        return claim
    session.ledger.claim = claim_then_interrupt
    with pytest.raises(KeyboardInterrupt):
        Worker(study, options, pick_device("cpu"), session).run()
    assert "stopped (KeyboardInterrupt); handed back to the queue, its checkpoint kept" in capsys.readouterr().err
    trials = session.ledger.study.get_trials()
    released = [t for t in trials if t.state.name == "FAIL"]
    assert len(released) == 1 and "released by its worker (KeyboardInterrupt)" in released[0].user_attrs["failure_reason"]
    copy = [t for t in trials if t.user_attrs["cell_hash"] == released[0].user_attrs["cell_hash"] and t.state.name == "WAITING"]
    assert len(copy) == 1 and copy[0].user_attrs[DEATHS] == 0
    summary = run_study(study, options, report=False)  # the rerun resumes it
    assert [c.state for c in summary.cells] == ["done"] * 2
    _, _, runs = cell_runs(study.name)
    assert sorted(r.info.status for r in runs) == ["FINISHED", "FINISHED"]
