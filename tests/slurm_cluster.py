"""A real, throw-away single-node SLURM cluster for tests (SLURM 22.05 and munge as Debian 12 ships them).

`slurm_cluster(base)` starts munged, slurmctld and slurmd as root with all they write under `base`
(state, spool, logs, its own munge key and socket) and on free TCP ports, so it neither needs nor
disturbs a system munged or a second test session; it yields the environment under which sbatch,
squeue, scancel, srun (inside jobs too) and submitit use it. There is no slurmdbd, so the real
`sacct` only says "accounting storage is disabled"; submitit polls job states with it, so the PATH
yielded puts first a small `sacct` that answers from squeue and the job-completion log (`sacct_main`).
`python tests/slurm_cluster.py` starts a cluster, runs `smoke` (a submitit job array, and a
preempted checkpointable job that submitit requeues) and prints how long each part took.
"""
from __future__ import annotations

import itertools
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("munge", "sbatch", "squeue", "scancel", "scontrol", "sinfo", "srun")
INSTALL = "apt-get install slurmctld slurmd slurm-client munge"
PARTITION = "debug"
START_TIMEOUT_S = 60.0
KILL_WAIT_S = 5  # KillWait: SIGTERM to SIGKILL of a cancelled job's tasks
CRED_EXPIRE_S = 5  # launch credentials' lifetime; slurmctld holds a requeued job this long (+1 s)
# Job ids start at a different FirstJobId in each cluster: submitit's state cache is one per process
# (SlurmJob.watcher) and would take job 1 of a new cluster for job 1 of an earlier one, finished.
_first_job_ids = itertools.count(random.randrange(60_000))


class SlurmStartError(RuntimeError):
    """The cluster did not come up; the message gives the reason and the tails of the daemons' logs."""


def _which(name: str) -> str | None:
    """The path of a SLURM or munge program; the daemons live in /usr/sbin, off a user's PATH."""
    path = os.pathsep.join([os.environ.get("PATH", os.defpath), "/usr/sbin", "/sbin"])
    return shutil.which(name, path=path)


def slurm_unavailable() -> str | None:
    """Why a cluster cannot be started on this machine, in one line; None when it can."""
    missing = [name for name in DAEMONS + CLIENTS if _which(name) is None]
    if missing:
        return f"SLURM is not installed (no {', '.join(missing)}): {INSTALL}"
    if os.geteuid() != 0:
        return "slurmd must run as root (it starts each job as the job's user): run the tests as root"
    return None


@contextmanager
def slurm_cluster(base: Path, *, sacct_shim: bool = True) -> Iterator[dict[str, str]]:
    """A running one-node cluster (partition `debug`, every CPU of this machine) whose files live
    under `base`. Yields the variables to merge into os.environ or a subprocess's env: SLURM_CONF,
    and PATH with the `sacct` stand-in first (unless sacct_shim=False). On exit every job is
    cancelled and the daemons, and any job process left, are stopped. Raises SlurmStartError if
    SLURM is missing or does not come up within START_TIMEOUT_S."""
    reason = slurm_unavailable()
    if reason:
        raise SlurmStartError(reason)
    base = Path(base).resolve()
    for sub in ("state", "log"):
        shutil.rmtree(base / sub, ignore_errors=True)
        (base / sub).mkdir(parents=True)
    procs: dict[str, subprocess.Popen] = {}
    with ExitStack() as stack:
        run = _socket_dir(base, stack)
        conf = base / "slurm.conf"
        env = {"SLURM_CONF": str(conf)}
        if sacct_shim:
            env["PATH"] = f"{_write_sacct(base)}{os.pathsep}{os.environ.get('PATH', os.defpath)}"
        # daemons get no SLURM_* of an outer job (were the tests themselves run under SLURM)
        daemon_env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")} | env
        stack.callback(_stop, procs, daemon_env)

        key = base / "munge.key"  # our own munged: a system one may be absent, or use another key
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        munge_socket = run / "munge.sock"
        # --force: munged refuses a socket in a directory that others cannot enter (pytest's tmp_path
        # is 0700), which only matters for jobs of other users; ours all run as root
        procs["munged"] = _spawn(base, "munged", [
            "-F", "--force", f"--socket={munge_socket}", f"--key-file={key}",
            f"--pid-file={base / 'log/munged.pid'}", f"--log-file={base / 'log/munged.log'}",
            f"--seed-file={base / 'state/munged.seed'}"], daemon_env)
        _wait_until("munged's socket", munge_socket.exists, procs, base)

        node = socket.gethostname().split(".")[0]
        ctld_port, slurmd_port = _free_ports(2)
        conf.write_text(_slurm_conf(base, run, node, munge_socket, ctld_port, slurmd_port))
        # -D: stay in the foreground, our child, so that stopping them is a signal to a known pid
        procs["slurmctld"] = _spawn(base, "slurmctld", ["-D", "-f", str(conf)], daemon_env)
        procs["slurmd"] = _spawn(base, "slurmd", ["-D", "-f", str(conf), "-N", node], daemon_env)
        _wait_until(f"node {node} idle in sinfo", lambda: _sinfo_state(daemon_env) == "idle", procs, base)
        yield env


