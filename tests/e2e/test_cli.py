"""The CLI as a user runs it: `kneo service serve` on embedded servers, a second process reusing them,
`kneo run` locally and against the service, clean shutdown, one-line errors."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import ROOT, free_port, wait_ready

pytestmark = pytest.mark.slow
KNEO = shutil.which("kneo", path=str(Path(sys.executable).parent)) or "kneo"


@pytest.fixture
def cli_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KNEO_")}
    env.update(
        KNEO_DATA_DIR=str(tmp_path / "data"),
        KNEO_EMBEDDED_NATS_PORT=str(free_port()),
        KNEO_EMBEDDED_PG_PORT=str(free_port()),
        KNEO_SERV_REQUEST_LOGS="false",
        NO_COLOR="1",
        COLUMNS="200",
    )
    return env


def kneo(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [KNEO, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
    )


def _server_pids(data: Path) -> list[int]:
    pids = []
    for name in ("nats", "pg"):
        f = data / name / "kneo-server.json"
        if f.exists():
            pids.append(int(json.loads(f.read_text())["pid"]))
    return pids


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purposes
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.fixture
def served(cli_env: dict[str, str], tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[str], dict[str, str]]]:
    port = free_port()
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen(
        [KNEO, "service", "serve", "--port", str(port)],
        env=cli_env,
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    log.close()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc, tmp_path / "serve.log")
    except AssertionError:
        proc.kill()
        raise
    try:
        yield url, proc, cli_env
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


def test_serve_run_reuse_and_clean_shutdown(served: tuple[str, subprocess.Popen[str], dict[str, str]]) -> None:
    url, proc, env = served
    data = Path(env["KNEO_DATA_DIR"])
    pids = _server_pids(data)
    assert len(pids) == 2 and all(_alive(p) for p in pids)

    # against the service
    res = kneo(env, "run", "examples/research_agent.yaml", "--input", "hello", "--json", "--service-url", url)
    assert res.returncode == 0, res.stderr
    body = json.loads(res.stdout)
    assert body["status"] == "succeeded" and body["visited_steps"] == ["retrieve", "analyze", "summarize"]
    got = json.loads(kneo(env, "runs", "get", body["run_id"], "--json", "--service-url", url).stdout)
    assert got["run_id"] == body["run_id"] and got["status"] == "succeeded"
    listed = json.loads(kneo(env, "runs", "list", "--json", "--service-url", url).stdout)
    assert body["run_id"] in [r["run_id"] for r in listed["runs"]]
    events = json.loads(kneo(env, "runs", "events", body["run_id"], "--json", "--service-url", url).stdout)
    assert events["events"][-1]["type"] == "run.succeeded"
    missing = kneo(env, "runs", "get", "run_nope", "--service-url", url)
    assert missing.returncode == 4 and "not_found" in missing.stderr

    # a second process on the same data dir reuses the running servers and leaves them running
    local = kneo(env, "run", "examples/research_agent.yaml", "--input", "again", "--follow")
    assert local.returncode == 0, local.stderr
    assert "▸ retrieve" in local.stdout and "status  succeeded" in local.stdout
    assert _server_pids(data) == pids and all(_alive(p) for p in pids)
    # both runs are in the one shared log
    listed = json.loads(kneo(env, "runs", "list", "--json", "--service-url", url).stdout)
    assert listed["total"] == 2

    # Ctrl-C stops the platform and the embedded servers it started
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) == 0
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(p) for p in pids)


def test_data_survives_a_restart(cli_env: dict[str, str]) -> None:
    first = kneo(cli_env, "run", "examples/research_agent.yaml", "--input", "persist", "--json")
    assert first.returncode == 0, first.stderr
    run_id = json.loads(first.stdout)["run_id"]
    rebuilt = kneo(cli_env, "service", "rebuild-projections", "runs")
    assert rebuilt.returncode == 0 and "1 runs" in rebuilt.stderr
    again = kneo(cli_env, "run", "examples/research_agent.yaml", "--input", "second", "--json")
    assert again.returncode == 0
    data = Path(cli_env["KNEO_DATA_DIR"])
    assert not _server_pids(data) or not any(_alive(p) for p in _server_pids(data))
    # restart the platform once more and read the first run back over HTTP
    port = free_port()
    proc = subprocess.Popen(
        [KNEO, "service", "serve", "--port", str(port)],
        env=cli_env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                resp = httpx.get(f"http://127.0.0.1:{port}/v1/runs/{run_id}", timeout=1)
                if resp.status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        assert resp.json()["status"] == "succeeded"
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0


def test_taken_port_is_a_one_line_error(cli_env: dict[str, str]) -> None:
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        env: dict[str, Any] = {**cli_env, "KNEO_EMBEDDED_NATS_PORT": str(port)}
        res = kneo(env, "service", "serve", "--port", str(free_port()), timeout=60)
    assert res.returncode != 0
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, res.stderr
    assert str(port) in lines[0] and "KNEO_EMBEDDED_NATS_PORT" in lines[0]


def test_unreachable_service_names_the_url(cli_env: dict[str, str]) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    res = kneo(cli_env, "runs", "list", "--service-url", url)
    assert res.returncode == 5
    assert url in res.stderr and "kneo service serve" in res.stderr


def test_service_run_requires_urls(cli_env: dict[str, str]) -> None:
    res = kneo(cli_env, "service", "run", "runner", timeout=30)
    assert res.returncode != 0 and "KNEO_NATS_URL" in res.stderr
    bad = kneo(cli_env, "service", "run", "nope", timeout=30)
    assert bad.returncode == 2 and "gateway" in bad.stderr


def test_unreachable_servers_are_one_line_errors(cli_env: dict[str, str]) -> None:
    dead = free_port()
    env = {
        **cli_env,
        "KNEO_NATS_URL": f"nats://127.0.0.1:{dead}",
        "KNEO_NATS_CONNECT_TIMEOUT_SECONDS": "2",
        "KNEO_DATABASE_URL": f"postgresql://kneo:secret@127.0.0.1:{free_port()}/kneo",
    }
    res = kneo(env, "service", "run", "runner", timeout=60)
    assert res.returncode == 5, res.stderr
    assert res.stderr.strip().count("\n") == 0
    assert "cannot reach PostgreSQL" in res.stderr and "secret" not in res.stderr and "KNEO_DATABASE_URL" in res.stderr


def test_spec_commands_locally_and_through_the_service(
    served: tuple[str, subprocess.Popen[str], dict[str, str]], tmp_path: Path
) -> None:
    url, _, env = served
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: v1\nagent:\n  name: a\n  tools: [nonexistent_tool]\n")
    for extra in ([], ["--service-url", url]):
        ok = kneo(env, "spec", "validate", "examples/research_agent.yaml", "--env", "prod", "--json", *extra)
        assert ok.returncode == 0, ok.stderr
        assert json.loads(ok.stdout)["valid"] is True
        no = kneo(env, "spec", "validate", str(bad), "--json", *extra)
        assert no.returncode == 1
        assert "E_UNKNOWN_TOOL" in [d["code"] for d in json.loads(no.stdout)["diagnostics"]]
        plan = kneo(env, "spec", "compile", "examples/research_agent.yaml", "--json", *extra)
        assert plan.returncode == 0 and json.loads(plan.stdout)["hash"].startswith("sha256:")
        report = kneo(env, "spec", "policy-report", "examples/research_agent.yaml", "--json", *extra)
        assert report.returncode == 0 and set(json.loads(report.stdout)) == {"valid", "report"}
    lint = kneo(env, "spec", "lint", "examples/legacy_agent.yaml", "--json")
    assert lint.returncode == 1 and json.loads(lint.stdout)["warning_count"] >= 1


def test_run_honours_the_project_policy(cli_env: dict[str, str], tmp_path: Path) -> None:
    project = tmp_path / "proj"
    (project / ".kneo").mkdir(parents=True)
    (project / ".kneo" / "config.yaml").write_text(
        "name: demo\nenvironments:\n  prod:\n    policy_enforcement:\n      enabled: true\n      require_guardrails: true\n"
    )
    spec = project / "plain.yaml"
    spec.write_text(
        "version: v1\nagent: {name: a, model: {provider: dummy}}\n"
        "workflow: {name: w, kind: sequential, steps: [{id: one}]}\n"
    )
    env = {**cli_env, "KNEO_PROJECT_CONFIG": str(project / ".kneo" / "config.yaml")}
    refused = kneo(env, "run", str(spec), "--input", "x", "--env", "prod", "--service-url", "http://127.0.0.1:9")
    assert refused.returncode == 1 and "E_POLICY_GUARDRAILS" in refused.stdout + refused.stderr
    assert "nothing was run" in refused.stderr
