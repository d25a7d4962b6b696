"""The V2 protocol's REST endpoints (aiohttp) on ``http_port``, on the worker's event loop.

A REST call is turned into the same ``ModelInferRequest`` a gRPC caller sends (JSON ``data``
and binary-extension bytes both become raw contents) and answered by
:meth:`InferenceServicer.infer`: one request path, one batcher. Errors are the gRPC status
the call would have ended with (:func:`~roundtrip.server.service.failure_of`), as the HTTP
status Google's API mapping gives it (:data:`HTTP_STATUS`: 400, 404, 429, 503...) with V2's
body ``{"error": "<message>"}``.

Routes (``/versions/1`` may follow the model's name):

* ``GET /v2/health/live``, ``GET /v2/health/ready``: 200, or 503 when not ready;
* ``GET /v2``: server metadata; ``GET /v2/models/roundtrip``: model metadata;
* ``GET /v2/models/roundtrip/ready``; ``POST /v2/models/roundtrip/infer``.

Binary tensor data: an input with parameter ``binary_data_size`` takes its bytes from after
the JSON (whose length the ``Inference-Header-Content-Length`` header gives); an output asked
for with ``binary_data: true`` (or every output, with the request's ``binary_data_output``)
comes back that way, and the response carries the same header.
"""

from __future__ import annotations

import hmac
import json
import logging
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import numpy as np
from aiohttp import web

from roundtrip.server import numerics, v2
from roundtrip.server.admission import Reservation
from roundtrip.server.errors import InvalidArgument, LimitExceeded
from roundtrip.server.service import Failure, check_new_call, counted, failure_of
from roundtrip.server.v2proto import grpc_predict_v2_pb2 as v2pb
from roundtrip.server.v2service import InferenceServicer

log = logging.getLogger(__name__)

HEADER_LENGTH = "Inference-Header-Content-Length"
METHOD = "ModelInferHTTP"

#: gRPC status -> HTTP status, as Google's APIs map them (google/rpc/code.proto).
HTTP_STATUS = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
}


def error_response(failure: Failure) -> web.Response:
    """V2's error body with the HTTP status of ``failure``'s gRPC code.

    >>> error_response(Failure(grpc.StatusCode.INVALID_ARGUMENT, "x is required")).status
    400
    """
    return web.json_response({"error": failure.message}, status=HTTP_STATUS[failure.code])


#: Bytes a JSON body may take while decoded, per byte of JSON: Python's numbers and lists
#: (``[[0],[0],...]`` measured 24x; flat floats 1.6x). Reserved from max_inflight_bytes
#: before decoding, so JSON cannot hold more memory than the budget allows.
JSON_EXPANSION = 32


def json_length(body: bytes, header_length: str | None) -> int:
    """How many leading bytes of ``body`` are JSON: all of them, or what the binary data
    extension's ``Inference-Header-Content-Length`` says.

    >>> json_length(b'{"inputs": []}abcd', "14")
    14
    """
    if header_length is None:
        return len(body)
    try:
        split = int(header_length)
    except ValueError:
        raise InvalidArgument(f"{HEADER_LENGTH} is not an integer: {header_length!r}") from None
    if not 0 <= split <= len(body):
        raise InvalidArgument(f"{HEADER_LENGTH} is {split}, but the body has {len(body)} bytes")
    return split


