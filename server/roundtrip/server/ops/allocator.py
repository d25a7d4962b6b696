"""Giving freed memory back to the OS: what makes the parameter cache's bound hold in RSS.

glibc keeps memory a program frees and reuses it for later allocations; by default
it hands little of it back. Blocks of 128 KiB or more start out as their own
``mmap`` (unmapped when freed), but freeing one raises that threshold to the
block's size, and from then on blocks that size come from the heap, where a
freed block stays in the process. The parameter cache evicts 4 MiB sets, and
with the other threads' heaps between them, the holes they leave were not all
reused: a 32 MiB cache grew RSS by 43 to 51 MiB, a 128 MiB one by 154 to 166 MiB
(``tests/test_param_cache.py`` holds a worker's RSS to its cache's bound).

:func:`release_freed` (glibc's ``malloc_trim``) hands the free pages of every
heap back to the OS. The engine calls it after a put that evicted, and only
then: traffic whose seeds never repeat, or that fits the cache, never evicts
and pays nothing. Fixing the threshold instead (``mallopt``) kept RSS at the
bound exactly, but mapped every 4 MiB buffer afresh: fresh-seed W3 requests
ran 7% slower.

>>> release_freed() in (True, False)  # False where the C library has no malloc_trim
True
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        trim: Callable[[int], int] = ctypes.CDLL(None).malloc_trim  # this process's C library
    except (OSError, AttributeError):
        return None
    return trim


def release_freed() -> bool:
    """Give the free pages of the C allocator's heaps back to the OS; False where that is
    not available (a C library other than glibc)."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
