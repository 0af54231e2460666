"""Value parsers shared by every `agentsched` command (typer `parser=` functions).

Integer ranges use typer's own `min=`/`max=`; what typer cannot say (a strictly positive finite
number, a comma-separated list, a path the command will be able to write) is parsed here, once.
A parser raises `typer.BadParameter`, which typer turns into "Invalid value for '--flag': ...":
the flag is named by typer, and the command never starts with a bad value.
"""

from __future__ import annotations

import math
import os
import tempfile
from enum import Enum
from pathlib import Path
from typing import Any, Callable, NewType

import typer

FloatList = NewType("FloatList", list)  # list[float], from "0.05,0.1"
IntList = NewType("IntList", list)  # list[int], from "0,1" or "0-9" or "0-3,7"
TextList = NewType("TextList", list)  # list[str], from "rr,hexgen"

LIST_METAVAR = "A,B,..."


class OnOff(str, Enum):
    """A switch given as on/off (typer lists the choices and rejects anything else)."""

    on = "on"
    off = "off"


class Backend(str, Enum):
    """Where a sweep's simulations run: a local process pool, or Ray tasks (RAY_ADDRESS: an existing cluster)."""

    process = "process"
    ray = "ray"


def backend_option() -> Any:
    """`--backend process|ray`, the same on bench, evaluate and league."""
    return typer.Option(Backend.process, "--backend",
                        help="process (local worker pool) or ray (Ray tasks; RAY_ADDRESS to use a cluster)")


PREFIX_CACHE_HELP = "vLLM's automatic prefix caching on every engine (on: vLLM's default; off: no cache)"


def prefix_cache_option() -> Any:
    """`--prefix-cache on|off`, the same on every command that simulates."""
    return typer.Option(OnOff.on, "--prefix-cache", help=PREFIX_CACHE_HELP)


def positive_float(text: str | float) -> float:
    """A finite number > 0 (rates, SLO scales, CVs): typer's `min=` is inclusive and lets inf/nan through."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise typer.BadParameter(f"{text!r} is not a number (give a positive number, e.g. 0.5)") from None
    if not (value > 0 and math.isfinite(value)):
        raise typer.BadParameter(f"must be a positive finite number, got {text} (e.g. 0.5)")
    return value


def _int_items(part: str) -> list[int]:
    """One item of an integer list: 'n' or an inclusive range 'a-b' (seeds are >= 0)."""
    lo_text, dash, hi_text = part.partition("-")
    try:
        lo = int(lo_text)
        hi = int(hi_text) if dash else lo
    except ValueError:
        raise typer.BadParameter(f"{part!r} is not an integer >= 0 or a range a-b (e.g. 0,1 or 0-9)") from None
    if hi < lo:
        raise typer.BadParameter(f"range {part!r} ends before it starts (write low-high, e.g. 0-9)")
    return list(range(lo, hi + 1))


def _float_item(part: str) -> list[float]:
    try:
        return [positive_float(part)]
    except typer.BadParameter:
        raise typer.BadParameter(f"{part!r} is not a positive number (e.g. 0.05,0.1)") from None


def comma_list(item: Callable[[str], list], sort: bool = False) -> Callable[[str | list], list]:
    """A parser for "a,b,c": no empty items, duplicates dropped (first kept), optionally sorted."""

    def parse(text: str | list) -> list:
        if isinstance(text, list):  # typer hands over an already parsed default
            return text
        parts = [p.strip() for p in str(text).split(",")]
        if not any(parts):
            raise typer.BadParameter("give at least one value (comma-separated, e.g. a,b)")
        if not all(parts):
            raise typer.BadParameter(f"empty item in {text!r} (remove the extra comma)")
        values = list(dict.fromkeys(v for part in parts for v in item(part)))
        return sorted(values) if sort else values

    return parse


parse_float_list = comma_list(_float_item, sort=True)
parse_int_list = comma_list(_int_items)
parse_text_list = comma_list(lambda part: [part])


def writable_file(text: str | Path) -> Path:
    """An output file path whose directory exists or can be created and is writable: checked before
    any work, so a long run never ends on "permission denied"."""
    path = Path(text)
    if path.is_dir():
        raise typer.BadParameter(f"{path} is a directory (give a file name, e.g. {path / 'out.json'})")
    _check_creatable_dir(path.parent)
    return path


def writable_dir(text: str | Path) -> Path:
    """An output directory that exists (and is writable) or can be created."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise typer.BadParameter(f"{path} is a file, not a directory (give a directory)")
    _check_creatable_dir(path)
    return path


def _check_creatable_dir(directory: Path) -> None:
    existing = directory.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        if existing == directory.absolute():
            raise typer.BadParameter(f"{directory} is a file, not a directory (pick another path)")
        raise typer.BadParameter(f"{existing} is a file, so directory {directory} cannot be created (pick another path)")
    if not _can_create_in(existing):
        what = "is not writable" if existing == directory.absolute() else f"cannot be created ({existing} is not writable)"
        raise typer.BadParameter(f"directory {directory} {what}; pick another path")


def _can_create_in(directory: Path) -> bool:
    """Whether a file can be created here; tried for real (root passes `os.access` on /proc or a
    read-only mount)."""
    if not os.access(directory, os.W_OK | os.X_OK):
        return False
    try:
        with tempfile.TemporaryFile(dir=directory):
            return True
    except OSError:
        return False
