"""Error types that end a command with one readable line (see kmclust.cli)."""


class KmclustError(Exception):
    """Base of every error kmclust reports to a user as one line."""


class IDXError(KmclustError):
    """A malformed or unexpected IDX file; the message names the file."""


class DataError(KmclustError):
    """A missing, malformed or inconsistent data store or source."""


class ConfigError(KmclustError):
    """Bad options, a bad cluster.yaml, or a results store of another config."""


class SchedulerError(KmclustError):
    """A Dask scheduler that cannot be reached or started."""
