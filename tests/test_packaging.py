"""The wheel as another team installs it: no extras, outside the repository, checked by mypy.

Builds the wheel with the project's pinned ``uv``, installs it into a fresh virtual
environment (dependencies from PyPI, as any caller gets them) and, from a directory
outside the repository, calls a worker, type-checks a caller with ``mypy --strict``,
and checks that the thin client brought no JAX and the worker says which extra it needs.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from roundtrip.client import __version__
from support.workers import ROOT, WorkerProcess, console_script

UV = ROOT / ".tools" / "bin" / "uv"
pytestmark = [pytest.mark.slow, pytest.mark.external]

GOOD_CALLER = """
import sys

from roundtrip.client import NO_DEADLINE, RoundTripClient, RoundTripResult


def answer(target: str) -> list[float]:
    with RoundTripClient(target, timeout=30) as client:
        client.wait_until_serving(timeout=60)
        result: RoundTripResult = client.round_trip(
            0, [1.0, 2.0, 3.0], 4, timeout=NO_DEADLINE, metadata=[("x-request-id", "1")]
        )
        return result.as_list()


if __name__ == "__main__":
    print(answer(sys.argv[1]))
"""

BAD_CALLER = """
from roundtrip.client import RoundTripClient


def wrong(client: RoundTripClient) -> str:
    return client.round_trip(0, [1.0], "4").orig_sum
"""


def run(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "VIRTUAL_ENV"}}
    return subprocess.run(
        [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, check=False
    )


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(the wheel ``make wheel`` builds, a fresh venv's python with it installed, no extras)."""
    if not UV.exists():
        pytest.skip("make installs .tools/bin/uv")
    place = tmp_path_factory.mktemp("caller")
    built = run(
        "make", "-C", ROOT, "--no-print-directory", "wheel", f"DIST={place / 'dist'}", cwd=place
    )
    assert built.returncode == 0, built.stderr
    [wheel] = (place / "dist").glob("*.whl")
    made = run(UV, "venv", "--quiet", "--python", sys.executable, place / "venv", cwd=place)
    assert made.returncode == 0, made.stderr
    python = place / "venv" / "bin" / "python"
    done = run(UV, "pip", "install", "--quiet", "--python", python, wheel, cwd=place)
    assert done.returncode == 0, done.stderr
    return wheel, python


def test_the_wheel_is_named_and_licensed_as_the_project(installed: tuple[Path, Path]) -> None:
    wheel, _ = installed
    assert wheel.name == f"roundtrip_worker-{__version__}-py3-none-any.whl"
    names = zipfile.ZipFile(wheel).namelist()
    assert f"roundtrip_worker-{__version__}.dist-info/licenses/LICENSE" in names
    assert {"roundtrip/client/py.typed", "roundtrip/v1/py.typed"} <= set(names)


