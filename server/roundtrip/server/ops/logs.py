"""Structured logs: one JSON object per line on stderr.

Fields passed with ``extra=`` land in the object, so events stay greppable:
``log.info("listening", extra={"port": 50051})`` prints
``{"ts": ..., "level": "INFO", "logger": ..., "event": "listening", "port": 50051}``.
A line written while a traced call is served also carries its ``trace_id`` and ``span_id``
(``docs/tracing.md``). What native code writes to the process's stderr itself (gRPC core's
and XLA's own lines: a TLS handshake a plaintext caller failed, a port that is taken) is
relayed as JSON lines too (:func:`native_lines`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
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


#: absl's line format, which gRPC core and XLA write to file descriptor 2 themselves:
#: severity letter, date, time, thread, ``source:line]``, message.
_ABSL = re.compile(r"([IWEF])\d{4} [\d:.]+ +\d+ ([^\]\s]+)\] ?(.*)")
_SEVERITY = {"I": logging.INFO, "W": logging.WARNING, "E": logging.ERROR, "F": logging.CRITICAL}


def native_record(line: str) -> tuple[int, str, str]:
    """A line native code wrote as (level, source, message); one not in absl's format is a
    WARNING from ``stderr``.

    >>> native_record("E1207 12:52:03.086529    6929 add_port.cc:83] Failed to add port")
    (40, 'add_port.cc:83', 'Failed to add port')
    >>> native_record("Fatal Python error: Aborted")
    (30, 'stderr', 'Fatal Python error: Aborted')
    """
    match = _ABSL.fullmatch(line)
    if match is None:
        return logging.WARNING, "stderr", line
    return _SEVERITY[match[1]], match[2], match[3]


@contextmanager
def native_lines(logger: str = "native") -> Iterator[None]:
    r"""While the block runs, file descriptor 2 is a pipe whose lines are logged through
    ``logger`` (so the JSON handler writes them): gRPC core and XLA write there directly,
    not through Python. The JSON handlers write to the real stderr meanwhile. On leaving,
    fd 2 is the real stderr again and every line written before is logged.

    >>> records = []
    >>> class Keep(logging.Handler):
    ...     def emit(self, record): records.append(record)
    >>> native = logging.getLogger("native")
    >>> native.setLevel(logging.INFO); native.addHandler(keep := Keep())
    >>> with native_lines():
    ...     _ = os.write(2, b"I1207 12:53:29.503426 9557 ssl_transport_security.cc:2563] "
    ...                     b"Handshake failed\n")
    >>> native.setLevel(logging.NOTSET); native.removeHandler(keep)
    >>> [(r.levelname, r.source, r.getMessage()) for r in records]
    [('INFO', 'ssl_transport_security.cc:2563', 'Handshake failed')]
    """
    sys.stderr.flush()
    real = os.fdopen(os.dup(2), "w", buffering=1, errors="backslashreplace")
    ours = [
        handler
        for handler in logging.getLogger().handlers
        if isinstance(handler, logging.StreamHandler) and handler.stream is sys.stderr
    ]
    for handler in ours:
        handler.setStream(real)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)
    relay = threading.Thread(
        target=_relay, args=(read_end, logging.getLogger(logger)), name="native-lines", daemon=True
    )
    relay.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(real.fileno(), 2)  # the pipe's last writer gone: the relay drains it and ends
        relay.join(timeout=5)
        for handler in ours:
            handler.setStream(sys.stderr)
        real.close()


def _relay(read_end: int, logger: logging.Logger) -> None:
    with open(read_end, "rb") as pipe:
        for raw in pipe:
            line = raw.decode(errors="backslashreplace").rstrip()
            if line:
                level, source, message = native_record(line)
                logger.log(level, "%s", message, extra={"source": source})
