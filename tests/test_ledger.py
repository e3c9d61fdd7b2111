"""The ledger: Optuna's private attributes it relies on, URL handling, queueing and claiming, and the
translation of trials into the project's cell records."""
from __future__ import annotations

import os
import time
from dataclasses import replace
from pathlib import Path

import optuna
import pytest
from optuna.storages import BaseStorage

from chae_ablate.errors import ChaeError
from chae_ablate.ledger import Ledger, journal_file, masked, recorded_versions, storage_url, study_exists
from chae_ablate.ledger import DEFAULTS, TakenOver
from chae_ablate.ledger.claims import BEAT, DEATHS, HOLDER, Watch
from chae_ablate.ledger.storage import JournalRepaired, internals
from chae_ablate.records import CellState, PlannedCell
from chae_ablate.study import load_study

from claimer import claim_all
from conftest import STUDIES

STORAGES = {"sqlite": lambda tmp: f"sqlite:///{tmp / 'o.db'}", "journal": lambda tmp: f"journal:{tmp / 'o.journal'}"}
storages = pytest.mark.parametrize("make_url", STORAGES.values(), ids=STORAGES.keys())


def open_ledger(name: str, url: str, **settings) -> Ledger:
    return Ledger(name, url, **settings)


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


class one_cell:
    """A study of a single cell (the baseline, seed 0), as far as the ledger sees it."""

    def __init__(self):
        self.study = load_study(STUDIES / "synthetic-tiny.yaml", {"protocol.seeds": [0]})
        self.name = self.study.name

    def plan(self):
        plan = self.study.plan()
        return replace(plan, cells=plan.cells[:1])


def dead_pid() -> int:
    """The PID of a process of this machine that has exited (and been reaped)."""
    import subprocess
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def die(ledger: Ledger, claim) -> None:
    """As if the claim's worker process had been killed: its holder names a process that is gone."""
    machine, _, token = claim.holder.split("/")
    claim.holder = f"{machine}/{dead_pid()}/{token}"
    internals(ledger.study)[0].set_trial_user_attr(claim._id, HOLDER, claim.holder)


@storages
def test_a_claim_taken_over_stops_and_records_nothing(tmp_path, make_url):
    """A live worker whose cell was re-queued (its heartbeats went unseen) must notice at its next
    write and write nothing: it used to train to the end and finish the cell a second time."""
    study = one_cell()
    url = make_url(tmp_path)
    first, second = open_ledger(study.name, url), open_ledger(study.name, url)
    first.queue(planned(study))
    claim = first.claim(hashes(study))
    die(first, claim)  # looks dead to an observer on this machine, but goes on
    taken = second.claim(hashes(study))
    assert taken is not None and taken.cell_hash == claim.cell_hash and taken.number != claim.number
    with pytest.raises(TakenOver):
        claim.confirm_held()
    with pytest.raises(TakenOver):
        claim.report(1, 0.9)
    with pytest.raises(TakenOver):
        claim.complete({"best_val_loss": 0.5})
    claim.fail("late")  # records nothing either
    taken.report(1, 0.8)
    taken.complete({"best_val_loss": 0.4})
    record = {r.cell_hash: r for r in second.records()}[claim.cell_hash]
    assert record.state == CellState.DONE and record.metrics["best_val_loss"] == 0.4
    trials = second.study.get_trials()
    assert trials[claim.number].intermediate_values == {} and "late" not in str(trials[claim.number].user_attrs)


@storages
def test_a_requeued_cell_inherits_no_lease_of_its_dead_holder(tmp_path, make_url):
    """Three workers: the first dies holding a cell, the second re-queues and claims it, the third
    polls at once. The copy used to carry the dead holder's lease, so the third failed it again and
    claimed it too: one cell trained by two live workers."""
    study = one_cell()
    url = make_url(tmp_path)
    workers = [open_ledger(study.name, url) for _ in range(3)]
    workers[0].queue(planned(study))
    dead = workers[0].claim(hashes(study))
    with dead.heartbeat():
        time.sleep(0.2)
    die(workers[0], dead)
    second = workers[1].claim(hashes(study))
    assert second is not None and second.cell_hash == dead.cell_hash
    copy = workers[1].study.get_trials()[second.number]
    assert copy.user_attrs[HOLDER] == second.holder and BEAT not in copy.user_attrs  # nothing of the dead holder's
    assert copy.user_attrs[DEATHS] == 1
    for _ in range(3):
        assert workers[2].claim(hashes(study)) is None  # the third finds nothing to take
    second.confirm_held()
    second.complete({"best_val_loss": 0.4})
    states = [t.state.name for t in workers[2].study.get_trials()]
    assert states == ["FAIL", "COMPLETE"]