def infer_request(body: bytes, split: int, model: str, version: str) -> Any:
    """A REST infer body (JSON in its first ``split`` bytes, binary data after them) as the
    ``ModelInferRequest`` it means, plus the names of the outputs wanted in binary.

    >>> body = b'{"inputs": [{"name": "seed", "datatype": "INT64", "shape": [1], "data": [7]}]}'
    >>> request, binary = infer_request(body, len(body), "roundtrip", "")
    >>> request.inputs[0].name, np.frombuffer(request.raw_input_contents[0], "<i8").tolist()
    ('seed', [7])
    """
    try:
        document = json.loads(body[:split])
    except (ValueError, UnicodeDecodeError) as error:
        raise InvalidArgument(f"the request body is not valid JSON: {error}") from None
    if not isinstance(document, dict):
        raise InvalidArgument("the request body must be a JSON object with 'inputs'")
    binary = memoryview(body)[split:]
    request = v2pb.ModelInferRequest(
        model_name=model, model_version=version, id=str(document.get("id", ""))
    )
    inputs = document.get("inputs")
    if not isinstance(inputs, list):
        raise InvalidArgument("'inputs' must be a list of tensors")
    offset = 0
    for tensor in inputs:
        name, datatype, shape, parameters = _tensor_header(tensor, "inputs")
        request.inputs.add(name=name, datatype=datatype, shape=shape)
        size = parameters.get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or size < 0 or offset + size > len(binary):
                raise InvalidArgument(
                    f"{name}: binary_data_size {size!r} does not fit the {len(binary)} bytes "
                    f"of binary data after the JSON (offset {offset})"
                )
            request.raw_input_contents.append(bytes(binary[offset : offset + size]))
            offset += size
        else:
            request.raw_input_contents.append(_json_elements(tensor, name, datatype))
    if offset != len(binary):
        raise InvalidArgument(
            f"the body has {len(binary) - offset} bytes of binary data that no input claims"
        )
    wanted_binary = bool(_parameters(document, "request").get("binary_data_output", False))
    binary_outputs = set()
    outputs = document.get("outputs", [])
    if not isinstance(outputs, list):
        raise InvalidArgument("'outputs' must be a list")
    for output in outputs:
        if not isinstance(output, dict) or not isinstance(output.get("name"), str):
            raise InvalidArgument("each of 'outputs' needs a 'name'")
        request.outputs.add(name=output["name"])
        if _parameters(output, output["name"]).get("binary_data", wanted_binary):
            binary_outputs.add(output["name"])
    if wanted_binary and not outputs:
        binary_outputs.update(v2.DEFAULT_OUTPUTS)
    return request, binary_outputs


def _parameters(document: dict[str, Any], what: str) -> dict[str, Any]:
    parameters = document.get("parameters", {})
    if not isinstance(parameters, dict):
        raise InvalidArgument(f"{what}: 'parameters' must be an object")
    return parameters


def _tensor_header(tensor: Any, where: str) -> tuple[str, str, list[int], dict[str, Any]]:
    if not isinstance(tensor, dict):
        raise InvalidArgument(f"each of '{where}' must be an object")
    name, datatype, shape = tensor.get("name"), tensor.get("datatype"), tensor.get("shape")
    if not isinstance(name, str):
        raise InvalidArgument(f"each of '{where}' needs a 'name'")
    if datatype not in v2.NUMPY_OF:
        raise InvalidArgument(
            f"{name}: datatype {datatype!r} is not one this worker reads ({', '.join(v2.NUMPY_OF)})"
        )
    if not isinstance(shape, list) or not all(
        isinstance(dim, int) and not isinstance(dim, bool) for dim in shape
    ):
        raise InvalidArgument(f"{name}: 'shape' must be a list of integers")
    return name, datatype, shape, _parameters(tensor, name)


def _json_elements(tensor: dict[str, Any], name: str, datatype: str) -> bytes:
    """A tensor's JSON ``data`` (flat or nested, row-major) as little-endian bytes."""
    if "data" not in tensor:
        raise InvalidArgument(f"{name}: give 'data' or parameters.binary_data_size")
    try:
        with np.errstate(over="raise", invalid="raise"):
            return np.asarray(tensor["data"], dtype=v2.NUMPY_OF[datatype]).tobytes()
    except (ValueError, TypeError, OverflowError, FloatingPointError) as error:
        raise InvalidArgument(f"{name}: 'data' is not {datatype} numbers: {error}") from None


