"""User-facing errors: one line that names the field and the fix.

Pure on purpose: the simulator core raises `UserError` and validates input files here, with no
CLI library inside. How the command prints these (and typer's or pydantic's own errors) lives in
`agentsched/errors.py`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ValidationError

ModelT = TypeVar("ModelT", bound=BaseModel)


class UserError(Exception):
    """A mistake in user input (file, flag, field). Printed as one line; exit code 2."""


def pydantic_error_text(exc: ValidationError) -> str:
    """The first validation error as `field.path: message` (pydantic's "Value error, " dropped)."""
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first.get("loc", ()))
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    if not where or message.startswith(f"{where}.") or message.startswith(f"{where}:"):
        return message  # a model-level check, or a validator that already names the full path
    return f"{where}: {message}"


def load_yaml_mapping(path: Path, what: str, hint: str = "") -> dict:
    """Read a YAML file that must hold a mapping; syntax and shape mistakes become UserErrors."""
    if not path.is_file():
        reason = "is a directory" if path.is_dir() else "not found"
        raise UserError(f"{what}: file {path} {reason} (check the path)")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise UserError(f"{what}: {path} is not valid YAML ({exc.__class__.__name__}; fix the syntax)") from None
    if not isinstance(raw, dict):
        raise UserError(f"{what}: {path} must be a YAML mapping{hint}")
    return raw


def validate_as(model: type[ModelT], raw: dict, what: str, source: str) -> ModelT:
    """`model.model_validate(raw)`, with the first validation error as a one-line UserError."""
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise UserError(f"{what}: {source}: {pydantic_error_text(exc)} (fix this field)") from None
