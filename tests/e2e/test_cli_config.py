"""`kneo config …` and `--profile` as a user runs them (the CLI as a subprocess), and the SDK's ServiceClient with
its retries against the real platform and against a small flaky server.

Every CLI output is checked for the API keys it must never print."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import stat
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from kneo_client import (
    AsyncServiceClient,
    ConflictError,
    NotFoundError,
    ServiceClient,
    ServiceUnavailable,
    ValidationError,
)
from tests.conftest import ROOT, free_port, wait_ready
from tests.e2e.test_cli import KNEO

pytestmark = pytest.mark.slow
SECRET = "sk-profile-secret-7f3a9c"
OTHER_SECRET = "sk-openai-secret-55e1"
SPEC = "examples/research_agent.yaml"


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("KNEO_") and not k.endswith("_API_KEY")}
    base.update(
        KNEO_SERV_PROFILES_PATH=str(tmp_path / "profiles" / "profiles.json"),
        KNEO_DATA_DIR=str(tmp_path / "data"),
        KNEO_EMBEDDED_NATS_PORT=str(free_port()),
        KNEO_EMBEDDED_PG_PORT=str(free_port()),
        KNEO_SERV_REQUEST_LOGS="false",
        KNEO_SERV_CLIENT_RETRY_BACKOFF_SECONDS="0.01",
        NO_COLOR="1",
        COLUMNS="200",
    )
    return base


class Cli:
    """Runs `kneo` and checks that no secret ever appears in what it prints."""

    def __init__(self, env: dict[str, str], cwd: Path, secrets: tuple[str, ...] = (SECRET, OTHER_SECRET)) -> None:
        self.env, self.cwd, self.secrets = env, cwd, secrets

    def __call__(self, *args: str, extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        res = subprocess.run(
            [KNEO, *args],
            env={**self.env, **(extra_env or {})},
            cwd=self.cwd,
            capture_output=True,
            text=True,
            timeout=120,
            stdin=subprocess.DEVNULL,
        )
        for secret in self.secrets:
            assert secret not in res.stdout + res.stderr, f"kneo {' '.join(args)} printed a secret"
        return res

    def json(self, *args: str, extra_env: dict[str, str] | None = None) -> Any:
        res = self(*args, "--json", extra_env=extra_env)
        assert res.returncode == 0, res.stderr
        return json.loads(res.stdout)


def test_profile_commands(env: dict[str, str], tmp_path: Path) -> None:
    kneo = Cli(env, tmp_path)
    path = Path(env["KNEO_SERV_PROFILES_PATH"])
    assert kneo.json("config", "profile", "list") == {"active": None, "profiles": [], "count": 0, "path": str(path)}

    local = kneo.json(
        "config", "profile", "set", "local", "--service-url", "http://127.0.0.1:8000/", "--api-key", SECRET
    )
    assert local["api_key"] == "***REDACTED***" and local["authenticated"] is True and local["active"] is True
    assert local["service_url"] == "http://127.0.0.1:8000"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert json.loads(path.read_text())["profiles"]["local"]["api_key"] == SECRET  # stored, as asked

    staging = kneo.json(
        "config", "profile", "set", "staging", "--service-url", "https://staging.example.com",
        "--api-key-env", "STAGING_KEY", "--no-activate",
    )  # fmt: skip
    assert staging["active"] is False and staging["authenticated"] is False and staging["api_key"] is None
    assert "api_key" not in json.loads(path.read_text())["profiles"]["staging"]

    listed = kneo.json("config", "profile", "list", extra_env={"STAGING_KEY": OTHER_SECRET})
    assert listed["active"] == "local" and [p["name"] for p in listed["profiles"]] == ["local", "staging"]
    assert [p["authenticated"] for p in listed["profiles"]] == [True, True]
    table = kneo("config", "profile", "list")
    assert "* local" in table.stdout and "staging" in table.stdout and "no API key" in table.stdout

    shown = kneo.json("config", "profile", "show")
    assert shown["name"] == "local" and shown["api_key"] == "***REDACTED***"
    text = kneo("config", "profile", "show", "--name", "staging", extra_env={"STAGING_KEY": OTHER_SECRET})
    assert text.returncode == 0 and "STAGING_KEY" in text.stdout

    used = kneo.json("config", "profile", "use", "staging")
    assert used["active"] is True and json.loads(path.read_text())["active"] == "staging"
    missing = kneo("config", "profile", "use", "nope")
    assert missing.returncode == 2 and "no service profile named 'nope'" in missing.stderr
    assert kneo("config", "profile", "set", "bad name", "--service-url", "http://x").returncode == 2
    assert kneo("config", "profile", "set", "x", "--service-url", "ftp://x").returncode == 2
    unknown = kneo("runs", "list", "--profile", "nope")
    assert unknown.returncode == 2 and "nope" in unknown.stderr

    deleted = kneo.json("config", "profile", "delete", "staging")
    assert deleted == {"deleted": "staging", "was_active": True}
    assert kneo.json("config", "profile", "list")["active"] is None
    assert kneo("config", "profile", "show").returncode == 1


def test_project_config_commands(env: dict[str, str], tmp_path: Path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(ROOT / SPEC, project / "agent.yaml")
    kneo = Cli(env, project)
    kneo("config", "profile", "set", "local", "--service-url", "http://127.0.0.1:9", "--api-key", SECRET)

    assert kneo("config", "show").returncode == 1  # no project yet
    init = kneo.json("config", "init", "--name", "research-agent-demo")
    config = project / ".kneo" / "config.yaml"
    assert init["path"] == str(config) and config.is_file()
    assert (project / ".kneo" / "artifacts" / ".gitkeep").exists() and (
        project / ".kneo" / "logs" / ".gitkeep"
    ).exists()
    again = kneo("config", "init")
    assert again.returncode == 1 and "--force" in again.stderr
    assert kneo("config", "init", "--force", "--name", "renamed").returncode == 0

    shown = kneo.json("config", "show")
    assert shown["path"] == str(config) and shown["config"]["name"] == "renamed"
    assert set(shown["config"]["environments"]) == {"dev", "staging", "prod"}
    assert "renamed" in kneo("config", "show").stdout

    resolved = kneo.json("config", "resolve", "--env", "prod", "--spec", "agent.yaml")
    assert resolved["environment"] == "prod" and resolved["environment_source"] == "--env"
    assert resolved["overlay"] == {"metadata": {"tier": "prod"}}
    assert resolved["policy_enforcement"]["require_human_review"] is True
    assert resolved["spec"] == {"path": "agent.yaml", "exists": True}
    assert resolved["service"]["service_url"] == "http://127.0.0.1:9"
    assert resolved["service"]["authenticated"] is True and resolved["service"]["api_key"] == "***REDACTED***"
    default_env = kneo.json("config", "resolve", extra_env={"KNEO_ENV": "staging"})
    assert (default_env["environment"], default_env["environment_source"]) == ("staging", "KNEO_ENV")
    assert kneo.json("config", "resolve")["environment"] == "dev"  # the project's default_environment

    inventory = kneo.json("config", "secrets", "--env", "prod", extra_env={"OPENAI_API_KEY": OTHER_SECRET})
    assert inventory["environment"] == "prod"
    refs = inventory["inventory"]
    assert refs["providers"]["openai"] == {
        "name": "provider:openai", "env_var": "OPENAI_API_KEY", "present": True, "value": "***REDACTED***",
    }  # fmt: skip
    assert refs["providers"]["anthropic"]["present"] is False and refs["providers"]["anthropic"]["value"] is None
    assert refs["profiles"]["local"]["stored"] is True and refs["profiles"]["local"]["value"] == "***REDACTED***"
    assert refs["service"]["api_key"]["env_var"] == "KNEO_SERV_API_KEY"
    assert "OPENAI_API_KEY" in kneo("config", "secrets", extra_env={"OPENAI_API_KEY": OTHER_SECRET}).stdout

    out = project / "rendered" / "prod.yaml"
    rendered = kneo.json("config", "render-spec", "-o", str(out), "--env", "prod", "--spec", "agent.yaml")
    assert rendered == {"output": str(out), "environment": "prod"}
    assert "tier: prod" in out.read_text()
    dev = kneo("config", "render-spec", "-o", "dev.yaml", "--spec", "agent.yaml")
    assert dev.returncode == 0 and "tier:" not in (project / "dev.yaml").read_text()
    assert kneo("config", "render-spec", "-o", "x.yaml").returncode == 2  # no --spec and no default_spec


# ----------------------------------------------------------------------------- against an authenticated service


@pytest.fixture
def authed(env: dict[str, str], tmp_path: Path) -> Iterator[str]:
    """`kneo service serve` with API keys required (operator: SECRET)."""
    port = free_port()
    log_path = tmp_path / "serve.log"
    server_env = {**env, "KNEO_SERV_AUTH_ENABLED": "true", "KNEO_SERV_API_KEYS": f"operator:{SECRET}:operator"}
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [KNEO, "service", "serve", "--port", str(port)],
            env=server_env,
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc, log_path)
        yield url
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def test_profiles_reach_an_authenticated_service(env: dict[str, str], authed: str) -> None:
    url = authed
    kneo = Cli(env, ROOT)

    # 401s say which key was read
    none = kneo("runs", "list", "--service-url", url)
    assert none.returncode == 3 and "no API key was sent" in none.stderr and "KNEO_API_KEY" in none.stderr
    wrong = kneo("runs", "list", "--service-url", url, extra_env={"KNEO_SERV_API_KEY": "nope"})
    assert wrong.returncode == 3 and "KNEO_SERV_API_KEY" in wrong.stderr
    ok = kneo("runs", "list", "--service-url", url, extra_env={"KNEO_API_KEY": SECRET})
    assert ok.returncode == 0, ok.stderr

    # a profile that reads its key from a variable
    kneo("config", "profile", "set", "prod", "--service-url", url, "--api-key-env", "PROD_KEY", "--no-activate")
    with_key = {"PROD_KEY": SECRET}
    unset = kneo("runs", "list", "--profile", "prod")
    assert unset.returncode == 3 and "no API key was sent with profile 'prod'" in unset.stderr
    bad = kneo("runs", "list", "--profile", "prod", extra_env={"PROD_KEY": "wrong"})
    assert bad.returncode == 3 and "PROD_KEY" in bad.stderr

    run = kneo.json("run", SPEC, "--input", "hello", "--profile", "prod", extra_env=with_key)
    assert run["status"] == "succeeded"
    got = kneo.json("runs", "get", run["run_id"], "--profile", "prod", extra_env=with_key)
    assert got["run_id"] == run["run_id"]
    listed = kneo.json("runs", "list", "--profile", "prod", extra_env=with_key)
    assert run["run_id"] in [r["run_id"] for r in listed["runs"]]
    events = kneo.json("runs", "events", run["run_id"], "--profile", "prod", extra_env=with_key)
    assert events["events"][-1]["type"] == "run.succeeded"
    watched = kneo("runs", "watch", run["run_id"], "--profile", "prod", extra_env=with_key)
    assert watched.returncode == 0 and "run.succeeded" in watched.stdout
    assert kneo.json("human", "list", "--profile", "prod", extra_env=with_key)["tasks"] == []
    assert kneo("human", "get", "cont_nope", "--profile", "prod", extra_env=with_key).returncode == 4
    assert "events" in kneo.json("audit", "list", "--profile", "prod", extra_env=with_key)
    valid = kneo.json("spec", "validate", SPEC, "--profile", "prod", extra_env=with_key)
    assert valid["valid"] is True
    denied = kneo("spec", "validate", SPEC, "--profile", "prod")
    assert denied.returncode == 3

    # a stored key and the active profile: no flags needed
    kneo("config", "profile", "set", "stored", "--service-url", url, "--api-key", SECRET)
    assert kneo.json("runs", "get", run["run_id"])["status"] == "succeeded"
    status = kneo("service", "status")
    assert status.returncode == 0, status.stderr
    # an environment key overrides the active profile's stored key
    overridden = kneo("runs", "get", run["run_id"], extra_env={"KNEO_API_KEY": "wrong"})
    assert overridden.returncode == 3 and "KNEO_API_KEY" in overridden.stderr


# ----------------------------------------------------------------------------- the SDK


FAST_SPEC = """
version: v1
agent: {name: fast-agent, model: {provider: dummy, name: d}}
workflow: {name: two, kind: sequential, steps: [{id: one, prompt: "first {input}"}, {id: two, prompt: "then"}]}
"""


async def test_service_client_against_the_platform(platform: Any) -> None:
    def work() -> dict[str, Any]:
        with ServiceClient(platform.url, retry_backoff_seconds=0.01) as client:
            assert client.health()["ok"] is True
            run = client.create_run(input="hello", spec=FAST_SPEC)
            assert run["status"] == "succeeded"
            assert client.get_run(run["run_id"])["visited_steps"] == ["one", "two"]
            assert run["run_id"] in [r["run_id"] for r in client.list_runs(limit=50)["runs"]]
            assert client.run_events(run["run_id"])["events"][-1]["type"] == "run.succeeded"
            streamed = [ev.event for ev in client.stream_run(run["run_id"])]
            assert streamed[-1] == "run.succeeded"
            assert client.validate_spec(FAST_SPEC)["valid"] is True
            with pytest.raises(NotFoundError) as missing:
                client.get_run("run_nope")
            assert missing.value.code == "not_found" and missing.value.body["error"] == "not_found"
            with pytest.raises(ValidationError) as invalid:
                client.list_runs(sort_order="sideways")
            assert invalid.value.status in (400, 422)
        # one stable Idempotency-Key: the same request is answered once, a different one is a conflict
        with ServiceClient(platform.url, idempotency_key="fixed-key-1") as client:
            first = client.create_run(input="same", spec=FAST_SPEC)
            second = client.create_run(input="same", spec=FAST_SPEC)
            assert first["run_id"] == second["run_id"]
            with pytest.raises(ConflictError) as conflict:
                client.create_run(input="different", spec=FAST_SPEC)
            assert conflict.value.code == "idempotency_key_conflict"
        return run

    # the blocking client runs its own loop on a thread; this test's loop keeps serving the platform meanwhile
    run = await asyncio.to_thread(work)
    async with AsyncServiceClient(platform.url) as client:
        assert (await client.get_run(run["run_id"]))["status"] == "succeeded"
        with pytest.raises(NotFoundError):
            await client.get_human_task("cont_nope")


class Flaky:
    """A small HTTP server that answers 503 ``failures`` times per path, then 200; it records every request."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.seen: list[tuple[str, str, str | None]] = []
        flaky = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(length)
                flaky.seen.append((self.command, self.path, self.headers.get("Idempotency-Key")))
                count = sum(1 for _, p, _ in flaky.seen if p == self.path)
                status = 503 if count <= flaky.failures else 200
                body = (
                    {"error": "not_ready", "message": "warming up"}
                    if status == 503
                    else {"run_id": "run_flaky", "status": "succeeded"}
                )
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = _answer

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Flaky:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