def test_silence_is_judged_by_the_observers_own_clock(tmp_path):
    """A holder is stale only once this process has watched its beat stand still for the grace
    period: an observer whose wall clock runs 40 s ahead (a skewed cluster node) used to fail every
    live worker's cell, judged against leases written by the others' clocks."""
    study = one_cell()
    url = f"journal:{tmp_path / 'o.journal'}"
    holder = open_ledger(study.name, url, heartbeat_s=1, grace_s=10)
    holder.queue(planned(study))
    claim = holder.claim(hashes(study))
    skewed = open_ledger(study.name, url)
    real_time = time.time
    try:
        time.time = lambda: real_time() + 40  # the observer's wall clock is 40 s ahead
        with claim.heartbeat():
            for _ in range(4):
                skewed.recover()
                time.sleep(0.5)
    finally:
        time.time = real_time
    claim.confirm_held()  # still this worker's
    now = [0.0]
    watch = Watch(10, clock=lambda: now[0])  # an observer's own monotonic clock, driven by hand
    trial = holder.study.get_trials()[claim.number]
    assert not watch.silent(trial)  # first seen: not judged
    now[0] = 9.5
    assert not watch.silent(trial)
    now[0] = 10.5
    assert watch.silent(trial)  # 10.5 s of watching a beat that stood still
    beaten = optuna.trial.create_trial(state=optuna.trial.TrialState.RUNNING, user_attrs={**trial.user_attrs, BEAT: 99})
    beaten._trial_id = trial._trial_id
    assert not watch.silent(beaten)  # it moved: the watch starts again


@storages
def test_a_cell_whose_workers_keep_dying_fails_after_the_retries(tmp_path, make_url):
    """A cell that kills its process (host OOM) was re-queued forever; now after --retries deaths it
    fails with the reason, and the worker that gave up reports it (for MLflow and the report)."""
    study = one_cell()
    url = make_url(tmp_path)
    ledger = open_ledger(study.name, url, retries=2)
    ledger.queue(planned(study))
    claims = 0
    while (claim := ledger.claim(hashes(study))) is not None:
        claims += 1
        die(ledger, claim)
    assert claims == 3  # the first attempt and 2 retries
    given_up = ledger.given_up()
    assert [r.state for r in given_up] == [CellState.FAILED]
    assert "died 3 times" in given_up[0].failure_reason and "--retries 2" in given_up[0].failure_reason
    record = {r.cell_hash: r for r in ledger.records()}[given_up[0].cell_hash]
    assert record.state == CellState.FAILED and "died 3 times" in record.failure_reason
    assert ledger.queue(planned(study)) == 0  # a rerun does not retry it: it would only kill the next worker
    more = open_ledger(study.name, url, retries=3)  # unless asked to retry more often
    assert more.queue(planned(study)) == 1
    assert more.study.get_trials()[-1].user_attrs[DEATHS] == 3  # its deaths so far still count


@storages
def test_a_released_cell_goes_back_at_once_and_counts_no_death(tmp_path, make_url):
    study = one_cell()
    ledger = open_ledger(study.name, make_url(tmp_path), retries=0)
    ledger.queue(planned(study))
    claim = ledger.claim(hashes(study))
    claim.release("preempted")
    again = ledger.claim(hashes(study))
    assert again is not None and again.cell_hash == claim.cell_hash
    assert ledger.study.get_trials()[again.number].user_attrs.get(DEATHS) == 0


