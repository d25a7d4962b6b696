"""Admission by bytes: the worker holds at most ``max_inflight_bytes`` of admitted work.

Counting requests does not bound memory: one 16 MiB request holds well over
a hundred MiB while it is decoded, batched, computed and encoded. But it holds
that much only while its batch runs on a lane. So each stage holds what it
really holds, reserved before it is held: every message counts its own bytes
from the moment gRPC hands it over (:meth:`ByteBudget.received`: one that does
not fit is dropped unparsed); a request admitted holds its decoded input and
its answer's bytes until its caller has taken the answer; its batch, when a
lane takes it, reserves the rest of the computation's working set
(:func:`reserved_bytes`) and gives it back once computed. Nothing grows after
it is reserved, so ``in_use`` never exceeds the limit. A batch that does not
fit waits until bytes come back (:meth:`ByteBudget.wait_for_room`); a request that does
not fit at admission is refused at once with RESOURCE_EXHAUSTED naming the knob
(one that could never run, INVALID_ARGUMENT), never queued. One caller holds
at most its share (:class:`Caller`, ``max_caller_share``).

The default budget follows the container: half its memory limit (cgroup v2
``memory.max`` or v1 ``memory.limit_in_bytes``), or 2 GiB (half the 4 GiB pod
of the manifests) where there is no limit. The other half holds the
interpreter, JAX, the compiled executables and what gRPC buffers.

>>> budget = ByteBudget(100)
>>> held = budget.reserve(60)
>>> budget.in_use
60
>>> budget.reserve(50)  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
roundtrip.server.errors.Overloaded: the worker holds 60 bytes ... over max_inflight_bytes = 100 ...
>>> held.release(); held.release(); budget.in_use
0
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from roundtrip.server.errors import LimitExceeded, Overloaded

MIB = 1024 * 1024
#: The budget where no container limit is found: half of the manifests' 4 GiB pod.
DEFAULT_INFLIGHT_BYTES = 2048 * MIB
CGROUP_LIMIT_FILES = (
    Path("/sys/fs/cgroup/memory.max"),  # cgroup v2
    Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"),  # cgroup v1
)
#: cgroup v1 reports "no limit" as a huge number (a page-rounded 2**63).
NO_LIMIT_ABOVE = 1 << 60


def container_memory_limit(files: tuple[Path, ...] = CGROUP_LIMIT_FILES) -> int | None:
    """The container's memory limit in bytes, or None where there is none.

    >>> container_memory_limit(())
    """
    for path in files:
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        if text == "max" or not text.isdigit() or int(text) >= NO_LIMIT_ABOVE:
            return None
        return int(text)
    return None


def default_inflight_bytes(limit: int | None) -> int:
    """Half the container's memory limit, or :data:`DEFAULT_INFLIGHT_BYTES` without one.

    >>> default_inflight_bytes(4 * 1024**3) // MIB, default_inflight_bytes(None) // MIB
    (2048, 2048)
    """
    return DEFAULT_INFLIGHT_BYTES if limit is None else limit // 2


@dataclass(frozen=True, slots=True)
class WorkingSet:
    """The sizes one request's computation is made of, all known before x is decoded."""

    x_bytes: int  #: x decoded, in the dtype the engine computes in
    param_bytes: int  #: kernel and bias, float32
    output_bytes: int  #: one output (orig_out or merged_out)
    with_outputs: bool
    rank: int = 1  #: of x, and of each output


def working_set_bytes(size: WorkingSet) -> int:
    """An upper estimate of the bytes one request's computation holds beyond its message.

    (The message itself is held from the moment gRPC hands it over:
    :meth:`ByteBudget.received`.) Measured on CPU with ``bench/memory_bounds.py
    --calibrate`` (peak RSS above the level before, one request and eight at
    once; figures in docs/operations.md) and with 64 concurrent 16 MiB
    requests, each term rounded up: x decoded, stacked into the batch (padded
    up to a power-of-two bucket) and copied to the device (4 x); the
    parameters, built inside the executable with their truncated-normal
    temporaries (4 x, measured 4.0 x); orig_out and merged_out with the
    batch's padded output buffers, the loop's carried copies and the
    reductions' temporaries (6 x one output); with outputs returned, their
    host copies and the encoded answer (3 x one output more); plus 64 KiB for
    the Python objects around it.

    >>> working_set_bytes(WorkingSet(12, 64, 16, False))
    65936
    """
    total = 4 * size.x_bytes + 4 * size.param_bytes + 6 * size.output_bytes
    if size.with_outputs:
        total += 3 * size.output_bytes
    return total + 64 * 1024


