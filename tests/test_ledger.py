"""The ledger: Optuna's private attributes it relies on, URL handling, queueing and claiming, and the
translation of trials into the project's cell records."""
from __future__ import annotations

import os
import time
from pathlib import Path

import optuna
import pytest
from optuna.storages import BaseStorage

from chae_ablate.errors import ChaeError
from chae_ablate.ledger import Ledger, journal_file, masked, recorded_versions, storage_url, study_exists
from chae_ablate.ledger.storage import LEASE, internals
from chae_ablate.options import RUN_DEFAULTS
from chae_ablate.records import CellState, PlannedCell
from chae_ablate.study import load_study

from conftest import STUDIES

STORAGES = {"sqlite": lambda tmp: f"sqlite:///{tmp / 'o.db'}", "journal": lambda tmp: f"journal:{tmp / 'o.journal'}"}
storages = pytest.mark.parametrize("make_url", STORAGES.values(), ids=STORAGES.keys())


def open_ledger(name: str, url: str, grace_s: int = RUN_DEFAULTS.grace_s) -> Ledger:
    return Ledger(name, url, RUN_DEFAULTS.heartbeat_s, grace_s)


def planned(study) -> list[PlannedCell]:
    return list(study.plan().cells)


def hashes(study) -> set[str]:
    return {c.cell_hash for c in study.plan().cells}


def test_optuna_internals_still_exist(tmp_path):
    """Fails loudly when a new Optuna renames Study._storage or Trial._trial_id (checked against 5.0.0)."""
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'o.db'}")
    study.enqueue_trial({})
    frozen = study.get_trials()[0]
    storage, trial_id = internals(study, frozen)
    assert isinstance(storage, BaseStorage)
    assert storage.get_trial(trial_id).number == frozen.number
    trial = optuna.trial.Trial(study, trial_id)
    assert internals(study, trial)[1] == trial_id


def test_storage_urls_are_parsed_and_masked():
    url = "postgresql://user:secret@db.example:5432/chae"
    assert "secret" not in masked(url) and "***" in masked(url)
    assert storage_url("sqlite:///runs/optuna.db").get_backend_name() == "sqlite"
    with pytest.raises(ChaeError, match="not a database URL"):
        storage_url("not a url")


@storages
def test_queue_claim_complete_and_records(tmp_path, make_url):
    study = load_study(STUDIES / "synthetic-tiny.yaml")
    assert not study_exists(study.name, make_url(tmp_path)) and not list(tmp_path.iterdir())  # creates nothing
    ledger = open_ledger(study.name, make_url(tmp_path))
    assert study_exists(study.name, make_url(tmp_path)) and not study_exists("other", make_url(tmp_path))
    cells = planned(study)
    assert ledger.queue(cells) == 4 and ledger.queue(cells) == 0  # queued once
    assert {r.state for r in ledger.records()} == {CellState.QUEUED}
    claim = ledger.claim(hashes(study))
    assert claim is not None and claim.cell_hash == cells[0].cell_hash
    claim.report(1, 0.9)
    assert claim.reported_epochs() == {1}
    claim.complete({"best_val_loss": 0.5, "test_acc": 0.75})
    failed = ledger.claim(hashes(study))
    failed.fail("boom")
    running = ledger.claim(hashes(study))
    records = {r.cell_hash: r for r in ledger.records()}
    done, bad, held = records[cells[0].cell_hash], records[cells[1].cell_hash], records[running.cell_hash]
    assert (done.state, done.metrics, done.variant, done.seed) == (CellState.DONE, {"best_val_loss": 0.5, "test_acc": 0.75},
                                                                   cells[0].variant, cells[0].seed)
    assert done.source == "ledger trial 0"
    assert (bad.state, bad.failure_reason, bad.metrics) == (CellState.FAILED, "boom", {})
    assert held.state == CellState.RUNNING and held.worker.endswith(f":{os.getpid()}")  # host:pid of the holder
    assert ledger.queue(cells, retry_failed=False) == 0  # a running study does not retry
    assert ledger.queue(cells) == 1  # a rerun does


@storages
def test_a_worker_claims_only_the_cells_of_its_own_plan(tmp_path, make_url):
    """Two versions of a study share its ledger: a worker of one never trains, fails or waits for
    the other's queued cells."""
    old = load_study(STUDIES / "synthetic-tiny.yaml")
    new = load_study(STUDIES / "synthetic-tiny.yaml", {"protocol.epochs": 3})
    ledger = open_ledger(old.name, make_url(tmp_path))
    ledger.queue(planned(old))
    assert hashes(old).isdisjoint(hashes(new))  # epochs are part of a cell's identity
    assert ledger.claim(hashes(new)) is None and not ledger.active(hashes(new))
    assert ledger.active(hashes(old))
    ledger.queue(planned(new))
    claimed = {ledger.claim(hashes(new)).cell_hash for _ in range(4)}
    assert claimed == hashes(new) and ledger.claim(hashes(new)) is None
    assert {r.state for r in ledger.records() if r.cell_hash in hashes(old)} == {CellState.QUEUED}


@storages
def test_versions_are_kept_with_the_study(tmp_path, make_url):
    url = make_url(tmp_path)
    assert recorded_versions("tiny", url) == []  # creates nothing
    assert not list(tmp_path.iterdir())
    ledger = open_ledger("tiny", url)
    ledger.record_version("abc", {"fingerprint": "abc", "source": "/s.yaml", "recorded_at": "2026-01-01T00:00:00"})
    ledger.record_version("def", {"fingerprint": "def", "source": "/s.yaml", "recorded_at": "2026-01-02T00:00:00"})
    assert sorted(v["fingerprint"] for v in recorded_versions("tiny", url)) == ["abc", "def"]