def _socket_dir(base: Path, stack: ExitStack) -> Path:
    """Where the munge socket and slurmd's spool (step sockets, `<spool>/<node>_<job>.<step>`) go:
    under `base` when its path is short enough for a Unix socket (108 bytes), else a short
    temporary folder under /tmp, removed on exit."""
    if len(str(base)) <= 60:
        path = base / "run"
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir()
        return path
    return Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="slurm-", dir="/tmp")))


def _free_ports(n: int) -> list[int]:
    """n distinct TCP ports free now (held open together, so the kernel gives different ones)."""
    held = [socket.socket() for _ in range(n)]
    try:
        for s in held:
            s.bind(("", 0))
        return [s.getsockname()[1] for s in held]
    finally:
        for s in held:
            s.close()


def _node_hardware() -> str:
    """This machine as slurmd sees it (`slurmd -C`: CPUs, sockets, cores, threads), so that slurmd
    registers without a mismatch that drains the node; RealMemory a little under /proc/meminfo's."""
    mem_kb = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))
    memory = f"RealMemory={int(mem_kb / 1024 * 0.95)}"
    try:
        probe = subprocess.run([_which("slurmd"), "-C"], capture_output=True, text=True, timeout=30,
                               env={"PATH": os.defpath, "SLURM_CONF": "/dev/null"})
        line = probe.stdout.splitlines()[0]
        cpus = re.findall(r"\b(?:CPUs|Boards|SocketsPerBoard|CoresPerSocket|ThreadsPerCore)=\d+", line)
    except (OSError, IndexError, subprocess.SubprocessError):
        cpus = []
    if not any(c.startswith("CPUs=") for c in cpus):
        cpus = [f"CPUs={len(os.sched_getaffinity(0))}"]
    return " ".join([*cpus, memory])


