"""Configuration: flags over environment over defaults, validated, documented."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from roundtrip.server.config import WorkerConfig, config_table

README = Path(__file__).resolve().parent.parent / "README.md"


def test_flag_wins_over_environment() -> None:
    config = WorkerConfig.from_sources(
        ["--max-batch-size", "4"], {"ROUNDTRIP_MAX_BATCH_SIZE": "16", "ROUNDTRIP_PORT": "6000"}
    )
    assert config.max_batch_size == 4
    assert config.port == 6000


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--max-batch-size", "0"], "max_batch_size must be >= 1"),
        (["--port", "http"], "port: 'http' is not a valid int"),
        (["--warmup-shapes", "64x64"], "warmup_shapes"),
        (["--log-level", "LOUD"], "log_level"),
    ],
)
def test_invalid_settings_stop_the_worker_with_a_clear_message(
    argv: list[str], message: str
) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "roundtrip.server", *argv], capture_output=True, text=True
    )
    assert done.returncode == 2
    assert message in done.stderr


def test_readme_configuration_table_matches_the_code() -> None:
    assert config_table() in README.read_text()
