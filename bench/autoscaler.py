"""The HorizontalPodAutoscaler's decision, as Kubernetes documents it, for the rehearsal
(:mod:`bench.rehearsal`): what the manifests ask the real HPA (or KEDA's) to do.

Per sync: the mean of the signal over the pods that report it, over the target, is the
ratio; within ``tolerance`` of 1 nothing changes; otherwise
``desired = ceil(ratio x pods)``. Pods that do not report yet (warming up) count as 0 when
scaling up and as on target when scaling down, which can only make a change smaller. A
scale-up adds at most ``max(100%, 4 pods)`` per step (the HPA's default policy); a
scale-down takes the highest recommendation of the last ``down_window_s`` (its
stabilization window). https://kubernetes.io/docs/tasks/run-application/horizontal-pod-autoscale/#algorithm-details

>>> hpa = Hpa(target=10, min_replicas=1, max_replicas=8, down_window_s=60)
>>> hpa.desired(0, [25.0])             # one pod at 2.5 x target: 3 pods
3
>>> hpa.desired(5, [30.0, None, None])  # the two new ones not ready: counted as 0
3
>>> hpa.desired(10, [10.5, 9.8, 10.2])  # within the tolerance
3
>>> hpa.desired(20, [2.0, 2.0, 2.0])    # low, but 3 was recommended 10 s ago
3
>>> hpa.desired(71, [2.0, 2.0, 2.0])    # the window has passed
1
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field


@dataclass
class Hpa:
    target: float
    min_replicas: int
    max_replicas: int
    down_window_s: float
    tolerance: float = 0.1
    _recommended: deque[tuple[float, int]] = field(default_factory=deque)

    def desired(self, now: float, values: list[float | None]) -> int:
        """The replicas wanted at time ``now`` (seconds) given each current pod's signal
        (None: the pod reports none yet)."""
        current = len(values)
        proposal = self._proposal(values)
        self._recommended.append((now, proposal))
        while self._recommended[0][0] < now - self.down_window_s:
            self._recommended.popleft()
        if proposal < current:  # stabilised: the highest of the window, never above current
            proposal = min(current, max(wanted for _, wanted in self._recommended))
        if proposal > current:
            proposal = min(proposal, max(2 * current, current + 4))
        return max(self.min_replicas, min(self.max_replicas, proposal))

    def _proposal(self, values: list[float | None]) -> int:
        current = len(values)
        reported = [value for value in values if value is not None]
        if not reported:
            return current
        ratio = sum(reported) / len(reported) / self.target
        missing = current - len(reported)
        if missing:
            assumed = 0.0 if ratio > 1 else self.target
            ratio = (sum(reported) + assumed * missing) / current / self.target
        if abs(ratio - 1) <= self.tolerance:
            return current
        return math.ceil(ratio * current)
