"""Every error the client library's docstrings promise is one a real worker makes it raise:
each ``Raises`` entry (and each error a ``Raises`` entry names) of the blocking and the
asyncio client, provoked here by the method it is documented on."""

from __future__ import annotations

import asyncio
import inspect
import re
import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

from roundtrip.client import AsyncRoundTripClient, RoundTripClient, errors
from support.polling import wait_for
from support.workers import InProcessWorker, busy_lane, free_port, serving_worker

CLIENTS = {"sync": RoundTripClient, "aio": AsyncRoundTripClient}
#: The error classes a docstring may promise: every subclass of RoundTripError.
ERRORS = {
    name
    for name, value in vars(errors).items()
    if isinstance(value, type)
    and issubclass(value, errors.RoundTripError)
    and value is not errors.RoundTripError
}


def documented() -> set[tuple[str, str, str]]:
    """(client, method, error) for every error class a public method's ``Raises`` names."""
    promised = set()
    for kind, client in CLIENTS.items():
        for method, function in inspect.getmembers(client, inspect.isfunction):
            doc = inspect.getdoc(function) or ""
            if method.startswith("_") or "Raises:" not in doc:
                continue
            raises = doc.split("Raises:", 1)[1]
            for name in set(re.findall(r"\b([A-Z][A-Za-z]+Error)\b", raises)) & ERRORS:
                promised.add((kind, method, name))
    return promised


@pytest.fixture(scope="module")
def worker() -> Iterator[InProcessWorker]:
    flags = ["--warmup-shapes", "3:4", "--max-queue-size", "1", "--max-batch-items", "4"]
    flags += ["--max-message-bytes", str(256 * 1024)]
    with serving_worker(*flags) as process:
        yield process


def call(kind: str, target: str, method: str, *args: Any, **kwargs: Any) -> Any:
    """``method`` of a ``kind`` client of ``target``, called with ``args``."""
    if kind == "sync":
        with RoundTripClient(target, timeout=10) as client:
            return getattr(client, method)(*args, **kwargs)

    async def called() -> Any:
        async with AsyncRoundTripClient(target, timeout=10) as client:
            return await getattr(client, method)(*args, **kwargs)

    return asyncio.run(called())


def features_zero(kind: str, worker: InProcessWorker) -> Any:
    return call(kind, worker.target, "round_trip", 0, [1.0, 2.0, 3.0], 0)


def queue_full(kind: str, worker: InProcessWorker) -> Any:
    """Behind the busy lane: one call's batch waits for the lane, the next holds the one
    queue place (max_queue_size 1). The second is sent once the first has left the queue
    for its batch: sent together, both could be in the queue at once, the second refused."""
    with busy_lane(worker) as release:
        waiting = [
            threading.Thread(
                target=call, args=("sync", worker.target, "round_trip", seed, [1.0, 2.0, 3.0], 4)
            )
            for seed in (1, 2)
        ]
        try:
            waiting[0].start()
            wait_for(lambda: worker.metric("roundtrip_computing_bytes") > 0, "a batch of one")
            waiting[1].start()
            wait_for(lambda: worker.metric("roundtrip_queued_requests") == 1, "one queued")
            return call(kind, worker.target, "round_trip", 3, [1.0, 2.0, 3.0], 4)
        finally:
            release.set()
            for thread in waiting:
                if thread.ident is not None:  # started
                    thread.join()


ONE = (0, [1.0, 2.0, 3.0], 4)


def nobody_listens(method: str) -> Callable[[str, InProcessWorker], Any]:
    def provoke(kind: str, worker: InProcessWorker) -> Any:
        args = ONE if method == "round_trip" else ([ONE],)
        return call(kind, f"127.0.0.1:{free_port()}", method, *args, timeout=3)

    return provoke


def deadline_passes(method: str) -> Callable[[str, InProcessWorker], Any]:
    def provoke(kind: str, worker: InProcessWorker) -> Any:
        args = ONE if method == "round_trip" else ([ONE],)
        with busy_lane(worker):
            return call(kind, worker.target, method, *args, timeout=0.5)

    return provoke


def too_many_items(kind: str, worker: InProcessWorker) -> Any:
    requests = [(seed, [1.0, 2.0, 3.0], 4) for seed in range(5)]  # max_batch_items is 4
    return call(kind, worker.target, "round_trip_many", requests)


def message_too_large(kind: str, worker: InProcessWorker) -> Any:
    x = np.ones(128 * 1024, np.float32)  # 512 KiB: over max_message_bytes (256 KiB)
    return call(kind, worker.target, "round_trip_many", [(0, x, 1)])


def never_serving(kind: str, worker: InProcessWorker) -> Any:
    return call(kind, f"127.0.0.1:{free_port()}", "wait_until_serving", 1.0)


#: How a real worker makes each documented error happen, by client method.
PROVOKED: dict[tuple[str, str], Callable[[str, InProcessWorker], Any]] = {
    ("round_trip", "InvalidArgumentError"): features_zero,
    ("round_trip", "ResourceExhaustedError"): queue_full,
    ("round_trip", "UnavailableError"): nobody_listens("round_trip"),
    ("round_trip", "DeadlineExceededError"): deadline_passes("round_trip"),
    ("round_trip_many", "InvalidArgumentError"): too_many_items,
    ("round_trip_many", "UnavailableError"): nobody_listens("round_trip_many"),
    ("round_trip_many", "DeadlineExceededError"): deadline_passes("round_trip_many"),
    ("round_trip_many", "ResourceExhaustedError"): message_too_large,
    ("wait_until_serving", "DeadlineExceededError"): never_serving,
}


def test_every_error_a_docstring_promises_has_a_way_to_happen() -> None:
    assert {(method, error) for _, method, error in documented()} <= set(PROVOKED)


@pytest.mark.parametrize("kind", CLIENTS)
@pytest.mark.parametrize(("method", "error"), PROVOKED)
def test_the_worker_makes_the_client_raise_what_it_promises(
    worker: InProcessWorker, kind: str, method: str, error: str
) -> None:
    expected = getattr(errors, error.split()[0])
    with pytest.raises(expected) as raised:
        PROVOKED[method, error](kind, worker)
    assert (
        raised.value.code.name
        == re.sub(r"(?<!^)(?=[A-Z])", "_", error.split()[0])[: -len("_Error")].upper()
    )