def _slurm_conf(base: Path, run: Path, node: str, munge_socket: Path, ctld_port: int,
                slurmd_port: int) -> str:
    """slurm.conf for one node on localhost; the comments say why each non-default line is there."""
    log = base / "log"
    return f"""\
ClusterName=test
# slurmctld only runs on a host named here; the address spares a DNS lookup
SlurmctldHost={node}(127.0.0.1)
# free ports, so that two clusters (test sessions) on one machine do not meet
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
CredType=cred/munge
# cred_expire: a requeued job waits cred_expire + 1 s before it may start again (default 121 s)
AuthInfo=socket={munge_socket},cred_expire={CRED_EXPIRE_S}
SlurmUser=root
SlurmdUser=root
StateSaveLocation={base / 'state'}
SlurmdSpoolDir={run / 'spool'}
SlurmctldPidFile={log / 'slurmctld.pid'}
SlurmdPidFile={log / 'slurmd.pid'}
SlurmctldLogFile={log / 'slurmctld.log'}
SlurmdLogFile={log / 'slurmd.log'}
MailProg=/bin/true
# no cgroups in a container: track job processes through /proc, bind no CPUs, gather no usage
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
# no slurmdbd; finished jobs are logged here instead, which is what our sacct reads
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={log / 'jobcomp.txt'}
MpiDefault=none
SwitchType=switch/none
# a core per 1-CPU task, so the tasks of an array run side by side
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# a node that was down comes back by itself when its slurmd registers
ReturnToService=2
# jobs may be requeued (submitit's preemption and timeout handling runs `scontrol requeue`)
JobRequeue=1
# look at pending jobs every second, not every 60 s (30 s for backfill): a requeued job becomes
# eligible cred_expire + 1 s after its requeue, and then only starts at the next pass
SchedulerParameters=sched_interval=1,bf_interval=1
FirstJobId={(next(_first_job_ids) % 60_000 + 1) * 1000}
MinJobAge=10
KillWait={KILL_WAIT_S}
InactiveLimit=0
NodeName={node} NodeAddr=127.0.0.1 {_node_hardware()} State=UNKNOWN
PartitionName={PARTITION} Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


def _spawn(base: Path, name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen:
    """A daemon in its own session (so the test's Ctrl-C does not hit it), stdout and stderr
    (everything before its log file opens, e.g. a bad slurm.conf) into log/<name>.out."""
    with open(base / "log" / f"{name}.out", "ab") as out:
        return subprocess.Popen([_which(name), *args], stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _sinfo_state(env: dict[str, str]) -> str:
    """The node's state as sinfo shows it ("idle", "down*", ...), or "" while slurmctld does not answer."""
    try:
        out = subprocess.run([_which("sinfo"), "-h", "-N", "-o", "%T"], capture_output=True, text=True,
                             env=env, timeout=10)
    except subprocess.TimeoutExpired:
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def _wait_until(what: str, ready: Callable[[], bool], procs: dict[str, subprocess.Popen], base: Path) -> None:
    """Polls `ready` until START_TIMEOUT_S; a daemon that exits meanwhile fails the start at once."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while not ready():
        for name, proc in procs.items():
            if proc.poll() is not None:
                raise SlurmStartError(f"{name} exited ({proc.returncode}) before {what}{_log_tails(base)}")
        if time.monotonic() > deadline:
            raise SlurmStartError(f"no {what} after {START_TIMEOUT_S:.0f} s{_log_tails(base)}")
        time.sleep(0.2)


def _log_tails(base: Path, lines: int = 12) -> str:
    """The last lines of each daemon's output and log, for a SlurmStartError."""
    parts = []
    for path in sorted((base / "log").glob("*")):
        if path.suffix in (".out", ".log") and path.stat().st_size:
            tail = path.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"\n--- {path} ---\n" + "\n".join(tail))
    return "".join(parts)


def _stop(procs: dict[str, subprocess.Popen], env: dict[str, str]) -> None:
    """Cancel every job, wait for its processes to go, then stop slurmd, slurmctld and munged, in
    that order (slurmd does not take running steps down with it, so the jobs go first)."""
    try:
        if "slurmctld" in procs and procs["slurmctld"].poll() is None:
            _cancel_all(env)
    except (OSError, subprocess.SubprocessError):
        pass  # a slurmctld that does not answer: its jobs' processes are swept below
    finally:
        for name in ("slurmd", "slurmctld", "munged"):
            if name in procs:
                _terminate(procs[name])
        _kill_job_processes(env["SLURM_CONF"])


