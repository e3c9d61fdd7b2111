"""SLURM job arrays through submitit (cluster.py) and `chae-ablate status`.

The unit tests need nothing; the SLURM tests start a real single-node SLURM (slurmctld, slurmd
and munge from Debian's slurm-wlm packages, see tests/slurm_cluster.py) on loopback and skip,
with the reason, where it cannot be started.
"""
from __future__ import annotations

import re
import subprocess
import time
from contextlib import ExitStack
from pathlib import Path

import mlflow
import optuna
import pytest
from typer.testing import CliRunner

from chae_ablate.cli import app
from chae_ablate.cluster import SlurmOptions, minutes, shared_options
from chae_ablate.errors import ChaeError
from chae_ablate.runner import RunOptions

from conftest import STUDIES, slow_study
from slurm_cluster import SlurmStartError, slurm_cluster, slurm_unavailable

TINY = STUDIES / "synthetic-tiny.yaml"
cli = CliRunner()


@pytest.mark.parametrize("text, expected", [("90", 90), ("4:00:00", 240), ("0:30", 1), ("1-00", 1440),
                                            ("1-02:30", 1590), ("2-00:00:30", 2881), ("00:10:29", 11)])
def test_time_limits_read_as_sbatch_does(text, expected):
    assert minutes(text) == expected


def test_a_bad_time_limit_is_one_line():
    with pytest.raises(ChaeError, match="--time 4h: expected MINUTES"):
        minutes("4h")


