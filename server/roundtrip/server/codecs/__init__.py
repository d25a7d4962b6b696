"""Wire formats to and from the pipeline's values: ``roundtrip.v1`` and the V2 protocol
(protobuf, and JSON for REST)."""
