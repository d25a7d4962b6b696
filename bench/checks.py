"""What the benchmark sends and how it checks what comes back: the workloads' bodies with
their eager reference answers (:class:`Body`, :class:`BatchBody`), and each body's answer
compared bit for bit over every door before its load (h2load counts an HTTP 200 that
carries a gRPC error as a success).

>>> same((1.0, 1.0, 0.0), (1.0, 1.0, 0.0)), same((0.0, 0.0, 0.0), (-0.0, 0.0, 0.0))
(True, False)
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, TypeVar

import grpc
import numpy as np

from roundtrip.client.messages import build_request
from roundtrip.server.v2proto import grpc_predict_v2_pb2 as v2pb
from roundtrip.v1 import roundtrip_pb2 as pb
from roundtrip.v1 import roundtrip_pb2_grpc as pb_grpc
from support.v2_stub import V2Stub

T = TypeVar("T")

ROUNDTRIP = "/roundtrip.v1.RoundTripService/RoundTrip"


ROUNDTRIP_BATCH = "/roundtrip.v1.RoundTripService/RoundTripBatch"


MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"


INFER_PATH = "/v2/models/roundtrip/infer"


#: (width, features) of the workloads: the worked example, a small layer, a wide one.
WORKLOADS = {"W1": (3, 4), "W2": (64, 64), "W3": (1024, 1024)}


Answer = tuple[float, float, float]


def reference(seed: int, x: Any, features: int) -> Answer:
    """SPEC.md's eager steps, run here on this process's backend."""
    from roundtrip.server.numerics.reference import eager_round_trip

    result = eager_round_trip(seed, x, features)
    return (result.orig_sum, result.merged_sum, result.max_abs_diff)


def same(got: Sequence[float], want: Sequence[float]) -> bool:
    """The three numbers bit for bit (0.0 is not -0.0; NaN matches NaN): the worker's own
    comparison, which its self-check and audit use."""
    from roundtrip.server.numerics.reference import same_answer
    from roundtrip.server.values import RoundTripAnswer

    return same_answer(
        RoundTripAnswer(got[0], got[1], got[2]), RoundTripAnswer(want[0], want[1], want[2])
    )


def answer_of(response: pb.RoundTripResponse) -> Answer:
    return (response.orig_sum, response.merged_sum, response.max_abs_diff)


@dataclass
class Body:
    """One request of a workload, with its answer from the eager reference, in every
    encoding a scenario sends it in."""

    seed: int
    x: np.ndarray
    features: int
    expected: Answer = field(init=False)

    def __post_init__(self) -> None:
        self.expected = reference(self.seed, self.x, self.features)

    @cached_property
    def request(self) -> pb.RoundTripRequest:
        return build_request(self.seed, self.x, self.features)

    @cached_property
    def v2(self) -> v2pb.ModelInferRequest:
        request = v2pb.ModelInferRequest(model_name="roundtrip")
        for name, datatype, data in (
            ("seed", "INT64", np.array([self.seed], "<i8")),
            ("x", "FP32", self.x.astype("<f4")),
            ("features", "INT64", np.array([self.features], "<i8")),
        ):
            request.inputs.add(name=name, datatype=datatype, shape=data.shape)
            request.raw_input_contents.append(data.tobytes())
        return request

    @cached_property
    def json(self) -> bytes:
        tensors = [
            ("seed", "INT64", [1], [self.seed]),
            ("x", "FP32", list(self.x.shape), self.x.ravel().tolist()),
            ("features", "INT64", [1], [self.features]),
        ]
        inputs = [
            {"name": name, "datatype": datatype, "shape": shape, "data": data}
            for name, datatype, shape, data in tensors
        ]
        return json.dumps({"inputs": inputs}).encode()


def workload_body(workload: str, index: int = 0) -> Body:
    """Request ``index`` of ``workload`` (W1's first is the worked example)."""
    width, features = WORKLOADS[workload]
    rng = np.random.default_rng(width * 7 + features + index)
    if workload == "W1" and index == 0:
        x = np.array([1.0, 2.0, 3.0], np.float32)
    else:
        x = rng.standard_normal(width).astype(np.float32)
    return Body(int(rng.integers(-(2**63), 2**63 - 1)), x, features)


@dataclass
class BatchBody:
    """One RoundTripBatch message of ``count`` requests of a workload, each its own seed."""

    workload: str
    count: int = 64
    items: list[Body] = field(init=False)

    def __post_init__(self) -> None:
        width, features = WORKLOADS[self.workload]
        rng = np.random.default_rng(self.count)
        x = rng.standard_normal(width).astype(np.float32)
        seeds = [int(s) for s in rng.integers(-(2**31), 2**31, self.count)]
        self.items = [Body(seed, x, features) for seed in seeds]

    @cached_property
    def request(self) -> pb.RoundTripBatchRequest:
        return pb.RoundTripBatchRequest(requests=[item.request for item in self.items])


class Mismatch(AssertionError):
    """An answer that differs from the eager reference: the run is worthless."""


def check_unary(port: int, body: Body) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        response = pb_grpc.RoundTripServiceStub(channel).RoundTrip(body.request, timeout=120)
    if not same(answer_of(response), body.expected):
        raise Mismatch(f"RoundTrip answered {answer_of(response)}, expected {body.expected}")


def check_batch(port: int, batch: BatchBody) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.RoundTripServiceStub(channel)
        response = stub.RoundTripBatch(batch.request, timeout=120)
    for outcome, item in zip(response.outcomes, batch.items, strict=True):
        if outcome.HasField("error") or not same(answer_of(outcome.response), item.expected):
            raise Mismatch(f"a RoundTripBatch outcome differs from the reference: {outcome}")


def check_v2(port: int, body: Body) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        response = V2Stub(channel).ModelInfer(body.v2, timeout=120)
    if response.raw_output_contents:
        got = np.frombuffer(response.raw_output_contents[0], "<f4")
    else:
        got = np.asarray(response.outputs[0].contents.fp32_contents, np.float32)
    if not same(tuple(float(v) for v in got), body.expected):
        raise Mismatch(f"V2 gRPC answered {got.tolist()}, expected {body.expected}")


def check_json(http_port: int, body: Body) -> None:
    request = urllib.request.Request(f"http://127.0.0.1:{http_port}{INFER_PATH}", body.json)
    request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, timeout=120) as response:
        [tensor] = json.loads(response.read())["outputs"]
    got = tuple(float(np.float32(v)) for v in np.asarray(tensor["data"]).ravel())
    if not same(got, body.expected):
        raise Mismatch(f"V2 REST answered {got}, expected {body.expected}")


class Bodies:
    """Every body the scenarios send, with its reference answer, built once per run; on
    ``device`` (a JAX device: the reference runs on the backend of the worker it checks)."""

    def __init__(self, device: Any = None) -> None:
        self.device = device
        self._made: dict[Any, Any] = {}

    def on_device(self) -> AbstractContextManager[Any]:
        """Where references run while this body set is in use."""
        if self.device is None:
            return nullcontext()
        import jax

        context: AbstractContextManager[Any] = jax.default_device(self.device)
        return context

    def one(self, workload: str) -> Body:
        return self._get(("one", workload), lambda: workload_body(workload))

    def many(self, workload: str, count: int = 64) -> list[Body]:
        return self._get(
            ("many", workload),
            lambda: [workload_body(workload, index) for index in range(count)],
        )

    def batch(self, workload: str, count: int = 64) -> BatchBody:
        return self._get(("batch", workload, count), lambda: BatchBody(workload, count))

    def _get(self, key: Any, make: Callable[[], T]) -> T:
        if key not in self._made:
            self._made[key] = make()
        made: T = self._made[key]
        return made
