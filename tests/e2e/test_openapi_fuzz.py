"""Schemathesis against our own OpenAPI: generated requests never get a 500 and every response matches its schema.

The platform runs as a separate `kneo service serve` process (schemathesis drives it with blocking calls).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from tests.conftest import ROOT, Servers, free_port, wait_ready

pytestmark = pytest.mark.slow
EXAMPLES = int(os.environ.get("KNEO_FUZZ_EXAMPLES", "25"))


@pytest.fixture(scope="module")
def served_url(servers: Servers, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    tag = os.urandom(4).hex()
    env = {k: v for k, v in os.environ.items() if not k.startswith("KNEO_")}
    env.update(
        KNEO_NATS_URL=servers.nats_url,
        KNEO_DATABASE_URL=servers.database_url,
        KNEO_DATABASE_SCHEMA=f"fuzz_{tag}",
        KNEO_BUS_PREFIX=f"F{tag}",
        KNEO_SERV_REQUEST_LOGS="false",
        KNEO_SERV_SYNC_WAIT_SECONDS="5",
        KNEO_SERV_SPEC_ROOT=str(ROOT),
    )
    log = tmp_path_factory.mktemp("fuzz") / "serve.log"
    kneo = shutil.which("kneo", path=str(Path(sys.executable).parent)) or "kneo"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [kneo, "service", "serve", "--port", str(port)],
            env=env,
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc, log)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_api_conforms_to_its_openapi(served_url: str) -> None:
    """Every operation, fuzzed with schemathesis' default checks (no 5xx, status codes, content types, schemas)."""
    api = schemathesis.openapi.from_url(f"{served_url}/openapi.json")
    failures: list[str] = []
    tested = 0
    calls = [0]
    for result in api.get_all_operations():
        operation = result.ok()
        tested += 1

        @given(case=operation.as_strategy())
        @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def check(case: schemathesis.Case) -> None:
            # Our request rules go beyond JSON Schema (spec or spec_path, a readable file, valid YAML), so a
            # schema-valid request may rightly get 400: that check alone is excluded.
            calls[0] += 1
            case.call_and_validate(timeout=30, excluded_checks=[positive_data_acceptance])

        try:
            check()
        except Exception as exc:  # collect every operation's failure, then report them all
            failures.append(f"{operation.method.upper()} {operation.path}: {exc}")
    assert tested >= 15 and calls[0] >= 10 * tested, (tested, calls[0])
    assert not failures, "\n\n".join(failures)
