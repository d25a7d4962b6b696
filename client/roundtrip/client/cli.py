"""``roundtrip``: call a worker from the shell.

    roundtrip call --seed 0 --x 1,2,3 --features 4 [--target 127.0.0.1:50051]
    roundtrip --target 127.0.0.1:50051 info
    roundtrip ready [--wait 30]
    roundtrip many < requests.jsonl     one {"seed": 0, "x": [1, 2, 3], "features": 4} per line

Global options (``--target``, ``--timeout``, TLS and token files) go before or after the
command; ``--target`` defaults to ``$ROUNDTRIP_TARGET``, then ``127.0.0.1:50051``. TLS:
``--ca-file`` (and ``--cert-file``/``--key-file`` for mutual TLS); a bearer token:
``--token-file``.

Output is JSON with snake_case keys, the proto's field names. Answers are float32 and print
in their shortest float32 form (``-4.2219334``, not the double ``-4.221933364868164``).
``many`` sends its lines as one ``RoundTripBatch`` and prints one line per request, in order:
the result, or ``{"error": {"code": ..., "message": ...}}``.
Exit status: 0 done; 1 the worker answered the call (or, for ``many``, any request) with an
error (status and message on stderr), or, for ``ready``, answers but is not serving (warming
up, draining); 2 a usage error, an unreadable file or input line, or no worker reachable at
the target, with the reason on stderr when the port shows it
(:mod:`~roundtrip.client.diagnosis`: nothing listens there, TLS on one side only, a failed
TLS handshake, an HTTP/1 port such as the worker's REST or metrics port). ``ready --wait``
says what waiting cannot fix at once, before it waits. ``roundtrip --version`` prints the
client's version.

>>> float32_json(-4.221933364868164)
-4.2219334
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from roundtrip.client.channel import DEFAULT_TARGET, DEFAULT_TIMEOUT_S, tls_credentials
from roundtrip.client.diagnosis import Problem, diagnose
from roundtrip.client.errors import DeadlineExceededError, RoundTripError, UnavailableError
from roundtrip.client.messages import Outcome, RoundTripResult
from roundtrip.client.sync import RoundTripClient
from roundtrip.wire.version import __version__

TARGET_ENV = "ROUNDTRIP_TARGET"
#: Options whose value may start with "-" (``--x -1,2,3``); argparse would read it as a flag.
VALUE_OPTIONS = ("--x",)


def float32_json(value: float) -> float:
    """``value`` (a float32 held as a double) as the double that prints as its shortest
    float32 form: converted back to float32 it gives the same bits."""
    return float(str(np.float32(value)))


def array_json(array: npt.NDArray[Any]) -> Any:
    """An output array as nested lists, each element in its dtype's shortest form."""
    if array.ndim == 0:
        return float(str(array[()]))
    return [array_json(row) for row in array]


def result_json(result: RoundTripResult) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "orig_sum": float32_json(result.orig_sum),
        "merged_sum": float32_json(result.merged_sum),
        "max_abs_diff": float32_json(result.max_abs_diff),
    }
    if result.orig_out is not None and result.merged_out is not None:
        payload["orig_out"] = array_json(result.orig_out)
        payload["merged_out"] = array_json(result.merged_out)
    return payload


def _floats(text: str) -> list[float]:
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of numbers"
        ) from None


