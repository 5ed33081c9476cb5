"""Logging for dpmd's commands (and elt's): DeePMD-kit's `-v/--log-level LEVEL` and `-l/--log-path FILE`.

A command prints what it *returns* on stdout, for scripts (dpmd test's error table, show, neighbor-stat's
numbers, a built library's path).  Everything else (progress, what was written where, timings, warnings) goes
through `logging.getLogger(__name__)` of the module saying it: on stderr, and with -l FILE appended to FILE
with a time stamp.  One-line errors stay on stderr and are also written to the file.  Under mpiexec and
torchrun only rank 0 logs.  Without `setup` (dpmd used as a library) the `dpmd` logger is left to the
application, as Python's logging expects.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from dpmd.errors import DpmdError

LEVELS = {"DEBUG": logging.DEBUG, "3": logging.DEBUG, "INFO": logging.INFO, "2": logging.INFO,
          "WARNING": logging.WARNING, "1": logging.WARNING, "ERROR": logging.ERROR, "0": logging.ERROR}
FILE_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
_RANK_VARIABLES = ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK")  # torchrun's, then mpiexec's


def add_arguments(parser) -> None:
    """-v/--log-level and -l/--log-path, as `dp` has them on every command (a bare -v means DEBUG)."""
    parser.add_argument("-v", "--log-level", nargs="?", const="DEBUG", default="INFO", type=str.upper,
                        choices=list(LEVELS), metavar="LEVEL",
                        help="what is logged: DEBUG (3; a bare -v), INFO (2, the default), WARNING (1) or ERROR (0)")
    parser.add_argument("-l", "--log-path", default=None, metavar="FILE",
                        help="also append the log to FILE, with time stamps (default: the console only)")


def process_rank() -> int:
    """This process's rank under torchrun or mpiexec (0 otherwise); reading it does not initialise MPI."""
    return int(next((os.environ[k] for k in _RANK_VARIABLES if k in os.environ), 0))


class _Console(logging.StreamHandler):
    """stderr as it is when a record is written (pytest and callers may swap sys.stderr); INFO lines bare,
    others prefixed with their level."""

    def __init__(self):
        super().__init__()
        self.addFilter(lambda record: getattr(record, "console", True))

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _):
        pass

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        return text if record.levelno == logging.INFO else f"{record.levelname.lower()}: {text}"


def setup(level: str | int = "INFO", path: str | Path | None = None, names=("dpmd",), more_paths=()) -> None:
    """Send the loggers `names` (and their children) to stderr and, if given, to the file `path` and the files
    `more_paths` (appended).  Replaces what an earlier call set up; ranks other than 0 log nothing."""
    level = LEVELS[str(level).upper()] if isinstance(level, str) else level
    handlers: list[logging.Handler] = []
    if process_rank() == 0:
        handlers.append(_Console())
        for file in dict.fromkeys(Path(p).resolve() for p in [path, *more_paths] if p is not None):
            try:
                file.parent.mkdir(parents=True, exist_ok=True)
                handler = logging.FileHandler(file, mode="a", encoding="utf-8")
            except OSError as err:
                raise DpmdError(f"{file}: cannot write the log file ({err.strerror or err})") from None
            handler.setFormatter(logging.Formatter(FILE_FORMAT))
            handlers.append(handler)
    else:
        handlers.append(logging.NullHandler())  # (not Python's last-resort handler either)
    for name in names:
        logger = logging.getLogger(name)
        for old in [h for h in logger.handlers if getattr(h, "dpmd_setup", False)]:
            logger.removeHandler(old)
            old.close()
        for handler in handlers:
            handler.dpmd_setup = True
            logger.addHandler(handler)
        logger.setLevel(level)
        logger.propagate = False  # the application's root handlers would print every line twice


def file_only(logger: logging.Logger, level: int, message: str) -> None:
    """A line for the log file alone (the console has it already, or does not need it); nothing when logging
    is not set up (Python's last-resort handler would print it)."""
    if logger.hasHandlers():
        logger.log(level, message, extra={"console": False})