def test_tasks_share_an_absolute_journal_by_default_and_never_sqlite(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    options = shared_options(RunOptions(runs_dir=Path("shared")), SlurmOptions(cpus_per_task=3))
    assert options.storage == f"journal:{tmp_path / 'shared' / 'ledger.journal'}"
    assert options.runs_dir == tmp_path / "shared" and options.threads == 3 and options.workers == 1
    relative = shared_options(RunOptions(storage="journal:l.journal"), SlurmOptions())
    assert relative.storage == f"journal:{tmp_path / 'l.journal'}"
    server = "postgresql://u:p@db/chae"
    assert shared_options(RunOptions(storage=server), SlurmOptions()).storage == server
    with pytest.raises(ChaeError, match="sqlite cannot be shared safely"):
        shared_options(RunOptions(storage="sqlite:///runs/optuna.db"), SlurmOptions())


def test_submit_says_where(workdir):
    result = cli.invoke(app, ["submit", str(TINY)])
    assert result.exit_code == 1 and "--slurm" in result.output


def test_an_array_is_refused_a_local_mlflow_store_with_the_fix(workdir, monkeypatch, capsys):
    """Many nodes writing one sqlite file on a shared filesystem: MLflow's busy timeout failed cells.
    submit names the fix (a tracking server) before anything is queued; --local-tracking accepts
    the risk with a warning; one task, or a tracking server, needs neither."""
    from chae_ablate.cluster import refuse_local_tracking
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    result = cli.invoke(app, ["submit", str(TINY), "--slurm", "--array", "3"])
    assert result.exit_code == 1 and "--local-tracking" in result.output, result.output
    assert "mlflow server --backend-store-uri" in result.output and "MLFLOW_TRACKING_URI" in result.output
    assert not (workdir / "runs").exists()  # refused before anything was written
    refuse_local_tracking(SlurmOptions(array=3, local_tracking=True))
    assert "warning: 3 tasks will write the local MLflow store" in capsys.readouterr().err
    refuse_local_tracking(SlurmOptions(array=1))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking:5000")
    refuse_local_tracking(SlurmOptions(array=3))


def test_sigterm_is_taken_as_slurms_preemption_signal_once():
    """Clusters without preempt_send_user_signal preempt with SIGTERM, which submitit ignored (then
    SIGKILL, no requeue): an array task hands SIGTERM to the handler submitit set for SIGUSR2. Only
    once: SLURM sends SIGTERM again as it requeues the task, and that second requeue failed inside
    the cell being trained (seen on the real SLURM: the cell failed with CalledProcessError). A
    requeue that fails ends the task (SystemExit: the worker hands its cell back)."""
    import signal

    from chae_ablate.cluster import preempt_on_sigterm
    saved = signal.getsignal(signal.SIGUSR2), signal.getsignal(signal.SIGTERM)
    calls = []
    try:
        signal.signal(signal.SIGUSR2, lambda signum, frame: calls.append(signum))
        preempt_on_sigterm()
        signal.raise_signal(signal.SIGTERM)
        signal.raise_signal(signal.SIGTERM)  # SLURM's, as it requeues
        signal.raise_signal(signal.SIGUSR2)
        assert calls == [signal.SIGTERM]

        def refused(signum, frame):
            raise RuntimeError("scontrol requeue: job is cancelled")
        signal.signal(signal.SIGUSR2, refused)
        preempt_on_sigterm()
        with pytest.raises(SystemExit, match="SIGTERM: the task could not be requeued .*cancelled"):
            signal.raise_signal(signal.SIGTERM)
    finally:
        signal.signal(signal.SIGUSR2, saved[0])
        signal.signal(signal.SIGTERM, saved[1])


def test_status_says_what_an_undecided_variant_needs_and_which_cell_diverged(workdir):
    """After the look: the seeds an undecided variant would likely need (one variant: the paired
    t's spread; statsmodels' one-sample normal power at alpha 0.05, the margin 5% of the
    baseline's mean), and a cell that diverged at its first epoch shown as such, not as 'inf'."""
    import math

    from statsmodels.stats.power import NormalIndPower

    from chae_ablate.ledger import Ledger
    from chae_ablate.study import load_study
    plan = load_study(TINY).plan()
    ledger = Ledger("synthetic-tiny", f"sqlite:///{(workdir / 'runs' / 'optuna.db').resolve()}")
    ledger.queue(plan.cells)
    values = {("baseline", 0): 0.50, ("baseline", 1): 0.52, ("depth2", 0): 0.53, ("depth2", 1): math.inf}
    for cell in plan.cells:
        metrics = {"best_val_loss": values[cell.variant, cell.seed], "test_acc": 0.7, "wall_time_s": 60.0}
        if math.isinf(metrics["best_val_loss"]):
            metrics["diverged_epoch"] = 1
        ledger.claim({cell.cell_hash}).complete(metrics)
    result = cli.invoke(app, ["status", str(TINY)])
    assert result.exit_code == 0, result.output
    assert any(line.split()[:5] == ["depth2", "1", "done", "diverged", "(epoch"] for line in result.output.splitlines())
    d = [0.53 - 0.50, 0.53 - 0.52]  # the diverged cell counts as the worst value of the look: 0.53
    sd, mean, margin = abs(d[0] - d[1]) / math.sqrt(2), sum(d) / 2, 0.05 * 0.51
    need = min(NormalIndPower().solve_power(mean / sd, alpha=0.05, power=0.8, ratio=0),
               NormalIndPower().solve_power((margin - mean) / sd, alpha=0.1, power=0.8, ratio=0))
    assert f"undecided: depth2 likely needs {max(3, math.ceil(need))} seeds (has 2, about" in result.output


def test_status_lists_cells_and_who_holds_the_running_one(workdir):
    result = cli.invoke(app, ["status", str(TINY)])
    assert result.exit_code == 1 and "not in the ledger" in result.output
    assert not (workdir / "runs").exists()  # looking created nothing
    from chae_ablate.ledger import Ledger
    from chae_ablate.study import load_study
    study = load_study(TINY)
    plan = study.plan()
    ledger = Ledger(study.name, f"sqlite:///{(workdir / 'runs' / 'optuna.db').resolve()}")
    ledger.queue(plan.cells)
    hashes = {c.cell_hash for c in plan.cells}
    ledger.claim(hashes).complete({"best_val_loss": 0.5, "test_acc": 0.75})
    ledger.claim(hashes)
    other = load_study(TINY, {"protocol.epochs": 3}).plan()  # an earlier version's cells: kept apart
    ledger.queue(other.cells[:2])
    ledger.claim({c.cell_hash for c in other.cells}).fail("boom")
    result = cli.invoke(app, ["status", str(TINY)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split() == ["variant", "seed", "state", "best_val_loss", "test_acc", "worker"]
    assert lines[1].split()[:5] == ["baseline", "0", "done", "0.5000", "0.750"] and len(lines[1].split()) == 5
    assert lines[2].split()[:3] == ["baseline", "1", "running"] and lines[2].split()[3].endswith(f":{__import__('os').getpid()}")
    assert lines[-2] == "1 done, 1 running, 2 queued, 0 failed, 0 not queued yet, of 4 cells"
    assert lines[-1] == "kept apart: 2 cells of other versions of this study (1 queued, 1 failed), not counted"


# --- a real single-node SLURM ------------------------------------------------------------------

@pytest.fixture(scope="module")
def slurm_env(tmp_path_factory):
    """The variables (SLURM_CONF, PATH) under which sbatch, squeue and scancel use a throw-away
    single-node cluster, started once for this module."""
    reason = slurm_unavailable()
    if reason:
        pytest.skip(f"SLURM tests: {reason}")
    stack = ExitStack()
    try:
        env = stack.enter_context(slurm_cluster(tmp_path_factory.mktemp("slurm")))
    except SlurmStartError as err:
        pytest.skip(f"SLURM did not start here: {err}")
    with stack:
        yield env


@pytest.fixture
def on_slurm(slurm_env, workdir, monkeypatch):
    """The working folder, with this process's environment pointing at the cluster."""
    for key, value in slurm_env.items():
        monkeypatch.setenv(key, value)
    return workdir


def submitted(*args: str) -> str:
    """Run `chae-ablate submit ... --slurm` for CPU tasks; returns the array's job id."""
    result = cli.invoke(app, ["submit", *args, "--slurm", "--partition", "debug", "--gpus-per-task", "0",
                              "--cpus-per-task", "1", "--time", "20", "--local-tracking"])  # one node here
    assert result.exit_code == 0, result.output
    match = re.search(r"submitted job array (\d+) \((\d+) tasks", result.output)
    assert match, result.output
    assert f"squeue -j {match[1]}" in result.output and "chae-ablate status" in result.output
    return match[1]


def squeue(job: str) -> list[str]:
    """The array's tasks SLURM still holds (pending or running), as JOBID_TASK STATE."""
    out = subprocess.run(["squeue", "-h", "-r", "-j", job, "-o", "%i %T"], capture_output=True, text=True)
    return out.stdout.split("\n") if out.stdout.strip() else []


def wait_for(ready, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if ready():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def task_logs(folder: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in sorted((folder / "runs" / "slurm").rglob("*_log.*")))


def ledger_trials(folder: Path, name: str) -> list:
    from chae_ablate.ledger.storage import open_study
    return open_study(name, f"journal:{folder / 'runs' / 'ledger.journal'}").get_trials()


def cell_runs(name: str) -> list:
    client = mlflow.tracking.MlflowClient(f"sqlite:///{Path('mlflow.db').resolve()}")
    experiment = client.get_experiment_by_name(name)
    return client.search_runs([experiment.experiment_id], "tags.`chae.role` = 'cell'")


def test_what_sbatch_refuses_is_one_line_with_a_hint(on_slurm):
    result = cli.invoke(app, ["submit", str(TINY), "--slurm", "--partition", "debug",  # 1 GPU per task, none here
                              "--local-tracking"])
    assert result.exit_code == 1 and "sbatch refused the job array" in result.output
    assert "for CPU tasks pass --gpus-per-task 0" in result.output and "Traceback" not in result.output
    result = cli.invoke(app, ["submit", str(TINY), "--slurm", "--partition", "nope", "--gpus-per-task", "0",
                              "--local-tracking"])
    assert result.exit_code == 1 and "Invalid partition name" in result.output


@pytest.mark.slow
def test_a_job_array_trains_every_cell_once_and_writes_the_report(on_slurm):
    job = submitted(str(TINY), "--array", "2", "--seeds", "0,1,2")
    wait_for(lambda: not squeue(job), 300, f"job array {job} to leave the queue:\n{task_logs(on_slurm)}")
    logs = task_logs(on_slurm)
    assert "Traceback" not in logs, logs

    trials = ledger_trials(on_slurm, "synthetic-tiny")
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 6 == len({t.user_attrs["cell_hash"] for t in complete}), [
        (t.number, t.state, t.user_attrs) for t in trials]
    assert len(trials) == 6  # none failed, none retried
    workers = {t.user_attrs["worker"].split(" slurm ")[1] for t in complete}
    assert workers <= {f"{job}_0", f"{job}_1"} and workers, workers  # every cell trained by an array task

    runs = cell_runs("synthetic-tiny")
    assert len(runs) == 6 and all(r.info.status == "FINISHED" for r in runs)
    assert {r.data.tags["cell_hash"] for r in runs} == {t.user_attrs["cell_hash"] for t in complete}
    report = on_slurm / "reports" / "synthetic-tiny" / "report.md"
    assert report.exists() and "depth2" in report.read_text()

    status = cli.invoke(app, ["status", str(TINY), "--seeds", "0,1,2", "--storage",
                              f"journal:{on_slurm / 'runs' / 'ledger.journal'}"])
    assert status.exit_code == 0 and "\n6 done, 0 running" in status.output, status.output


@pytest.mark.slow
def test_a_preempted_task_is_requeued_and_its_cell_resumes_from_its_checkpoint(on_slurm):
    """A preemption that arrives as SIGTERM alone (a cluster without preempt_send_user_signal;
    submitit ignored it, then SIGKILL ended the task without a requeue) to the one task of an
    array, mid-cell: the task is requeued, its worker hands the cell back to the queue at once, and
    the requeued task resumes it from its epoch checkpoint, continuing its MLflow run; nothing runs
    twice. (With more tasks, whichever is free first resumes it.)"""
    (on_slurm / "preempt.yaml").write_text(slow_study("preempt"))
    job = submitted("preempt.yaml", "--array", "1", "--seeds", "0")  # two cells: the preempted one and one more
    checkpoints = on_slurm / "runs" / "checkpoints" / "preempt"

    def holder() -> tuple[str, str] | None:
        """(cell hash, array task) of a running cell past its first checkpoint."""
        for t in ledger_trials(on_slurm, "preempt"):
            if (t.state == optuna.trial.TrialState.RUNNING and " slurm " in t.user_attrs.get("worker", "")
                    and (checkpoints / t.user_attrs["cell_hash"] / "last.pt").exists()):
                return t.user_attrs["cell_hash"], t.user_attrs["worker"].split(" slurm ")[1]
        return None
    wait_for(lambda: holder() is not None, 240, f"a cell past its first epoch:\n{task_logs(on_slurm)}")
    cell, task = holder()
    subprocess.run(["scancel", "--signal", "SIGTERM", task], check=True)
    wait_for(lambda: not squeue(job), 420, f"job array {job} to leave the queue:\n{task_logs(on_slurm)}")
    logs = task_logs(on_slurm)
    assert "this job is preempted" in logs and logs.count("Starting with JobEnvironment") == 2, logs

    trials = ledger_trials(on_slurm, "preempt")
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert sorted(t.user_attrs["variant"] for t in complete) == ["baseline", "depth2"]
    assert len({t.user_attrs["cell_hash"] for t in complete}) == 2
    attempts = [t for t in trials if t.user_attrs["cell_hash"] == cell]
    assert [t.state for t in attempts] == [optuna.trial.TrialState.FAIL, optuna.trial.TrialState.COMPLETE], [
        (t.number, t.state, t.user_attrs) for t in trials]  # the preempted attempt, resumed once
    before, after = (t.user_attrs["worker"] for t in attempts)
    assert before != after and before.endswith(f"slurm {task}") and after.endswith(f"slurm {task}")  # requeued

    runs = cell_runs("preempt")
    assert not [r for r in runs if r.info.status == "RUNNING"]
    finished = [r for r in runs if r.info.status == "FINISHED"]
    assert len(finished) == 2 == len({r.data.tags["cell_hash"] for r in finished})
    resumed = [r for r in finished if r.data.tags["cell_hash"] == cell][0]
    assert int(resumed.data.tags["resumed_from_epoch"]) >= 1  # from its checkpoint, not from scratch
    assert not [r for r in finished if r.data.tags["cell_hash"] != cell and "resumed_from_epoch" in r.data.tags]
    client = mlflow.tracking.MlflowClient(f"sqlite:///{Path('mlflow.db').resolve()}")
    steps = [m.step for m in client.get_metric_history(resumed.info.run_id, "val_loss")]
    assert sorted(steps) == list(range(1, 7))  # every epoch once in the cell's run
    assert (on_slurm / "reports" / "preempt" / "report.md").exists()


TINY_SEARCH = """
base: {tiny}
name: slurmsearch
variants: {{depth2: null}}
analysis: {{min_seeds: 2, max_seeds: 2, margin: 0.5, relative: false}}
search:
  trials: 4
  top_k: 1
  seeds: [0]
  pruner: none
  space:
    protocol.lr: [1.0e-3, 3.0e-3]
    model.transformer.depth: [1, 2]
"""


@pytest.mark.slow
def test_a_search_runs_on_a_job_array_led_by_task_0(on_slurm):
    (on_slurm / "search.yaml").write_text(TINY_SEARCH.format(tiny=TINY))
    job = submitted("search.yaml", "--search", "--array", "2")
    wait_for(lambda: not squeue(job), 420, f"job array {job} to leave the queue:\n{task_logs(on_slurm)}")
    logs = task_logs(on_slurm)
    assert "Traceback" not in logs and logs.count("Job completed successfully") == 2, logs
    from chae_ablate.ledger.storage import open_study
    from chae_ablate.search import trials_name
    from chae_ablate.study import load_study
    study = load_study(on_slurm / "search.yaml")
    trials = open_study(trials_name(study, study.search.trials),
                        f"journal:{on_slurm / 'runs' / 'ledger.journal'}").get_trials()
    assert sum(t.state == optuna.trial.TrialState.COMPLETE for t in trials) == 4  # the budget, exactly
    assert (on_slurm / "reports" / "slurmsearch-search" / "report.md").exists()  # written by task 0
