"""Every knob of the worker, in one place, validated at start.

Each field of :class:`WorkerConfig` is settable by a command-line flag
(``--max-batch-size``), an environment variable with the ``ROUNDTRIP_``
prefix (``ROUNDTRIP_MAX_BATCH_SIZE``) or a key of a TOML file named by
``--config-file`` / ``ROUNDTRIP_CONFIG_FILE`` (``max_batch_size = 8``). A flag
wins over the environment, which wins over the file. Unknown keys and values
of the wrong type stop the worker with a message naming them. The README's
configuration table is generated from these fields
(``python -m roundtrip.server --print-config-table``) and a test keeps the two
equal.

>>> config = WorkerConfig.from_sources(["--port", "0"], environ={"ROUNDTRIP_MAX_BATCH_SIZE": "8"})
>>> config.port, config.max_batch_size
(0, 8)
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from roundtrip.server.ops.eventloop import EVENT_LOOPS

ENV_PREFIX = "ROUNDTRIP_"
AUTH_EXEMPTABLE = frozenset({"health", "reflection"})
MIB = 1024 * 1024


def _knob(default: Any, help: str, *, minimum: int | None = None) -> Any:
    return field(default=default, metadata={"help": help, "minimum": minimum})


@dataclass(frozen=True)
class WorkerConfig:
    """The worker's configuration; see the README's table for each knob."""

    host: str = _knob("127.0.0.1", "Address to listen on (0.0.0.0 or [::] in a pod).")
    port: int = _knob(50051, "gRPC port; 0 picks a free one (logged at start).", minimum=0)
    metrics_port: int = _knob(
        9464,
        "HTTP port serving Prometheus metrics at /metrics (on --host); 0 picks a free one "
        "(logged at start).",
        minimum=0,
    )
    http_port: int = _knob(
        8000,
        "Port of the V2 (Open Inference Protocol) REST endpoint, /v2/... (on --host, with the "
        "gRPC port's TLS and token); 0 picks a free one (logged at start), -1 turns it off.",
        minimum=-1,
    )
    max_json_bytes: int = _knob(
        128 * 1024,
        "Largest JSON part of a V2 REST body (413 beyond, before it is read): JSON is decoded "
        "on the event loop, so it is kept small; send large tensors as binary data (the "
        "binary tensor data extension) or over gRPC.",
        minimum=1024,
    )
    max_json_output_elements: int = _knob(
        65536,
        "Most output elements a V2 REST answer sends as JSON (orig_out, merged_out without "
        "binary_data); beyond it the call is refused before compute (400).",
        minimum=1,
    )
    http_read_timeout_s: float = _knob(
        10.0, "Seconds a V2 REST upload may send nothing before it is dropped (408)."
    )
    http_upload_timeout_s: float = _knob(
        60.0,
        "Seconds a whole V2 REST upload may take, however it trickles (408 beyond); the body "
        "holds its bytes against the budget as they arrive, not as declared.",
    )
    http_idle_timeout_s: float = _knob(
        15.0,
        "Seconds a V2 REST connection may go without a complete request, its headers "
        "included (slow senders too), before it is closed.",
    )
    metrics_max_connections: int = _knob(
        8,
        "Most connections the metrics port serves at once (one thread each); a new one that "
        "finds them all taken closes the one that has held its slot longest, so a scraper "
        "always gets in.",
        minimum=1,
    )
    metrics_timeout_s: float = _knob(
        5.0, "Seconds a metrics connection may stay open in all before it is closed."
    )
    max_message_bytes: int = _knob(
        64 * MIB,
        "Largest gRPC message received or sent (applied to both directions).",
        minimum=1024,
    )
    max_x_elements: int = _knob(
        16 * MIB, "Most elements x may have (INVALID_ARGUMENT beyond).", minimum=1
    )
    max_x_rank: int = _knob(
        32, "Most dimensions x may have, at most 64 (INVALID_ARGUMENT beyond).", minimum=1
    )
    max_features: int = _knob(65536, "Largest features (INVALID_ARGUMENT beyond).", minimum=1)
    max_param_bytes: int = _knob(
        256 * MIB,
        "Largest float32 parameter set, (width + 1) * features * 4 bytes "
        "(INVALID_ARGUMENT beyond).",
        minimum=1,
    )
    max_output_elements: int = _knob(
        16 * MIB,
        "Most elements one output may have, rows of x * features (INVALID_ARGUMENT beyond).",
        minimum=1,
    )
    max_batch_size: int = _knob(
        32, "Most same-shape requests run as one batch (1 turns batching off).", minimum=1
    )
    max_queue_delay_us: int = _knob(
        0,
        "How long the oldest queued request may wait for its batch to fill, in microseconds; "
        "0 runs whatever is queued as soon as the engine is free.",
        minimum=0,
    )
    max_queue_size: int = _knob(
        2048,
        "Most requests waiting for the engine; beyond it new ones get RESOURCE_EXHAUSTED.",
        minimum=1,
    )
    max_queue_share: float = _knob(
        0.125,
        "Share of max_queue_size one caller's calls of many requests (RoundTripBatch, V2 "
        "calls of several seeds) may hold queued or computing at once; their other requests "
        "wait in their calls and are queued in turn, caller after caller, as places come "
        "back. A caller is one connection.",
    )
    max_bulk_queue_share: float = _knob(
        0.75,
        "Share of max_queue_size that calls of many requests may fill together; the rest is "
        "kept for single calls (RoundTrip, stream messages, V2 calls of one seed), which are "
        "refused with RESOURCE_EXHAUSTED only when the whole queue is full.",
    )
    max_caller_share: float = _knob(
        0.5,
        "Share of max_inflight_bytes one caller (one connection) may hold at once: its "
        "messages, waiting inputs and unread answers. Beyond it that caller's new requests "
        "get RESOURCE_EXHAUSTED, so one stream that does not read its answers, or one "
        "connection, cannot take the whole budget.",
    )
    max_stall_s: float = _knob(
        10.0,
        "Seconds requests may wait while no batch runs, starts or finishes before health "
        "says NOT_SERVING (and roundtrip_stalled reads 1); it says SERVING again once the "
        "queue moves; 0 turns the watch off.",
    )
    write_timeout_s: float = _knob(
        30.0,
        "Seconds a caller gets to take an answer once the worker writes it (a stream "
        "message's, a V2 REST body): past it the stream ends with DEADLINE_EXCEEDED, or the "
        "connection is closed, and what the answer held is given back.",
    )
    max_inflight_bytes: int = _knob(
        0,
        "Bytes of admitted work held at once: each request reserves an estimate of its working "
        "set (x, parameters, outputs and their copies) until its answer is written, and one "
        "that does not fit gets RESOURCE_EXHAUSTED. 0: half the container's memory limit "
        "(cgroup), or 2 GiB where there is none.",
        minimum=0,
    )
    max_pending_rpcs: int = _knob(
        4096,
        "Most calls gRPC holds before a handler takes them (its own default, 1000, cancels "
        "bursts the queue would answer); beyond it gRPC cancels new calls (CANCELLED). Bounds "
        "how long calls wait when the RPC layer itself is saturated.",
        minimum=1,
    )
    max_connections: int = _knob(
        256,
        "Most gRPC connections the worker holds at once (gRPC refuses more). With "
        "max_concurrent_streams and max_message_bytes it bounds the bytes of messages still "
        "arriving, which gRPC holds before the byte budget can count them "
        "(docs/operations.md#memory).",
        minimum=1,
    )
    max_concurrent_streams: int = _knob(
        0,
        "Most calls one gRPC connection may have open at once (HTTP/2 "
        "SETTINGS_MAX_CONCURRENT_STREAMS); its caller queues the rest (a burst on a new "
        "connection, sent before the caller has read the setting, is refused UNAVAILABLE). "
        "0: no limit, gRPC's default. Set it where callers are not trusted: "
        "docs/operations.md#memory.",
        minimum=0,
    )
    max_stream_inflight: int = _knob(
        256,
        "Most unanswered requests one RoundTripStream may have; the worker stops reading "
        "the stream until some are answered.",
        minimum=1,
    )
    max_batch_items: int = _knob(
        1024,
        "Most requests one RoundTripBatch call may hold (INVALID_ARGUMENT beyond); each "
        "is still weighed and limited as if sent alone, and has its own outcome.",
        minimum=1,
    )
    max_compiled: int = _knob(
        64, "Most compiled executables kept (least recently used is evicted).", minimum=1
    )
    max_param_cache_bytes: int = _knob(
        256 * MIB,
        "Bytes of initialized parameters kept for seeds that repeat, so they skip drawing "
        "them again (kept on a seed's second sighting; least recently used is evicted; "
        "shapes of at least 1024 parameters, (width + 1) * features; shared out evenly "
        "between compute lanes; 0 turns the cache off). Held beside max_inflight_bytes.",
        minimum=0,
    )
    batched_max_bytes: int = _knob(
        16 * MIB,
        "Most parameter bytes a batch may draw or read at once as one batched program (every "
        "request's draws and matmuls together), (width + 1) * features * 4 per request; "
        "larger batches, and any whose batched program does not prove eager's bits on this "
        "device, run request by request. 0 runs every batch request by request. Held "
        "beside max_inflight_bytes while a batch runs.",
        minimum=0,
    )
    compilation_cache_dir: str = _knob(
        "",
        "Directory for JAX's persistent compilation cache, so a restarted worker loads "
        "executables instead of compiling them (empty: off). Must be writable.",
    )
    warmup_shapes: str = _knob(
        "3:4,64:64",
        "Comma-separated width:features pairs compiled (1-D float32 x, every batch size) "
        "and self-checked before health turns SERVING.",
    )
    drain_announce_s: float = _knob(
        1.0,
        "Seconds after SIGTERM during which health reads NOT_SERVING but calls are still "
        "answered, so probes and health-watching clients move traffic away before the worker "
        "refuses anything; set it above the readiness probe's detection time in a pod.",
    )
    drain_grace_s: float = _knob(
        10.0,
        "Seconds, after the announce, that open calls get to finish while new ones are refused "
        "with UNAVAILABLE; calls still open then are cancelled.",
    )
    max_connection_age_s: float = _knob(
        300.0,
        "Seconds after which the server asks a client to reconnect (GOAWAY), so clients "
        "re-resolve and spread over pods that came up since; 0 turns it off.",
    )
    max_connection_age_grace_s: float = _knob(
        30.0, "Seconds a connection past its age may keep finishing its calls."
    )
    tls_cert_file: str = _knob(
        "",
        "PEM certificate chain the server presents; with --tls-key-file turns TLS on "
        "(empty: plaintext).",
    )
    tls_key_file: str = _knob("", "PEM private key of --tls-cert-file.")
    tls_client_ca_file: str = _knob(
        "",
        "PEM CA bundle; when set, clients must present a certificate it signed (mutual TLS).",
    )
    plaintext_health_port: int = _knob(
        0,
        "Port of a second, plaintext listener serving only grpc.health.v1, for Kubernetes "
        "gRPC probes (which cannot speak TLS) when TLS is on; 0: none.",
        minimum=0,
    )
    auth_token_file: str = _knob(
        "",
        "File holding the bearer token callers must send as 'authorization: Bearer <token>' "
        "(UNAUTHENTICATED otherwise; empty: no token check).",
    )
    auth_exempt: str = _knob(
        "health",
        "Comma-separated services callable without the token: health, reflection, both or "
        "none (empty). Kubernetes gRPC probes cannot send a token.",
    )
    audit_fraction: float = _knob(
        0.001,
        "Fraction of answered requests re-run through the eager reference steps in the "
        "background and compared bit for bit (0 turns the audit off).",
    )
    audit_queue_size: int = _knob(
        64,
        "Most requests waiting for the audit; beyond it samples are skipped and counted.",
        minimum=1,
    )
    xla_cpu_max_isa: str = _knob(
        "",
        "Newest CPU instruction set XLA may generate code for: SSE4_2, AVX, AVX2, AVX512, "
        "AVX512_VNNI, AVX512_BF16, AMX or AMX_FP16 (x86). Workers pinned to one level give "
        "the same bits on any CPU that supports it; empty: XLA targets the host. Applied to "
        "XLA_FLAGS before JAX starts; a level this CPU cannot run stops the worker (exit 2).",
    )
    event_loop: str = _knob(
        "uvloop",
        "The asyncio event loop every RPC runs on: uvloop (libuv; more requests per second "
        "per core, docs/adr/0002-uvloop-by-default.md) or asyncio (the standard library's). "
        "Answers are the same bits on either.",
    )
    gc_threshold: int = _knob(
        10_000,
        "Once warm-up is done, the start-up heap is frozen out of Python's garbage collector "
        "and its young generation is collected every this many allocations (Python's "
        "default: 700), so collections stop walking JAX's objects on the event loop; 0 "
        "leaves the collector as Python set it.",
        minimum=0,
    )
    log_level: str = _knob("INFO", "DEBUG, INFO, WARNING or ERROR.")

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            minimum = f.metadata.get("minimum")
            value = getattr(self, f.name)
            if minimum is not None and value < minimum:
                raise ValueError(f"{f.name} must be >= {minimum} (got {value})")
        for name in (
            "drain_announce_s",
            "drain_grace_s",
            "max_connection_age_s",
            "max_connection_age_grace_s",
            "metrics_timeout_s",
            "http_read_timeout_s",
            "http_idle_timeout_s",
            "http_upload_timeout_s",
            "max_stall_s",
            "write_timeout_s",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (got {getattr(self, name)})")
        if self.max_x_rank > 64:  # validation.MAX_RANK (config imports no server module)
            raise ValueError(f"max_x_rank must be <= 64, numpy's limit (got {self.max_x_rank})")
        for name in ("max_queue_share", "max_bulk_queue_share", "max_caller_share"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in (0, 1] (got {getattr(self, name)})")
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ValueError("tls_cert_file and tls_key_file must be set together")
        if self.tls_client_ca_file and not self.tls_cert_file:
            raise ValueError("tls_client_ca_file needs tls_cert_file and tls_key_file")
        for name in ("tls_cert_file", "tls_key_file", "tls_client_ca_file", "auth_token_file"):
            path = getattr(self, name)
            if path and not os.access(path, os.R_OK):
                raise ValueError(f"{name}: cannot read {path!r}")
        if self.auth_token_file and not self.auth_token():
            raise ValueError(f"auth_token_file: {self.auth_token_file!r} is empty")
        unknown = set(self.auth_exempt_services()) - AUTH_EXEMPTABLE
        if unknown:
            raise ValueError(
                f"auth_exempt: unknown service {sorted(unknown)[0]!r} "
                f"(choose from {', '.join(sorted(AUTH_EXEMPTABLE))})"
            )
        if not 0.0 <= self.audit_fraction <= 1.0:
            raise ValueError(f"audit_fraction must be within [0, 1] (got {self.audit_fraction})")
        if self.event_loop not in EVENT_LOOPS:
            raise ValueError(
                f"event_loop must be one of {', '.join(EVENT_LOOPS)} (got {self.event_loop})"
            )
        if self.log_level.upper() not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
            raise ValueError(
                f"log_level must be DEBUG, INFO, WARNING or ERROR (got {self.log_level})"
            )
        self.warmup_pairs()

    def auth_token(self) -> str:
        """The bearer token from ``auth_token_file`` (surrounding whitespace stripped)."""
        if not self.auth_token_file:
            return ""
        with open(self.auth_token_file, encoding="utf-8") as handle:
            return handle.read().strip()

    def auth_exempt_services(self) -> list[str]:
        return [part.strip() for part in self.auth_exempt.split(",") if part.strip()]

    def warmup_pairs(self) -> list[tuple[int, int]]:
        """``warmup_shapes`` parsed into (width, features) pairs."""
        pairs = []
        for item in filter(None, (part.strip() for part in self.warmup_shapes.split(","))):
            try:
                width, features = (int(v) for v in item.split(":"))
            except ValueError:
                raise ValueError(
                    f"warmup_shapes: {item!r} is not width:features (e.g. 64:64)"
                ) from None
            if width < 1 or features < 1:
                raise ValueError(f"warmup_shapes: {item!r} needs width and features >= 1")
            pairs.append((width, features))
        return pairs

    @classmethod
    def from_sources(
        cls, argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
    ) -> WorkerConfig:
        """Read flags (``argv``) over environment variables over a file over defaults."""
        parser = argument_parser()
        args = parser.parse_args(argv)
        env = environ or {}
        path = args.config_file or env.get(ENV_PREFIX + "CONFIG_FILE")
        try:
            values = read_config_file(path) if path else {}
        except ValueError as error:
            parser.error(str(error))
        for f in dataclasses.fields(cls):
            raw = getattr(args, f.name)
            if raw is None:
                raw = env.get(ENV_PREFIX + f.name.upper())
            if raw is None:
                continue
            try:
                values[f.name] = _parse(f, raw)
            except ValueError:
                parser.error(f"{f.name}: {raw!r} is not a valid {type(f.default).__name__}")
        try:
            return cls(**values)
        except ValueError as error:
            parser.error(str(error))
            raise  # unreachable: parser.error exits

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def read_config_file(path: str) -> dict[str, Any]:
    """The knobs a TOML file sets, type-checked; unknown keys are errors, not ignored."""
    try:
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
    except OSError as error:
        raise ValueError(f"config_file: cannot read {path!r}: {error.strerror}") from None
    except tomllib.TOMLDecodeError as error:
        raise ValueError(f"config_file: {path!r} is not valid TOML: {error}") from None
    fields = {f.name: f for f in dataclasses.fields(WorkerConfig)}
    values: dict[str, Any] = {}
    for key, value in data.items():
        if key not in fields:
            raise ValueError(f"config_file: unknown setting {key!r} in {path!r}")
        kind: type[Any] = type(fields[key].default)
        accepted = (int, float) if kind is float else (kind,)
        if isinstance(value, bool) or not isinstance(value, accepted):
            raise ValueError(
                f"config_file: {key} = {value!r} in {path!r} is not a valid {kind.__name__}"
            )
        values[key] = kind(value)
    return values


def _parse(f: dataclasses.Field[Any], raw: str) -> Any:
    """A flag or environment string as the field's type (that of its default)."""
    kind: type[Any] = type(f.default)
    return kind(raw)


