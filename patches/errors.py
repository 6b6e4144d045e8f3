"""Errors that end a run with a one-line message and exit code 2."""

from __future__ import annotations


class StackpatchError(Exception):
    """A problem with the user's input or environment; the message says what to do."""

    exit_code = 2


class UsageError(StackpatchError):
    pass


class EnvironmentProblem(StackpatchError):
    pass


class ManifestError(StackpatchError):
    pass


class LockHeld(StackpatchError):
    pass
