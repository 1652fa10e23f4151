"""The runs routes over HTTP against the whole platform (real NATS + PostgreSQL, every service in-process)."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from kneo_client.sdk import AsyncServiceClient, parse_sse

SPEC = "examples/research_agent.yaml"
FAST_SPEC = """
version: v1
name: fast
agent:
  name: fast-agent
  model: {provider: dummy, name: d, params: {chunks: 3}}
workflow:
  name: three-steps
  kind: sequential
  steps:
    - {id: one, prompt: "first {input}"}
    - {id: two, prompt: "second {steps.one}"}
    - {id: three, prompt: "third {steps.two}"}
"""


async def _events_total(platform: Any) -> int:
    return int(await platform.kernel.store.pool.fetchval("SELECT count(*) FROM events"))


async def test_sync_run_returns_terminal_body(platform: Any) -> None:
    async with httpx.AsyncClient(base_url=platform.url, timeout=30) as http:
        resp = await http.post(
            "/v1/runs",
            json={
                "input": "Summarize Nvidia AI strategy",
                "spec_path": SPEC,
                "environment": "prod",
                "async_mode": False,
            },
        )
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert set(body) >= {
            "run_id",
            "status",
            "output_text",
            "human_intervention_required",
            "continuation_id",
            "metadata",
        }
        assert body["status"] == "succeeded"
        assert body["run_id"].startswith("run_") and len(body["run_id"].split("_")[-1]) == 8
        assert body["human_intervention_required"] is False and body["continuation_id"] is None
        assert body["metadata"]["workflow_kind"] == "sequential"
        assert body["metadata"]["trace_event_count"] == 18  # 12, plus the dummy's two tool calls per step
        assert "Summarize for an executive" in body["output_text"]
        assert resp.headers["x-request-id"]

        got = (await http.get(f"/v1/runs/{body['run_id']}")).json()
        assert got["status"] == "succeeded"
        assert got["visited_steps"] == ["retrieve", "analyze", "summarize"]
        assert got["agent_name"] == "research-copilot" and got["workflow_name"] == "research-pipeline"
        assert got["metadata"]["environment"] == "prod"
        legacy = (await http.get(f"/runs/{body['run_id']}")).json()
        assert legacy == got

        history = (await http.get(f"/v1/runs/{body['run_id']}/events")).json()
        types = [e["type"] for e in history["events"]]
        step = ["step.scheduled", "step.tool_called", "step.tool_called", "step.completed", "checkpoint.saved"]
        assert types == ["run.created", "run.compiled", *step, *step, *step, "run.succeeded"]
        tools = [(e["data"]["step_id"], e["data"]["tool"], e["data"]["ok"]) for e in history["events"][3:5]]
        assert tools == [("retrieve", "web_search", True), ("retrieve", "webpage_reader", True)]
        assert [e["version"] for e in history["events"]] == list(range(1, 19))
        assert {e["metadata"].get("request_id") for e in history["events"]} == {resp.headers["x-request-id"]}


async def test_async_run_answers_202_then_finishes(platform: Any) -> None:
    async with AsyncServiceClient(platform.url) as client:
        resp = await client.http.post("/v1/runs", json={"input": "x", "spec": FAST_SPEC, "async_mode": True})
        assert resp.status_code == 202
        body = resp.json()
        assert body["status"] in ("queued", "running")
        # a GET right after the POST sees the run (inline projection)
        assert (await client.get_run(body["run_id"]))["run_id"] == body["run_id"]
        events = [ev async for ev in client.stream_run(body["run_id"])]
        assert events[-1].event == "run.succeeded"
        final = await client.get_run(body["run_id"])
        assert final["status"] == "succeeded" and final["output_text"].startswith("On third")


async def test_sse_streams_history_then_live_output_and_ends(platform: Any) -> None:
    async with AsyncServiceClient(platform.url) as client:
        body = await client.create_run(input="Analyze", spec_path=SPEC, async_mode=True)
        seen = [ev async for ev in client.stream_run(body["run_id"])]
    kinds = [e.event for e in seen]
    assert kinds[0] == "run.created" and kinds[-1] == "run.succeeded"
    outputs = [e for e in seen if e.event == "output"]
    assert len(outputs) == 3 * 10  # 8 chunks, the heading piece and the tool results piece, per step
    tools = [e.json()["tool"] for e in seen if e.event == "tool"]  # the agent's two tools, live, per step
    assert len(tools) == 3 * 4
    assert [(t["name"], t["status"]) for t in tools[:4]] == [
        ("web_search", "running"),
        ("web_search", "completed"),
        ("webpage_reader", "running"),
        ("webpage_reader", "completed"),
    ]
    assert tools[1]["ok"] is True and tools[1]["cached"] is False and tools[1]["result"]
    event_ids = [int(e.id) for e in seen if e.event not in ("output", "tool")]
    assert event_ids == list(range(1, 19)), "every event once, in order"
    # chunk ids are <version>.<seq> of the step.scheduled they follow (tool items and text share the sequence)
    live = [e for e in seen if e.event in ("output", "tool")]
    assert [e.id for e in live[:5]] == ["3.0", "3.1", "3.2", "3.3", "3.4"]
    assert live[0].event == "tool" and outputs[0].json()["step_id"] == "retrieve"
    text = "".join(o.json()["text"] for o in outputs if o.json()["step_id"] == "summarize")
    final = [e for e in seen if e.event == "step.completed"][-1].json()
    assert final["data"]["output"] == text


async def test_last_event_id_resumes_without_gap_or_duplicate(platform: Any) -> None:
    async with AsyncServiceClient(platform.url) as client:
        body = await client.create_run(input="r", spec=FAST_SPEC)
        run_id = body["run_id"]
        assert body["status"] == "succeeded"
        full = [e async for e in client.stream_run(run_id)]
        resumed = [e async for e in client.stream_run(run_id, last_event_id="5")]
        legacy = await client.http.get(f"/runs/{run_id}/stream", headers={"Last-Event-ID": "10"})
    assert [int(e.id) for e in full] == list(range(1, 13))
    assert [int(e.id) for e in resumed] == list(range(6, 13))
    assert [e.json()["event_id"] for e in resumed] == [e.json()["event_id"] for e in full[5:]]
    legacy_events = [e async for e in parse_sse(_lines(legacy.text))]
    assert [e.id for e in legacy_events] == ["11", "12"]


async def _lines(text: str) -> Any:
    for line in text.splitlines():
        yield line


async def test_list_runs_filters_sorts_and_clamps(platform: Any) -> None:
    async with AsyncServiceClient(platform.url) as client:
        ids = [(await client.create_run(input=str(i), spec=FAST_SPEC))["run_id"] for i in range(3)]
        page = await client.list_runs(status="succeeded", limit=2, sort_order="desc")
        assert page["count"] == 2 and page["total"] == 3 and page["limit"] == 2 and page["offset"] == 0
        assert page["sort_by"] == "created_at" and page["sort_order"] == "desc"
        assert [r["run_id"] for r in page["runs"]] == ids[::-1][:2]
        asc = await client.list_runs(sort_order="asc", offset=1)
        assert [r["run_id"] for r in asc["runs"]] == ids[1:]
        clamped = await client.list_runs(limit=5000)
        assert clamped["limit"] == 100
        none = await client.list_runs(status="failed")
        assert none["runs"] == [] and none["total"] == 0
        for bad in ({"sort_by": "nope"}, {"sort_order": "up"}, {"limit": -1}, {"offset": -2}):
            resp = await client.http.get("/v1/runs", params=bad)
            assert resp.status_code == 400 and resp.json()["error"] == "invalid_request", bad


@pytest.mark.parametrize(
    ("payload", "status", "code", "field"),
    [
        ({"input": "x", "spec_path": SPEC, "surprise": 1}, 422, "invalid_request", None),
        ({"input": "x"}, 400, "invalid_request", "spec_path"),
        ({"input": "x", "spec_path": "examples/nope.yaml"}, 400, "invalid_request", "spec_path"),
        ({"input": "x", "spec_path": "../../etc/passwd"}, 400, "invalid_request", "spec_path"),
        ({"input": "x", "spec": "version: v1\nagent: [unclosed"}, 400, "invalid_request", "spec"),
        ({"input": "x", "spec": "- just\n- a list\n"}, 400, "invalid_request", "spec"),
        ({"input": "x", "spec": "a: &a [1]\nb: *a\n"}, 400, "invalid_request", "spec"),
        ({"input": "x" * 20001, "spec_path": SPEC}, 413, "payload_too_large", "input"),
        (
            {"input": "x", "spec_path": SPEC, "metadata": {"k": "v" * 40000}},
            413,
            "payload_too_large",
            "metadata",
        ),
        ({"input": "x", "spec": "x: " + "y" * 262200}, 413, "payload_too_large", "spec"),
    ],
)
async def test_bad_requests_get_the_envelope_and_append_nothing(
    platform: Any, payload: dict[str, Any], status: int, code: str, field: str | None
) -> None:
    before = await _events_total(platform)
    async with httpx.AsyncClient(base_url=platform.url, timeout=30) as http:
        resp = await http.post("/v1/runs", json=payload)
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert body["error"] == code and isinstance(body["message"], str) and body["message"]
    if field:
        assert body["field"] == field
    if status == 422:
        assert body["details"][0]["loc"] == ["body", "surprise"]
    assert await _events_total(platform) == before


async def test_body_over_limit_is_413_before_routing_even_with_a_lying_length(platform: Any) -> None:
    before = await _events_total(platform)
    big = b'{"input": "' + b"x" * 1_100_000 + b'", "spec_path": "examples/research_agent.yaml"}'

    async def chunks() -> Any:
        for i in range(0, len(big), 65536):
            yield big[i : i + 65536]

    async with httpx.AsyncClient(base_url=platform.url, timeout=30) as http:
        declared = await http.post("/v1/runs", content=big, headers={"content-type": "application/json"})
        streamed = await http.post("/v1/runs", content=chunks(), headers={"content-type": "application/json"})
    for resp in (declared, streamed):
        assert resp.status_code == 413
        assert resp.json()["error"] == "payload_too_large" and resp.json()["limit"] == 1_048_576
    assert await _events_total(platform) == before


async def test_invalid_spec_semantics_fail_the_run_with_diagnostics(platform: Any) -> None:
    spec = "version: v1\nagent: {name: a}\nworkflow: {name: w, kind: sequential, steps: [{id: s}, {id: s}]}\n"
    async with AsyncServiceClient(platform.url) as client:
        body = await client.create_run(input="x", spec=spec)
        assert body["status"] == "failed"
        state = await client.get_run(body["run_id"])
    codes = [d["code"] for d in state["metadata"]["diagnostics"]]
    assert codes == ["E_DUPLICATE_ID"]


async def test_unknown_run_is_404_in_the_envelope(platform: Any) -> None:
    async with httpx.AsyncClient(base_url=platform.url) as http:
        for path in ("/v1/runs/run_nope", "/v1/runs/run_nope/events", "/v1/runs/run_nope/stream"):
            resp = await http.get(path)
            assert resp.status_code == 404 and resp.json()["error"] == "not_found", path


async def test_health_routes(platform: Any) -> None:
    async with httpx.AsyncClient(base_url=platform.url) as http:
        assert (await http.get("/livez")).json() == {"ok": True, "metadata": {}}
        ready = await http.get("/readyz")
        assert ready.status_code == 200 and ready.json()["checks"]["postgres"]["ok"] is True
        assert (await http.get("/")).json()["status"] == "ok"


async def test_many_concurrent_runs_all_finish(platform: Any) -> None:
    async with AsyncServiceClient(platform.url) as client:
        bodies = await asyncio.gather(*(client.create_run(input=str(i), spec=FAST_SPEC) for i in range(40)))
    assert {b["status"] for b in bodies} == {"succeeded"}
    completed = await platform.kernel.store.pool.fetchval("SELECT count(*) FROM events WHERE type = 'step.completed'")
    assert completed == 120


@pytest.mark.parametrize(
    "raw",
    [
        b'{"input": "x", "spec_path": "examples/research_agent.yaml", "metadata": {"n": 123456789012345678901234567890}}',
        b'{"input": "x\\u0000y", "spec_path": "examples/research_agent.yaml"}',
        b'{"input": "\\ud800", "spec_path": "examples/research_agent.yaml"}',
    ],
)
async def test_unstorable_json_is_400_not_500(platform: Any, raw: bytes) -> None:
    before = await _events_total(platform)
    async with httpx.AsyncClient(base_url=platform.url) as http:
        resp = await http.post("/v1/runs", content=raw, headers={"content-type": "application/json"})
    assert resp.status_code == 400 and resp.json()["error"] == "invalid_request", resp.text
    assert await _events_total(platform) == before