def _global_options(parser: argparse.ArgumentParser, *, defaults: bool) -> None:
    """The options every command takes; on a command's parser they default to nothing, so
    the value given before the command stands unless one is given after it."""

    def default(value: object) -> object:
        return value if defaults else argparse.SUPPRESS

    target = os.environ.get(TARGET_ENV) or DEFAULT_TARGET
    parser.add_argument(
        "--target",
        default=default(target),
        help=f"worker address (default ${TARGET_ENV}, then {DEFAULT_TARGET})",
    )
    parser.add_argument(
        "--timeout", type=float, default=default(DEFAULT_TIMEOUT_S), help="deadline in seconds"
    )
    parser.add_argument(
        "--ca-file", default=default(None), help="PEM CA that signed the worker's certificate"
    )
    parser.add_argument("--cert-file", default=default(None), help="PEM client certificate")
    parser.add_argument("--key-file", default=default(None), help="PEM key of --cert-file")
    parser.add_argument("--token-file", default=default(None), help="file with the bearer token")


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="roundtrip", description="Call a RoundTrip worker.")
    root.add_argument("--version", action="version", version=f"roundtrip {__version__}")
    _global_options(root, defaults=True)
    commands = root.add_subparsers(dest="command", required=True)
    call = commands.add_parser("call", help="run RoundTrip once and print the result")
    _global_options(call, defaults=False)
    call.add_argument("--seed", type=int, required=True)
    call.add_argument("--x", type=_floats, required=True, help="comma-separated values: -1,2,3")
    call.add_argument("--features", type=int, required=True)
    call.add_argument(
        "--dtype", default="float32", choices=["float32", "float64", "float16", "bfloat16"]
    )
    call.add_argument("--outputs", action="store_true", help="also print orig_out and merged_out")
    info = commands.add_parser("info", help="print the worker's versions, backend and limits")
    _global_options(info, defaults=False)
    ready = commands.add_parser("ready", help="exit 0 when a worker at the target is SERVING")
    _global_options(ready, defaults=False)
    ready.add_argument(
        "--wait", type=float, default=0.0, help="wait up to this many seconds for it"
    )
    many = commands.add_parser(
        "many", help="run the JSON lines of stdin as one RoundTripBatch; print one line each"
    )
    _global_options(many, defaults=False)
    many.add_argument(
        "--dtype", default="float32", choices=["float32", "float64", "float16", "bfloat16"]
    )
    return root


def read_requests(lines: Sequence[str]) -> list[tuple[int, Any, int]]:
    """``{"seed": 0, "x": [1, 2, 3], "features": 4}`` per line (blank lines skipped).

    >>> read_requests(['{"seed": 0, "x": [1, 2, 3], "features": 4}', ""])
    [(0, [1, 2, 3], 4)]
    """
    requests = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            requests.append((item["seed"], item["x"], item["features"]))
        except (ValueError, KeyError, TypeError) as error:
            raise ValueError(
                f'line {number}: not {{"seed": ..., "x": [...], "features": ...}} '
                f"({type(error).__name__}: {error})"
            ) from None
    return requests


def outcome_json(outcome: Outcome) -> dict[str, Any]:
    if isinstance(outcome, RoundTripError):
        return {"error": {"code": outcome.code.name, "message": outcome.message}}
    return result_json(outcome)


def message_json(message: Message) -> dict[str, Any]:
    """``message`` as JSON for a reader: every field, zero and false ones too, in the proto's
    snake_case, and 64-bit integers as numbers (proto3's JSON form writes them as strings).

    >>> from roundtrip.v1 import roundtrip_pb2 as pb
    >>> message_json(pb.Limits(max_batch_items=4096))["max_batch_items"], message_json(
    ...     pb.Limits())["max_features"]
    (4096, 0)
    """
    data = json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    return _numbers(message.DESCRIPTOR, data)


_WIDE = {
    FieldDescriptor.TYPE_INT64,
    FieldDescriptor.TYPE_UINT64,
    FieldDescriptor.TYPE_SINT64,
    FieldDescriptor.TYPE_FIXED64,
    FieldDescriptor.TYPE_SFIXED64,
}


def _numbers(descriptor: Any, data: dict[str, Any]) -> dict[str, Any]:
    """``data`` with the 64-bit integer fields of ``descriptor`` (a message's, nested ones
    too) turned back into numbers."""
    for field in descriptor.fields:
        if field.name not in data:
            continue
        value = data[field.name]
        if field.message_type is not None and not field.message_type.GetOptions().map_entry:
            items = value if isinstance(value, list) else [value]
            for item in items:
                _numbers(field.message_type, item)
        elif field.type in _WIDE:
            data[field.name] = [int(v) for v in value] if isinstance(value, list) else int(value)
    return data


