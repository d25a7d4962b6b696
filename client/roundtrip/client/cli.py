"""``roundtrip``: call a worker from the shell.

    roundtrip call --seed 0 --x 1,2,3 --features 4 [--target 127.0.0.1:50051]
    roundtrip info [--target ...]

TLS: ``--ca-file`` (and ``--cert-file``/``--key-file`` for mutual TLS); a
bearer token: ``--token-file``.

``call`` prints the result as JSON; a refused call prints the status and
message on stderr and exits 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from google.protobuf import json_format

from roundtrip.client.channel import DEFAULT_TARGET, DEFAULT_TIMEOUT_S, tls_credentials
from roundtrip.client.errors import RoundTripError
from roundtrip.client.sync import RoundTripClient


def _floats(text: str) -> list[float]:
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of numbers"
        ) from None


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="roundtrip", description="Call a RoundTrip worker.")
    root.add_argument(
        "--target", default=DEFAULT_TARGET, help=f"worker address (default {DEFAULT_TARGET})"
    )
    root.add_argument(
        "--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="deadline in seconds"
    )
    root.add_argument("--ca-file", help="PEM CA that signed the worker's certificate (TLS)")
    root.add_argument("--cert-file", help="PEM client certificate (mutual TLS)")
    root.add_argument("--key-file", help="PEM key of --cert-file")
    root.add_argument("--token-file", help="file holding the bearer token")
    commands = root.add_subparsers(dest="command", required=True)
    call = commands.add_parser("call", help="run RoundTrip once and print the result")
    call.add_argument("--seed", type=int, required=True)
    call.add_argument("--x", type=_floats, required=True, help="comma-separated values, e.g. 1,2,3")
    call.add_argument("--features", type=int, required=True)
    call.add_argument(
        "--dtype", default="float32", choices=["float32", "float64", "float16", "bfloat16"]
    )
    call.add_argument("--outputs", action="store_true", help="also print orig_out and merged_out")
    commands.add_parser("info", help="print the worker's versions, backend and limits")
    return root


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    secure = args.ca_file or args.cert_file or args.key_file
    credentials = tls_credentials(args.ca_file, args.cert_file, args.key_file) if secure else None
    token = Path(args.token_file).read_text().strip() if args.token_file else None
    try:
        with RoundTripClient(
            args.target, timeout=args.timeout, credentials=credentials, token=token
        ) as client:
            if args.command == "info":
                print(json_format.MessageToJson(client.server_info(), indent=2))
                return 0
            result = client.round_trip(
                args.seed, args.x, args.features, dtype=args.dtype, return_outputs=args.outputs
            )
    except RoundTripError as error:
        print(f"roundtrip: {error}", file=sys.stderr)
        return 1
    payload: dict[str, object] = {
        "orig_sum": result.orig_sum,
        "merged_sum": result.merged_sum,
        "max_abs_diff": result.max_abs_diff,
    }
    if result.orig_out is not None and result.merged_out is not None:
        payload["orig_out"] = result.orig_out.tolist()
        payload["merged_out"] = result.merged_out.tolist()
    print(json.dumps(payload))
    return 0


if __name__ == "__main__":
    sys.exit(main())
