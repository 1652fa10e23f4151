"""Spec operations over HTTP, answered by the compiler service (request/reply over NATS)."""

from __future__ import annotations

from typing import Any

import httpx
from pydantic import SecretStr

BAD = """version: v1
agent:
  name: a
  tools: [nonexistent_tool]
workflow: {name: w, kind: sequential, steps: [{id: one}]}
"""


async def test_validate_compile_explain_policy_report(platform: Any) -> None:
    async with httpx.AsyncClient(base_url=platform.url, timeout=30) as http:
        ok = await http.post(
            "/v1/specs/validate", json={"spec_path": "examples/research_agent.yaml", "environment": "prod"}
        )
        assert ok.status_code == 200
        assert ok.json()["valid"] is True
        assert ok.json()["report"]["agent_name"] == "research-copilot"
        assert ok.json()["report"]["workflow_name"] == "research-pipeline"
        bad = (await http.post("/specs/validate", json={"spec": BAD})).json()  # legacy alias
        assert bad["valid"] is False
        unknown = [d for d in bad["diagnostics"] if d["code"] == "E_UNKNOWN_TOOL"]
        assert unknown and unknown[0]["path"].startswith("agent.tools") and unknown[0]["line"] == 4
        compiled = (await http.post("/v1/specs/compile", json={"spec_path": "examples/research_agent.yaml"})).json()
        assert compiled["valid"] is True and compiled["plan_hash"].startswith("sha256:")
        assert [s["id"] for s in compiled["plan"]["steps"]] == ["retrieve", "analyze", "summarize"]
        graph = (await http.post("/v1/specs/compile", json={"spec_path": "examples/graph_review_workflow.yaml"})).json()
        assert graph["valid"] is True and graph["plan"]["workflow"]["kind"] == "graph"
        explained = (await http.post("/v1/specs/explain", json={"spec_path": "examples/research_agent.yaml"})).json()
        assert explained["valid"] is True and "retrieve" in explained["explanation"]
        report = (await http.post("/v1/specs/policy-report", json={"spec_path": "examples/research_agent.yaml"})).json()
        assert set(report) == {"valid", "report"} and report["valid"] is True
        missing = await http.post("/v1/specs/validate", json={"spec_path": "examples/nope.yaml"})
        assert missing.status_code == 400 and missing.json()["field"] == "spec_path"
        extra = await http.post("/v1/specs/validate", json={"spec": BAD, "surprise": 1})
        assert extra.status_code == 422
    types = [
        r["type"]
        for r in await platform.kernel.store.pool.fetch(
            "SELECT type FROM events WHERE stream_id LIKE 'specop-%' ORDER BY position"
        )
    ]
    assert types == [
        "spec.validated",
        "spec.validated",
        "spec.compiled",
        "spec.compiled",
        "spec.explained",
        "spec.policy_reported",
    ]


async def test_specs_run_and_run_policy_report(platform: Any) -> None:
    body = {"input": "hi", "spec_path": "examples/research_agent.yaml", "environment": "prod"}
    async with httpx.AsyncClient(base_url=platform.url, timeout=30) as http:
        first = await http.post("/v1/specs/run", json=body, headers={"Idempotency-Key": "spec-run-1"})
        again = await http.post("/v1/specs/run", json=body, headers={"Idempotency-Key": "spec-run-1"})
        assert first.status_code == 200 and first.json()["status"] == "succeeded"
        assert again.json()["run_id"] == first.json()["run_id"]
        run_id = first.json()["run_id"]
        report = await http.get(f"/v1/runs/{run_id}/policy-report")
        assert report.status_code == 200 and report.json()["valid"] is True
        assert (await http.get("/v1/runs/run_nope/policy-report")).status_code == 404
    assert await platform.kernel.store.pool.fetchval("SELECT count(*) FROM runs") == 1
    recorded = await platform.kernel.store.pool.fetch("SELECT data FROM events WHERE type = 'spec.policy_reported'")
    assert recorded[0]["data"]["source"] == "run" and recorded[0]["data"]["run_id"] == run_id


async def test_scopes_and_a_missing_compiler(platform_factory: Any) -> None:
    p = await platform_factory(("gateway",), api_keys=SecretStr("viewer:view:viewer"), rpc_timeout_seconds=1.0)
    async with httpx.AsyncClient(base_url=p.url, timeout=30) as http:
        headers = {"Authorization": "Bearer view"}
        down = await http.post("/v1/specs/validate", json={"spec": BAD}, headers=headers)
        assert down.status_code == 503 and down.json()["error"] == "not_ready" and down.json()["service"] == "compiler"
        run = await http.post("/v1/specs/run", json={"input": "x", "spec": BAD}, headers=headers)
        assert run.status_code == 403 and run.json()["required_scope"] == "runs:write"
