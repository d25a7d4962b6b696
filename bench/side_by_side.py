"""The worker at an earlier commit and now, side by side on W1 and W2 under h2load.

    python -m bench.side_by_side --base 2c54b4f --rounds 4   # -> docs/bench/side_by_side.json

Checks the base commit out into a temporary git worktree and runs its worker
with that tree's ``client`` and ``server`` first on ``PYTHONPATH`` (same
virtual environment, same machine), alternating with the current tree, the
order flipped every round. Each run: a fresh worker, h2load 8 connections x
16 streams for ``--duration`` seconds per workload. Medians per side, and the
ratio now / base. Needs h2load (Debian nghttp2-client).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
from pathlib import Path

from bench.run import OUT, ROOT, WORKLOADS, cases, check_body, h2load, machine, server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="the commit to compare with")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--duration", type=int, default=10)
    args = parser.parse_args()
    workloads = ("W1", "W2")
    load = {name: cases(*WORKLOADS[name], 1, check=True)[0] for name in workloads}
    rps: dict[str, dict[str, list[float]]] = {
        side: {name: [] for name in workloads} for side in ("base", "now")
    }
    with tempfile.TemporaryDirectory() as scratch:
        tree = Path(scratch) / "base"
        subprocess.run(
            ["git", "worktree", "add", "-q", "--detach", str(tree), args.base], cwd=ROOT, check=True
        )
        try:
            for round_ in range(args.rounds):
                for side in ("base", "now") if round_ % 2 == 0 else ("now", "base"):
                    if side == "base":
                        os.environ["PYTHONPATH"] = f"{tree / 'client'}:{tree / 'server'}"
                    else:
                        os.environ.pop("PYTHONPATH", None)
                    flags = ("--warmup-shapes", "3:4,64:64", "--audit-fraction", "0")
                    with server("worker", *flags) as port:
                        for name in workloads:
                            check_body(port, load[name])
                            result = h2load(
                                port,
                                load[name].request,
                                duration=args.duration,
                                clients=8,
                                streams=16,
                            )
                            rps[side][name].append(result["rps"])
                            print(round_, side, name, result, flush=True)
        finally:
            os.environ.pop("PYTHONPATH", None)
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT)
    medians = {side: {n: statistics.median(v) for n, v in d.items()} for side, d in rps.items()}
    report = {
        "base": args.base,
        "h2load": "8 connections x 16 streams, one request replayed",
        "rps": rps,
        "medians": medians,
        "ratio_now_to_base": {
            n: round(medians["now"][n] / medians["base"][n], 3) for n in workloads
        },
        "machine": machine("h2load on the same cores"),
    }
    (OUT / "side_by_side.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["ratio_now_to_base"]))


if __name__ == "__main__":
    main()
