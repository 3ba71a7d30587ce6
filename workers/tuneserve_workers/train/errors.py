"""Typed failures the entrypoint turns into a ``Failed`` progress state and a non-zero exit.

Each carries a message written for the person who submitted the FineTuneJob: it names the file
and line, the URI, or the memory that was needed. Anything else is a bug and is reported as such.
"""
from __future__ import annotations


class TrainError(Exception):
    """Base class: a failure the user can act on. ``str(err)`` is the whole message."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __reduce__(self):  # keep the message when Ray pickles it across processes
        return (type(self), (self.message,))


class ConfigError(TrainError):
    """The job asks for something this accelerator or model cannot do."""


class DataError(TrainError):
    """A dataset row is malformed; the message names the file and line."""


class StorageError(TrainError):
    """A URI could not be read or written; the message names it."""


class ResourceError(TrainError):
    """The model does not fit; the message says how much memory it needed."""
