"""What decides the bits of the worker's answers: the CPU instruction set XLA generates code
for, and the fingerprint a caller can insist on. No JAX here: the pin must be in
``XLA_FLAGS`` before JAX initializes (:func:`pin_cpu_isa`, run by ``__main__``).

XLA's CPU backend generates code for the host's instruction set unless ``--xla_cpu_max_isa``
caps it; the same request then gives different last bits on an AVX2 host and an AVX host
(fused multiply-adds in the initializer's math, measured: docs/operations.md#numerics). A
fleet pinned to one level that every node supports generates the same code everywhere.
Library kernels that pick their code at run time (the matmul's) are not under the pin.

>>> pinned_isa("--xla_force_host_platform_device_count=2 --xla_cpu_max_isa=AVX")
'AVX'
>>> host_isa(frozenset({"sse4_2", "avx", "avx2", "fma"}))
'AVX2'
>>> expected_fingerprint([("authorization", "Bearer x"), (FINGERPRINT_KEY, "3f2a9c41d07e5b18")])
'3f2a9c41d07e5b18'
"""

from __future__ import annotations

import platform
import re
from collections.abc import Iterable, Mapping, MutableMapping
from pathlib import Path

from roundtrip.server.errors import NotReady, NumericsMismatch
from roundtrip.wire.metadata import FINGERPRINT_KEY as FINGERPRINT_KEY  # REST: the header

#: The values ``--xla_cpu_max_isa`` accepts (x86 only), oldest first; each needs these CPU
#: flags (``/proc/cpuinfo``) and those of every level before it.
ISA_LEVELS: Mapping[str, frozenset[str]] = {
    "SSE4_2": frozenset({"sse4_2"}),
    "AVX": frozenset({"avx"}),
    "AVX2": frozenset({"avx2", "fma"}),
    "AVX512": frozenset({"avx512f"}),
    "AVX512_VNNI": frozenset({"avx512_vnni"}),
    "AVX512_BF16": frozenset({"avx512_bf16"}),
    "AMX": frozenset({"amx_tile", "amx_bf16", "amx_int8"}),
    "AMX_FP16": frozenset({"amx_fp16"}),
}
FLAG = "--xla_cpu_max_isa"


class PinRefused(ValueError):
    """The pin cannot be applied on this machine; the worker must not start."""


def cpu_flags(path: Path = Path("/proc/cpuinfo")) -> frozenset[str] | None:
    """The host CPU's feature flags, or None where they cannot be read."""
    try:
        text = path.read_text()
    except OSError:
        return None
    match = re.search(r"^flags\s*:\s*(.*)$", text, flags=re.MULTILINE)
    return frozenset(match.group(1).split()) if match else None


def supported_levels(flags: frozenset[str]) -> list[str]:
    """The levels the CPU with ``flags`` can run, oldest first (cumulative)."""
    levels: list[str] = []
    needed: set[str] = set()
    for level, required in ISA_LEVELS.items():
        needed |= required
        if not needed <= flags:
            break
        levels.append(level)
    return levels


def host_isa(flags: frozenset[str] | None) -> str:
    """The newest level the host supports ("" where unknown or not x86)."""
    if flags is None:
        return ""
    levels = supported_levels(flags)
    return levels[-1] if levels else ""


def pinned_isa(xla_flags: str) -> str:
    """The ``--xla_cpu_max_isa`` value in ``xla_flags`` (the last one wins), or ""."""
    found = re.findall(rf"{FLAG}=(\S+)", xla_flags)
    return found[-1].upper() if found else ""


def pin_cpu_isa(value: str, environ: MutableMapping[str, str], flags: frozenset[str] | None) -> str:
    """Add ``--xla_cpu_max_isa=<value>`` to ``environ["XLA_FLAGS"]`` (before JAX starts);
    returns the level pinned. Refuses (:class:`PinRefused`) a value XLA does not know, one
    this CPU cannot run (XLA would quietly generate older code: another fleet's bits), a
    non-x86 host, and an ``XLA_FLAGS`` that already pins another level.
    """
    level = value.strip().upper()
    if not level:
        return pinned_isa(environ.get("XLA_FLAGS", ""))
    if level not in ISA_LEVELS:
        raise PinRefused(
            f"xla_cpu_max_isa {value!r} is not a level XLA knows: use one of "
            f"{', '.join(ISA_LEVELS)} (or empty for XLA's choice)"
        )
    if flags is None or not supported_levels(flags):
        raise PinRefused(
            f"xla_cpu_max_isa={level} needs an x86 CPU whose flags can be read "
            f"(/proc/cpuinfo); this one is {platform.machine() or 'unknown'}: leave it empty"
        )
    if level not in supported_levels(flags):
        missing = sorted(_needed(level) - flags)
        raise PinRefused(
            f"xla_cpu_max_isa={level} is beyond this CPU (missing {', '.join(missing)}; it "
            f"supports up to {host_isa(flags)}): pin a level every node supports"
        )
    existing = environ.get("XLA_FLAGS", "")
    already = pinned_isa(existing)
    if already and already != level:
        raise PinRefused(
            f"XLA_FLAGS already sets {FLAG}={already}, but xla_cpu_max_isa is {level}: "
            "set one of them"
        )
    if not already:
        environ["XLA_FLAGS"] = f"{existing} {FLAG}={level}".strip()
    return level


def _needed(level: str) -> set[str]:
    needed: set[str] = set()
    for name, required in ISA_LEVELS.items():
        needed |= required
        if name == level:
            break
    return needed


def expected_fingerprint(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    """The fingerprint a call's metadata insists on, or None (no check)."""
    for key, value in metadata or ():
        if key == FINGERPRINT_KEY:
            return value.decode() if isinstance(value, bytes) else value
    return None


def check_fingerprint(expected: str | None, actual: str) -> None:
    """Nothing when the caller insists on nothing or on ``actual``; else FAILED_PRECONDITION
    naming both (UNAVAILABLE while the worker has not computed its own yet).

    >>> check_fingerprint(None, "")
    >>> check_fingerprint("aa", "bb")
    Traceback (most recent call last):
    ...
    roundtrip.server.errors.NumericsMismatch: this worker's numerics fingerprint is bb, not ...
    """
    if expected is None or expected == actual:
        return
    if not actual:
        raise NotReady(
            "this worker has not computed its numerics fingerprint yet (its self-check is "
            "running); retry, or send the call to a serving worker"
        )
    raise NumericsMismatch(
        f"this worker's numerics fingerprint is {actual}, not {expected} as the call requires "
        f"({FINGERPRINT_KEY}): its answers' bits may differ; send the call to a worker "
        f"whose GetServerInfo reports {expected}"
    )
