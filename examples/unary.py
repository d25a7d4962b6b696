"""One RoundTrip call: python examples/unary.py [target]."""

from __future__ import annotations

import sys

from roundtrip.client import RoundTripClient

target = sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:50051"
with RoundTripClient(target, timeout=10) as client:
    client.wait_until_serving(timeout=60)
    result = client.round_trip(0, [1.0, 2.0, 3.0], 4)
    print(result.as_list())
    assert result.as_list() == [-4.221933364868164, -4.221933364868164, 0.0]
