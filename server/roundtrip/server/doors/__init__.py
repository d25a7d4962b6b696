"""The worker's doors: each turns one wire format into pipeline inputs and the pipeline's
outcomes back into that wire format, and nothing more.

* :mod:`.roundtrip`: ``RoundTrip``, ``RoundTripBatch`` and ``GetServerInfo`` (gRPC);
* :mod:`.stream`: ``RoundTripStream`` (gRPC);
* :mod:`.v2_grpc`: the Open Inference Protocol (V2) over gRPC;
* :mod:`.v2_rest`: V2 over HTTP (aiohttp).

Doors are siblings: none imports another (``tests/test_layering.py``). What the gRPC ones
share is :mod:`roundtrip.server.doors.grpc_calls`; what all of them share is
:mod:`roundtrip.server.pipeline.pipeline`.
"""
