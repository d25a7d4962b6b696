"""``roundtrip-server``: start the worker (``python -m roundtrip.server`` works too)."""

from __future__ import annotations

import asyncio
import logging
import os
import sys

from roundtrip.server import logs
from roundtrip.server.config import WorkerConfig, config_table


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if "--print-config-table" in args:
        print(config_table())
        return 0
    config = WorkerConfig.from_sources(args, os.environ)
    logs.configure(config.log_level)
    from roundtrip.server import app  # imports JAX: after the flags are known good
    from roundtrip.server.warmup import SelfCheckFailed

    try:
        asyncio.run(app.serve(config))
    except SelfCheckFailed:
        logging.getLogger("roundtrip.server").exception("self-check failed; refusing to serve")
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
