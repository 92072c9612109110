"""Errors the CLI turns into one-line messages with a hint and a documented exit code."""

from __future__ import annotations

# Exit codes shared by every command (each command documents its own codes from 3 up).
EXIT_OK = 0
EXIT_FAILURE = 1  # the operation ran and failed
EXIT_USAGE = 2  # bad flags or arguments (Typer's own code for usage errors)
EXIT_NOT_FOUND = 3
EXIT_UNAVAILABLE = 4  # the coordinator could not be reached
EXIT_ADDRESS_IN_USE = 5  # a daemon could not listen on a port it was given


class CliError(Exception):
    """A failure the user can act on: ``message`` says what is wrong, ``hint`` how to fix it."""

    def __init__(self, message: str, *, hint: str = "", exit_code: int = EXIT_FAILURE):
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.exit_code = exit_code


class UsageError(CliError):
    def __init__(self, message: str, *, hint: str = ""):
        super().__init__(message, hint=hint, exit_code=EXIT_USAGE)
