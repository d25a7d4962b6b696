"""The proof a batched program gives before it serves: eager's bits, on this device.

A batched program (:mod:`~roundtrip.server.numerics.programs`, ``batched=True``) draws
every request's parameters and runs every request's matmuls as one batched operation.
Whether a batched matmul accumulates each row in eager's order depends on the backend,
the shapes and the compiler, so it is not assumed: a :class:`Proof` runs the compiled
program on :func:`proof_inputs` (edge seeds, inputs of both signs and large magnitudes,
every row position of the batch) and compares each request's outputs and three numbers
with the eager reference steps, bit for bit. The engine serves the batched program only
when they all agree, and the looped one otherwise (docs/adr/0011):
:class:`ProvenPrograms` makes that choice for the engine, per executable it compiles.

>>> from roundtrip.server.values import ShapeSignature
>>> [item.seed for item in proof_inputs(ShapeSignature((3,), "float32", 4), 4, "seed")]
[0, -1, 4294967301, 9223372036854775807]
"""

from __future__ import annotations

import collections
import functools
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import jax
import numpy as np

from roundtrip.server.numerics.executables import (
    EXECUTABLES,
    CompiledRoundTrip,
    FromSeeds,
    ParamSource,
    ProgramKey,
)
from roundtrip.server.numerics.programs import Reductions
from roundtrip.server.numerics.reference import eager_with_outputs, same_answer
from roundtrip.server.values import RoundTripAnswer, RoundTripInput, ShapeSignature

log = logging.getLogger(__name__)

#: Batched programs whose proof failed, remembered (most recent) so that one is neither
#: proven nor logged again when it is compiled again after an eviction.
REFUSED_REMEMBERED = 1024

#: Distinct requests a proof runs through eager (its slowest part); a larger batch repeats
#: them, so every row position is still checked.
PROOF_REQUESTS = 16

#: Seeds at the edges of what the wire carries, then ordinary ones.
EDGE_SEEDS = (0, -1, 2**32 + 5, 2**63 - 1, -(2**63), 123456789)


@dataclass(frozen=True, slots=True)
class Verdict:
    """A proof's outcome: ``proven``, or the first disagreement in words;
    ``outputs_match``: steps 1-4 gave eager's outputs (only the sums differed)."""

    proven: bool
    detail: str = ""
    outputs_match: bool = True


def proof_inputs(
    signature: ShapeSignature, batch_size: int, source: ParamSource
) -> list[RoundTripInput]:
    """``batch_size`` requests of ``signature``: at most :data:`PROOF_REQUESTS` distinct
    ones, repeated to fill the batch. x is standard normal, every third one scaled by 1e4
    (large outputs, where an accumulation order shows most). Requests that share
    parameters (``source`` "shared") share one seed, as the engine groups them. The
    ``index``-th request is the same at every batch size, so its eager answer is computed
    once per signature (:func:`_eager`)."""
    requests = [_request(signature, source, index) for index in range(_distinct(batch_size))]
    return [requests[row % len(requests)] for row in range(batch_size)]


def _distinct(batch_size: int) -> int:
    """How many distinct requests a proof at ``batch_size`` runs."""
    return min(batch_size, PROOF_REQUESTS)


@functools.lru_cache(maxsize=4 * PROOF_REQUESTS)
def _request(signature: ShapeSignature, source: ParamSource, index: int) -> RoundTripInput:
    rng = np.random.default_rng([20261207, index])
    x = rng.standard_normal(signature.x_shape) * (1e4 if index % 3 == 2 else 1.0)
    seed = EDGE_SEEDS[0] if source == "shared" else _seed(index)
    return RoundTripInput(
        seed, x.astype(signature.x_dtype), signature.features, signature.with_outputs
    )


def _seed(index: int) -> int:
    if index < len(EDGE_SEEDS):
        return EDGE_SEEDS[index]
    return int(np.random.default_rng([20261207, index, 1]).integers(-(2**40), 2**40))


@functools.lru_cache(maxsize=4 * PROOF_REQUESTS)
def _eager(
    signature: ShapeSignature, source: ParamSource, index: int
) -> tuple[RoundTripAnswer, Any, Any]:
    """The eager steps' answer and outputs (host copies) for a proof's ``index``-th
    request: kept for the most recent few signatures, since every batch size of one asks
    the same."""
    item = _request(signature, source, index)
    answer, orig_out, merged_out = eager_with_outputs(item.seed, item.x, item.features)
    return answer, np.asarray(orig_out), np.asarray(merged_out)


