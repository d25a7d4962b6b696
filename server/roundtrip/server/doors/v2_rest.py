"""The V2 protocol's REST endpoints (aiohttp) on ``http_port``, on the worker's event loop.

An infer body becomes a ``ModelInferRequest`` through the JSON codec
(:mod:`~roundtrip.server.codecs.v2_json`) and is answered through V2's mapping into the pipeline
(:func:`roundtrip.server.codecs.v2.answer`), in the same envelope as every other door. Errors are
the gRPC status the call would have ended with, as the HTTP status of the one mapping
(:func:`~roundtrip.server.errors.failure_of`), with V2's body ``{"error": "<message>"}``.

Routes (``/versions/1`` may follow the model's name):

* ``GET /v2/health/live``, ``GET /v2/health/ready``: 200, or 503 when not ready;
* ``GET /v2``: server metadata; ``GET /v2/models/roundtrip``: model metadata;
* ``GET /v2/models/roundtrip/ready``; ``POST /v2/models/roundtrip/infer``;
* Triton's extensions: ``GET /v2/models/roundtrip/config`` (model configuration) and
  ``GET /v2/models/roundtrip/stats`` (statistics; ``/v2/models/stats``: every model);
* ``GET /v2/docs/dataplane.json``: the OpenAPI document of these routes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import grpc
from aiohttp import ClientConnectionError, web
from aiohttp.web_protocol import RequestPayloadError

from roundtrip.server.codecs import v2, v2_json
from roundtrip.server.codecs.v2_model import MODEL_NAME, Model, as_json
from roundtrip.server.doors import openapi
from roundtrip.server.doors.http_server import caller_of
from roundtrip.server.doors.security import TokenCheck
from roundtrip.server.errors import (
    AnswerNotTaken,
    BodyTooLarge,
    CallerGone,
    Failure,
    InvalidArgument,
    LimitExceeded,
    UploadTimedOut,
    failure_of,
)
from roundtrip.server.ops.tracing import TraceStart
from roundtrip.server.pipeline.calls import Call
from roundtrip.server.pipeline.pipeline import Pipeline
from roundtrip.wire.metadata import FINGERPRINT_KEY

log = logging.getLogger(__name__)

METHOD = "ModelInferHTTP"


def error_response(failure: Failure) -> web.Response:
    """V2's error body with ``failure``'s HTTP status.

    >>> error_response(Failure(grpc.StatusCode.INVALID_ARGUMENT, "x is required")).status
    400
    """
    return web.json_response({"error": failure.message}, status=failure.http_status)


class V2RestDoor:
    """The REST routes over ``pipeline``; ``token``: the check every route passes (health
    routes too unless exempt); ``ready``: whether the worker takes inference calls now."""

    def __init__(
        self,
        pipeline: Pipeline,
        model: Model,
        *,
        ready: Callable[[], bool],
        max_body_bytes: int,
        max_json_bytes: int = 128 * 1024,
        max_json_output_elements: int = 65536,
        read_timeout_s: float = 10.0,
        upload_timeout_s: float = 60.0,
        write_timeout_s: float = 30.0,
        token: TokenCheck | None = None,
    ) -> None:
        self.pipeline = pipeline
        self.model = model
        self.ready = ready
        self._max_body_bytes = max_body_bytes
        self._max_json_bytes = max_json_bytes
        self._max_json_output_elements = max_json_output_elements
        self._read_timeout_s = read_timeout_s
        self._upload_timeout_s = upload_timeout_s
        self._write_timeout_s = write_timeout_s
        self._token = token

    def application(self) -> web.Application:
        app = web.Application(client_max_size=self._max_body_bytes, middlewares=[self._errors])
        model = "/v2/models/{model}"
        versioned = "/v2/models/{model}/versions/{version}"
        app.add_routes(
            [
                web.get("/v2/health/live", self.live),
                web.get("/v2/health/ready", self.server_ready),
                web.get("/v2", self.server_metadata),
                *(web.get(prefix, self.model_metadata) for prefix in (model, versioned)),
                *(web.get(prefix + "/ready", self.model_ready) for prefix in (model, versioned)),
                *(web.get(prefix + "/config", self.model_config) for prefix in (model, versioned)),
                web.get("/v2/models/stats", self.model_statistics),
                web.get("/v2/docs/dataplane.json", self.openapi),
                *(
                    web.get(prefix + "/stats", self.model_statistics)
                    for prefix in (model, versioned)
                ),
                *(web.post(prefix + "/infer", self.infer) for prefix in (model, versioned)),
            ]
        )
        return app

    @web.middleware
    async def _errors(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        """The token check, and every error as V2's body with its mapped status."""
        token = self._token
        if (
            token is not None
            and not token.exempt_path(request.path)
            and not token.accepts(request.headers.get("Authorization"))
        ):
            self.pipeline.metrics.refused_unauthenticated("http")  # (paths: unbounded)
            return web.json_response(
                {"error": "missing or wrong bearer token: send 'Authorization: Bearer <token>'"},
                status=401,
            )
        try:
            return await handler(request)
        except web.HTTPException as error:  # aiohttp's own: an unknown route...
            return web.json_response({"error": error.reason}, status=error.status)
        except Exception as error:  # a RequestError's own status; anything else: INTERNAL, logged
            return error_response(failure_of(error))

    async def live(self, request: web.Request) -> web.Response:
        return web.json_response({"live": True})

    async def server_ready(self, request: web.Request) -> web.Response:
        ready = self.ready()
        return web.json_response({"ready": ready}, status=200 if ready else 503)

    async def server_metadata(self, request: web.Request) -> web.Response:
        return web.json_response(as_json(self.model.server_metadata()))

    async def model_metadata(self, request: web.Request) -> web.Response:
        self._check_model(request)
        return web.json_response(as_json(self.model.metadata()))

    def _check_model(self, request: web.Request) -> None:
        self.model.check(request.match_info["model"], request.match_info.get("version", ""))

    async def openapi(self, request: web.Request) -> web.Response:
        return web.json_response(openapi.document())

    async def model_config(self, request: web.Request) -> web.Response:
        self._check_model(request)
        return web.json_response(self.model.config())

    async def model_statistics(self, request: web.Request) -> web.Response:
        if "model" in request.match_info:
            self._check_model(request)
        return web.json_response(self.model.statistics())

    async def model_ready(self, request: web.Request) -> web.Response:
        self._check_model(request)
        ready = self.ready()
        return web.json_response({"name": MODEL_NAME, "ready": ready}, status=200 if ready else 503)

    async def infer(self, request: web.Request) -> web.StreamResponse:
        """One V2 call: its body admitted by bytes as it arrives, decoded, answered, and
        written while the call still holds its answer's bytes (every copy the door makes of
        it reserved before any compute)."""
        pipeline = self.pipeline
        model, version = request.match_info["model"], request.match_info.get("version", "")
        sent: web.StreamResponse | None = None
        trace = None
        if pipeline.tracing is not None:
            route = request.match_info.route.resource
            template = route.canonical if route is not None else request.path
            trace = TraceStart.http(request.method, template, request.headers)
        with pipeline.call(deadline=None, caller=caller_of(request)) as call:
            with pipeline.envelope(METHOD, dropped=_cancelled, trace=trace) as envelope:
                pipeline.check_new_call(request.headers.get(FINGERPRINT_KEY), call)
                self.model.check(model, version)
                body, split = await self._read(request, call)
                envelope.note("http.request.body.size", len(body))
                with self._decoding(call, split, len(body) - split):
                    message, binary_outputs = v2_json.infer_request(
                        memoryview(body)[:split], memoryview(body)[split:], model, version
                    )
                del body
                unpacked = v2.unpack(message, pipeline.limits, max_items=pipeline.max_batch_items)
                self._check_json_outputs(unpacked, binary_outputs)
                call.reserve(self._answer_copies(unpacked, binary_outputs))
                answers = await pipeline.answer_all(call, unpacked)
                response = v2.pack(message, unpacked, answers)
                del message, answers
                text = await _joined(v2_json.answer_pieces(response, binary_outputs))
                tail = v2_json.binary_tail(response, binary_outputs)
                del response
                sent = _answer(text, tail)
                envelope.note("http.response.body.size", len(text) + sum(map(len, tail)))
                await self._write(request, sent, text, tail)
                return sent
            assert envelope.failure is not None
            if sent is not None and sent.prepared:  # the caller left mid-answer: nothing to add
                return sent
            refusal = error_response(envelope.failure)
            if envelope.failure.http_status in (408, 413, 499):
                refusal.force_close()  # the rest of the body is never read
            return refusal

    async def _write(
        self, request: web.Request, sent: web.StreamResponse, text: bytes, tail: list[bytes]
    ) -> None:
        """Write the answer (its JSON, then its binary outputs, not joined into one more
        copy). A caller that hangs up ends the call (CANCELLED); one that does not take the
        answer within ``write_timeout_s`` has its connection closed, which drops what the
        transport still buffers (DEADLINE_EXCEEDED)."""
        try:
            async with asyncio.timeout(self._write_timeout_s):
                await sent.prepare(request)
                await sent.write(text)
                del text
                while tail:
                    await sent.write(tail.pop(0))
                await sent.write_eof()
        except TimeoutError:
            self.pipeline.metrics.unread_answers.labels(METHOD).inc()
            log.warning(
                "answer not taken",
                extra={
                    "method": METHOD,
                    "caller": caller_of(request),
                    "write_timeout_s": self._write_timeout_s,
                },
            )
            if request.transport is not None:
                request.transport.abort()  # drops what it buffers for the caller
            raise AnswerNotTaken(
                f"the caller did not take its answer within {self._write_timeout_s} s "
                "(write_timeout_s, env ROUNDTRIP_WRITE_TIMEOUT_S)"
            ) from None
        except (ConnectionError, ClientConnectionError) as error:
            raise CallerGone(f"the caller hung up while its answer was written ({error})") from None

    def _answer_copies(self, unpacked: v2.Unpacked, binary_outputs: set[str]) -> int:
        """What this door holds of an answer beyond the pipeline's own copies: each binary
        output read out of the response and buffered by the transport (2 x its bytes), and
        the JSON text of the others (at most 64 bytes an element, in its pieces and joined).
        """
        output_bytes = sum(size.output_bytes for size in unpacked.sizes)
        total = 64 * len(unpacked.seeds)
        for name in ("orig_out", "merged_out"):
            if name in unpacked.outputs:
                binary = name in binary_outputs
                total += 2 * output_bytes if binary else 64 * unpacked.output_elements()
        return total

    async def _read(self, request: web.Request, call: Call) -> tuple[bytearray, int]:
        """The body, held against the byte budget as it arrives, never before: a declared
        length over the limits is refused before a byte is read (413); otherwise every
        chunk is counted as it arrives (decompressed, when the body is), so an upload that
        trickles holds only what it sent; an upload that sends nothing for
        ``http_read_timeout_s``, or is not whole within ``http_upload_timeout_s``, is
        dropped (408), and one whose caller hangs up ends the call. Returns the body and its
        JSON part's length."""
        declared_json = v2_json.header_length(request.headers.get(v2_json.HEADER_LENGTH))
        declared = request.content_length if "Content-Encoding" not in request.headers else None
        if declared is not None:
            self._check_lengths(declared, declared_json)
        body = bytearray()
        ends = asyncio.get_running_loop().time() + self._upload_timeout_s
        while True:
            try:
                async with asyncio.timeout_at(ends):
                    async with asyncio.timeout(self._read_timeout_s):
                        chunk = await request.content.readany()
            except TimeoutError:
                raise UploadTimedOut(
                    f"the upload sent nothing for {self._read_timeout_s} s, or was not whole "
                    f"within {self._upload_timeout_s} s (http_read_timeout_s, "
                    "http_upload_timeout_s, env ROUNDTRIP_HTTP_READ_TIMEOUT_S, "
                    "ROUNDTRIP_HTTP_UPLOAD_TIMEOUT_S)"
                ) from None
            except (ConnectionError, ClientConnectionError) as error:
                raise CallerGone(f"the caller hung up during its upload ({error})") from None
            except RequestPayloadError as error:  # a corrupt compressed body, or a bad chunk
                raise InvalidArgument(f"the request body cannot be read: {error}") from None
            if not chunk:
                break
            if declared is None:  # chunked or compressed: checked as it arrives
                self._check_lengths(len(body) + len(chunk), declared_json)
            call.hold_message(len(chunk))
            body += chunk
        split = len(body) if declared_json is None else declared_json
        if split > len(body):
            raise InvalidArgument(
                f"{v2_json.HEADER_LENGTH} is {split}, but the body has {len(body)} bytes"
            )
        return body, split

    def _check_lengths(self, body_bytes: int, json_bytes: int | None) -> None:
        """413 for a body over ``max_message_bytes``, or a JSON part over ``max_json_bytes``
        (the whole body, when no binary data follows it)."""
        if body_bytes > self._max_body_bytes:
            raise BodyTooLarge(
                f"the request body is over this worker's limit of {self._max_body_bytes} "
                "bytes (max_message_bytes, env ROUNDTRIP_MAX_MESSAGE_BYTES)"
            )
        json_bytes = body_bytes if json_bytes is None else json_bytes
        if json_bytes > self._max_json_bytes:
            raise BodyTooLarge(
                f"the request's JSON is over this worker's limit of {self._max_json_bytes} "
                "bytes (max_json_bytes, env ROUNDTRIP_MAX_JSON_BYTES): send large tensors as "
                "binary data (parameters.binary_data_size, the binary tensor data "
                "extension) or over gRPC"
            )

    def _decoding(self, call: Call, json_bytes: int, binary_bytes: int) -> Any:
        """Hold what decoding the body takes beside it: ``JSON_EXPANSION`` x its
        ``json_bytes`` of JSON, and a copy of its ``binary_bytes`` of binary data (the
        message's raw contents)."""
        nbytes = v2_json.JSON_EXPANSION * json_bytes
        limit = self.pipeline.budget.limit
        if nbytes > limit:
            raise LimitExceeded(
                f"decoding this request's {json_bytes} bytes of JSON may take {nbytes} bytes, "
                f"over this worker's max_inflight_bytes = {limit} (env "
                "ROUNDTRIP_MAX_INFLIGHT_BYTES): send large tensors as binary data "
                "(parameters.binary_data_size, the binary tensor data extension) or over gRPC"
            )
        return call.holding(nbytes + binary_bytes)

    def _check_json_outputs(self, unpacked: v2.Unpacked, binary_outputs: set[str]) -> None:
        """Refuse, before any compute, outputs too large to send as JSON."""
        as_json = [name for name in ("orig_out", "merged_out") if name in unpacked.outputs]
        elements = unpacked.output_elements() * len(set(as_json) - binary_outputs)
        if elements > self._max_json_output_elements:
            raise LimitExceeded(
                f"the answer's outputs would be {elements} elements of JSON, over this "
                f"worker's limit of {self._max_json_output_elements} (max_json_output_elements, "
                "env ROUNDTRIP_MAX_JSON_OUTPUT_ELEMENTS): ask for them as binary data "
                "(parameters.binary_data: true, the binary tensor data extension) or over gRPC"
            )


async def _joined(pieces: Iterator[str]) -> bytes:
    """``pieces`` joined, the event loop free to run between them."""
    parts = []
    for piece in pieces:
        parts.append(piece)
        await asyncio.sleep(0)
    return "".join(parts).encode()


def _answer(text: bytes, tail: list[bytes]) -> web.StreamResponse:
    """The answer's response, its length and type set: JSON, or JSON then binary outputs."""
    if tail:
        sent = web.StreamResponse(headers={v2_json.HEADER_LENGTH: str(len(text))})
        sent.content_type = "application/octet-stream"
    else:
        sent = web.StreamResponse()
        sent.content_type = "application/json"
    sent.content_length = len(text) + sum(len(piece) for piece in tail)
    return sent


def _cancelled() -> grpc.StatusCode:
    return grpc.StatusCode.CANCELLED
