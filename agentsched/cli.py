"""The `agentsched` command: one typer app; each area registers its own commands.

Each area module exposes `register(app)`; heavy imports stay inside the commands so that
`agentsched --help` is instant.

One error path for the whole command (`main`): a user mistake (a `UserError`, a pydantic or policy
error, or typer's own usage error: unknown option or command, missing option, a value of the wrong
type or out of range) is printed as one line on stderr, `error: ...`, naming the option or field
and the fix, with exit code 2. Anything else is a bug: its traceback is kept and the exit code is 1.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import sys
from pathlib import Path
from typing import Callable, NoReturn, Sequence

import typer

from agentsched.errors import USAGE_ERRORS, format_user_error

PROG = "agentsched"

app = typer.Typer(
    name=PROG,
    help="Schedule agentic LLM workflows on heterogeneous GPU clusters: simulate, benchmark, train, deploy.",
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback(invoke_without_command=True)
def _root(ctx: typer.Context) -> None:
    """Without a command, print the help (not an error: nothing was asked for)."""
    if ctx.invoked_subcommand is None:
        typer.echo(ctx.get_help())
        raise typer.Exit(0)


# area modules that provide register(app); a missing one is skipped so areas can land independently
AREAS = ("envs.cli", "heuristics.cli", "training.cli", "deploy.cli")
_registered = False


def _register_all() -> None:
    global _registered
    if _registered:
        return
    for module_name in AREAS:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:
                continue
            raise
        module.register(app)
    _registered = True


def command_names(group: typer.Typer = app) -> dict[str, typer.Typer | None]:
    """Registered commands (value None) and sub-groups (value: the group), by name."""
    names: dict[str, typer.Typer | None] = {c.name: None for c in group.registered_commands if c.name}
    names.update({g.name: g.typer_instance for g in group.registered_groups if g.name})
    return names


def command_path(args: Sequence[str]) -> list[str]:
    """The command words of `args` (e.g. ['engines', 'up']), as far as they name real commands."""
    path: list[str] = []
    group: typer.Typer | None = app
    for arg in args:
        if group is None or arg.startswith("-"):
            break
        names = command_names(group)
        if arg not in names:
            break
        path.append(arg)
        group = names[arg]
    return path


def usage_hint(args: Sequence[str], message: str) -> str:
    """What to run to see the valid choices, appended to typer's own usage messages."""
    path = command_path(args)
    if message.startswith("No such command") and "Did you mean" not in message:
        known = sorted(command_names(_group_at(path)))
        typed = next((a for a in args if not a.startswith("-") and a not in path), "")
        close = difflib.get_close_matches(typed, known, n=1)
        return f" (did you mean '{close[0]}'?)" if close else f" (commands: {', '.join(known)})"
    return f" (see '{' '.join([PROG, *path, '--help'])}')"


def _group_at(path: Sequence[str]) -> typer.Typer:
    group = app
    for name in path:
        sub = command_names(group).get(name)
        if sub is None:
            break
        group = sub
    return group


def run_typer(command: typer.Typer, args: list[str], prog_name: str, hint: Callable[[str], str] | None = None) -> None:
    """Run a typer app on `args` with the one error path: user mistakes exit 2 with one line
    (`hint(message)` appended to typer's usage errors), bugs keep their traceback (exit 1)."""
    try:
        code = command(args=args, prog_name=prog_name, standalone_mode=False)
    except Exception as exc:
        message = format_user_error(exc)
        if message is None:
            raise
        if isinstance(exc, USAGE_ERRORS) and hint is not None:
            message += hint(message)
        exit_with_error(message)
    if isinstance(code, int) and code:  # typer.Exit(n) and Ctrl-C (130) return their code here
        sys.exit(code)


def main(argv: Sequence[str] | None = None) -> None:
    """Run the command line; user mistakes exit 2 with one line, bugs keep their traceback (exit 1)."""
    args = list(sys.argv[1:] if argv is None else argv)
    _register_all()
    run_typer(app, args, PROG, lambda message: usage_hint(args, message))


def exit_with_error(message: str) -> NoReturn:
    """The one line of a user mistake, exit code 2."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


class ScriptArgumentParser(argparse.ArgumentParser):
    """argparse for the scripts under benchmarks/ that use it: its own usage errors (an unknown
    option, a value of the wrong type) take the command's one-line path instead of usage + error."""

    def error(self, message: str) -> NoReturn:
        exit_with_error(f"{message} (see '{self.prog} --help')")


def run_argparse_script(main: Callable[[], None]) -> None:
    """An argparse script's `main`, run from its `__main__` with the command's error path: user
    mistakes exit 2 with one line, bugs keep their traceback."""
    try:
        main()
    except Exception as exc:
        message = format_user_error(exc)
        if message is None:
            raise
        exit_with_error(message + _script_help_hint())


def _script_help_hint() -> str:
    return f" (see '{Path(sys.argv[0]).name} --help')"


def run_script(script: typer.Typer) -> None:
    """A benchmark's or experiment's typer app, run from its `__main__` with the command's error path."""
    run_typer(script, sys.argv[1:], Path(sys.argv[0]).name, lambda _: _script_help_hint())


if __name__ == "__main__":
    main()