class Proof:
    """The eager reference's bits for :func:`proof_inputs` of one signature, batch size and
    parameter source, computed once, against which candidate programs are checked in turn.
    ``draw(seed)`` gives a seed's parameters, for the programs that take them as an operand.
    """

    def __init__(
        self,
        signature: ShapeSignature,
        batch_size: int,
        source: ParamSource,
        draw: Callable[[int], tuple[Any, ...]],
    ) -> None:
        self.inputs = proof_inputs(signature, batch_size, source)
        self._params = _params(self.inputs, source, draw)
        self._expected = [
            _eager(signature, source, index) for index in range(_distinct(batch_size))
        ]

    def check(self, compiled: CompiledRoundTrip) -> Verdict:
        """Whether ``compiled`` gives eager's bits for every row: both outputs and the three
        numbers."""
        orig_outs, merged_outs, *_ = compiled.outputs(self.inputs, self._params)
        orig_outs, merged_outs = np.asarray(orig_outs), np.asarray(merged_outs)
        answers = compiled(self.inputs, self._params)
        for row, (item, got) in enumerate(zip(self.inputs, answers, strict=True)):
            answer, orig_out, merged_out = self._expected[row % len(self._expected)]
            if not (
                _same_bits(orig_outs[row], orig_out) and _same_bits(merged_outs[row], merged_out)
            ):
                return Verdict(False, f"row {row} (seed {item.seed}): outputs differ", False)
            if not same_answer(got, answer):
                return Verdict(False, f"row {row} (seed {item.seed}): sums differ")
        return Verdict(True)


def _params(
    inputs: Sequence[RoundTripInput],
    source: ParamSource,
    draw: Callable[[int], tuple[Any, ...]],
) -> Any:
    if source == "shared":
        return draw(inputs[0].seed)
    if source == "rows":
        return [tuple(np.asarray(leaf) for leaf in draw(item.seed)) for item in inputs]
    return None


def _same_bits(got: Any, want: Any) -> bool:
    got, want = np.asarray(got), np.asarray(want)
    return bool(got.shape == want.shape and got.tobytes() == want.tobytes())


class Counts(Protocol):
    """Where the outcomes are counted (the engine's stats)."""

    batched_proven: int
    batched_refused: int


class ProvenPrograms:
    """Builds the program an executable key serves on ``device``: the batched one where it
    may run (:meth:`may_batch`) and its proof passes, the looped one otherwise. Refusals
    are logged once and remembered; both outcomes are counted in ``counts``."""

    def __init__(self, batched_max_bytes: int, counts: Counts, device: jax.Device | None) -> None:
        self.batched_max_bytes = batched_max_bytes
        self.device = device
        self._counts = counts
        self._refused: collections.OrderedDict[Any, None] = collections.OrderedDict()
        self._lock = threading.Lock()

    def build(
        self, key: ProgramKey, *, draw: Callable[[int], tuple[Any, ...]]
    ) -> CompiledRoundTrip:
        """The program for ``key``: batched if proven here, else looped. ``draw(seed)``: a
        seed's parameters, for a proof of a program that takes them as an operand."""
        if self.may_batch(key.signature, key.batch_size, key.source) and key not in self._refused:
            batched, verdict = self._proven(key, draw)
            with self._lock:
                if verdict.proven:
                    self._counts.batched_proven += 1
                    return batched
                self._counts.batched_refused += 1
                self._refused[key] = None
                while len(self._refused) > REFUSED_REMEMBERED:
                    self._refused.popitem(last=False)
            log.warning(
                "batched program refused: it does not give eager's bits here; the looped "
                "program serves",
                extra={
                    "signature": str(key.signature),
                    "batch_size": key.batch_size,
                    "params": key.source,
                    "detail": verdict.detail,
                },
            )
        return self._program(key, batched=False)

    def may_batch(
        self, signature: ShapeSignature, batch_size: int, source: ParamSource = "seed"
    ) -> bool:
        """Whether a batch of ``batch_size`` requests of ``signature`` may run as a batched
        program (if it proves itself): more than one request, and the parameter sets it
        draws or reads at once within ``batched_max_bytes`` (one set when the requests
        share it, one per request otherwise)."""
        sets = 1 if source == "shared" else batch_size
        elements = (signature.x_shape[-1] + 1) * signature.features
        return batch_size > 1 and sets * elements * 4 <= self.batched_max_bytes

    def _proven(
        self, key: ProgramKey, draw: Callable[[int], tuple[Any, ...]]
    ) -> tuple[CompiledRoundTrip, Verdict]:
        """The cheapest batched program that proves eager's bits (the sums as one row-wise
        reduce, else each row reduced on its own), or the last one tried and why it failed."""
        proof = Proof(key.signature, key.batch_size, key.source, draw)
        batched = self._program(key, batched=True, reductions="rowwise")
        verdict = proof.check(batched)
        if not verdict.proven and verdict.outputs_match:
            batched = batched.with_reductions("sliced")
            verdict = proof.check(batched)
        return batched, verdict

    def _program(
        self, key: ProgramKey, *, batched: bool, reductions: Reductions = "sliced"
    ) -> CompiledRoundTrip:
        if key.source == "seed":
            return FromSeeds(
                key.signature,
                key.batch_size,
                emit_params=key.emit_params,
                device=self.device,
                batched=batched,
                reductions=reductions,
            )
        return EXECUTABLES[key.source](
            key.signature,
            key.batch_size,
            device=self.device,
            batched=batched,
            reductions=reductions,
        )
