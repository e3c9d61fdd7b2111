"""The one domain exception: the CLI prints its message as one red line and exits 1."""


class ChaeError(Exception):
    """A problem the user can fix (bad input, missing data); never a bug."""


class ConfigError(ChaeError):
    """A study file, override or config value that fails validation."""


class DataError(ChaeError):
    """A dataset that is missing, empty or unusable."""
