"""Errors that reach users: one line naming the file, key or atom and what was expected."""


class DpmdError(Exception):
    """Base class: the CLI prints these as one line, without a traceback."""


class DataError(DpmdError, ValueError):
    """A dataset on disk is missing a file or holds values of the wrong shape or type."""


class ConfigError(DpmdError, ValueError):
    """A model or run configuration has an unknown key or a bad value."""


class NeighborOverflowError(DpmdError, RuntimeError):
    """An atom has more neighbours of one type than the model's `sel` allows."""


class MDStopError(DpmdError, RuntimeError):
    """An MD run was stopped by a safety check (lost atoms, atoms too close, NaN energy, neighbour overflow);
    the message is "step N: what happened, naming the atoms" (dpmd.md.safety)."""
