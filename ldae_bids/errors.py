"""Exceptions that carry a BIDS execution-spec exit code and a one-line message.

Every error the user can cause is one of these; the CLI turns them into a single
line on stderr and the matching exit code. Subject-level problems (a corrupt image,
say) raise :class:`InputError`, which fails that subject only.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """Exit codes of the BIDS Apps execution specification (and sysexits.h)."""

    OK = 0
    SUBJECT_FAILED = 1
    INVALID_BIDS = 16
    UNKNOWN_LEVEL = 17
    NO_MATCH = 18
    USAGE = 64
    DATA_ERROR = 65
    MISSING_INPUT = 66
    CANNOT_CREATE_OUTPUT = 73
    TEMPORARY_FAILURE = 75


class LdaeError(Exception):
    """Base class: a message for the user and the exit code that goes with it."""

    exit_code: ExitCode = ExitCode.SUBJECT_FAILED

    def __init__(self, message: str, exit_code: ExitCode | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else self.__class__.__name__


class UsageError(LdaeError):
    exit_code = ExitCode.USAGE


class UnknownLevelError(LdaeError):
    exit_code = ExitCode.UNKNOWN_LEVEL


class InvalidBidsError(LdaeError):
    exit_code = ExitCode.INVALID_BIDS


class NoMatchError(LdaeError):
    exit_code = ExitCode.NO_MATCH


class MissingInputError(LdaeError):
    exit_code = ExitCode.MISSING_INPUT


class OutputError(LdaeError):
    exit_code = ExitCode.CANNOT_CREATE_OUTPUT


class InputError(LdaeError):
    """One input file is unusable (corrupt, wrong shape, NaNs, broken affine).

    The message must name the file and say what is wrong; it fails one subject.
    """

    exit_code = ExitCode.DATA_ERROR


class ModelError(LdaeError):
    """A model bundle is missing, corrupted or does not match what is asked."""

    exit_code = ExitCode.MISSING_INPUT


class PluginError(LdaeError):
    """A stage plugin failed to load or declares something inconsistent."""

    exit_code = ExitCode.USAGE
