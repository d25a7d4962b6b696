"""The contract's answer as a value: both sums, their largest absolute difference, and the
outputs when asked for. The client hands it to its callers as ``RoundTripResult``; the
worker's engine computes it (``roundtrip.server.values.RoundTripAnswer`` is this class).

>>> RoundTripResult(-4.221933364868164, -4.221933364868164, 0.0).as_list()
[-4.221933364868164, -4.221933364868164, 0.0]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy.typing as npt


@dataclass(frozen=True, slots=True)
class RoundTripResult:
    """One answer: both sums, their largest absolute difference, and optional outputs.

    The three numbers are float32 values (the wire's ``float``) held as Python floats, so
    ``str(numpy.float32(result.orig_sum))`` prints them as float32 (``-4.2219334``).
    """

    orig_sum: float
    merged_sum: float
    max_abs_diff: float
    orig_out: npt.NDArray[Any] | None = None
    merged_out: npt.NDArray[Any] | None = None

    def as_list(self) -> list[float]:
        """``[orig_sum, merged_sum, max_abs_diff]``, the contract's result array."""
        return [self.orig_sum, self.merged_sum, self.max_abs_diff]
