"""What the client and the worker share about the wire, and nothing else: the array codec
(numpy <-> ``roundtrip.v1.Array``), the metadata keys both sides read, and the version.

A package of its own, beside ``roundtrip.client`` and ``roundtrip.server``, so that neither
imports the other to agree on them: importing the worker never loads the client library.
"""
