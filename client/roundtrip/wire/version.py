"""The version of the ``roundtrip-worker`` distribution: one place, read by the build
(``pyproject.toml``), the client, the worker's ``GetServerInfo`` and the image tag."""

__version__ = "0.1.0"