def _cancel_all(env: dict[str, str]) -> None:
    """scancel every job and wait (KillWait and some) until squeue shows none left."""
    subprocess.run([_which("scancel"), "-p", PARTITION], env=env, capture_output=True, timeout=30)
    deadline = time.monotonic() + KILL_WAIT_S + 20
    while time.monotonic() < deadline:
        queue = subprocess.run([_which("squeue"), "-h", "-o", "%i"], env=env, capture_output=True,
                               text=True, timeout=30)
        if queue.returncode or not queue.stdout.strip():
            return
        time.sleep(0.5)


def _terminate(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM to the daemon's process group (slurmctld's slurmscriptd too), SIGKILL if it lingers."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=grace_s)
            break
        except subprocess.TimeoutExpired:
            continue
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # anything else left in its group
    except ProcessLookupError:
        pass


def _kill_job_processes(conf: str) -> list[int]:
    """SIGKILL what a job of this cluster left running (a slurmstepd or task that outlived the
    cancel): processes whose environment has this SLURM_CONF and that are slurmstepd or have a
    SLURM_JOB_ID. slurmstepd and tasks start sessions of their own, out of the daemons' groups."""
    mine = f"SLURM_CONF={conf}".encode()
    killed = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
            comm = (entry / "comm").read_text().strip()
        except OSError:
            continue
        in_job = comm == "slurmstepd" or any(v.startswith(b"SLURM_JOB_ID=") for v in environ)
        if mine in environ and in_job:
            try:
                os.kill(int(entry.name), signal.SIGKILL)
                killed.append(int(entry.name))
            except ProcessLookupError:
                pass
    return killed


# --- sacct without slurmdbd ------------------------------------------------------------------------

def _write_sacct(base: Path) -> Path:
    """A `sacct` in base/bin that runs sacct_main of this file with this Python; returns base/bin."""
    bin_dir = base / "bin"
    bin_dir.mkdir(exist_ok=True)
    script = bin_dir / "sacct"
    script.write_text(f"#!{sys.executable}\n"
                      "import sys\n"
                      f"sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})\n"
                      f"from {Path(__file__).stem} import sacct_main\n"
                      f"sys.exit(sacct_main(sys.argv[1:], {str(base / 'log' / 'jobcomp.txt')!r}))\n")
    script.chmod(0o755)
    return bin_dir


def sacct_main(argv: list[str], jobcomp: str) -> int:
    """As much of sacct as submitit asks for (`sacct -o JobID,State,NodeList --parsable2 -j ID ...`,
    also -n): one line per job or array task (`5_1`), as sacct prints them. Jobs slurmctld still
    holds come from `squeue -t all`, those it has forgotten (MinJobAge) from the job-completion log;
    without it submitit sees every job UNKNOWN and waits forever for one that died without a result."""
    fields, wanted, header = ["JobID", "State", "NodeList"], set(), True
    args = iter(argv)
    for arg in args:
        flag, _, value = arg.partition("=")
        if flag in ("-o", "--format"):
            fields = (value or next(args, "")).split(",")
        elif flag in ("-j", "--jobs"):
            wanted.update((value or next(args, "")).split(","))
        elif flag in ("-n", "--noheader"):
            header = False
        elif flag not in ("-P", "--parsable2", "-X", "--allocations"):
            print(f"sacct (test cluster stand-in): option {arg} not supported", file=sys.stderr)
            return 1
    known = {"jobid": "JobID", "state": "State", "nodelist": "NodeList"}
    if any(f.lower() not in known for f in fields):
        print(f"sacct (test cluster stand-in): fields {', '.join(known.values())} only", file=sys.stderr)
        return 1

    jobs: dict[str, dict[str, str]] = {}
    if os.path.exists(jobcomp):  # a requeued job has a line per run: the last one wins
        for line in Path(jobcomp).read_text(errors="replace").splitlines():
            rec = dict(re.findall(r"(\w+)=(\S*)", line))
            if "JobId" not in rec:
                continue  # a line being written
            jid = f"{rec['ArrayJobId']}_{rec['ArrayTaskId']}" if rec.get("ArrayTaskId") else rec["JobId"]
            jobs[jid] = {"JobID": jid, "State": rec.get("JobState", ""), "NodeList": rec.get("NodeList", "")}
    live = subprocess.run([_which("squeue"), "-h", "-r", "-t", "all", "-o", "%i|%T|%N"],
                          capture_output=True, text=True)
    if live.returncode:
        sys.stderr.write(live.stderr)
        return live.returncode
    for line in live.stdout.splitlines():
        jid, state, nodes = line.split("|", 2)
        jobs[jid] = {"JobID": jid, "State": state, "NodeList": nodes}

    if header:
        print("|".join(known[f.lower()] for f in fields))
    for jid, rec in jobs.items():
        if not wanted or jid in wanted or jid.split("_")[0] in wanted:
            print("|".join(rec[known[f.lower()]] for f in fields))
    return 0


