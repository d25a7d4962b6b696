"""Many requests per call: one RoundTripBatch, then one stream.

python examples/many_requests.py [target]
"""

from __future__ import annotations

import sys

from roundtrip.client import RoundTripClient, RoundTripError

target = sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:50051"
requests = [(seed, [1.0, 2.0, 3.0], 4) for seed in range(8)]
requests.append((0, [1.0, 2.0, 3.0], 0))  # features 0: refused on its own

with RoundTripClient(target, timeout=30) as client:
    batch = client.round_trip_many(requests)
    streamed = list(client.stream(requests))
for label, outcomes in (("batch", batch), ("stream", streamed)):
    for outcome in outcomes:
        print(
            label,
            f"error {outcome.code.name}"
            if isinstance(outcome, RoundTripError)
            else outcome.as_list(),
        )
answered = [o.as_list() for o in batch if not isinstance(o, RoundTripError)]
assert answered == [o.as_list() for o in streamed if not isinstance(o, RoundTripError)]
assert len(answered) == 8
