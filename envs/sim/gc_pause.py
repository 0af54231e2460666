"""Pause Python's cyclic garbage collector around allocation-heavy, cycle-free work.

The simulator's hot loops (drawing a workload, running the event loop) allocate many small objects
that form no reference cycles while earlier ones stay alive; each full pass of the cyclic collector
walks every live object and finds nothing. Reference counting frees everything as usual; the
collector resumes afterwards (or stays off if the caller had turned it off)."""

from __future__ import annotations

import gc
from contextlib import contextmanager
from typing import Iterator


@contextmanager
def cyclic_gc_paused() -> Iterator[None]:
    collecting = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if collecting:
            gc.enable()
