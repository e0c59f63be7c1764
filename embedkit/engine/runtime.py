"""Process-wide settings that make long batch runs cheaper.

glibc's malloc serves large requests (above a dynamic threshold of at most 32 MB) with fresh
`mmap`s and gives them back with `munmap` on free, and only the main thread's arena can grow
past 64 MB, so every window of a run (token arrays, padded batches, vectors fetched from the
device, Arrow buffers) is page-faulted in again, from the kernel, page by page. On virtual
machines a page fault is expensive. Raising the thresholds and using one arena keeps freed
memory in the process for the next window: a run over the bundled sample makes about 10x fewer
page faults this way (measured with getrusage; docs/benchmarks.md).

These are settings of the whole process, so the library never applies them on its own: the
`embedkit` command does (`cli_settings`), and so do the worker processes of a run it started,
which find EMBEDKIT_MALLOC_TUNING=1 in their environment (`inherited_settings`). A program that
calls `embedkit.encode` keeps its allocator as it set it.
"""

from __future__ import annotations

import ctypes
import os
import sys

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8

_INT_MAX = 2**31 - 1
_done = False


def retain_freed_memory(single_arena: bool = True) -> bool:
    """Tune glibc malloc to reuse freed memory instead of returning it to the kernel.

    `single_arena` puts every thread on the main arena, so that worker threads' big buffers are
    reused too (other arenas cap at 64 MB). Leave it off in a process whose threads allocate
    many small objects at once (the fast tokenizer's parallel batch calls in `generate`): with
    one arena, every allocation waits on its lock. On a 16-core machine, tokenizing 20k
    prompts took 10.7 s with one arena and 0.7 s without (docs/benchmarks.md).

    Idempotent (the first call's settings stay); a no-op off Linux/glibc and when
    EMBEDKIT_MALLOC_TUNING=0. Returns whether the settings are in effect.
    """
    global _done
    if _done:
        return True
    if os.environ.get("EMBEDKIT_MALLOC_TUNING", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    settings = [
        (_M_MMAP_THRESHOLD, _INT_MAX),  # requests up to 2 GB come from the heap...
        (_M_TRIM_THRESHOLD, _INT_MAX),  # ...and up to 2 GB of freed heap stays mapped
        (_M_TOP_PAD, 256 << 20),  # grow the heap in large steps
    ]
    if single_arena:
        settings.append((_M_ARENA_MAX, 1))
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = all(libc.mallopt(param, value) for param, value in settings)
    except (OSError, AttributeError):  # not glibc (musl, for one): leave the allocator alone
        return False
    _done = ok
    return ok


TUNING_ENV = "EMBEDKIT_MALLOC_TUNING"


def cli_settings(single_arena: bool = True) -> bool:
    """The process-wide settings of an `embedkit` command; recorded in the environment, so the
    worker processes it starts apply them too (EMBEDKIT_MALLOC_TUNING=0 turns them off)."""
    os.environ.setdefault(TUNING_ENV, "1")
    return retain_freed_memory(single_arena=single_arena)


def inherited_settings(single_arena: bool = True) -> bool:
    """In a worker process: the settings of the command that started it, if it was one."""
    if os.environ.get(TUNING_ENV) != "1":
        return False
    return retain_freed_memory(single_arena=single_arena)
