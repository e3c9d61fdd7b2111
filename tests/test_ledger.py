"""The ledger: Optuna's private attributes it relies on, URL handling, queueing and claiming."""
from __future__ import annotations

import optuna
import pytest
from optuna.storages import BaseStorage

from chae_ablate.errors import ChaeError
from chae_ablate.ledger import Ledger, _internals, shown, storage_url
from chae_ablate.study import load_study

from conftest import STUDIES


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


def test_queue_claim_complete_and_states(tmp_path):
    study = load_study(STUDIES / "synthetic-tiny.yaml")
    ledger = Ledger(study.name, f"sqlite:///{tmp_path / 'o.db'}")
    cells = study.cells()
    assert ledger.queue(cells) == 4 and ledger.queue(cells) == 0  # queued once
    claim = ledger.claim()
    assert claim is not None and claim.cell_hash == cells[0].hash
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


def test_a_claim_taken_over_after_late_heartbeats_records_nothing(tmp_path):
    """Under heavy load a live worker's heartbeats can be late: its trial is failed as stale and
    re-queued. The worker finishing later must not crash (it crashed a --workers 2 run in CI)."""
    study = load_study(STUDIES / "synthetic-tiny.yaml")
    ledger = Ledger(study.name, f"sqlite:///{tmp_path / 'o.db'}")
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


def test_processes_claiming_at_once_never_win_the_same_cell(tmp_path):
    """sqlite ignores SELECT ... FOR UPDATE: without the writer lock two processes both read a
    trial as WAITING and both claimed it (one cell trained twice in a --workers 2 CI run)."""
    import multiprocessing
    url = f"sqlite:///{tmp_path / 'o.db'}"
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