def argument_parser() -> argparse.ArgumentParser:
    """Flags for every field; defaults are None so the environment can fill them."""
    parser = argparse.ArgumentParser(
        prog="roundtrip-server",
        description="gRPC worker serving the Flax NNX split/merge RoundTrip computation.",
    )
    for f in dataclasses.fields(WorkerConfig):
        parser.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f.name,
            default=None,
            help=f"{f.metadata['help']} Env {ENV_PREFIX}{f.name.upper()}; default {f.default}.",
        )
    parser.add_argument(
        "--config-file",
        default=None,
        help=f"TOML file of settings (keys as the field names above, e.g. max_batch_size = 8); "
        f"flags and environment variables win over it. Env {ENV_PREFIX}CONFIG_FILE.",
    )
    parser.add_argument(
        "--print-config-table",
        action="store_true",
        help="Print the configuration table (Markdown) and exit.",
    )
    return parser


def config_table() -> str:
    """The README's configuration table, generated from :class:`WorkerConfig`."""
    rows = [
        "| flag | environment variable | file key | default | meaning |",
        "| --- | --- | --- | --- | --- |",
        f"| `--config-file` | `{ENV_PREFIX}CONFIG_FILE` | | | TOML file setting any knob below "
        "by its file key; flags and environment variables win over it. |",
    ]
    for f in dataclasses.fields(WorkerConfig):
        flag = "--" + f.name.replace("_", "-")
        rows.append(
            f"| `{flag}` | `{ENV_PREFIX}{f.name.upper()}` | `{f.name}` | `{f.default}` "
            f"| {f.metadata['help']} |"
        )
    return "\n".join(rows)
