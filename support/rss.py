"""A worker process's resident memory, watched while a test or benchmark loads it."""

from __future__ import annotations

import threading

from support.workers import ServerProcess


class RssSampler:
    """The worker's peak RSS, sampled every 20 ms while in the ``with`` block."""

    def __init__(self, worker: ServerProcess) -> None:
        self.worker = worker
        self.before = worker.rss_mib()
        self.peak = self.before
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self.worker.rss_mib())

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