def infer_body(
    response: v2pb.ModelInferResponse, binary_outputs: set[str]
) -> tuple[bytes, int | None]:
    """The REST body of ``response``: its JSON, then the binary outputs' bytes; and the JSON's
    length when any output is binary (the ``Inference-Header-Content-Length``)."""
    outputs = []
    tail = []
    for tensor, raw in zip(response.outputs, response.raw_output_contents, strict=True):
        entry: dict[str, Any] = {
            "name": tensor.name,
            "datatype": tensor.datatype,
            "shape": list(tensor.shape),
        }
        if tensor.name in binary_outputs:
            entry["parameters"] = {"binary_data_size": len(raw)}
            tail.append(raw)
        else:
            entry["data"] = np.frombuffer(raw, dtype=v2.NUMPY_OF[tensor.datatype]).tolist()
        outputs.append(entry)
    document: dict[str, Any] = {
        "model_name": response.model_name,
        "model_version": response.model_version,
        "outputs": outputs,
    }
    if response.id:
        document["id"] = response.id
    header = json.dumps(document, separators=(",", ":")).encode()
    if not tail:
        return header, None
    return header + b"".join(tail), len(header)


class Endpoint:
    """The REST routes over an :class:`InferenceServicer`; ``token``: the bearer token every
    route needs (health routes too unless ``health_exempt``)."""

    def __init__(
        self,
        servicer: InferenceServicer,
        *,
        max_body_bytes: int,
        token: str = "",
        health_exempt: bool = False,
    ) -> None:
        self._servicer = servicer
        self._max_body_bytes = max_body_bytes
        self._expected = f"Bearer {token}".encode() if token else None
        self._health_exempt = health_exempt

    def application(self) -> web.Application:
        app = web.Application(client_max_size=self._max_body_bytes, middlewares=[self._errors])
        model = "/v2/models/{model}"
        versioned = "/v2/models/{model}/versions/{version}"
        app.add_routes(
            [
                web.get("/v2/health/live", self.live),
                web.get("/v2/health/ready", self.ready),
                web.get("/v2", self.server_metadata),
                *(web.get(prefix, self.model_metadata) for prefix in (model, versioned)),
                *(web.get(prefix + "/ready", self.model_ready) for prefix in (model, versioned)),
                *(web.post(prefix + "/infer", self.infer) for prefix in (model, versioned)),
            ]
        )
        return app

    @web.middleware
    async def _errors(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        """The token check, and every error as V2's body with its mapped status."""
        if self._expected is not None and not (
            self._health_exempt and request.path.startswith("/v2/health/")
        ):
            given = request.headers.get("Authorization", "").encode()
            if not hmac.compare_digest(given, self._expected):
                self._servicer.metrics.refused_unauthenticated("http")  # (paths: unbounded)
                return web.json_response(
                    {
                        "error": "missing or wrong bearer token: "
                        "send 'Authorization: Bearer <token>'"
                    },
                    status=401,
                )
        try:
            return await handler(request)
        except web.HTTPException as error:  # aiohttp's own: unknown route, body too large...
            return web.json_response({"error": error.reason}, status=error.status)
        except Exception as error:  # a RequestError's own status; anything else: INTERNAL, logged
            return error_response(failure_of(error))

    async def live(self, request: web.Request) -> web.Response:
        return web.json_response({"live": True})

    async def ready(self, request: web.Request) -> web.Response:
        ready = self._servicer.ready()
        return web.json_response({"ready": ready}, status=200 if ready else 503)

    async def server_metadata(self, request: web.Request) -> web.Response:
        metadata = v2.server_metadata()
        return web.json_response(
            {
                "name": metadata.name,
                "version": metadata.version,
                "extensions": list(metadata.extensions),
            }
        )

    async def model_metadata(self, request: web.Request) -> web.Response:
        v2.check_model(request.match_info["model"], request.match_info.get("version", ""))
        metadata = v2.model_metadata()

        def tensors(items: Any) -> list[dict[str, Any]]:
            return [
                {"name": item.name, "datatype": item.datatype, "shape": list(item.shape)}
                for item in items
            ]

        return web.json_response(
            {
                "name": metadata.name,
                "versions": list(metadata.versions),
                "platform": metadata.platform,
                "inputs": tensors(metadata.inputs),
                "outputs": tensors(metadata.outputs),
            }
        )

    async def model_ready(self, request: web.Request) -> web.Response:
        v2.check_model(request.match_info["model"], request.match_info.get("version", ""))
        ready = self._servicer.ready()
        return web.json_response(
            {"name": v2.MODEL_NAME, "ready": ready}, status=200 if ready else 503
        )

    async def infer(self, request: web.Request) -> web.Response:
        servicer = self._servicer
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:  # over client_max_size: refused while read
            servicer.metrics.observe_rpc(METHOD, grpc.StatusCode.RESOURCE_EXHAUSTED.name, 0.0)
            return web.json_response(
                {
                    "error": f"the request body is over this worker's limit of "
                    f"{self._max_body_bytes} bytes (max_message_bytes, env "
                    "ROUNDTRIP_MAX_MESSAGE_BYTES)"
                },
                status=413,
            )
        servicer.calls.enter()
        try:
            outcome = await counted(
                servicer.metrics,
                METHOD,
                lambda: grpc.StatusCode.CANCELLED,  # the caller hung up
                lambda: self._answer(request, body),
            )
        finally:
            servicer.calls.leave()
        if isinstance(outcome, Failure):
            return error_response(outcome)
        return outcome

    def _reserve_decoding(self, json_bytes: int) -> Reservation:
        """Hold what decoding ``json_bytes`` of JSON may take (:data:`JSON_EXPANSION`)."""
        try:
            return self._servicer.budget.reserve(JSON_EXPANSION * json_bytes)
        except LimitExceeded:
            raise LimitExceeded(
                f"decoding this request's {json_bytes} bytes of JSON may take "
                f"{JSON_EXPANSION * json_bytes} bytes, over this worker's max_inflight_bytes "
                f"= {self._servicer.budget.limit} (env ROUNDTRIP_MAX_INFLIGHT_BYTES): send "
                "large tensors as binary data (parameters.binary_data_size, the binary tensor "
                "data extension) or over gRPC"
            ) from None

    async def _answer(self, request: web.Request, body: bytes) -> web.Response:
        servicer = self._servicer
        received = servicer.budget.received(len(body))
        try:
            check_new_call(servicer, request.headers.get(numerics.FINGERPRINT_KEY))
            v2.check_model(request.match_info["model"], request.match_info.get("version", ""))
            split = json_length(body, request.headers.get(HEADER_LENGTH))
            decoding = self._reserve_decoding(split)
            try:
                message, binary_outputs = infer_request(
                    body, split, request.match_info["model"], request.match_info.get("version", "")
                )
            finally:
                decoding.release()
            response, held = await servicer.infer(message, deadline=None)
        finally:
            received.release()
        try:
            payload, header_length = infer_body(response, binary_outputs)
        finally:
            for reservation in held:
                reservation.release()
        if header_length is None:
            return web.Response(body=payload, content_type="application/json")
        return web.Response(
            body=payload,
            content_type="application/octet-stream",
            headers={HEADER_LENGTH: str(header_length)},
        )


def ssl_context(cert_file: str, key_file: str, client_ca_file: str) -> ssl.SSLContext:
    """The same TLS (and client-certificate requirement) as the gRPC port's."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_file, key_file)
    if client_ca_file:
        context.load_verify_locations(client_ca_file)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


async def start(
    endpoint: Endpoint,
    host: str,
    port: int,
    *,
    tls: ssl.SSLContext | None,
) -> tuple[web.AppRunner, int]:
    """Serve ``endpoint`` on ``host:port`` (0 picks a free port); the runner and bound port.

    Raises OSError when the port cannot be bound.
    """
    # the drain has already waited for open calls (they count in OpenCalls) when the runner
    # is cleaned up, so its own wait is short
    runner = web.AppRunner(endpoint.application(), access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=tls, backlog=1024)
    try:
        await site.start()
    except OSError:
        await runner.cleanup()
        raise
    return runner, int(runner.addresses[0][1])
