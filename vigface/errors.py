"""Exceptions raised by vigface for bad input.

Every problem a user can cause (a corrupt file, a wrong argument) surfaces as a subclass of
`VigfaceError` whose message names the file or argument and what is wrong, so the CLI can
print one line instead of a traceback from deep inside struct/pickle/PIL.
"""

from __future__ import annotations

import os


class VigfaceError(Exception):
    """Base class of every error vigface raises on purpose."""


class DataFormatError(VigfaceError):
    """A data file is malformed. Carries the path and, where known, the byte offset."""

    def __init__(self, path: str | os.PathLike, message: str, offset: int | None = None):
        self.path = os.fspath(path)
        self.offset = offset
        where = self.path if offset is None else f"{self.path} at byte offset {offset}"
        super().__init__(f"{where}: {message}")


class AlignmentError(VigfaceError):
    """Landmarks from which no similarity transform can be estimated (NaN, degenerate)."""


class BackendUnavailableError(VigfaceError):
    """A backend was requested by name but what it needs is missing."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (a plain `kill`, a job scheduler's stop), raised in the main thread like Ctrl-C, so that
    every writer removes its temporary files on the way out instead of dying mid-write."""


class VigfaceWarning(UserWarning):
    """Something the user probably did not mean, but that still runs (printed as `<prog>: warning: ...`)."""


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first line of an exception from another library (onnxruntime, torch.distributed), cut to
    `limit` characters, for a one-line message; its type name when it says nothing."""
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else type(exc).__name__
