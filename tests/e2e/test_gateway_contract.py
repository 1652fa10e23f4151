"""The gateway contract: auth and scopes, envelopes, idempotency, rate limits, request ids and logs, health,
credentials inventory, environment policies, OpenAPI."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from tests.conftest import free_port

SPEC = """
version: v1
agent: {name: a, model: {provider: dummy, params: {chunks: 2}}}
workflow: {name: w, kind: sequential, steps: [{id: one}, {id: two}]}
"""
KEYS = "operator:op-token:operator;reviewer:rev-token:reviewer;viewer:view-token:viewer;ci:ci-token:service;reader:read-token:runs:read"
ADMIN = "admin-token"


async def _authed(platform_factory: Any, **extra: Any) -> Any:
    return await platform_factory(api_keys=SecretStr(KEYS), admin_api_key=SecretStr(ADMIN), **extra)


def h(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_auth_off_by_default_everything_open(platform: Any) -> None:
    async with httpx.AsyncClient(base_url=platform.url, timeout=30) as http:
        assert (await http.get("/v1/runs")).status_code == 200
        resp = await http.post("/v1/runs", json={"input": "x", "spec": SPEC})
        assert resp.status_code == 200
        events = (await http.get(f"/v1/runs/{resp.json()['run_id']}/events")).json()["events"]
    assert events[0]["metadata"]["actor"] == "anonymous"


ROUTES = [
    ("GET", "/v1/runs", None, "runs:read"),
    ("POST", "/v1/runs", {"input": "x", "spec": SPEC, "async_mode": True}, "runs:write"),
    ("GET", "/v1/security/credentials", None, "credentials:read"),
    ("GET", "/v1/policies/environment", None, "policies:read"),
    ("GET", "/v1/policies/environment/prod", None, "policies:read"),
    ("PUT", "/v1/policies/environment/qa", {"enabled": True}, "policies:write"),
]
ROLE_TOKENS = {
    "admin": ADMIN,
    "operator": "op-token",
    "reviewer": "rev-token",
    "viewer": "view-token",
    "service": "ci-token",
    "runs-reader": "read-token",
}
ROLE_SCOPES = {
    "admin": {"runs:read", "runs:write", "credentials:read", "policies:read", "policies:write"},
    "operator": {"runs:read", "runs:write", "credentials:read", "policies:read", "policies:write"},
    "reviewer": {"runs:read"},
    "viewer": {"runs:read"},
    "service": {"runs:read", "runs:write", "credentials:read", "policies:read"},
    "runs-reader": {"runs:read"},
}


async def test_every_role_against_every_route(platform_factory: Any) -> None:
    p = await _authed(platform_factory)
    async with httpx.AsyncClient(base_url=p.url, timeout=30) as http:
        for method, path, body, scope in ROUTES:
            none = await http.request(method, path, json=body)
            assert none.status_code == 401, (method, path)
            assert none.json()["error"] == "unauthorized" and none.json()["message"]
            bad = await http.request(method, path, json=body, headers=h("wrong-token"))
            assert bad.status_code == 401 and "wrong-token" not in bad.text
            for role, token in ROLE_TOKENS.items():
                resp = await http.request(method, path, json=body, headers=h(token))
                if scope in ROLE_SCOPES[role]:
                    assert resp.status_code in (200, 202), (role, method, path, resp.text)
                else:
                    assert resp.status_code == 403, (role, method, path, resp.status_code)
                    assert resp.json() == {
                        "error": "forbidden",
                        "required_scope": scope,
                        "message": resp.json()["message"],
                    }
                    assert token not in resp.text
        # the other header, and the open health routes
        assert (await http.get("/v1/runs", headers={"X-Kneo-Api-Key": "view-token"})).status_code == 200
        for open_path in ("/livez", "/readyz", "/healthz", "/"):
            assert (await http.get(open_path)).status_code == 200, open_path


async def test_actor_is_the_key_name_and_sse_takes_access_token(platform_factory: Any) -> None:
    p = await _authed(platform_factory)
    async with httpx.AsyncClient(base_url=p.url, timeout=30) as http:
        run = (await http.post("/v1/runs", json={"input": "x", "spec": SPEC}, headers=h("op-token"))).json()
        events = (await http.get(f"/v1/runs/{run['run_id']}/events", headers=h("view-token"))).json()["events"]
        assert events[0]["metadata"]["actor"] == "operator"
        stream = await http.get(f"/v1/runs/{run['run_id']}/stream?access_token=view-token")
        assert stream.status_code == 200 and "event: run.succeeded" in stream.text
        assert (await http.get(f"/v1/runs/{run['run_id']}?access_token=view-token")).status_code == 401


async def test_malformed_key_config_is_a_startup_error(platform_factory: Any) -> None:
    with pytest.raises(Exception, match="KNEO_SERV_API_KEYS"):
        await platform_factory(api_keys=SecretStr("broken-entry"))


async def test_idempotency_replays_conflicts_and_races(platform: Any) -> None:
    store = platform.kernel.store
    body = {"input": "once", "spec": SPEC}
    async with httpx.AsyncClient(base_url=platform.url, timeout=60) as http:
        first = await http.post("/v1/runs", json=body, headers={"Idempotency-Key": "k-1"})
        again = await http.post("/v1/runs", json=body, headers={"Idempotency-Key": "k-1"})
        assert first.status_code == again.status_code == 200
        assert again.json() == first.json() and again.headers["idempotent-replayed"] == "true"
        other = await http.post("/v1/runs", json={**body, "input": "twice"}, headers={"Idempotency-Key": "k-1"})
        assert other.status_code == 409 and other.json()["error"] == "idempotency_key_conflict"
        racers = await asyncio.gather(
            *(
                http.post("/v1/runs", json={**body, "async_mode": True}, headers={"Idempotency-Key": "k-race"})
                for _ in range(10)
            )
        )
        assert {r.json()["run_id"] for r in racers} == {racers[0].json()["run_id"]}
        assert await store.pool.fetchval("SELECT count(*) FROM runs") == 2
        # a bad request doesn't burn the key: fixing the payload still works
        bad = await http.post("/v1/runs", json={"input": "x"}, headers={"Idempotency-Key": "k-fix"})
        assert bad.status_code == 400
        fixed = await http.post("/v1/runs", json=body, headers={"Idempotency-Key": "k-fix"})
        assert fixed.status_code == 200 and fixed.json()["run_id"] != first.json()["run_id"]
        # records expire after the window
        await store.pool.execute("UPDATE idempotency_records SET created_at = created_at - interval '25 hours'")
        later = await http.post("/v1/runs", json=body, headers={"Idempotency-Key": "k-1"})
        assert later.status_code == 200 and later.json()["run_id"] != first.json()["run_id"]
        too_long = await http.post("/v1/runs", json=body, headers={"Idempotency-Key": "k" * 300})
        assert too_long.status_code == 400 and too_long.json()["field"] == "Idempotency-Key"


async def test_rate_limit_budget_is_shared_by_two_gateway_processes(platform_factory: Any, spawn_service: Any) -> None:
    limits = {"rate_limit": "4/3600", "rate_limits": "viewer=6/3600;operator=off"}
    a = await _authed(platform_factory, **limits)
    port = free_port()
    other = spawn_service(
        "gateway",
        "--port",
        str(port),
        KNEO_SERV_API_KEYS=KEYS,
        KNEO_SERV_ADMIN_API_KEY=ADMIN,
        KNEO_SERV_RATE_LIMIT="4/3600",
        KNEO_SERV_RATE_LIMITS="viewer=6/3600;operator=off",
    )
    b_url = f"http://127.0.0.1:{port}"
    async with httpx.AsyncClient(timeout=30) as http:
        for _ in range(200):
            try:
                if (await http.get(f"{b_url}/livez")).status_code == 200:
                    break
            except httpx.TransportError:
                await asyncio.sleep(0.1)
        assert other.poll() is None
        statuses = []
        for i in range(8):
            resp = await http.get(f"{(a.url, b_url)[i % 2]}/v1/runs", headers=h("view-token"))
            statuses.append(resp.status_code)
            if resp.status_code == 200:
                assert resp.headers["x-ratelimit-limit"] == "6"
                assert int(resp.headers["x-ratelimit-remaining"]) == 6 - (i + 1)
                assert int(resp.headers["x-ratelimit-reset"]) > 0
            else:
                assert resp.json()["error"] == "rate_limited"
                assert int(resp.headers["retry-after"]) >= 1 and resp.headers["x-ratelimit-remaining"] == "0"
        assert statuses == [200] * 6 + [429] * 2
        ci = [await http.get(f"{a.url}/v1/runs", headers=h("ci-token")) for _ in range(5)]
        assert [r.status_code for r in ci] == [200] * 4 + [429]
        op = [await http.get(f"{b_url}/v1/runs", headers=h("op-token")) for _ in range(6)]
        assert {r.status_code for r in op} == {200} and "x-ratelimit-limit" not in op[0].headers


async def test_request_ids_and_one_redacted_log_record_per_request(
    platform_factory: Any, caplog: pytest.LogCaptureFixture
) -> None:
    p = await _authed(platform_factory, request_logs=True)
    caplog.set_level(logging.INFO, logger="kneo.service")
    async with httpx.AsyncClient(base_url=p.url, timeout=30) as http:
        given = await http.get("/v1/runs", headers={**h("op-token"), "X-Request-ID": "req-123"})
        made = await http.get("/livez")
        run = await http.post(
            "/v1/runs",
            json={"input": "mail me at a@b.example", "spec": SPEC},
            headers={**h("op-token"), "X-Request-ID": "req-run"},
        )
    assert given.headers["x-request-id"] == "req-123" and len(made.headers["x-request-id"]) == 32
    records = [r for r in caplog.records if r.name == "kneo.service"]
    logs = [r.fields for r in records if getattr(r, "fields", None)]
    mine = [r for r in logs if r["request_id"] == "req-123"]
    assert len(mine) == 1 and mine[0]["event"] == "http_request" and mine[0]["status"] == 200
    assert mine[0]["method"] == "GET" and mine[0]["path"] == "/v1/runs" and "duration_ms" in mine[0]
    run_log = next(r for r in logs if r["request_id"] == "req-run")
    assert run_log["run_id"] == run.json()["run_id"] and run_log["actor"] == "operator"
    assert not any("op-token" in str(r.fields) for r in records)


async def test_credentials_inventory_is_redacted_and_audited(platform: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-secret-value-123456")
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    async with httpx.AsyncClient(base_url=platform.url, timeout=30) as http:
        resp = await http.get("/v1/security/credentials?providers=openai,anthropic&include_service_tokens=true")
        bad = await http.get("/v1/security/credentials?providers=nope")
    body = resp.json()
    assert body["inventory"]["providers"]["openai"] == {
        "name": "provider:openai",
        "env_var": "OPENAI_API_KEY",
        "present": True,
        "value": "[REDACTED]",
    }
    assert body["inventory"]["providers"]["anthropic"]["present"] is False
    assert set(body["inventory"]["service_tokens"]) == {"api_key", "api_keys", "admin_api_key"}
    assert "sk-test-secret" not in resp.text
    assert bad.status_code == 400 and "openai" in bad.json()["known"]
    audit = await platform.kernel.store.read_stream("credentials-inventory")
    assert [e.type for e in audit] == ["credential.inventory_accessed"]
    assert audit[0].data["counts"]["providers_present"] == 1 and "sk-test" not in str(audit[0].data)


async def test_environment_policies(platform: Any) -> None:
    async with httpx.AsyncClient(base_url=platform.url, timeout=30) as http:
        unset = (await http.get("/v1/policies/environment/prod")).json()
        assert unset["source"] == "default" and unset["policy"]["enabled"] is False
        put = await http.put(
            "/v1/policies/environment/prod",
            json={"enabled": True, "require_human_review": True, "blocked_diagnostic_codes": ["E_UNSAFE_TOOL_IMPORT"]},
        )
        assert put.status_code == 200
        assert put.json()["previous_policy"] is None
        assert put.json()["changed_fields"] == ["blocked_diagnostic_codes", "enabled", "require_human_review"]
        second = (await http.put("/v1/policies/environment/prod", json={"enabled": True})).json()
        assert second["previous_policy"]["require_human_review"] is True
        assert second["changed_fields"] == ["blocked_diagnostic_codes", "require_human_review"]
        got = (await http.get("/v1/policies/environment/prod")).json()
        assert got["source"] == "service" and got["policy"]["enabled"] is True and got["version"] == 2
        listed = (await http.get("/v1/policies/environment")).json()
        assert list(listed["policies"]) == ["prod"] and listed["count"] == 1
        for bad_body, code in (
            ({"enabled": "maybe"}, 422),
            ({"surprise": 1}, 422),
            ({"blocked_diagnostic_codes": ["lower"]}, 422),
        ):
            assert (await http.put("/v1/policies/environment/prod", json=bad_body)).status_code == code
        assert (await http.put("/v1/policies/environment/Bad Env!", json={})).status_code == 400
    events = await platform.kernel.store.read_stream("policy-prod")
    assert [e.type for e in events] == ["policy.changed", "policy.changed"]
    assert events[1].data["previous"]["require_human_review"] is True


async def test_readyz_names_failing_secret_checks(platform_factory: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    p = await platform_factory(health_providers="anthropic", health_mcp_secrets="mcp_default")
    async with httpx.AsyncClient(base_url=p.url, timeout=30) as http:
        resp = await http.get("/readyz")
    assert resp.status_code == 503
    body = resp.json()
    assert body["error"] == "not_ready"
    assert body["checks"]["providers"]["ok"] is False and "ANTHROPIC_API_KEY" in body["checks"]["providers"]["error"]
    assert body["checks"]["mcp_secrets"]["ok"] is False and body["checks"]["postgres"]["ok"] is True


def test_committed_openapi_is_current() -> None:
    from kneo_gateway.openapi import DOC, render

    assert DOC.read_bytes() == render(), "docs/openapi.json is stale: run python -m kneo_gateway.openapi"


async def test_500_carries_request_id_and_no_trace(platform: Any) -> None:
    from kneo_gateway.routers import runs

    async with httpx.AsyncClient(base_url=platform.url, timeout=30) as http:
        original = platform.kernel.store.list_runs

        async def boom(**_: Any) -> Any:
            raise RuntimeError("secret internals")

        platform.kernel.store.list_runs = boom
        try:
            resp = await http.get("/v1/runs", headers={"X-Request-ID": "req-500"})
        finally:
            platform.kernel.store.list_runs = original
    assert resp.status_code == 500
    assert resp.json() == {"error": "internal_error", "message": "internal server error", "request_id": "req-500"}
    assert "secret internals" not in resp.text and runs is not None


PLANTED = [
    "jane.roe@example.org",
    "sk-live-ABCDEFGHIJKLMNOPQRSTUVWX",
    "hunter2-secret",
    "123-45-6789",
    "4111111111111111",
    "ghp_ABCDEFGHIJKLMNOPQRSTUVWXYZ0123",
]


async def test_planted_secrets_never_come_back_out(platform_factory: Any, caplog: pytest.LogCaptureFixture) -> None:
    p = await platform_factory(request_logs=True)
    caplog.set_level(logging.DEBUG)
    body = {
        "input": f"Email {PLANTED[0]} with key {PLANTED[1]}, ssn {PLANTED[3]}, card {PLANTED[4]}",
        "spec": SPEC,
        "metadata": {"password": PLANTED[2], "note": f"token {PLANTED[5]}", "api_key": "plain-key-value"},
    }
    headers = {"Authorization": f"Bearer {PLANTED[1]}", "X-Request-ID": "req-secrets"}
    async with httpx.AsyncClient(base_url=p.url, timeout=30) as http:
        created = await http.post("/v1/runs", json=body, headers=headers)
        run_id = created.json()["run_id"]
        outputs = [
            created.text,
            (await http.get(f"/v1/runs/{run_id}")).text,
            (await http.get(f"/v1/runs/{run_id}/events")).text,
            (await http.get(f"/v1/runs/{run_id}/stream")).text,
            (await http.get("/v1/runs")).text,
        ]
    assert created.json()["status"] == "succeeded"
    logs = "\n".join(r.getMessage() + str(getattr(r, "fields", "")) for r in caplog.records)
    for text in [*outputs, logs]:
        for secret in [*PLANTED, "plain-key-value"]:
            assert secret not in text
    assert "[REDACTED]" in outputs[2]
    # the run itself used the real input (the log keeps it; responses never show it)
    stored = await p.kernel.store.read_stream(f"run-{run_id}")
    assert PLANTED[0] in stored[0].data["input"]
    checkpoints = [e for e in stored if e.type == "checkpoint.saved"]
    assert checkpoints and all(PLANTED[0] not in str(e.data) for e in checkpoints)


async def test_service_policy_is_enforced_on_runs(platform: Any) -> None:
    async with httpx.AsyncClient(base_url=platform.url, timeout=30) as http:
        put = await http.put("/v1/policies/environment/prod", json={"enabled": True, "require_guardrails": True})
        assert put.status_code == 200
        blocked = (await http.post("/v1/runs", json={"input": "x", "spec": SPEC, "environment": "prod"})).json()
        allowed_elsewhere = (
            await http.post("/v1/runs", json={"input": "x", "spec": SPEC, "environment": "dev"})
        ).json()
        research = (
            await http.post(
                "/v1/runs", json={"input": "x", "spec_path": "examples/research_agent.yaml", "environment": "prod"}
            )
        ).json()
        detail = (await http.get(f"/v1/runs/{blocked['run_id']}")).json()
    assert blocked["status"] == "failed"
    assert "E_POLICY_GUARDRAILS" in [d["code"] for d in detail["metadata"]["diagnostics"]]
    assert allowed_elsewhere["status"] == "succeeded"
    assert research["status"] == "succeeded"
