"""What the parameter cache costs in RSS: workers with caches of 0, 32 and 128 MiB, the same
W3 seeds pushed through each (48 seeds, three rounds), RSS above the level after warm-up.

    python -m bench.param_cache_rss   # -> docs/bench/param_cache_rss.json
"""

from __future__ import annotations

import json

import numpy as np

from bench.run import OUT
from conftest import serving_worker
from roundtrip.client import RoundTripClient

MIB = 1 << 20


def main() -> None:
    x = np.linspace(-1, 1, 1023, dtype=np.float32)
    report: dict[str, object] = {}
    for cache_mib in (0, 32, 128):
        flags = (
            *("--warmup-shapes", "1023:1024", "--max-batch-size", "1", "--audit-fraction", "0"),
            *("--max-param-cache-bytes", str(cache_mib * MIB)),
        )
        with serving_worker(*flags) as worker, RoundTripClient(worker.target, timeout=120) as c:
            c.round_trip(1000, x, 1024)
            c.round_trip(1001, x, 1024)
            idle = worker.rss_mib()
            grown = []
            for _ in range(3):
                for seed in range(48):
                    c.round_trip(seed, x, 1024)
                grown.append(round(worker.rss_mib() - idle, 1))
            cached = worker.metric("roundtrip_param_cache_bytes") / MIB
        report[f"{cache_mib} MiB"] = {"rss_growth_mib_per_round": grown, "cached_mib": cached}
        print(cache_mib, grown, cached, flush=True)
    report["note"] = "3 rounds of 48 W3 seeds (4 MiB sets); RSS above the level after 2 requests"
    (OUT / "param_cache_rss.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
