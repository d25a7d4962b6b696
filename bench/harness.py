"""What every benchmark report shares: where results go (:data:`OUT`), the machine they
were measured on (:func:`machine`), and the engine alone as a yardstick.

A benchmark starts its servers with :mod:`bench.launch`, drives them with
:mod:`bench.loads`, and checks every answer with :mod:`bench.checks`.
"""

from __future__ import annotations

import os
import platform
import re
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.checks import WORKLOADS
from support.workers import (
    ROOT,
)

OUT = ROOT / "docs" / "bench"


def machine(load: str = "load generators on the same cores") -> dict[str, Any]:
    """What a report's figures were measured on, read off this machine: runs on different
    days or nodes compare only when their machines do (the same size of machine computed
    1.5 x slower one day than the day before).

    >>> described = machine("h2load on the same cores")
    >>> described["cpus"] == os.cpu_count(), described["load"]
    (True, 'h2load on the same cores')
    >>> sorted(described)
    ['container_memory_gib', 'cpu_isa', 'cpu_model', 'cpus', 'load', 'memory_gib']
    """
    from roundtrip.server.numerics.numerics import cpu_flags, host_isa
    from roundtrip.server.pipeline.admission import container_memory_limit

    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.MULTILINE)
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    limit = container_memory_limit()
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model.group(1).strip() if model else platform.processor(),
        "cpu_isa": host_isa(cpu_flags()),
        "memory_gib": round(memory / 2**30, 1),
        "container_memory_gib": None if limit is None else round(limit / 2**30, 1),
        "load": load,
    }


def engine_batch_ms(workload: str = "W2", batch: int = 16, repeats: int = 300) -> float:
    """How fast this machine computes: the median milliseconds of one batch of ``batch``
    requests of ``workload`` through a warmed engine in this process, no RPC."""
    from roundtrip.server.engine.engine import Engine
    from roundtrip.server.values import RoundTripInput

    width, features = WORKLOADS[workload]
    engine = Engine(max_compiled=8, max_batch_size=batch)
    rng = np.random.default_rng(0)
    items = [
        RoundTripInput(seed, rng.standard_normal(width).astype(np.float32), features)
        for seed in range(batch)
    ]
    engine.run(items)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        engine.run(items)
        times.append(time.perf_counter() - started)
    return round(1000 * statistics.median(times), 3)
