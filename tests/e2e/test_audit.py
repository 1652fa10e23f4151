"""The audit log: who did what, redacted, newest first, filterable; the projection rebuilds identically."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
from pydantic import SecretStr

from kneo_audit.projection import catch_up, rebuild

KEYS = "alice:alice-token:admin;release-manager:rm-token:reviewer;viewer:view-token:viewer;op:op-token:operator"
SPEC = """
version: v1
agent: {name: a, model: {provider: dummy, params: {chunks: 1}}}
workflow:
  name: w
  kind: sequential
  steps:
    - {id: draft, kind: agent, prompt: "Draft {input}"}
    - {id: approve, kind: human, prompt: "Approve?", reviewers: [release-manager]}
    - {id: publish, kind: agent, prompt: "Publish {steps.draft}"}
"""
SECRET = "sk-proj-abcdefghijklmnopqrstuvwxyz0123456789"


def _h(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def _audit(http: httpx.AsyncClient, check: Any, **params: Any) -> dict[str, Any]:
    """Poll the audit list until ``check`` holds (the projection is asynchronous: moments, not seconds)."""
    for _ in range(200):
        body = (await http.get("/v1/audit-events", params=params, headers=_h("op-token"))).json()
        if check(body):
            return body
        await asyncio.sleep(0.025)
    raise AssertionError(body)


async def _columns(pool: Any) -> list[tuple[Any, ...]]:
    rows = await pool.fetch(
        "SELECT id, position, event_type, actor, occurred_at, run_id, continuation_id, request_id, payload::text "
        "FROM audit_events ORDER BY position"
    )
    return [tuple(r) for r in rows]


async def test_the_audit_log_shows_who_decided_what_without_secrets(platform_factory: Any) -> None:
    from kneo_events.settings import Settings  # noqa: F401  (the fixture's settings type)

    p = await platform_factory(api_keys=SecretStr(KEYS))
    async with httpx.AsyncClient(base_url=p.url, timeout=30) as http:
        run = (
            await http.post(
                "/v1/runs",
                json={"input": f"ship it with key {SECRET}", "spec": SPEC, "metadata": {"api_key": SECRET}},
                headers={**_h("alice-token"), "X-Request-ID": "req-audit-1"},
            )
        ).json()
        assert run["status"] == "paused", run
        cid = run["continuation_id"]
        refused = await http.post(
            f"/v1/human-tasks/{cid}/resume",
            json={"request_id": run["metadata"]["pending_human_request"]["request_id"], "decision": "approved"},
            headers=_h("view-token"),
        )
        assert refused.status_code == 403
        decided = await http.post(
            f"/v1/human-tasks/{cid}/resume",
            json={
                "request_id": run["metadata"]["pending_human_request"]["request_id"],
                "decision": "approved",
                "content": f"ok {SECRET}",
            },
            headers=_h("rm-token"),
        )
        assert decided.status_code == 200
        validated = await http.post(
            "/v1/specs/validate", json={"spec": SPEC}, headers={**_h("alice-token"), "X-Request-ID": "req-audit-2"}
        )
        assert validated.status_code == 200

        body = await _audit(
            http,
            lambda b: {e["event_type"] for e in b["events"]} >= {"run.created", "human.decision", "spec.validated"},
        )
        assert all(SECRET not in str(e) for e in body["events"])
        by_type = {e["event_type"]: e for e in body["events"]}
        created = by_type["run.created"]
        assert created["actor"] == "alice" and created["run_id"] == run["run_id"]
        assert created["request_id"] == "req-audit-1" and created["id"].startswith("evt_")
        assert created["payload"]["input_present"] is True and "input" not in created["payload"]
        assert created["payload"]["metadata"]["api_key"] != SECRET
        decision = by_type["human.decision"]
        assert decision["actor"] == "release-manager" and decision["continuation_id"] == cid
        assert decision["payload"]["decision"] == "approved" and decision["payload"]["content_present"] is True
        assert by_type["spec.validated"]["request_id"] == "req-audit-2"
        # newest first
        stamps = [e["occurred_at"] for e in body["events"]]
        assert stamps == sorted(stamps, reverse=True)

        # filters
        only = (
            await http.get("/v1/audit-events", params={"event_type": "human.decision"}, headers=_h("op-token"))
        ).json()
        assert [e["event_type"] for e in only["events"]] == ["human.decision"] and only["total"] == 1
        mine = (await http.get("/v1/audit-events", params={"actor": "alice"}, headers=_h("op-token"))).json()
        assert mine["total"] >= 2 and {e["actor"] for e in mine["events"]} == {"alice"}
        per_run = (await http.get("/v1/audit-events", params={"run_id": run["run_id"]}, headers=_h("op-token"))).json()
        assert {e["event_type"] for e in per_run["events"]} == {"run.created", "human.decision"}
        per_task = (await http.get("/v1/audit-events", params={"continuation_id": cid}, headers=_h("op-token"))).json()
        assert [e["event_type"] for e in per_task["events"]] == ["human.decision"]
        future = (
            await http.get("/v1/audit-events", params={"since": "2999-01-01T00:00:00Z"}, headers=_h("op-token"))
        ).json()
        assert future["events"] == [] and future["total"] == 0
        page = (
            await http.get("/v1/audit-events", params={"limit": 1, "sort_order": "asc"}, headers=_h("op-token"))
        ).json()
        assert page["count"] == 1 and page["limit"] == 1 and page["events"][0]["event_type"] == "run.created"
        legacy = await http.get("/audit-events", headers=_h("op-token"))
        assert legacy.status_code == 200 and legacy.json()["total"] == body["total"]

        # bad input: the documented envelope
        for params in ({"limit": -1}, {"sort_by": "actor"}, {"sort_order": "up"}, {"since": "yesterday"}):
            bad = await http.get("/v1/audit-events", params=params, headers=_h("op-token"))
            assert bad.status_code in (400, 422) and bad.json()["error"] == "invalid_request", (params, bad.text)
        crossed = await http.get(
            "/v1/audit-events",
            params={"since": "2026-01-02T00:00:00Z", "until": "2026-01-01T00:00:00Z"},
            headers=_h("op-token"),
        )
        assert crossed.status_code == 400
        assert (await http.get("/v1/audit-events")).status_code == 401
        assert (await http.get("/v1/audit-events", headers=_h("view-token"))).status_code == 200

        # the projection rebuilds identically from the log
        store = p.kernel.store
        await catch_up(store)
        live = await _columns(store.pool)
        assert len(live) >= 3
        await rebuild(store)
        assert await _columns(store.pool) == live


async def test_policy_and_credential_reads_are_audited_with_counts_only(platform_factory: Any) -> None:
    p = await platform_factory(api_keys=SecretStr(KEYS))
    async with httpx.AsyncClient(base_url=p.url, timeout=30) as http:
        inv = await http.get("/v1/security/credentials", headers=_h("alice-token"))
        assert inv.status_code == 200
        put = await http.put(
            "/v1/policies/environment/prod",
            json={"deny_unrestricted_tools": True},
            headers=_h("alice-token"),
        )
        assert put.status_code == 200, put.text
        body = await _audit(
            http,
            lambda b: {e["event_type"] for e in b["events"]} >= {"credential.inventory_accessed", "policy.changed"},
        )
    by_type = {e["event_type"]: e for e in body["events"]}
    assert set(by_type["credential.inventory_accessed"]["payload"]) == {"counts"}
    # the policies table is a projection of the log too: a rebuild gives the same rows
    from kneo_events.projections import rebuild_policies

    query = "SELECT environment, policy::text, version, updated_at, updated_by FROM environment_policies ORDER BY 1"
    live = [tuple(r) for r in await p.kernel.store.pool.fetch(query)]
    async with p.kernel.store.pool.acquire() as conn:
        assert await rebuild_policies(conn) == len(live) >= 1
    assert [tuple(r) for r in await p.kernel.store.pool.fetch(query)] == live
    changed = by_type["policy.changed"]["payload"]
    assert changed["environment"] == "prod" and "deny_unrestricted_tools" in str(changed["changed_fields"])


async def test_run_level_timeout_force_cancels_a_paused_run_and_closes_its_task(platform_factory: Any) -> None:
    p = await platform_factory(api_keys=SecretStr(KEYS), human_timer_interval_seconds=0.1)
    async with httpx.AsyncClient(base_url=p.url, timeout=30) as http:
        run = (
            await http.post(
                "/v1/runs", json={"input": "x", "spec": SPEC, "timeout_seconds": 0.5}, headers=_h("alice-token")
            )
        ).json()
        assert run["status"] == "paused"
        for _ in range(400):
            state = (await http.get(f"/v1/runs/{run['run_id']}", headers=_h("op-token"))).json()
            if state["status"] != "paused":
                break
            await asyncio.sleep(0.025)
        assert state["status"] == "timed_out" and "timed out after 0.5s" in state["error"]
        task = (await http.get(f"/v1/human-tasks/{run['continuation_id']}", headers=_h("op-token"))).json()
        assert task["status"] == "cancelled"
        late = await http.post(
            f"/v1/human-tasks/{run['continuation_id']}/resume",
            json={"request_id": run["metadata"]["pending_human_request"]["request_id"], "decision": "approved"},
            headers=_h("rm-token"),
        )
        assert late.status_code == 409 and late.json()["error"] == "invalid_state"
        events = (await http.get(f"/v1/runs/{run['run_id']}/events", headers=_h("op-token"))).json()["events"]
        types = [e["type"] for e in events]
        assert types[-2:] == ["human.cancelled", "run.timed_out"] and types.count("run.timed_out") == 1
        cancel = await http.post(f"/v1/runs/{run['run_id']}/cancel", headers=_h("alice-token"))
        assert cancel.status_code == 409
        audit = await _audit(http, lambda b: b["total"] == 1, event_type="run.timed_out")
        assert audit["events"][0]["actor"] == "system" and audit["events"][0]["run_id"] == run["run_id"]


async def test_spec_level_timeout_stops_a_running_run(platform_factory: Any) -> None:
    slow = """
version: v1
agent: {name: a, model: {provider: dummy, params: {chunks: 50, latency_ms: 100}}}
workflow:
  name: slow
  kind: sequential
  timeout_seconds: 0.5
  steps:
    - {id: one, kind: agent, prompt: "x"}
    - {id: two, kind: agent, prompt: "y"}
"""
    p = await platform_factory(human_timer_interval_seconds=0.1)
    async with httpx.AsyncClient(base_url=p.url, timeout=30) as http:
        run = (await http.post("/v1/runs", json={"input": "x", "spec": slow, "async_mode": True})).json()
        for _ in range(400):
            state = (await http.get(f"/v1/runs/{run['run_id']}")).json()
            if state["status"] not in ("queued", "running"):
                break
            await asyncio.sleep(0.025)
        assert state["status"] == "timed_out", state
        await asyncio.sleep(0.3)  # the step in flight stopped and recorded nothing afterwards
        events = (await http.get(f"/v1/runs/{run['run_id']}/events")).json()["events"]
        types = [e["type"] for e in events]
        assert types[-1] == "run.timed_out" and "step.completed" not in types
