"""The two kinds of failure a command reports without a traceback (cli.py turns them into
exit codes): a user error (exit 2) and a run that failed on its own (exit 1)."""

from __future__ import annotations

EXIT_USAGE = 2
EXIT_FAILED = 1


class UsageError(Exception):
    """A user error: printed without a traceback, exit code 2."""


class RunFailed(Exception):
    """The run itself failed (e.g. a non-finite loss): printed without a traceback, exit code 1."""
