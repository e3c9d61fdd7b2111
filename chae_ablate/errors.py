"""The one domain exception (the CLI prints its message as one red line and exits 1), a retry for
errors the caller knows to be transient, and the handler that makes a signal stop like Ctrl-C."""
from __future__ import annotations

import time


class ChaeError(Exception):
    """A problem the user can fix (bad input, missing data); never a bug."""


class ConfigError(ChaeError):
    """A study file, override or config value that fails validation."""


class DataError(ChaeError):
    """A dataset that is missing, empty or unusable."""


def retrying(call, *args, transient, attempts: int = 5, within_s: float | None = None, max_delay_s: float = 60.0,
             **kwargs):
    """call(*args, **kwargs), retried while transient(error) after 1, 2, 4, 8 ... s (at most
    max_delay_s apart): `attempts` tries in all, or with within_s every try that starts within
    that many seconds."""
    deadline = None if within_s is None else time.monotonic() + within_s
    delay, attempt = 1.0, 1
    while True:
        try:
            return call(*args, **kwargs)
        except Exception as err:
            spent = attempt >= attempts if deadline is None else time.monotonic() + delay > deadline
            if spent or not transient(err):
                raise
        time.sleep(delay)
        delay, attempt = min(delay * 2, max_delay_s), attempt + 1


def exit_on_signal(signum, frame) -> None:
    """A signal handler (SIGTERM: kill, a scheduler ending a job) that stops like Ctrl-C: a
    SystemExit(128 + signal) unwinds the stack, so a held cell or trial is handed back first."""
    raise SystemExit(128 + signum)