def round_trip_in_chunks(
    client: RoundTripClient, requests: Sequence[tuple[int, Any, int]], dtype: str
) -> list[Outcome]:
    """``round_trip_many`` over ``requests`` in calls of at most the worker's
    ``max_batch_items``, the outcomes in order."""
    size = max(int(client.server_info().limits.max_batch_items), 1)
    outcomes: list[Outcome] = []
    for start in range(0, len(requests), size):
        outcomes += client.round_trip_many(requests[start : start + size], dtype=dtype)
    return outcomes


def _attach_values(argv: Sequence[str]) -> list[str]:
    """``--x -1,2,3`` as ``--x=-1,2,3``, so a leading minus is a number, not a flag."""
    joined: list[str] = []
    args = iter(argv)
    for arg in args:
        if arg in VALUE_OPTIONS:
            value = next(args, None)
            joined.append(arg if value is None else f"{arg}={value}")
        else:
            joined.append(arg)
    return joined


def _fail(message: str, status: int) -> int:
    print(f"roundtrip: {message}", file=sys.stderr)
    return status


def _diagnosed(args: argparse.Namespace) -> Problem | None:
    return diagnose(
        args.target,
        ca_file=args.ca_file,
        cert_file=args.cert_file,
        key_file=args.key_file,
        timeout=args.timeout,
    )


def _ready(client: RoundTripClient, args: argparse.Namespace) -> int:
    """0 serving; 1 answering but not serving (yet); 2 what waiting cannot fix, said at once
    (TLS or HTTP/1 on the wrong side), or nothing listening once ``--wait`` is over."""
    serving = client.is_serving()
    problem = None
    if not serving and args.wait > 0:
        problem = _diagnosed(args)
        if problem is None or not problem.lasting:
            with contextlib.suppress(DeadlineExceededError):  # then: not serving
                client.wait_until_serving(args.wait)
            serving, problem = client.is_serving(), None
    if not serving and problem is None:
        problem = _diagnosed(args)
    print(json.dumps({"target": args.target, "serving": serving}))
    if problem is not None:
        return _fail(problem.message, 2)
    return 0 if serving else 1


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(_attach_values(sys.argv[1:] if argv is None else argv))
    try:
        secure = args.ca_file or args.cert_file or args.key_file
        credentials = (
            tls_credentials(args.ca_file, args.cert_file, args.key_file) if secure else None
        )
        token = Path(args.token_file).read_text().strip() if args.token_file else None
    except (OSError, ValueError) as error:
        return _fail(str(error), 2)
    try:
        with RoundTripClient(
            args.target, timeout=args.timeout, credentials=credentials, token=token
        ) as client:
            if args.command == "ready":
                return _ready(client, args)
            if args.command == "many":
                try:
                    requests = read_requests(sys.stdin.read().splitlines())
                    outcomes = round_trip_in_chunks(client, requests, args.dtype)
                except ValueError as error:
                    return _fail(str(error), 2)
                for outcome in outcomes:
                    print(json.dumps(outcome_json(outcome)))
                refused = [o for o in outcomes if isinstance(o, RoundTripError)]
                if refused:
                    return _fail(f"{len(refused)} of {len(outcomes)} requests refused", 1)
                return 0
            if args.command == "info":
                print(json.dumps(message_json(client.server_info()), indent=2))
                return 0
            result = client.round_trip(
                args.seed, args.x, args.features, dtype=args.dtype, return_outputs=args.outputs
            )
    except UnavailableError as error:
        problem = _diagnosed(args)
        said = f": {problem.message}" if problem is not None else f" ({error})"
        return _fail(f"no serving worker reachable at {args.target}{said}", 2)
    except RoundTripError as error:
        return _fail(str(error), 1)
    print(json.dumps(result_json(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
