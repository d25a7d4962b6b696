"""A compute lane: an engine on one device and the one thread that runs it, what the batcher
asks of that engine (:class:`Engine`, a protocol: the batcher imports nothing of JAX), and
one batch computed on it (:func:`compute`, :class:`BatchRecord`)."""

from __future__ import annotations

import collections
import logging
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from roundtrip.server.errors import ComputeFailed, ComputeOutOfMemory, RequestError
from roundtrip.server.values import RoundTripAnswer, RoundTripInput, ShapeSignature

log = logging.getLogger(__name__)

#: What a computed request gets: its answer, or its own error.
Outcome = RoundTripAnswer | RequestError


class Engine(Protocol):
    """What the batcher asks of a lane's engine (:class:`roundtrip.server.engine.engine.Engine`):
    the batcher schedules, the engine computes, and the batcher imports nothing of JAX."""

    @property
    def max_batch_size(self) -> int: ...

    def bucket_for(self, count: int) -> int:
        """The batch size a batch of ``count`` requests runs at."""
        ...

    def knows(self, signature: ShapeSignature) -> bool:
        """Whether ``signature`` runs without compiling a new shape."""
        ...

    def prepare(self, signature: ShapeSignature, batch_size: int) -> None:
        """Compile what a batch of ``signature`` at ``batch_size`` runs (the compile thread)."""
        ...

    def run(self, inputs: Sequence[RoundTripInput]) -> list[RoundTripAnswer]:
        """Answer ``inputs`` (one signature), in order."""
        ...

    def counts(self) -> dict[str, int]:
        """What the engine has done so far, by what a traced batch reports: compilations,
        executable and parameter cache hits and misses (read on the compute thread)."""
        ...


EngineT = TypeVar("EngineT", bound=Engine)


@dataclass(frozen=True, slots=True)
class BatchRecord:
    """What one engine run did, for metrics: size, seconds queued (oldest), seconds computing."""

    signature: ShapeSignature
    size: int
    queue_seconds: Sequence[float]
    compute_seconds: float
    lane: str = "0"


def _as_request_error(error: Exception) -> RequestError:
    text = f"{type(error).__name__}: {error}"
    if "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower():
        return ComputeOutOfMemory(f"the engine ran out of memory for this request ({text})")
    return ComputeFailed(f"the engine failed on this request ({text})")


def compute(engine: Engine, items: list[RoundTripInput]) -> list[Outcome]:
    """A lane's work: one batch's outcomes, in order. Runs on the lane's compute thread.

    A failed batch is retried request by request, so a request that fails the engine gets
    its own error and its neighbours their answers.
    """
    try:
        return list(engine.run(items))
    except Exception as error:
        if len(items) == 1:
            log.warning("compute failed", extra={"error": repr(error)})
            return [_as_request_error(error)]
    outcomes: list[Outcome] = []
    for item in items:
        outcomes.extend(compute(engine, [item]))
    return outcomes


def run_batch(
    engine: Engine, items: list[RoundTripInput], counted: bool = False
) -> tuple[list[Outcome], dict[str, int]]:
    """:func:`compute`, and (``counted``: a traced batch) by how much each of the engine's
    :meth:`Engine.counts` grew while it ran, named ``roundtrip.<count>``."""
    if not counted:
        return compute(engine, items), {}
    before = engine.counts()
    outcomes = compute(engine, items)
    after = engine.counts()
    return outcomes, {f"roundtrip.{key}": after[key] - before[key] for key in after}


@dataclass(frozen=True)
class Lane(Generic[EngineT]):
    """One compute lane: an engine (its executables and parameter cache, on one device) and
    the one thread that runs it. A worker has a lane per local device."""

    engine: EngineT
    executor: Executor
    name: str = "0"


class WarmSignatures:
    """Signatures each lane has run (a memo of :meth:`Engine.knows`, the oldest forgotten
    first once it holds ``size``): the batcher asks the engine only beyond them."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._known: collections.OrderedDict[tuple[str, ShapeSignature], None] = (
            collections.OrderedDict()
        )

    def knows(self, lane: Lane[Any], signature: ShapeSignature) -> bool:
        key = (lane.name, signature)
        if key in self._known:
            return True
        if lane.engine.knows(signature):
            self.remember(key)
            return True
        return False

    def remember(self, key: tuple[str, ShapeSignature]) -> None:
        self._known[key] = None
        while len(self._known) > self._size:
            self._known.popitem(last=False)
