"""Pause Python's cyclic garbage collector around allocation-heavy, cycle-free work.

The simulator's hot loops (drawing a workload, running the event loop) allocate many small objects
that form no reference cycles while earlier ones stay alive; each full pass of the cyclic collector
walks every live object and finds nothing. Reference counting frees everything as usual; the
collector resumes afterwards (or stays off if the caller had turned it off).

The collector is process-wide, so only the main thread pauses it: a pause from a worker thread (the
gateway plans on its twin in one) would hold it off for the event loop's thread too, and the
garbage that piles up meanwhile is then collected in one long pass that stalls every thread."""

from __future__ import annotations

import gc
import threading
from contextlib import contextmanager
from typing import Iterator


@contextmanager
def cyclic_gc_paused() -> Iterator[None]:
    collecting = gc.isenabled() and threading.current_thread() is threading.main_thread()
    if collecting:
        gc.disable()
    try:
        yield
    finally:
        if collecting:
            gc.enable()
