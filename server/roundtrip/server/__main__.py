"""``roundtrip-server``: start the worker (``python -m roundtrip.server`` works too).

Exit status: 0 after a clean stop, 2 for anything the operator must fix before it can start
(a bad knob, a port that is taken, the ``server`` extra not installed), 3 when the
self-check finds the fast path differs from the eager reference.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import os
import sys
from collections.abc import Callable

from roundtrip.server.config import WorkerConfig, config_table
from roundtrip.server.numerics import numerics
from roundtrip.server.ops import eventloop
from roundtrip.wire.version import __version__

#: Import names the worker needs beyond the thin client: the ``server`` extra.
SERVER_EXTRA = (
    "jax",
    "flax",
    "grpc_reflection",
    "prometheus_client",
    "aiohttp",
    "opentelemetry.sdk",
)
DISTRIBUTION = "roundtrip-worker"


def missing_server_extra() -> list[str]:
    """The ``server`` extra's modules that cannot be imported here."""
    return [name for name in SERVER_EXTRA if not _importable(name)]


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # a dotted name whose package is missing
        return False


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if "--print-config-table" in args:
        print(config_table())
        return 0
    config = WorkerConfig.from_sources(args, os.environ)
    missing = missing_server_extra()
    if missing:
        print(
            f"roundtrip-server: the worker needs the 'server' extra ({', '.join(missing)} "
            f"missing): install {DISTRIBUTION} with it, from its wheel or its checkout "
            f"(pip install 'dist/roundtrip_worker-{__version__}-py3-none-any.whl[server]', or "
            f"pip install '/path/to/checkout[server]'); {DISTRIBUTION} is not on PyPI",
            file=sys.stderr,
        )
        return 2
    try:  # before JAX starts: XLA reads its flags once
        numerics.pin_cpu_isa(config.xla_cpu_max_isa, os.environ, numerics.cpu_flags())
    except numerics.PinRefused as error:
        print(f"roundtrip-server: {error}", file=sys.stderr)
        return 2
    try:
        loop_factory = eventloop.loop_factory(config.event_loop)
    except eventloop.LoopUnavailable as error:
        print(f"roundtrip-server: {error}", file=sys.stderr)
        return 2
    from roundtrip.server.ops import logs, tracing  # the server extra's: after the check above

    try:
        tracing.TraceSettings.from_environ(os.environ)
    except tracing.TraceConfigError as error:
        print(f"roundtrip-server: {error}", file=sys.stderr)
        return 2
    logs.configure(config.log_level)
    with logs.native_lines():  # gRPC core's and XLA's own lines as JSON too
        return _serve(config, loop_factory)


def _serve(config: WorkerConfig, loop_factory: Callable[[], asyncio.AbstractEventLoop]) -> int:
    from roundtrip.server import app  # imports JAX: after the flags are known good
    from roundtrip.server.engine.warmup import SelfCheckFailed

    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(app.serve(config))
    except app.PortUnavailable as error:
        logging.getLogger("roundtrip.server").error("cannot start: %s", error)
        return 2
    except SelfCheckFailed:
        logging.getLogger("roundtrip.server").exception("self-check failed; refusing to serve")
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
