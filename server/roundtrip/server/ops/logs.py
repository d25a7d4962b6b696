"""Structured logs: one JSON object per line on stderr.

Fields passed with ``extra=`` land in the object, so events stay greppable:
``log.info("listening", extra={"port": 50051})`` prints
``{"ts": ..., "level": "INFO", "logger": ..., "event": "listening", "port": 50051}``.
A line written while a traced call is served also carries its ``trace_id`` and ``span_id``
(``docs/tracing.md``).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from opentelemetry import trace

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "event": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                payload[key] = value
        span = trace.get_current_span().get_span_context()
        if span.is_valid:  # written while serving a traced call: join the log to its span
            payload["trace_id"] = trace.format_trace_id(span.trace_id)
            payload["span_id"] = trace.format_span_id(span.span_id)
        if record.exc_info:
            payload["exception"] = self.formatException(record.exc_info)
        return json.dumps(payload, default=str)


class EndedCallFilter(logging.Filter):
    """grpc's ERROR with a traceback for a call gRPC core had already ended, as one WARNING.

    When core itself refuses a call (a compressed message that decompresses
    past ``max_message_bytes``, a client that went away) the caller already
    has its status, and grpc.aio logs the handler's late attempt to send one
    as an ERROR with a Cython traceback. Nothing failed in the worker, so it
    becomes a one-line WARNING naming the method.

    >>> record = logging.makeLogRecord({"levelno": logging.ERROR, "levelname": "ERROR",
    ...     "msg": "ExecuteBatchError raised in core by servicer method [%s]", "args": ("/m",)})
    >>> EndedCallFilter().filter(record), record.levelname, record.getMessage()
    (True, 'WARNING', 'call ended by gRPC core before its handler answered: /m')
    """

    PREFIX = "ExecuteBatchError raised in core by servicer method"

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith(self.PREFIX):
            method = message[len(self.PREFIX) :].strip(" []")
            record.msg = "call ended by gRPC core before its handler answered: %s"
            record.args = (method,)
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.exc_info = record.exc_text = None
        return True


def configure(level: str) -> None:
    """Send every log record, ours and the libraries', to stderr as JSON lines."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(EndedCallFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