def test_claim_settings_are_checked_and_kept_with_the_study(tmp_path):
    url = f"sqlite:///{tmp_path / 'o.db'}"
    with pytest.raises(ChaeError, match="--grace 5: must be at least 3 x --heartbeat"):
        open_ledger("s", url, heartbeat_s=2, grace_s=5)
    first = open_ledger("s", url, heartbeat_s=2, grace_s=7)
    assert (first.settings.heartbeat_s, first.settings.grace_s, first.settings.retries) == (2, 7, 3)
    assert open_ledger("s", url).settings == first.settings  # a joining worker uses the study's own
    with pytest.raises(ChaeError, match="--grace 30: study s keeps grace 7"):
        open_ledger("s", url, grace_s=30)
    journal = open_ledger("j", f"journal:{tmp_path / 'j.journal'}")
    assert journal.settings == DEFAULTS["journal"]
    with pytest.raises(ChaeError, match="on a journal ledger must be at least 10 s"):
        open_ledger("k", f"journal:{tmp_path / 'j.journal'}", heartbeat_s=1, grace_s=3)


def test_journal_heartbeats_stay_under_a_megabyte_per_worker_day(tmp_path):
    """Each beat appends a record to a journal that every new process replays: at the journal's
    default interval a worker-day of beats must stay small (leases grew it by 78 MB per 16 workers
    over 48 h)."""
    study = one_cell()
    path = tmp_path / "o.journal"
    ledger = open_ledger(study.name, f"journal:{path}")
    ledger.queue(planned(study))
    claim = ledger.claim(hashes(study))
    storage, trial_id = internals(ledger.study, claim._trial)
    before = path.stat().st_size
    for beat in range(1000, 1100):  # large counters: the records of a long-held cell
        storage.set_trial_user_attr(trial_id, BEAT, beat * 1000)
    per_beat = (path.stat().st_size - before) / 100
    per_day = per_beat * 86400 / DEFAULTS["journal"].heartbeat_s
    assert per_day < 1e6, f"{per_beat:.0f} bytes a beat: {per_day / 1e6:.2f} MB a worker-day"


def test_a_torn_last_journal_record_is_cut_off_and_the_study_goes_on(tmp_path):
    """A writer killed mid-append leaves half a record with no newline; Optuna appended the next
    record after it, and from then on every open of the ledger raised JSONDecodeError."""
    study = one_cell()
    path = tmp_path / "o.journal"
    url = f"journal:{path}"
    open_ledger(study.name, url).queue(planned(study))
    whole = path.read_bytes()
    with open(path, "ab") as f:
        f.write(b'{"op_code":5,"worker_id":"dead","trial_id":0,"sta')  # torn by a kill
    with pytest.warns(JournalRepaired, match="cut off a torn last record"):
        claim = open_ledger(study.name, url).claim(hashes(study))
    assert claim is not None
    claim.complete({"best_val_loss": 0.5})
    assert path.read_bytes().startswith(whole) and path.read_bytes().endswith(b"\n")
    assert [r.state for r in open_ledger(study.name, url).records()] == [CellState.DONE]


def test_a_journal_damaged_inside_is_one_line_naming_the_file(tmp_path):
    study = one_cell()
    path = tmp_path / "o.journal"
    open_ledger(study.name, f"journal:{path}").queue(planned(study))
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:1] + [b'{"op_code":5,"wor' + lines[1]] + lines[2:]))  # an old torn record, appended to
    with pytest.raises(ChaeError, match=f"ledger journal {path}: a record inside it is damaged"):
        open_ledger(study.name, f"journal:{path}").records()


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
    out, all_done = context.Queue(), context.Barrier(4)
    workers = [context.Process(target=claim_all, args=(study.name, url, hashes(study), out, all_done))
               for _ in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=120)
    claimed = []
    while not out.empty():
        claimed.append(out.get())
    assert sorted(claimed) == list(range(60))  # every cell claimed exactly once


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
    study = storage.open_study("race", f"sqlite:///{tmp_path}/optuna.db")
    assert study.study_name == "race" and len(calls) == 2

    def refused(*args, **kwargs):
        raise sqlalchemy.exc.ProgrammingError("SELECT ...", {}, Exception("permission denied for table studies"))

    monkeypatch.setattr(storage, "RDBStorage", refused)
    with pytest.raises(ChaeError, match="cannot open the Optuna storage .*permission denied"):
        storage.open_study("race", f"sqlite:///{tmp_path}/optuna.db")