# --- the self-check ------------------------------------------------------------------------------

def _array_task(i: int) -> tuple[str, str, float, float]:
    """A job-array task: its SLURM ids and when it ran (2 s), to see the tasks overlap."""
    start = time.time()
    time.sleep(2)
    return os.environ["SLURM_ARRAY_TASK_ID"], os.environ["SLURM_JOB_ID"], start, time.time()


class _Preemptible:
    """A checkpointable job: notes each start in folder/<name>.txt; sleeps through its first start
    (to be preempted there) unless told not to, and returns at once on the next; checkpoint() has
    submitit requeue it with the same arguments."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def __call__(self, name: str, sleep: bool = True) -> list[str]:
        marker = self.folder / f"{name}.txt"
        names = ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_RESTART_COUNT")
        with marker.open("a") as f:
            f.write(" ".join(f"{v[6:]}={os.environ[v]}" for v in names if v in os.environ) + "\n")
        starts = marker.read_text().splitlines()
        if sleep and len(starts) == 1:
            time.sleep(60)
        return starts

    def checkpoint(self, *args, **kwargs):
        import submitit
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


def _wait_done(jobs: list, timeout_s: float) -> None:
    """job.result() has no timeout; a job that never finishes fails the check instead of hanging it."""
    deadline = time.monotonic() + timeout_s
    while not all(job.done() for job in jobs):
        if time.monotonic() > deadline:
            raise AssertionError(f"jobs {[job.job_id for job in jobs]} not done after {timeout_s:.0f} s: "
                                 f"{[job.state for job in jobs]}")
        time.sleep(0.5)


def _wait_state(jobs: list, state: str, timeout_s: float) -> None:
    """Polls submitit's view of the jobs' SLURM state (through sacct) until all are in `state`."""
    deadline = time.monotonic() + timeout_s
    while (states := [job.get_info(mode="force").get("State") for job in jobs]) != [state] * len(jobs):
        if time.monotonic() > deadline:
            raise AssertionError(f"jobs {[job.job_id for job in jobs]} are {states}, not {state}")
        time.sleep(0.5)


def smoke(folder: Path) -> dict[str, float]:
    """Checks, on a running cluster whose environment is in os.environ, what tests need of it: a
    2-task submitit job array runs both tasks at once as root; a checkpointable job preempted the
    way submitit simulates it (`scancel --signal` TERM then USR2) is requeued by submitit
    (`scontrol requeue`) and completes on its second start; and, with the sacct stand-in, a
    cancelled job reads CANCELLED, so waiting on it ends. Returns seconds per part."""
    import cloudpickle
    import submitit

    if __name__ != "__main__":  # jobs unpickle our functions, and tests/ is on no job's sys.path
        cloudpickle.register_pickle_by_value(sys.modules[__name__])
    timings = {}
    params = dict(slurm_partition=PARTITION, timeout_min=5, cpus_per_task=1)

    t0 = time.monotonic()
    executor = submitit.AutoExecutor(folder=folder / "array")
    assert executor.cluster == "slurm", executor.cluster
    executor.update_parameters(slurm_array_parallelism=2, **params)
    jobs = executor.map_array(_array_task, [0, 1])
    _wait_done(jobs, 120)
    results = [job.result() for job in jobs]
    assert [r[0] for r in results] == ["0", "1"], results
    (_, _, start0, end0), (_, _, start1, end1) = results
    assert start0 < end1 and start1 < end0, f"array tasks ran one after the other: {results}"
    # the real sacct has no states to give here, our stand-in has
    states = shutil.which("sacct") == str(Path(os.environ["SLURM_CONF"]).parent / "bin" / "sacct")
    if states:
        _wait_state(jobs, "COMPLETED", 30)  # the result comes before SLURM sees the job end
    timings["array"] = time.monotonic() - t0

    # a plain job and task 1 of an array (task 0 just finishes), preempted together
    t0 = time.monotonic()
    markers = folder / "preempt"
    markers.mkdir(parents=True, exist_ok=True)
    executor = submitit.AutoExecutor(folder=folder / "preempt")
    # over 10 min, or submitit takes any USR2 for a timeout (it guarantees min(0.8 T, T - 10 min))
    executor.update_parameters(**(params | dict(timeout_min=15, slurm_array_parallelism=2)))
    job = executor.submit(_Preemptible(markers), "job")
    tasks = executor.map_array(_Preemptible(markers), ["task0", "task1"], [False, True])
    preempted = [job, tasks[1]]
    deadline = time.monotonic() + 60
    while not all((markers / f"{name}.txt").exists() for name in ("job", "task1")):
        assert time.monotonic() < deadline, f"jobs never started: {[j.state for j in preempted]}"
        time.sleep(0.2)
    time.sleep(1)  # the marker is written after submitit installed its signal handlers; be sure
    timings["preempt_started"] = time.monotonic() - t0
    for j in preempted:
        j._interrupt()  # what a preemption sends: SIGTERM (submitit ignores it), then USR2
    _wait_done(preempted + tasks[:1], 180)
    starts = [j.result() for j in preempted]
    assert [len(s) for s in starts] == [2, 2] and len(tasks[0].result()) == 1, starts
    for j in preempted:  # ("Requeued job" may be missing from it: the requeue kills the task)
        log = j.paths.stderr.read_text()
        assert "Caught signal SIGUSR2" in log and "this job is preempted" in log, log[-2000:]
    timings["preempt"] = time.monotonic() - t0
    print(f"array (task id, SLURM_JOB_ID): {[r[:2] for r in results]}")
    for j, s in zip(preempted, starts):
        print(f"preempted {j.job_id}, its starts: {s}")

    if states:  # a job that dies without a result ends submitit's wait
        t0 = time.monotonic()
        _wait_state(preempted + tasks[:1], "COMPLETED", 30)
        job = executor.submit(time.sleep, 60)
        _wait_state([job], "RUNNING", 30)
        job.cancel()
        _wait_done([job], 30)
        assert job.state.startswith("CANCELLED"), job.state
        timings["cancel"] = time.monotonic() - t0
    return timings


@contextmanager
def _environ(env: dict[str, str]) -> Iterator[None]:
    """os.environ with `env` merged in, restored afterwards."""
    saved = dict(os.environ)
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


if __name__ == "__main__":
    if reason := slurm_unavailable():
        sys.exit(f"cannot run: {reason}")
    with tempfile.TemporaryDirectory(prefix="slurm-smoke-") as tmp:
        t0 = time.monotonic()
        with slurm_cluster(Path(tmp) / "cluster") as cluster_env, _environ(cluster_env):
            print(f"cluster up in {time.monotonic() - t0:.1f} s")
            parts = smoke(Path(tmp) / "jobs")
            t1 = time.monotonic()
        print(", ".join(f"{k} {v:.1f} s" for k, v in parts.items())
              + f"; teardown {time.monotonic() - t1:.1f} s; total {time.monotonic() - t0:.1f} s")
