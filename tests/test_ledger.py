"""The ledger: Optuna's private attributes it relies on, URL handling, queueing and claiming."""
from __future__ import annotations

import os
import time
from pathlib import Path

import optuna
import pytest
from optuna.storages import BaseStorage

from chae_ablate.errors import ChaeError
from chae_ablate.ledger import LEASE, Ledger, _internals, journal_file, shown, storage_url, study_exists
from chae_ablate.study import load_study

from conftest import STUDIES

STORAGES = {"sqlite": lambda tmp: f"sqlite:///{tmp / 'o.db'}", "journal": lambda tmp: f"journal:{tmp / 'o.journal'}"}
storages = pytest.mark.parametrize("make_url", STORAGES.values(), ids=STORAGES.keys())


def test_optuna_internals_still_exist(tmp_path):
    """Fails loudly when a new Optuna renames Study._storage or Trial._trial_id (checked against 5.0.0)."""
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'o.db'}")
    study.enqueue_trial({})
    frozen = study.get_trials()[0]
    storage, trial_id = _internals(study, frozen)
    assert isinstance(storage, BaseStorage)
    assert storage.get_trial(trial_id).number == frozen.number
    trial = optuna.trial.Trial(study, trial_id)
    assert _internals(study, trial)[1] == trial_id


def test_storage_urls_are_parsed_and_masked():
    url = "postgresql://user:secret@db.example:5432/chae"
    assert "secret" not in shown(url) and "***" in shown(url)
    assert storage_url("sqlite:///runs/optuna.db").get_backend_name() == "sqlite"
    with pytest.raises(ChaeError, match="not a database URL"):
        storage_url("not a url")


@storages
def test_queue_claim_complete_and_states(tmp_path, make_url):
    study = load_study(STUDIES / "synthetic-tiny.yaml")
    assert not study_exists(study.name, make_url(tmp_path)) and not list(tmp_path.iterdir())  # creates nothing
    ledger = Ledger(study.name, make_url(tmp_path))
    assert study_exists(study.name, make_url(tmp_path)) and not study_exists("other", make_url(tmp_path))
    cells = study.cells()
    assert ledger.queue(cells) == 4 and ledger.queue(cells) == 0  # queued once
    claim = ledger.claim()
    assert claim is not None and claim.cell_hash == cells[0].hash
    assert ledger.cell_states(cells)[0].worker.endswith(f":{os.getpid()}")  # host:pid of the holder
    claim.report(1, 0.9)
    assert claim.reported_epochs() == {1}
    claim.complete({"best_val_loss": 0.5, "test_acc": 0.75})
    failed = ledger.claim()
    failed.fail("boom")
    states = {c.cell_hash: c for c in ledger.cell_states(cells)}
    assert states[cells[0].hash].state == "COMPLETE" and states[cells[0].hash].best_val_loss == 0.5
    assert states[cells[1].hash].state == "FAIL" and states[cells[1].hash].failure_reason == "boom"
    assert ledger.queue(cells, retry_failed=False) == 0  # a running study does not retry
    assert ledger.queue(cells) == 1  # a rerun does
    assert ledger.progress({c.hash for c in cells}) == (1, 0, 4)


@storages
def test_a_claim_taken_over_after_late_heartbeats_records_nothing(tmp_path, make_url):
    """Under heavy load a live worker's heartbeats can be late: its trial is failed as stale and
    re-queued. The worker finishing later must not crash (it crashed a --workers 2 run in CI)."""
    study = load_study(STUDIES / "synthetic-tiny.yaml")
    ledger = Ledger(study.name, make_url(tmp_path))
    ledger.queue(study.cells())
    claim = ledger.claim()
    ledger.study.tell(claim.trial, state=optuna.trial.TrialState.FAIL)  # as fail_stale_trials does
    claim.report(1, 0.9)
    claim.complete({"best_val_loss": 0.5})
    claim.fail("late")
    state = {c.cell_hash: c for c in ledger.cell_states(study.cells())}[claim.cell_hash]
    assert state.state == "FAIL" and state.failure_reason == ""


def _claim_all(url: str, out) -> None:
    study = load_study(STUDIES / "synthetic-tiny.yaml", {"protocol.seeds": list(range(30))})
    ledger = Ledger(study.name, url)
    while (claim := ledger.claim()) is not None:
        out.put(claim.trial.number)


@storages
def test_processes_claiming_at_once_never_win_the_same_cell(tmp_path, make_url):
    """sqlite ignores SELECT ... FOR UPDATE: without the writer lock two processes both read a
    trial as WAITING and both claimed it (one cell trained twice in a --workers 2 CI run). A
    journal's claims are decided by the order of its log."""
    import multiprocessing
    url = make_url(tmp_path)
    study = load_study(STUDIES / "synthetic-tiny.yaml", {"protocol.seeds": list(range(30))})
    Ledger(study.name, url).queue(study.cells())
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
    alive, other = Ledger(study.name, url, grace_s=2), Ledger(study.name, url, grace_s=2)
    alive.queue(study.cells())
    held = alive.claim()
    with held.heartbeat(0.5):
        time.sleep(3)  # longer than the grace period, but the lease is renewed
        renewed = other.claim()
        assert renewed is not None and renewed.cell_hash != held.cell_hash
    assert alive.study.get_trials()[held.trial.number].user_attrs[LEASE] > time.time() - 2
    time.sleep(2.5)  # silent now, as a killed worker
    retaken = other.claim()
    assert retaken is not None and retaken.cell_hash == held.cell_hash
    states = {t.number: t.state for t in other.study.get_trials()}
    assert states[held.trial.number] == optuna.trial.TrialState.FAIL
    assert states[retaken.trial.number] == optuna.trial.TrialState.RUNNING
    held.complete({"best_val_loss": 0.5})  # the silent worker, back late: records nothing
    retaken.complete({"best_val_loss": 0.4})
    by_hash = {c.cell_hash: c for c in other.cell_states(study.cells())}
    assert by_hash[held.cell_hash].state == "COMPLETE" and by_hash[held.cell_hash].best_val_loss == 0.4


def test_journal_urls():
    assert journal_file("sqlite:///x.db") is None
    assert journal_file("journal:runs/l.journal") == (Path.cwd() / "runs" / "l.journal")
    assert shown("journal:runs/l.journal") == "journal:runs/l.journal"
    with pytest.raises(ChaeError, match="expected a file after journal:"):
        journal_file("journal:")
