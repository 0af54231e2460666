"""The `agentsched` command: one typer app; each area registers its own commands.

Each area module exposes `register(app)`; heavy imports stay inside the commands so that
`agentsched --help` is instant. User mistakes raise `UserError` (or a pydantic/Policy error),
which is printed as one line on stderr with exit code 2, never a traceback.
"""

from __future__ import annotations

import importlib
import sys

import typer

app = typer.Typer(
    name="agentsched",
    help="Schedule agentic LLM workflows on heterogeneous GPU clusters: simulate, benchmark, train, deploy.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# area modules that provide register(app); a missing one is skipped so areas can land independently
AREAS = ("envs.cli", "heuristics.cli", "training.cli", "deploy.cli")


def _register_all() -> None:
    for module_name in AREAS:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:
                continue
            raise
        module.register(app)


def main() -> None:
    from envs.sim.errors import UserError, format_user_error

    _register_all()
    try:
        app(standalone_mode=False)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except Exception as exc:  # pydantic validation and policy errors are user errors too
        message = format_user_error(exc)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