def test_a_caller_outside_the_repository_gets_the_answer(
    installed: tuple[Path, Path], worker: WorkerProcess, tmp_path: Path
) -> None:
    _, python = installed
    (tmp_path / "caller.py").write_text(GOOD_CALLER)
    done = run(python, "caller.py", worker.target, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[-4.221933364868164, -4.221933364868164, 0.0]"
    where = run(python, "-c", "import roundtrip.client as c; print(c.__file__)", cwd=tmp_path)
    assert "site-packages" in where.stdout  # not this repository's sources


def test_the_thin_client_brings_no_jax(installed: tuple[Path, Path], tmp_path: Path) -> None:
    _, python = installed
    done = run(python, "-c", "import jax", cwd=tmp_path)
    assert "No module named 'jax'" in done.stderr


def test_the_worker_without_its_extra_says_which_to_install(
    installed: tuple[Path, Path], tmp_path: Path
) -> None:
    _, python = installed
    done = run(python.parent / "roundtrip-server", "--port", "0", cwd=tmp_path)
    assert done.returncode == 2
    assert "the 'server' extra" in done.stderr
    assert f"roundtrip_worker-{__version__}-py3-none-any.whl[server]" in done.stderr
    assert "not on PyPI" in done.stderr  # the name is not published: no bare pip install
    assert "Traceback" not in done.stderr


def test_mypy_strict_sees_the_clients_real_types(
    installed: tuple[Path, Path], tmp_path: Path
) -> None:
    """A correct caller passes; a wrong one fails, which it could not if the client were Any."""
    _, python = installed
    (tmp_path / "good.py").write_text(GOOD_CALLER)
    (tmp_path / "bad.py").write_text(BAD_CALLER)
    mypy: list[str | Path] = [console_script("mypy"), "--strict", "--python-executable", python]
    good = run(*mypy, "good.py", cwd=tmp_path)
    assert good.returncode == 0, good.stdout
    bad = run(*mypy, "bad.py", cwd=tmp_path)
    assert bad.returncode == 1, bad.stdout
    assert 'Argument 3 to "round_trip" of "RoundTripClient" has incompatible type "str"' in (
        bad.stdout
    )
    assert 'Incompatible return value type (got "float", expected "str")' in bad.stdout


def test_the_readme_installs_what_the_tests_install() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "make wheel" in readme
    assert f"pip install dist/roundtrip_worker-{__version__}-py3-none-any.whl" in readme
    assert "pip install roundtrip " not in readme
    assert "pip install roundtrip`" not in readme


def test_the_fresh_client_resolves_ml_dtypes_below_0_7_and_reports_its_import_time(
    installed: tuple[Path, Path], tmp_path: Path
) -> None:
    """ml-dtypes 0.7 made `import roundtrip.client` take 1.8-1.9 s against 0.5-0.6 s with
    0.6 (docs/adr/0008): the pin keeps a fresh install on the cheaper one. The import time
    is printed (run with -s), not asserted: timings are the benchmarks' business."""
    _, python = installed
    done = run(
        python,
        "-c",
        "import time; t = time.perf_counter(); import roundtrip.client; "
        "took = time.perf_counter() - t; import ml_dtypes; print(ml_dtypes.__version__, took)",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    version, took = done.stdout.split()
    assert tuple(int(part) for part in version.split(".")[:2]) < (0, 7), version
    print(f"import roundtrip.client: {float(took):.2f} s with ml-dtypes {version}")


#: Unary, batch and stream through the installed client; prints the runtime versions.
THREE_WAYS = """
import sys
import google.protobuf, grpc
from roundtrip.client import RoundTripClient
with RoundTripClient(sys.argv[1], timeout=30) as client:
    one = client.round_trip(0, [1.0, 2.0, 3.0], 4).as_list()
    batch = [o.as_list() for o in client.round_trip_many([(0, [1.0, 2.0, 3.0], 4)] * 2)]
    streamed = [o.as_list() for o in client.stream([(0, [1.0, 2.0, 3.0], 4)] * 2)]
assert one == batch[0] == batch[1] == streamed[0] == streamed[1], (one, batch, streamed)
assert one == [-4.221933364868164, -4.221933364868164, 0.0], one
# without the otel extra, nothing of OpenTelemetry is imported (roundtrip.client.tracing)
assert not [name for name in sys.modules if name.startswith("opentelemetry")], sys.modules
print(google.protobuf.__version__, grpc.__version__)
"""

#: tritonclient over gRPC and HTTP, in the same environment as the client.
TRITON_CALLS = """
import sys
import numpy as np
import tritonclient.grpc as g
import tritonclient.http as h
for module, target in ((g, sys.argv[1]), (h, sys.argv[2])):
    client = module.InferenceServerClient(target)
    inputs = [module.InferInput("seed", [1], "INT64"), module.InferInput("x", [3], "FP32"),
              module.InferInput("features", [1], "INT64")]
    inputs[0].set_data_from_numpy(np.array([0], np.int64))
    inputs[1].set_data_from_numpy(np.array([1, 2, 3], np.float32))
    inputs[2].set_data_from_numpy(np.array([4], np.int64))
    result = client.infer("roundtrip", inputs).as_numpy("result")
    assert result.tolist() == [[-4.221933364868164, -4.221933364868164, 0.0]], result
print("tritonclient ok")
"""


def environment(place: Path, wheel: Path, *requirements: str) -> Path:
    """A fresh venv with the wheel (no extras) and ``requirements``, resolved together."""
    made = run(UV, "venv", "--quiet", "--python", sys.executable, place / "venv", cwd=place)
    assert made.returncode == 0, made.stderr
    python = place / "venv" / "bin" / "python"
    done = run(UV, "pip", "install", "--quiet", "--python", python, wheel, *requirements, cwd=place)
    assert done.returncode == 0, done.stderr
    return python


def test_the_client_works_on_the_oldest_protobuf_and_grpcio_it_declares(
    installed: tuple[Path, Path], worker: WorkerProcess, tmp_path: Path
) -> None:
    wheel, _ = installed
    oldest = ("protobuf==5.27.2", "grpcio==1.66.2", "grpcio-health-checking==1.66.2")
    python = environment(tmp_path, wheel, *oldest)
    done = run(python, "-c", THREE_WAYS, worker.target, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["5.27.2", "1.66.2"]


def test_the_client_and_tritonclient_share_one_environment(
    installed: tuple[Path, Path], worker: WorkerProcess, tmp_path: Path
) -> None:
    """tritonclient 2.73 wants protobuf < 7: the client takes whatever it resolves."""
    wheel, _ = installed
    python = environment(tmp_path, wheel, "tritonclient[grpc,http]==2.73.0")
    done = run(python, "-c", THREE_WAYS, worker.target, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[0].startswith("6.")
    http = f"127.0.0.1:{worker.http_port}"
    triton = run(python, "-c", TRITON_CALLS, worker.target, http, cwd=tmp_path)
    assert triton.returncode == 0, triton.stderr