def test_retries_against_a_flaky_server(env: dict[str, str], tmp_path: Path) -> None:
    with Flaky(failures=2) as flaky, ServiceClient(flaky.url, retries=2, retry_backoff_seconds=0.01) as client:
        assert client.get_run("run_flaky")["status"] == "succeeded"
        assert [m for m, p, _ in flaky.seen] == ["GET"] * 3
        flaky.seen.clear()
        assert client.cancel_run("run_flaky")["run_id"] == "run_flaky"
        keys = [k for _, _, k in flaky.seen]
        assert len(keys) == 3 and keys[0] and len(set(keys)) == 1  # one key, sent with every attempt

    with Flaky(failures=5) as flaky, ServiceClient(flaky.url, retries=1, retry_backoff_seconds=0.01) as client:
        with pytest.raises(ServiceUnavailable) as spent:
            client.get_run("run_flaky")
        assert spent.value.code == "not_ready" and spent.value.retryable and len(flaky.seen) == 2

    dead = f"http://127.0.0.1:{free_port()}"
    with ServiceClient(dead, retries=1, retry_backoff_seconds=0.01) as client, pytest.raises(httpx.ConnectError):
        client.get_run("run_x")

    # the CLI retries the same way (KNEO_SERV_CLIENT_RETRIES), and without retries shows the 503 as one line
    with Flaky(failures=2) as flaky:
        res = Cli(env, tmp_path)("runs", "get", "run_flaky", "--service-url", flaky.url, "--json")
        assert res.returncode == 0, res.stderr
        assert json.loads(res.stdout)["status"] == "succeeded" and len(flaky.seen) == 3
    with Flaky(failures=2) as flaky:
        res = Cli(env, tmp_path)(
            "runs", "get", "run_flaky", "--service-url", flaky.url, extra_env={"KNEO_SERV_CLIENT_RETRIES": "0"}
        )
        assert res.returncode == 1 and "503 not_ready" in res.stderr and len(flaky.seen) == 1
    bad = Cli(env, tmp_path)("runs", "get", "x", "--service-url", dead, extra_env={"KNEO_SERV_CLIENT_RETRIES": "-1"})
    assert bad.returncode == 2 and "KNEO_SERV_CLIENT_RETRIES" in bad.stderr
    gone = Cli(env, tmp_path)("runs", "get", "x", "--service-url", dead)
    assert gone.returncode == 5 and f"no service answers at {dead}" in gone.stderr
