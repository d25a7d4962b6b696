"""The event loop the worker runs on (``event_loop``): uvloop by default, asyncio on request.

Every RPC's Python runs on this one loop, beside the compute lanes' threads, so its cost
per wake-up bounds unary throughput: uvloop (libuv) serves more unary requests per second
than the standard library's selector loop (docs/adr/0002-uvloop-by-default.md). Answers are
computed on the lanes either way: the loop never changes a bit.

>>> loop = loop_factory("asyncio")()
>>> loop_name(loop)
'asyncio'
>>> loop.close()
"""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import Callable

#: What ``event_loop`` may name.
EVENT_LOOPS = ("uvloop", "asyncio")


class LoopUnavailable(RuntimeError):
    """``event_loop`` names a loop this install lacks (uvloop is not built for Windows)."""


def available(name: str) -> bool:
    """Whether ``name`` can run here (asyncio always can)."""
    return name == "asyncio" or importlib.util.find_spec(name) is not None


def loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop]:
    """What :class:`asyncio.Runner` calls to make the worker's loop (``name`` is one of
    :data:`EVENT_LOOPS`: the configuration checked it)."""
    if name == "asyncio":
        return asyncio.new_event_loop
    if not available(name):
        raise LoopUnavailable(
            f"event_loop {name} is not installed here; install it or set event_loop = asyncio"
        )
    import uvloop

    return uvloop.new_event_loop


def loop_name(loop: asyncio.AbstractEventLoop) -> str:
    """Which kind ``loop`` is, as ``event_loop`` names it (for the start log)."""
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"
