"""User-facing errors: one line that names the field and the fix."""

from __future__ import annotations

import click


class UserError(Exception):
    """A mistake in user input (file, flag, field). Printed as one line; exit code 2."""


def format_user_error(exc: BaseException) -> str | None:
    """One-line message for exceptions that stem from user input, or None for real bugs."""
    from pydantic import ValidationError

    from policies.base import PolicyError

    if isinstance(exc, ValidationError):
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "input"
        return f"{where}: {first.get('msg', 'invalid value')} (fix this field and retry)"
    if isinstance(exc, PolicyError):
        return str(exc)
    if isinstance(exc, click.exceptions.UsageError):
        return exc.format_message()
    if isinstance(exc, click.exceptions.Abort):
        return "aborted"
    if isinstance(exc, FileNotFoundError):
        return f"file not found: {exc.filename} (check the path)"
    return None
