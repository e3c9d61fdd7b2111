"""The one domain exception (the CLI prints its message as one red line and exits 1), and a
retry for errors the caller knows to be transient."""
from __future__ import annotations

import time


class ChaeError(Exception):
    """A problem the user can fix (bad input, missing data); never a bug."""


class ConfigError(ChaeError):
    """A study file, override or config value that fails validation."""


class DataError(ChaeError):
    """A dataset that is missing, empty or unusable."""


def retrying(call, *args, transient, attempts: int = 5, **kwargs):
    """call(*args, **kwargs), retried after 1, 2, 4, 8 s while transient(error)."""
    for attempt in range(attempts):
        try:
            return call(*args, **kwargs)
        except Exception as err:
            if attempt == attempts - 1 or not transient(err):
                raise
            time.sleep(2 ** attempt)