def answer_bytes(size: WorkingSet) -> int:
    """What an answer holds once computed, until its caller has taken it: both outputs (the
    engine's arrays, then encoded for the wire: 2 x each of the two) when they are sent,
    plus 1 KiB.

    >>> answer_bytes(WorkingSet(12, 64, 16, False)), answer_bytes(WorkingSet(12, 64, 16, True))
    (1024, 1088)
    """
    return (4 * size.output_bytes if size.with_outputs else 0) + 1024


def waiting_bytes(size: WorkingSet) -> int:
    """What a request holds while it waits for its batch, beyond its message: x decoded,
    and the Python objects around it (16 KiB).

    >>> waiting_bytes(WorkingSet(12, 64, 16, False))
    16396
    """
    return size.x_bytes + 16 * 1024


def reserved_bytes(size: WorkingSet) -> tuple[int, int, int]:
    """What admission reserves for a request weighed at ``size``, as ``(held, compute,
    answer)``. ``held``: its decoded input (:func:`waiting_bytes`) and its answer
    (:func:`answer_bytes`), from admission until the answer is taken, so nothing a request
    holds grows after it is admitted. ``compute``: the rest of :func:`working_set_bytes`,
    which its batch reserves while it runs on a lane.

    >>> reserved_bytes(WorkingSet(12, 64, 16, False))
    (17420, 49540, 1024)
    """
    waiting, answer = waiting_bytes(size), answer_bytes(size)
    return waiting + answer, working_set_bytes(size) - waiting, answer


class Caller:
    """One caller (a connection): what its calls hold now against its share of the budget,
    and how many of its calls are open (the pipeline forgets a caller with none).

    >>> budget = ByteBudget(100, caller_share=0.5)
    >>> caller = Caller("ipv4:127.0.0.1:5000")
    >>> held = budget.reserve(40, caller)
    >>> budget.reserve(20, caller)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    roundtrip.server.errors.Overloaded: this caller holds 40 bytes ...(max_caller_share ...
    >>> held.release(); caller.held
    0
    """

    __slots__ = ("calls", "held", "key", "outstanding")

    def __init__(self, key: str) -> None:
        self.key = key
        #: Bytes its reservations hold now.
        self.held = 0
        #: Its open calls.
        self.calls = 0
        #: Requests of its calls of many queued or computing now (its share of the queue).
        self.outstanding = 0


#: What a gRPC message holds for as long as its call lives: the bytes gRPC hands over (it
#: keeps them until the call ends) and the message parsed from them.
MESSAGE_COPIES = 2


class Reservation:
    """Bytes one request (or one batch, computing) holds, charged to its caller when it has
    one; :meth:`release` gives them back (once, however often called), and from then on it
    holds 0."""

    __slots__ = ("_budget", "caller", "computing", "nbytes", "to_compute")

    def __init__(
        self,
        budget: ByteBudget,
        nbytes: int,
        *,
        caller: Caller | None = None,
        computing: bool = False,
    ) -> None:
        self._budget: ByteBudget | None = budget
        self.nbytes = nbytes
        self.caller = caller
        self.computing = computing
        #: The compute bytes this waiting request will need, until its batch reserves them.
        self.to_compute = 0

    def computed(self) -> None:
        """This waiting request's batch has reserved its compute bytes (or it will never
        run): it no longer counts among those the budget keeps room for."""
        if self._budget is not None and self.to_compute:
            self._budget.unpend(self.to_compute)
            self.to_compute = 0

    def release(self) -> None:
        budget = self._budget
        if budget is not None:
            if self.to_compute:
                self.computed()
            nbytes = self.nbytes
            if self.computing:
                budget.computing -= nbytes
            if self.caller is not None:
                self.caller.held -= nbytes
            budget.in_use -= nbytes
            if nbytes and budget.wanting_room:
                budget.freed.set()
            self._budget = None
            self.nbytes = 0


