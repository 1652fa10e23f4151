"""Every example in examples/ runs through HTTP to its documented end state on the dummy provider, and folding its
log from scratch gives exactly the live projection; retries obey max_retries; a step past its timeout follows
its on_error."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from kneo_events.ids import run_stream
from kneo_events.projections import fold_run
from tests.conftest import ROOT

EXAMPLES = sorted(p.name for p in (ROOT / "examples").glob("*.yaml") if p.name != "project_config.yaml")
# the documented end state of each example (its header comment / README): status and steps visited
END_STATE = {
    "concurrent_review_workflow.yaml": ("succeeded", None),
    "graph_review_workflow.yaml": ("succeeded", None),
    "group_chat_workflow.yaml": ("succeeded", None),
    "human_approval_workflow.yaml": ("paused", ["draft"]),
    "legacy_agent.yaml": ("succeeded", None),
    "mcp_tools_workflow.yaml": ("succeeded", None),
    "research_agent.yaml": ("succeeded", ["retrieve", "analyze", "summarize"]),
    "smoke_human_workflow.yaml": ("paused", ["answer"]),
}


def test_every_example_has_a_documented_end_state() -> None:
    assert sorted(END_STATE) == EXAMPLES


async def _settled(http: httpx.AsyncClient, run_id: str) -> dict[str, Any]:
    for _ in range(800):
        body = (await http.get(f"/v1/runs/{run_id}")).json()
        if body["status"] not in ("queued", "running"):
            return body
        await asyncio.sleep(0.025)
    raise AssertionError(body)


async def _fold_equals_live(platform: Any, run_id: str) -> None:
    store = platform.kernel.store
    events = await store.read_stream(run_stream(run_id))
    assert fold_run(None, events) == await store.get_run(run_id)


@pytest.mark.parametrize("name", EXAMPLES)
async def test_example_runs_to_its_documented_end(platform: Any, name: str) -> None:
    status, visited = END_STATE[name]
    async with httpx.AsyncClient(base_url=platform.url, timeout=60) as http:
        text = (
            "nats" if name == "mcp_tools_workflow.yaml" else "Analyze Nvidia AI business"
        )  # as their headers run them
        resp = await http.post("/v1/runs", json={"input": text, "spec_path": f"examples/{name}", "async_mode": True})
        assert resp.status_code == 202, resp.text
        run = await _settled(http, resp.json()["run_id"])
        assert run["status"] == status, run
        if visited is not None:
            assert run["visited_steps"] == visited
        if status == "succeeded":
            assert run["output_text"]
        events = (await http.get(f"/v1/runs/{run['run_id']}/events")).json()["events"]
        if name == "mcp_tools_workflow.yaml":  # an MCP tool really called, through the official SDK
            calls = [e["data"] for e in events if e["type"] == "step.tool_called"]
            assert calls and all(c["ok"] for c in calls), calls
            assert any("lookup_fact" in c["tool"] or "word_count" in c["tool"] for c in calls), calls
        if status == "paused":
            pending = run["metadata"]["pending_human_request"]
            resumed = await http.post(
                f"/v1/human-tasks/{pending['continuation_id']}/resume",
                json={"request_id": pending["request_id"], "decision": "approved"},
            )
            assert resumed.status_code == 200
            final = await _settled(http, run["run_id"])
            for _ in range(400):  # resumed: it runs on to the end
                if final["status"] not in ("paused", "running", "queued"):
                    break
                await asyncio.sleep(0.025)
                final = (await http.get(f"/v1/runs/{run['run_id']}")).json()
            assert final["status"] == "succeeded", final
    await _fold_equals_live(platform, run["run_id"])


RETRY_SPEC = """
version: v1
agent: {name: a, model: {provider: dummy, params: {chunks: 1, fail_attempts: FAILS}}}
workflow:
  name: w
  kind: sequential
  steps:
    - {id: flaky, kind: agent, prompt: "x", on_error: retry, max_retries: 2}
"""


@pytest.mark.parametrize(("fails", "status", "retries"), [(2, "succeeded", 2), (3, "failed", 2)])
async def test_a_provider_failing_n_times_obeys_max_retries(
    platform: Any, fails: int, status: str, retries: int
) -> None:
    async with httpx.AsyncClient(base_url=platform.url, timeout=60) as http:
        run = (await http.post("/v1/runs", json={"input": "x", "spec": RETRY_SPEC.replace("FAILS", str(fails))})).json()
        run = await _settled(http, run["run_id"])
        events = (await http.get(f"/v1/runs/{run['run_id']}/events")).json()["events"]
    types = [e["type"] for e in events]
    assert run["status"] == status
    assert types.count("step.retrying") == retries
    assert types.count("step.completed") == (1 if status == "succeeded" else 0)
    attempts = [e["data"]["attempt"] for e in events if e["type"] == "step.scheduled"]
    assert attempts == [1, 2, 3]


TIMEOUT_SPEC = """
version: v1
agent: {name: a, model: {provider: dummy, params: {chunks: 20, latency_ms: 50}}}
workflow:
  name: w
  kind: sequential
  steps:
    - {id: slow, kind: agent, prompt: "x", timeout_seconds: 0.2, on_error: ON_ERROR}
    - {id: after, kind: agent, prompt: "y", timeout_seconds: 30}
"""


@pytest.mark.parametrize(("on_error", "status"), [("continue", "succeeded"), ("fail", "failed")])
async def test_a_step_past_its_timeout_follows_on_error(platform: Any, on_error: str, status: str) -> None:
    async with httpx.AsyncClient(base_url=platform.url, timeout=60) as http:
        spec = TIMEOUT_SPEC.replace("ON_ERROR", on_error)
        run = (await http.post("/v1/runs", json={"input": "x", "spec": spec})).json()
        run = await _settled(http, run["run_id"])
        events = (await http.get(f"/v1/runs/{run['run_id']}/events")).json()["events"]
    failed = [e["data"] for e in events if e["type"] == "step.failed"]
    assert run["status"] == status
    assert failed and failed[0]["step_id"] == "slow" and "timed out after 0.2s" in failed[0]["error"]
    completed = [e["data"]["step_id"] for e in events if e["type"] == "step.completed"]
    assert completed == (["after"] if on_error == "continue" else [])
