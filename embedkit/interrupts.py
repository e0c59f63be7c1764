"""Ctrl-C held back across a few lines that must not be cut in half.

Python raises KeyboardInterrupt in the main thread at whatever bytecode it is running when the
signal arrives, even inside the standard library: a `multiprocessing.Pool` interrupted in its
constructor, or a thread interrupted in `Thread.start()` after it began running, is left
half-made, and nothing closes it before the interpreter exits (whose own clean-up then prints
tracebacks). Inside `held_interrupts()` a Ctrl-C is only recorded; the caller finishes what it
was making, then tears it down and raises.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator


@contextlib.contextmanager
def held_interrupts() -> Iterator[list[int]]:
    """Record SIGINT instead of raising it inside the block; yields the list of signals seen.

    Only the main thread can change a handler, and only Python's default one is replaced (a
    handler a caller installed on purpose is left alone); elsewhere this is a no-op.
    """
    seen: list[int] = []
    swap = threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    if swap:
        signal.signal(signal.SIGINT, lambda signum, frame: seen.append(signum))
    try:
        yield seen
    finally:
        if swap:
            signal.signal(signal.SIGINT, signal.default_int_handler)