class ByteBudget:
    """Bytes of admitted work, bounded by ``limit``: a hard bound, since every byte is
    checked before it is held and nothing held grows unchecked. Used on the event loop only.

    A request holds what it really holds at each stage: its message from arrival, its
    decoded input and its answer's bytes from admission (:meth:`admit`) until its answer is
    taken, and its computation's working set only while its batch runs
    (:meth:`try_compute`, by the batcher, for the whole batch). So that a waiting request
    can always run, admission keeps room for the largest compute set among the requests
    waiting (``to_compute``): when no batch runs, the oldest request fits alone. One caller
    (:class:`Caller`) may hold at most ``caller_share`` of the budget, so that one stream
    that does not read, or one connection, cannot take it all. Whenever bytes come back,
    :attr:`freed` is set: what waits for room (a batch) waits on it, never on a guess of
    who will give bytes back.

    >>> budget = ByteBudget(1000)
    >>> waiting = budget.admit(100, 600)
    >>> budget.in_use, budget.room_kept
    (100, 600)
    >>> budget.admit(400, 100)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    roundtrip.server.errors.Overloaded: the worker holds 100 bytes ... = 1000 ...
    >>> computing = budget.try_compute(600, [waiting])
    >>> budget.in_use, budget.computing, budget.room_kept
    (700, 600, 0)
    >>> computing.release(); waiting.release(); budget.in_use, budget.computing
    (0, 0)
    """

    def __init__(self, limit: int, *, caller_share: float = 1.0) -> None:
        self.limit = limit
        #: The most one caller may hold (``max_caller_share`` of the limit).
        self.caller_limit = max(1, int(limit * caller_share))
        self.in_use = 0
        #: Bytes held by batches computing now (part of ``in_use``).
        self.computing = 0
        #: The most ``in_use`` has been (a gauge's maximum, for tests and operators).
        self.peak = 0
        #: Set whenever bytes come back; whoever waits for room clears it first.
        self.freed = asyncio.Event()
        #: How many wait for room now (:meth:`wait_for_room`).
        self.wanting_room = 0
        self._computes_waiting: collections.Counter[int] = collections.Counter()
        self._room = 0

    @property
    def room_kept(self) -> int:
        """The largest compute set among the waiting requests: kept free for it."""
        return self._room

    def unpend(self, nbytes: int) -> None:
        self._computes_waiting[nbytes] -= 1
        if not self._computes_waiting[nbytes]:
            del self._computes_waiting[nbytes]
            if nbytes == self._room:
                self._room = max(self._computes_waiting, default=0)

    async def wait_for_room(self) -> None:
        """Until bytes come back (a reservation's release): what a batch that does not fit
        waits on. Releases set :attr:`freed` only while something waits here."""
        self.wanting_room += 1
        self.freed.clear()
        try:
            await self.freed.wait()
        finally:
            self.wanting_room -= 1

    def _take(self, nbytes: int, caller: Caller | None) -> None:
        self.in_use += nbytes
        if self.in_use > self.peak:
            self.peak = self.in_use
        if caller is not None:
            caller.held += nbytes

    def received(self, nbytes: int) -> Reservation:
        """Count a message of ``nbytes`` gRPC has received: :data:`MESSAGE_COPIES` times its
        size, or raise :class:`Overloaded` (the message is then dropped unparsed) when the
        budget cannot take it now."""
        held = MESSAGE_COPIES * nbytes
        self._check(held, held, None)
        self._take(held, None)
        return Reservation(self, held)

    def charge(self, reservation: Reservation, caller: Caller) -> None:
        """Charge a reservation made before its caller was known (a message, counted as it
        arrived) to ``caller``, or raise :class:`Overloaded` when that is over its share."""
        if reservation.caller is None and reservation.nbytes:
            self._check_caller(caller, reservation.nbytes)
            caller.held += reservation.nbytes
        reservation.caller = caller

    def grow(self, reservation: Reservation, nbytes: int) -> None:
        """Hold ``nbytes`` more under ``reservation`` (a body still arriving), or raise as
        :meth:`reserve` would for its new size."""
        self._check(reservation.nbytes + nbytes, nbytes, reservation.caller)
        self._take(nbytes, reservation.caller)
        reservation.nbytes += nbytes

    def reserve(self, nbytes: int, caller: Caller | None = None) -> Reservation:
        """Hold ``nbytes`` now (a body, JSON being decoded), or raise if the budget cannot
        take them now; more than the whole budget can never be taken (LimitExceeded)."""
        self._check(nbytes, nbytes, caller)
        self._take(nbytes, caller)
        return Reservation(self, nbytes, caller=caller)

    def admit(self, held: int, compute: int, caller: Caller | None = None) -> Reservation:
        """Admit a request that holds ``held`` bytes from now until its answer is taken and
        ``compute`` more while its batch runs: hold the first, keep room for the second.
        Raises LimitExceeded when the two together exceed the whole budget (it could never
        run), Overloaded when they do not fit beside what is held now."""
        self._check(held + compute, held + max(0, compute - self._room), caller, held)
        self._take(held, caller)
        reservation = Reservation(self, held, caller=caller)
        reservation.to_compute = compute
        self._computes_waiting[compute] += 1
        self._room = max(self._room, compute)
        return reservation

    def try_compute(self, nbytes: int, requests: Sequence[Reservation]) -> Reservation | None:
        """Hold ``nbytes`` for a batch of ``requests`` about to compute, or None if the
        budget cannot take them now (the batch waits for :attr:`freed`)."""
        if self.in_use + nbytes > self.limit:
            return None
        for request in requests:
            request.computed()
        self._take(nbytes, None)
        self.computing += nbytes
        return Reservation(self, nbytes, computing=True)

    def _check(
        self, total: int, nbytes: int, caller: Caller | None, caller_bytes: int | None = None
    ) -> None:
        """Whether a reservation may hold ``total`` bytes, ``nbytes`` of them new (and the
        room kept for waiting requests' computations), ``caller_bytes`` of them (default
        ``nbytes``) charged to ``caller``."""
        if total > self.limit:
            raise LimitExceeded(
                f"this request's working set is estimated at {total} bytes, over this "
                f"worker's max_inflight_bytes = {self.limit} (env ROUNDTRIP_MAX_INFLIGHT_BYTES); "
                "send a smaller x, fewer features, or no return_outputs"
            )
        if self.in_use + self._room + nbytes > self.limit:
            raise Overloaded(
                f"the worker holds {self.in_use} bytes of admitted work and this request needs "
                f"{nbytes} more, over max_inflight_bytes = {self.limit} "
                "(env ROUNDTRIP_MAX_INFLIGHT_BYTES); retry with backoff"
            )
        if caller is not None:
            self._check_caller(caller, nbytes if caller_bytes is None else caller_bytes)

    def _check_caller(self, caller: Caller, nbytes: int) -> None:
        if nbytes > self.caller_limit:
            raise LimitExceeded(
                f"this request needs {nbytes} bytes, over the share of this worker one caller "
                f"may hold, {self.caller_limit} bytes (max_caller_share of max_inflight_bytes, "
                "env ROUNDTRIP_MAX_CALLER_SHARE): send a smaller x, fewer features, or no "
                "return_outputs"
            )
        if caller.held + nbytes > self.caller_limit:
            raise Overloaded(
                f"this caller holds {caller.held} bytes of admitted work and this request "
                f"needs {nbytes} more, over its share of the worker, {self.caller_limit} "
                "bytes (max_caller_share of max_inflight_bytes, env ROUNDTRIP_MAX_CALLER_SHARE): "
                "take the answers already sent (read the stream), or retry with backoff"
            )
