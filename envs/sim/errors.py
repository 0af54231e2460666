"""User-facing errors: one line that names the field and the fix."""

from __future__ import annotations

from pathlib import Path
from typing import Any

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


def load_yaml_mapping(path: Path, what: str, hint: str = "") -> dict:
    """Read a YAML file that must hold a mapping; syntax and shape mistakes become UserErrors."""
    import yaml

    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise UserError(f"{what}: {path} is not valid YAML ({exc.__class__.__name__}; fix the syntax)") from None
    if not isinstance(raw, dict):
        raise UserError(f"{what}: {path} must be a YAML mapping{hint}")
    return raw


def validate_as(model: type, raw: dict, what: str, source: str) -> Any:
    """`model.model_validate(raw)`, with the first validation error as a one-line UserError."""
    from pydantic import ValidationError

    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"]) or "input"
        raise UserError(f"{what}: {source}: {loc}: {err['msg']} (fix this field)") from None
