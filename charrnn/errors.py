"""Errors a user can cause, each with the exit code a script can test."""

import signal


class CharrnnError(Exception):
    """A failure explained in one line; `exit_code` tells scripts which kind."""

    exit_code = 1


class UsageError(CharrnnError):
    """A bad option value, config key or config type."""

    exit_code = 2


class CorpusError(CharrnnError):
    """Text that cannot be read, decoded, or is too short for the settings."""

    exit_code = 3


class CheckpointError(CharrnnError):
    """A checkpoint that is missing, damaged, or does not fit the request."""

    exit_code = 4


class DivergedError(CharrnnError):
    """Training produced a non-finite loss."""

    exit_code = 5


class StorageError(CharrnnError):
    """The run directory cannot be written (permissions, disk full)."""

    exit_code = 6


class BusyError(CharrnnError):
    """Another process is training into the same run directory."""

    exit_code = 7


class PeerError(CharrnnError):
    """Another process of a multi-process run failed, left, or never joined."""

    exit_code = 8


# Conventional shell codes for a run stopped by a signal: 128 + signal number.
EXIT_SIGINT = 130
EXIT_SIGTERM = 143


class Interrupted(CharrnnError):
    """Training stopped by SIGINT/SIGTERM after saving a resumable checkpoint."""

    def __init__(self, message: str, signal_number: int):
        super().__init__(message)
        self.exit_code = EXIT_SIGINT if signal_number == signal.SIGINT else EXIT_SIGTERM
