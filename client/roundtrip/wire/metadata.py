"""Metadata keys (gRPC metadata, and the HTTP headers of the same names) both sides read.

>>> FINGERPRINT_KEY
'roundtrip-fingerprint'
"""

#: The numerics fingerprint a call insists on: a worker with another one refuses the call
#: with FAILED_PRECONDITION (on REST, the header of the same name).
FINGERPRINT_KEY = "roundtrip-fingerprint"
