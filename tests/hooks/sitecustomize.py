"""Test hook, active only in test subprocesses started with tests/hooks on PYTHONPATH: a cell of the
variant named by CHAE_TEST_KILL_VARIANT kills its own process (SIGKILL, as the host's OOM killer
would) as it starts training, on every attempt."""
import os

if os.environ.get("CHAE_TEST_KILL_VARIANT"):
    import signal

    import chae_ablate.runner as _runner

    _train_cell = _runner.train_cell

    def _killing_train_cell(*args, **kwargs):
        if kwargs.get("label", "").split("/")[0] == os.environ["CHAE_TEST_KILL_VARIANT"]:
            os.kill(os.getpid(), signal.SIGKILL)
        return _train_cell(*args, **kwargs)

    _runner.train_cell = _killing_train_cell
