"""Requests in flight, now and over time: the worker's load signals.

A gauge sampled every 15 s sees the in-flight count at 4 instants a minute and misses
every burst between them. So the worker keeps two integrals over time, whose ``rate()``
over any window is exact whatever the scrape interval:

- ``roundtrip_busy_seconds_total``, the seconds with at least one request in flight: its
  rate is the share of time the worker was busy, its utilisation, which grows in
  proportion to the load up to 1. The autoscaling signal (docs/autoscaling.md gives the
  per-pod target and the measurement that chose it).
- ``roundtrip_inflight_seconds_total``, the in-flight count integrated: its rate is the
  mean number of requests in flight (Little's law: arrival rate x time in the worker),
  the length of the worker's queue, which stays low until the worker nears saturation and
  then climbs steeply.

>>> clock = iter([0.0, 1.0, 3.0, 5.0, 6.0]).__next__
>>> occupancy = Occupancy(clock=clock)
>>> occupancy.inc(2)          # t=0: two requests arrive
>>> occupancy.dec()           # t=1: one answered (2 in flight for 1 s)
>>> occupancy.dec()           # t=3: the other (1 in flight for 2 s); idle from here
>>> occupancy.level, occupancy.seconds(), occupancy.busy_seconds()  # t=5, t=6
(0, 4.0, 3.0)
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector


class Occupancy:
    """The number of requests in flight and its integral over time (request-seconds).

    Changed by the doors of both event loops (gRPC's, REST's), so under a lock.
    """

    __slots__ = ("_area", "_busy", "_clock", "_lock", "_since", "level")

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self.level = 0
        self._area = 0.0
        self._busy = 0.0
        self._since = 0.0

    def inc(self, count: int = 1) -> None:
        with self._lock:
            now = self._clock()
            if self.level:
                self._area += self.level * (now - self._since)
                self._busy += now - self._since
            self._since = now
            self.level += count

    def dec(self, count: int = 1) -> None:
        self.inc(-count)

    def seconds(self) -> float:
        """Request-seconds spent in flight since the worker started, up to now."""
        with self._lock:
            return self._area + self.level * (self._clock() - self._since)

    def busy_seconds(self) -> float:
        """Seconds with at least one request in flight since the worker started, up to now."""
        with self._lock:
            return self._busy + (self._clock() - self._since if self.level else 0.0)


class OccupancyCollector(Collector):
    """Exports an :class:`Occupancy` at scrape time."""

    def __init__(self, occupancy: Occupancy) -> None:
        self._occupancy = occupancy

    def collect(self) -> Iterator[Metric]:
        gauge = GaugeMetricFamily(
            "roundtrip_inflight_requests",
            "Requests received and not yet answered, now (a sample; its mean over a window "
            "is rate(roundtrip_inflight_seconds_total)).",
        )
        gauge.add_metric([], self._occupancy.level)
        yield gauge
        counter = CounterMetricFamily(
            "roundtrip_inflight_seconds",
            "Request-seconds spent in flight (the in-flight count integrated over time): its "
            "rate() is the mean number of requests in flight.",
        )
        counter.add_metric([], self._occupancy.seconds())
        yield counter
        busy = CounterMetricFamily(
            "roundtrip_busy_seconds",
            "Seconds with at least one request in flight: its rate() is the worker's "
            "utilisation (0 to 1). Scale on it: target 0.6 per pod, 0.45 for pods below one "
            "CPU (docs/autoscaling.md).",
        )
        busy.add_metric([], self._occupancy.busy_seconds())
        yield busy