@storages
def test_a_claim_taken_over_after_late_heartbeats_records_nothing(tmp_path, make_url):
    """Under heavy load a live worker's heartbeats can be late: its trial is failed as stale and
    re-queued. The worker finishing later must not crash (it crashed a --workers 2 run in CI)."""
    study = load_study(STUDIES / "synthetic-tiny.yaml")
    ledger = open_ledger(study.name, make_url(tmp_path))
    ledger.queue(planned(study))
    claim = ledger.claim(hashes(study))
    ledger.study.tell(claim._trial, state=optuna.trial.TrialState.FAIL)  # as fail_stale_trials does
    claim.report(1, 0.9)
    claim.complete({"best_val_loss": 0.5})
    claim.fail("late")
    record = {r.cell_hash: r for r in ledger.records()}[claim.cell_hash]
    assert record.state == CellState.FAILED and record.failure_reason == ""


def _claim_all(url: str, out) -> None:
    study = load_study(STUDIES / "synthetic-tiny.yaml", {"protocol.seeds": list(range(30))})
    ledger = open_ledger(study.name, url)
    while (claim := ledger.claim(hashes(study))) is not None:
        out.put(claim.number)


@storages
def test_processes_claiming_at_once_never_win_the_same_cell(tmp_path, make_url):
    """sqlite ignores SELECT ... FOR UPDATE: without the writer lock two processes both read a
    trial as WAITING and both claimed it (one cell trained twice in a --workers 2 CI run). A
    journal's claims are decided by the order of its log."""
    import multiprocessing
    url = make_url(tmp_path)
    study = load_study(STUDIES / "synthetic-tiny.yaml", {"protocol.seeds": list(range(30))})
    open_ledger(study.name, url).queue(planned(study))
    context = multiprocessing.get_context("spawn")
    out = context.Queue()
    workers = [context.Process(target=_claim_all, args=(url, out)) for _ in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=120)
    claimed = []
    while not out.empty():
        claimed.append(out.get())
    assert sorted(claimed) == list(range(60))  # every cell claimed exactly once


def test_journal_leases_return_a_silent_workers_cell_to_the_queue(tmp_path):
    """The journal storage has no heartbeats: a claimed trial's lease, renewed by the Heartbeat
    thread, is what a killed worker stops renewing; after the grace period the next claim fails
    the trial and claims its re-queued copy (same cell)."""
    study = load_study(STUDIES / "synthetic-tiny.yaml", {"protocol.seeds": [0]})
    url = f"journal:{tmp_path / 'o.journal'}"
    alive, other = Ledger(study.name, url, 1, 2), Ledger(study.name, url, 1, 2)  # heartbeat 1 s, grace 2 s
    alive.queue(planned(study))
    held = alive.claim(hashes(study))
    with held.heartbeat():
        time.sleep(3)  # longer than the grace period, but the lease is renewed
        renewed = other.claim(hashes(study))
        assert renewed is not None and renewed.cell_hash != held.cell_hash
    assert alive.study.get_trials()[held.number].user_attrs[LEASE] > time.time() - 2
    time.sleep(2.5)  # silent now, as a killed worker
    retaken = other.claim(hashes(study))
    assert retaken is not None and retaken.cell_hash == held.cell_hash
    states = {t.number: t.state for t in other.study.get_trials()}
    assert states[held.number] == optuna.trial.TrialState.FAIL
    assert states[retaken.number] == optuna.trial.TrialState.RUNNING
    held.complete({"best_val_loss": 0.5})  # the silent worker, back late: records nothing
    retaken.complete({"best_val_loss": 0.4})
    record = {r.cell_hash: r for r in other.records()}[held.cell_hash]
    assert record.state == CellState.DONE and record.metrics["best_val_loss"] == 0.4


def test_journal_urls():
    assert journal_file("sqlite:///x.db") is None
    assert journal_file("journal:runs/l.journal") == (Path.cwd() / "runs" / "l.journal")
    assert masked("journal:runs/l.journal") == "journal:runs/l.journal"
    with pytest.raises(ChaeError, match="expected a file after journal:"):
        journal_file("journal:")


@pytest.mark.parametrize("lost", ['relation "studies" already exists', 'type "studydirection" already exists'])
def test_a_worker_that_loses_the_schema_race_retries(tmp_path, monkeypatch, lost):
    """PostgreSQL tells the loser of two CREATEs 'relation/type ... already exists' as a
    ProgrammingError (seen in CI with three workers starting at once); opening the ledger retries it
    as it does a duplicate row, and the worker gets its study. Any other ProgrammingError is one line."""
    import sqlalchemy

    from chae_ablate.ledger import storage

    calls = []
    real = storage.RDBStorage

    def rdb(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise sqlalchemy.exc.ProgrammingError("CREATE ...", {}, Exception(lost))
        return real(*args, **kwargs)

    monkeypatch.setattr(storage, "RDBStorage", rdb)
    study = storage.open_study("race", f"sqlite:///{tmp_path}/optuna.db", 5, 15)
    assert study.study_name == "race" and len(calls) == 2

    def refused(*args, **kwargs):
        raise sqlalchemy.exc.ProgrammingError("SELECT ...", {}, Exception("permission denied for table studies"))

    monkeypatch.setattr(storage, "RDBStorage", refused)
    with pytest.raises(ChaeError, match="cannot open the Optuna storage .*permission denied"):
        storage.open_study("race", f"sqlite:///{tmp_path}/optuna.db", 5, 15)
