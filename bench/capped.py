"""Workers capped to a pod's CPU limit the way the kubelet caps a container: a CFS quota on
a cgroup of their own (root only). cgroup v1's ``cpu`` controller (``cpu.cfs_quota_us``
per ``cpu.cfs_period_us``) where it is mounted, cgroup v2's ``cpu.max`` otherwise.

    with CpuCap("roundtrip-bench-0", cpus=0.5) as cap:
        worker = WorkerProcess(command=cap.command([sys.executable, "-m", ...]))
        ...
        cap.throttled_s()    # seconds the quota held the worker back

A worker's CPU seconds are read from ``/proc/PID/stat`` (all its threads), which is what
cAdvisor's ``container_cpu_usage_seconds_total`` counts for a one-process container: the
numerator of the HPA's CPU utilisation.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

V1 = Path("/sys/fs/cgroup/cpu")
V2 = Path("/sys/fs/cgroup")
PERIOD_US = 100_000  # the kubelet's CFS period
TICKS = os.sysconf("SC_CLK_TCK")


class CpuCap:
    """A cgroup with a CFS quota of ``cpus`` CPUs; processes started by :meth:`command`
    run in it. Removed on exit (its processes must have ended)."""

    def __init__(self, name: str, cpus: float) -> None:
        self.cpus = cpus
        quota = int(cpus * PERIOD_US)
        if (V1 / "cpu.cfs_quota_us").exists():
            self.path = V1 / name
            self.path.mkdir(exist_ok=True)
            (self.path / "cpu.cfs_period_us").write_text(str(PERIOD_US))
            (self.path / "cpu.cfs_quota_us").write_text(str(quota))
        elif (V2 / "cgroup.controllers").exists():
            self.path = V2 / name
            self.path.mkdir(exist_ok=True)
            (self.path / "cpu.max").write_text(f"{quota} {PERIOD_US}")
        else:
            raise RuntimeError("no cgroup cpu controller: run as root on a Linux host")

    def command(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside the cgroup (the shell joins it, then execs ``argv``)."""
        procs = self.path / "cgroup.procs"
        return ["sh", "-c", f'echo $$ > {procs} && exec "$@"', "sh", *argv]

    def throttled_s(self) -> float:
        """Seconds the quota has held this cgroup's processes back so far."""
        for line in (self.path / "cpu.stat").read_text().splitlines():
            key, value = line.split()
            if key == "throttled_time":  # v1: nanoseconds
                return int(value) / 1e9
            if key == "throttled_usec":  # v2
                return int(value) / 1e6
        return 0.0

    def __enter__(self) -> CpuCap:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.remove()

    def remove(self) -> None:
        for _ in range(50):  # processes just killed take a moment to leave
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.1)
        shutil.rmtree(self.path, ignore_errors=True)


def cpu_seconds(pid: int, thread: int | None = None) -> float:
    """CPU seconds (user + system) process ``pid`` has used so far: all its threads, or
    only ``thread`` (a thread id; the process's own id is its main thread)."""
    stat = Path(f"/proc/{pid}/stat" if thread is None else f"/proc/{pid}/task/{thread}/stat")
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS
