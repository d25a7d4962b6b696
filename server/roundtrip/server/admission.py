"""Admission by bytes: the worker holds at most ``max_inflight_bytes`` of admitted work.

Counting requests does not bound memory: one 16 MiB request holds well over
a hundred MiB while it is decoded, batched, computed and encoded. So every
message counts its own bytes from the moment gRPC hands it over
(:meth:`ByteBudget.received`: it is in memory whether or not it is admitted),
and each request then reserves an estimate of its computation's working set
(:func:`working_set_bytes`) before x is decoded. Once computed, the
reservation shrinks to what the answer holds (:func:`answer_bytes`) until
gRPC has written it. A request that does not fit is refused at once with
RESOURCE_EXHAUSTED naming the knob, never queued: waiting requests would hold
their bytes too.

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


def working_set_bytes(size: WorkingSet) -> int:
    """An upper estimate of the bytes one request's computation holds beyond its message.

    (The message itself is held from the moment gRPC hands it over:
    :func:`received_bytes`.) Measured on CPU with ``bench/memory_bounds.py
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


def answer_bytes(output_bytes: int) -> int:
    """What an answer holds once computed, until gRPC has written it: the encoded outputs
    and their serialization (2 x each of the two), plus 1 KiB.

    >>> answer_bytes(0), answer_bytes(1000)
    (1024, 5024)
    """
    return 4 * output_bytes + 1024


class Reservation:
    """Bytes one request holds; :meth:`release` gives them back (once, however often called),
    and from then on it holds 0."""

    __slots__ = ("_budget", "nbytes")

    def __init__(self, budget: ByteBudget, nbytes: int) -> None:
        self._budget: ByteBudget | None = budget
        self.nbytes = nbytes

    def shrink(self, nbytes: int) -> None:
        """Hold only ``nbytes`` from now on (what is left once the computation is done)."""
        if self._budget is not None and nbytes < self.nbytes:
            self._budget.in_use -= self.nbytes - nbytes
            self.nbytes = nbytes

    def release(self) -> None:
        if self._budget is not None:
            self._budget.in_use -= self.nbytes
            self._budget = None
            self.nbytes = 0


class ByteBudget:
    """Bytes of admitted work, bounded by ``limit``. Used on the event loop only."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_use = 0

    def received(self, nbytes: int) -> Reservation:
        """Count a message gRPC has already received: it is in memory, refused or not.

        Never refuses (it is too late to), but later :meth:`reserve` calls see it.
        """
        self.in_use += nbytes
        return Reservation(self, nbytes)

    def reserve(self, nbytes: int) -> Reservation:
        """Hold ``nbytes`` for one request, or raise if the budget cannot take them now.

        A request larger than the whole budget can never run: that is a limit
        (LimitExceeded), not overload.
        """
        if nbytes > self.limit:
            raise LimitExceeded(
                f"this request's working set is estimated at {nbytes} bytes, over this "
                f"worker's max_inflight_bytes = {self.limit} (env ROUNDTRIP_MAX_INFLIGHT_BYTES); "
                "send a smaller x, fewer features, or no return_outputs"
            )
        if self.in_use + nbytes > self.limit:
            raise Overloaded(
                f"the worker holds {self.in_use} bytes of admitted work and this request needs "
                f"{nbytes} more, over max_inflight_bytes = {self.limit} "
                "(env ROUNDTRIP_MAX_INFLIGHT_BYTES); retry with backoff"
            )
        self.in_use += nbytes
        return Reservation(self, nbytes)
