"""Configuration: flags over environment over a TOML file over defaults, validated, documented."""

from __future__ import annotations

import ast
import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest

from roundtrip.server.config import ENV_PREFIX, WorkerConfig, config_table, read_config_file

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def test_flag_wins_over_environment() -> None:
    config = WorkerConfig.from_sources(
        ["--max-batch-size", "4"], {"ROUNDTRIP_MAX_BATCH_SIZE": "16", "ROUNDTRIP_PORT": "6000"}
    )
    assert config.max_batch_size == 4
    assert config.port == 6000


def test_a_config_file_sets_knobs_under_the_environment_and_flags(tmp_path: Path) -> None:
    path = tmp_path / "worker.toml"
    path.write_text('max_batch_size = 8\nport = 7000\nhost = "0.0.0.0"\ndrain_grace_s = 3\n')
    config = WorkerConfig.from_sources(
        ["--config-file", str(path), "--max-batch-size", "2"], {"ROUNDTRIP_PORT": "6000"}
    )
    assert (config.max_batch_size, config.port, config.host) == (2, 6000, "0.0.0.0")
    assert config.drain_grace_s == 3.0
    from_env = WorkerConfig.from_sources([], {"ROUNDTRIP_CONFIG_FILE": str(path)})
    assert from_env.max_batch_size == 8


def file_with(tmp_path: Path, text: str) -> str:
    path = tmp_path / "worker.toml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--max-batch-size", "0"], "max_batch_size must be >= 1"),
        (["--port", "http"], "port: 'http' is not a valid int"),
        (["--warmup-shapes", "64x64"], "warmup_shapes"),
        (["--log-level", "LOUD"], "log_level"),
        (["--tls-cert-file", "/etc/hostname"], "tls_cert_file and tls_key_file"),
        (["--auth-token-file", "/nonexistent/token"], "auth_token_file: cannot read"),
        (["--auth-exempt", "health,metrics"], "auth_exempt: unknown service 'metrics'"),
        (["--audit-fraction", "1.5"], "audit_fraction must be within [0, 1]"),
        (["--event-loop", "trio"], "event_loop must be one of uvloop, asyncio (got trio)"),
        (["--config-file", "/nonexistent.toml"], "config_file: cannot read"),
        (["--config-file", "{tmp}/worker.toml"], "unknown setting 'max_batch'"),
    ],
)
def test_invalid_settings_stop_the_worker_with_a_clear_message(
    argv: list[str], message: str, tmp_path: Path
) -> None:
    file_with(tmp_path, "max_batch = 4\n")
    argv = [arg.format(tmp=tmp_path) for arg in argv]
    done = subprocess.run(
        [sys.executable, "-m", "roundtrip.server", *argv], capture_output=True, text=True
    )
    assert done.returncode == 2
    assert message in done.stderr


def test_readme_configuration_table_matches_the_code() -> None:
    assert config_table() in README.read_text()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('port = "50051"\n', "port = '50051'"),
        ("max_batch_size = true\n", "is not a valid int"),
        ("port = [\n", "is not valid TOML"),
    ],
)
def test_a_config_file_of_the_wrong_shape_is_refused(
    tmp_path: Path, text: str, message: str
) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        read_config_file(file_with(tmp_path, text))


def test_every_roundtrip_variable_the_manifests_and_image_set_is_a_knob() -> None:
    """A typo in a manifest would be silently ignored by the worker: catch it here."""
    known = {ENV_PREFIX + f.name.upper() for f in dataclasses.fields(WorkerConfig)}
    known.add(ENV_PREFIX + "CONFIG_FILE")
    files = [ROOT / "Dockerfile", *sorted((ROOT / "deploy").rglob("*.yaml"))]
    used = {
        (path.relative_to(ROOT).as_posix(), name)
        for path in files
        for name in re.findall(r"\b" + ENV_PREFIX + r"[A-Z0-9_]+", path.read_text())
    }
    assert used, "the manifests set no ROUNDTRIP_ variables at all?"
    assert [(path, name) for path, name in sorted(used) if name not in known] == []


#: Methods of WorkerConfig that read every field (validation, logging), so reading through
#: them says nothing about whether a knob does anything.
READ_ALL = {"__post_init__", "as_dict"}


def config_reads(tree: ast.AST) -> set[str]:
    """Attributes read off a ``config`` (``config.x``, ``self.config.x``) in ``tree``."""
    return {
        node.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and (
            (isinstance(node.value, ast.Name) and node.value.id == "config")
            or (isinstance(node.value, ast.Attribute) and node.value.attr in {"config", "_config"})
        )
    }


def test_every_knob_is_read_outside_config() -> None:
    """A knob only config.py reads does nothing (``drain_announce_s`` was such a knob).

    A knob counts as read when the worker's other modules read it off their ``config``,
    directly or through a WorkerConfig method that reads it (``warmup_pairs()`` reads
    ``warmup_shapes``).
    """
    package = ROOT / "server" / "roundtrip" / "server"
    read: set[str] = set()
    for module in package.rglob("*.py"):
        if module.name != "config.py":
            read |= config_reads(ast.parse(module.read_text()))
    [config_class] = [
        node
        for node in ast.parse((package / "config.py").read_text()).body
        if isinstance(node, ast.ClassDef) and node.name == "WorkerConfig"
    ]
    through_methods = {
        method.name: {
            node.attr
            for node in ast.walk(method)
            if isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id == "self"
        }
        for method in config_class.body
        if isinstance(method, ast.FunctionDef) and method.name not in READ_ALL
    }
    for method, fields in through_methods.items():
        if method in read:
            read |= fields
    knobs = {f.name for f in dataclasses.fields(WorkerConfig)}
    assert knobs - read == set(), "knobs nothing outside config.py reads"
