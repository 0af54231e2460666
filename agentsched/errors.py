"""How the `agentsched` command tells a user mistake (one line, exit code 2) from a bug (traceback).

The simulator core only knows `UserError` (`envs/sim/errors.py`, no CLI library inside); this
module, which belongs to the command, also knows the exceptions of the libraries the command is
built on: typer's usage errors, pydantic's validation errors and the policy loader's `PolicyError`.

Typer >= 0.26 vendors Click: its usage errors derive from `typer.TyperException`, not from
`click.ClickException`. Both families are recognised, so code that raises Click's own exceptions
(or a typer that depends on Click again) still gets one line instead of a traceback.
"""

from __future__ import annotations

import typer
from pydantic import ValidationError

from envs.sim.errors import UserError, pydantic_error_text
from policies.base import PolicyError

try:  # not a dependency of typer >= 0.26 any more; recognised whenever it is installed
    import click
except ModuleNotFoundError:  # pragma: no cover - click is installed with uvicorn here
    USAGE_ERRORS: tuple[type[BaseException], ...] = (typer.TyperException,)
    ABORTS: tuple[type[BaseException], ...] = (typer.Abort,)
else:
    USAGE_ERRORS = (typer.TyperException, click.ClickException)
    ABORTS = (typer.Abort, click.Abort)


# the optional extras (pyproject.toml) and the packages that only they install
EXTRA_OF_PACKAGE = {
    **dict.fromkeys(("gymnasium", "stable_baselines3", "sb3_contrib", "torch", "tensorboard", "ray"), "train"),
    **dict.fromkeys(("fastapi", "uvicorn", "starlette", "httpx", "prometheus_client", "aiohttp", "openai"), "serve"),
    **dict.fromkeys(("transformers", "tokenizers", "safetensors"), "tiny-model"),
}


def missing_extra(exc: BaseException) -> str | None:
    """The extra to install when `exc` is the import of a package only an extra brings."""
    if isinstance(exc, ModuleNotFoundError) and exc.name:
        return EXTRA_OF_PACKAGE.get(exc.name.split(".")[0])
    return None


def format_user_error(exc: BaseException) -> str | None:
    """One-line message for an exception that stems from user input, or None for a real bug."""
    extra = missing_extra(exc)
    if extra is not None:
        return (f"this needs the '{extra}' extra ({exc.name} is not installed): pip install 'agentsched[{extra}]' "
                f"(or `make install`, which installs every extra)")
    if isinstance(exc, (UserError, PolicyError)):
        return _one_line(str(exc))
    if isinstance(exc, USAGE_ERRORS):  # typer >= 0.29 words its own checks through pydantic
        return _one_line(exc.format_message().replace("Value error, ", ""))
    if isinstance(exc, ABORTS):
        return "aborted"
    if isinstance(exc, ValidationError):
        return f"{pydantic_error_text(exc)} (fix this field and retry)"
    if isinstance(exc, FileNotFoundError) and exc.filename:
        return f"file not found: {exc.filename} (check the path)"
    if isinstance(exc, PermissionError) and exc.filename:
        return f"permission denied: {exc.filename} (pick a path you can read, or a directory you can write to)"
    if isinstance(exc, IsADirectoryError) and exc.filename:
        return f"{exc.filename} is a directory (give a file name)"
    return None


def _one_line(text: str) -> str:
    """Messages are one line by contract; a stray newline would break `2>err; head -1 err` use."""
    return " ".join(text.split())
