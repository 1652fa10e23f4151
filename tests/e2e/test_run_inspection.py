"""Run inspection routes over HTTP against the whole platform: checkpoints, checkpoint diff, replay, recovery and
trace are read-only views of the run's stream (real NATS + PostgreSQL, every service in-process)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import orjson
import yaml

from kneo_gateway.routers.inspect import PreviewLimits, bounded_payload, diff_states, flatten, preview_value

ROOT = Path(__file__).resolve().parents[2]
SPEC = "examples/research_agent.yaml"
STEPS = ["retrieve", "analyze", "summarize"]
# Step one fails once then succeeds (a retry before the first checkpoint); step two always fails (5 > 1 attempt).
FLAKY = """
version: v1
name: flaky
agent: {name: steady, model: {provider: dummy, name: d, params: {chunks: 2}}}
components:
  agents:
    wobbly: {name: wobbly, model: {provider: dummy, name: d, params: {chunks: 2, fail_attempts: 1}}}
    broken: {name: broken, model: {provider: dummy, name: d, params: {chunks: 2, fail_attempts: 5}}}
workflow:
  name: flaky-pipeline
  kind: sequential
  steps:
    - {id: one, ref: wobbly, prompt: "first {input}", max_retries: 1}
    - {id: two, ref: broken, prompt: "second {steps.one}"}
    - {id: three, prompt: "third {steps.two}"}
"""
LOOP = """
version: v1
agent: {name: a, model: {provider: dummy, params: {chunks: 1}}}
workflow:
  name: loop
  kind: graph
  start: draft
  max_iterations: 2
  nodes:
    - {id: draft, kind: agent, prompt: "Draft about {input}"}
    - {id: done, kind: agent, prompt: "Finish {steps.draft}"}
  edges:
    - {from: draft, to: draft, when: {contains: "On "}}
    - {from: draft, to: done}
"""
UNKNOWN = "run_2026-01-01T00:00:00_deadbeef"


async def _run(http: httpx.AsyncClient, **body: Any) -> tuple[str, list[dict[str, Any]]]:
    resp = await http.post("/v1/runs", json={"input": "Summarize Nvidia AI strategy", **body})
    assert resp.status_code == 200, resp.text
    run_id = resp.json()["run_id"]
    events = (await http.get(f"/v1/runs/{run_id}/events")).json()["events"]
    return run_id, events


async def _research(http: httpx.AsyncClient) -> tuple[str, list[dict[str, Any]]]:
    # The example with its tools left uncalled: these tests pin the event positions of a plain three-step run
    # (tool calls and their step.tool_called events are covered in tests/integration/test_provider_fakes.py).
    spec = yaml.safe_load((ROOT / SPEC).read_text())
    spec["agent"]["model"]["params"]["call_tools"] = False
    return await _run(http, spec=yaml.safe_dump(spec), environment="prod")


def _outputs(events: list[dict[str, Any]]) -> dict[str, Any]:
    return {e["data"]["step_id"]: e["data"]["output"] for e in events if e["type"] == "step.completed"}


def _size(value: Any) -> int:
    return len(orjson.dumps(value))


def _expected_checkpoints(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What the route must answer for the research run: one checkpoint per step, all while the run is running."""
    out = _outputs(events)
    items = []
    for i, ev in enumerate(e for e in events if e["type"] == "checkpoint.saved"):
        payload = {
            "step_outputs": {s: out[s] for s in STEPS[: i + 1]},
            "visited_steps": STEPS[: i + 1],
            "next_step_index": i + 1,
        }
        assert ev["data"]["state"] == payload
        items.append(
            {
                "sequence": i + 1,
                "type": "step",
                "step_id": STEPS[i],
                "node_id": STEPS[i],
                "step_index": i,
                "status": "running",
                "position": ev["version"],
                "pending_human_request": None,
                "error_summary": None,
                "created_at": ev["recorded_at"],
                "payload": payload,
                "truncated": False,
                "original_bytes": _size(payload),
            }
        )
    return items


def _page(key: str, items: list[Any], total: int, limit: int, offset: int, sort_by: str, order: str) -> dict[str, Any]:
    return {
        key: items,
        "count": len(items),
        "total": total,
        "limit": limit,
        "offset": offset,
        "sort_by": sort_by,
        "sort_order": order,
    }


async def _error(http: httpx.AsyncClient, path: str, status: int) -> dict[str, Any]:
    resp = await http.get(path)
    assert resp.status_code == status, resp.text
    body: dict[str, Any] = resp.json()
    return body


async def test_checkpoints_of_a_three_step_run(platform: Any) -> None:
    cap = platform.settings.max_list_items
    async with httpx.AsyncClient(base_url=platform.url, timeout=60) as http:
        run_id, events = await _research(http)
        expected = _expected_checkpoints(events)
        assert [c["position"] for c in expected] == [5, 8, 11]
        base = f"/v1/runs/{run_id}/checkpoints"

        body = (await http.get(base)).json()
        assert body == {"run_id": run_id, **_page("checkpoints", expected, 3, cap, 0, "sequence", "asc")}
        assert (await http.get(f"/runs/{run_id}/checkpoints")).json() == body, "legacy alias"

        page = (await http.get(base, params={"limit": 1, "offset": 1})).json()
        assert page == {"run_id": run_id, **_page("checkpoints", expected[1:2], 3, 1, 1, "sequence", "asc")}
        desc = (await http.get(base, params={"sort_order": "desc"})).json()
        assert desc["checkpoints"] == expected[::-1]
        by_time = (await http.get(base, params={"sort_by": "created_at", "sort_order": "desc", "limit": 2})).json()
        assert by_time == {"run_id": run_id, **_page("checkpoints", expected[:0:-1], 3, 2, 0, "created_at", "desc")}
        clamped = (await http.get(base, params={"limit": 5000})).json()
        assert clamped["limit"] == cap and clamped["count"] == 3
        assert (await http.get(base, params={"type": "step"})).json()["total"] == 3
        other = (await http.get(base, params={"type": "human"})).json()
        assert other == {"run_id": run_id, **_page("checkpoints", [], 0, cap, 0, "sequence", "asc")}
        assert (await http.get(base, params={"offset": 7})).json()["checkpoints"] == []

        for params, message in (
            ({"limit": -1}, "limit and offset must not be negative"),
            ({"offset": -1}, "limit and offset must not be negative"),
        ):
            resp = await http.get(base, params=params)
            assert resp.status_code == 400
            assert resp.json() == {"error": "invalid_request", "message": message}
        resp = await http.get(base, params={"sort_by": "step_id"})
        assert resp.status_code == 400
        assert resp.json() == {
            "error": "invalid_request",
            "message": "unknown sort_by 'step_id'",
            "allowed": ["sequence", "created_at"],
        }
        resp = await http.get(base, params={"sort_order": "up"})
        assert resp.status_code == 400
        assert resp.json() == {
            "error": "invalid_request",
            "message": "sort_order must be asc or desc",
            "allowed": ["asc", "desc"],
        }
        for path in ("checkpoints", "checkpoints/diff", "replay", "recovery", "trace"):
            body = await _error(http, f"/v1/runs/{UNKNOWN}/{path}", 404)
            assert body == {"error": "not_found", "message": f"run {UNKNOWN} not found", "run_id": UNKNOWN}


async def test_checkpoint_diff_default_and_explicit(platform: Any) -> None:
    async with httpx.AsyncClient(base_url=platform.url, timeout=60) as http:
        run_id, events = await _research(http)
        out = _outputs(events)
        base = f"/v1/runs/{run_id}/checkpoints/diff"

        latest = (await http.get(base)).json()
        assert latest == {
            "run_id": run_id,
            "from_sequence": 2,
            "to_sequence": 3,
            "added": {"step_outputs.summarize": out["summarize"], "visited_steps[2]": "summarize"},
            "removed": {},
            "changed": {"next_step_index": {"from": 2, "to": 3}},
        }
        assert (await http.get(base, params={"to_sequence": 3})).json() == latest
        assert (await http.get(f"/runs/{run_id}/checkpoints/diff")).json() == latest, "legacy alias"

        wide = (await http.get(base, params={"from_sequence": 1, "to_sequence": 3})).json()
        assert wide == {
            "run_id": run_id,
            "from_sequence": 1,
            "to_sequence": 3,
            "added": {
                "step_outputs.analyze": out["analyze"],
                "step_outputs.summarize": out["summarize"],
                "visited_steps[1]": "analyze",
                "visited_steps[2]": "summarize",
            },
            "removed": {},
            "changed": {"next_step_index": {"from": 1, "to": 3}},
        }
        backwards = (await http.get(base, params={"from_sequence": 2, "to_sequence": 1})).json()
        assert backwards == {
            "run_id": run_id,
            "from_sequence": 2,
            "to_sequence": 1,
            "added": {},
            "removed": {"step_outputs.analyze": out["analyze"], "visited_steps[1]": "analyze"},
            "changed": {"next_step_index": {"from": 2, "to": 1}},
        }
        only_from = (await http.get(base, params={"from_sequence": 1})).json()
        assert (only_from["from_sequence"], only_from["to_sequence"]) == (1, 3)
        same = (await http.get(base, params={"from_sequence": 2, "to_sequence": 2})).json()
        assert (same["added"], same["removed"], same["changed"]) == ({}, {}, {})

        missing = await _error(http, f"{base}?from_sequence=9", 400)
        assert missing == {
            "error": "invalid_request",
            "message": f"checkpoint sequence 9 does not exist in run {run_id}",
            "field": "from_sequence",
            "available": [1, 2, 3],
        }
        missing_to = await _error(http, f"{base}?from_sequence=1&to_sequence=0", 400)
        assert missing_to["field"] == "to_sequence" and missing_to["available"] == [1, 2, 3]
        first = await _error(http, f"{base}?to_sequence=1", 400)
        assert first == {
            "error": "invalid_request",
            "message": "no checkpoint before sequence 1: give from_sequence",
            "field": "from_sequence",
            "available": [1, 2, 3],
        }


async def test_replay_and_recovery_of_a_succeeded_run(platform: Any) -> None:
    async with httpx.AsyncClient(base_url=platform.url, timeout=60) as http:
        run_id, events = await _research(http)
        out = _outputs(events)
        recovery = (await http.get(f"/v1/runs/{run_id}/recovery")).json()
        assert recovery == {
            "run_id": run_id,
            "status": "succeeded",
            "workflow_kind": "sequential",
            "completed_steps": STEPS,
            "failed_step": None,
            "resume_input": out["summarize"],
            "next_step_index": 3,
            "can_continue": False,
            "reason": "the run's status is succeeded; only a failed, cancelled or timed-out run can continue",
        }
        assert (await http.get(f"/runs/{run_id}/recovery")).json() == recovery, "legacy alias"

        replay = (await http.get(f"/v1/runs/{run_id}/replay")).json()
        at = {e["version"]: e["recorded_at"] for e in events}

        def entry(v: int, type_: str, step: str | None, status: str, seq: int | None = None) -> dict[str, Any]:
            return {
                "position": v,
                "sequence": seq,
                "type": type_,
                "step_id": step,
                "status": status,
                "at": at[v],
                "error": None,
            }

        timeline = [
            entry(1, "run.created", None, "queued"),
            entry(2, "run.compiled", None, "queued"),
            entry(4, "step.completed", "retrieve", "running"),
            entry(5, "checkpoint.saved", "retrieve", "running", 1),
            entry(7, "step.completed", "analyze", "running"),
            entry(8, "checkpoint.saved", "analyze", "running", 2),
            entry(10, "step.completed", "summarize", "running"),
            entry(11, "checkpoint.saved", "summarize", "running", 3),
            entry(12, "run.succeeded", None, "succeeded"),
        ]
        assert replay == {
            "run_id": run_id,
            "status": "succeeded",
            "workflow_kind": "sequential",
            "timeline": timeline,
            "count": 9,
            "checkpoint_count": 3,
            "latest_checkpoint_sequence": 3,
            "current_position": {"step_index": 2, "node_id": "summarize", "version": 12},
            "pending_human_request": None,
            "error_summary": None,
            "replay_context": recovery,
        }


async def test_replay_and_recovery_of_a_failed_run(platform: Any) -> None:
    async with httpx.AsyncClient(base_url=platform.url, timeout=60) as http:
        run_id, events = await _run(http, spec=FLAKY)
        assert [e["type"] for e in events] == [
            "run.created",
            "run.compiled",
            "step.scheduled",
            "step.retrying",
            "step.scheduled",
            "step.completed",
            "checkpoint.saved",
            "step.scheduled",
            "step.failed",
            "run.failed",
        ]
        one = _outputs(events)["one"]
        recovery = (await http.get(f"/v1/runs/{run_id}/recovery")).json()
        assert recovery == {
            "run_id": run_id,
            "status": "failed",
            "workflow_kind": "sequential",
            "completed_steps": ["one"],
            "failed_step": "two",
            "resume_input": one,
            "next_step_index": 1,
            "can_continue": True,
            "reason": None,
        }

        at = {e["version"]: e["recorded_at"] for e in events}
        retry_error = "injected failure on attempt 1"
        run_error = "step two failed: injected failure on attempt 1"
        replay = (await http.get(f"/v1/runs/{run_id}/replay")).json()
        rows = [
            (1, None, "run.created", None, "queued", None),
            (2, None, "run.compiled", None, "queued", None),
            (4, None, "step.retrying", "one", "running", retry_error),
            (6, None, "step.completed", "one", "running", None),
            (7, 1, "checkpoint.saved", "one", "running", None),
            (9, None, "step.failed", "two", "running", retry_error),
            (10, None, "run.failed", "two", "failed", run_error),
        ]
        timeline = [
            {"position": v, "sequence": seq, "type": t, "step_id": sid, "status": st, "at": at[v], "error": err}
            for v, seq, t, sid, st, err in rows
        ]
        assert replay == {
            "run_id": run_id,
            "status": "failed",
            "workflow_kind": "sequential",
            "timeline": timeline,
            "count": 7,
            "checkpoint_count": 1,
            "latest_checkpoint_sequence": 1,
            "current_position": {"step_index": 1, "node_id": "two", "version": 10},
            "pending_human_request": None,
            "error_summary": run_error,
            "replay_context": recovery,
        }

        checkpoints = (await http.get(f"/v1/runs/{run_id}/checkpoints")).json()["checkpoints"]
        payload = {"step_outputs": {"one": one}, "visited_steps": ["one"], "next_step_index": 1}
        assert checkpoints == [
            {
                "sequence": 1,
                "type": "step",
                "step_id": "one",
                "node_id": "one",
                "step_index": 0,
                "status": "running",
                "position": 7,
                "pending_human_request": None,
                "error_summary": retry_error,  # the last error before the checkpoint: step one's first attempt
                "created_at": at[7],
                "payload": payload,
                "truncated": False,
                "original_bytes": _size(payload),
            }
        ]
        too_few = await _error(http, f"/v1/runs/{run_id}/checkpoints/diff", 400)
        assert too_few == {
            "error": "invalid_request",
            "message": f"run {run_id} has 1 checkpoint(s); a diff needs at least two",
            "checkpoints": 1,
        }


async def test_recovery_of_a_graph_run_stopped_by_its_iteration_limit(platform: Any) -> None:
    async with httpx.AsyncClient(base_url=platform.url, timeout=60) as http:
        run_id, events = await _run(http, spec=LOOP)
        recovery = (await http.get(f"/v1/runs/{run_id}/recovery")).json()
        draft = _outputs(events)["draft"]
        assert recovery == {
            "run_id": run_id,
            "status": "failed",
            "workflow_kind": "graph",
            "completed_steps": ["draft", "draft"],
            "failed_step": None,
            "resume_input": draft,
            "next_step_index": 1,
            "can_continue": False,
            # graph runs can continue (test_run_lineage.py), but this one stopped at max_iterations, not in a step
            "reason": "the run stopped outside a step (spec, compile or workflow limit): there is no step to continue from",
        }
        replay = (await http.get(f"/v1/runs/{run_id}/replay")).json()
        edges = [e for e in replay["timeline"] if e["type"] == "graph.edge_taken"]
        assert [(e["step_id"], e["status"]) for e in edges] == [("draft", "running")]


async def test_trace_filters_and_pages(platform: Any) -> None:
    cap = platform.settings.max_list_items
    async with httpx.AsyncClient(base_url=platform.url, timeout=60) as http:
        run_id, events = await _research(http)
        base = f"/v1/runs/{run_id}/trace"

        full = (await http.get(base)).json()
        assert full == {"run_id": run_id, **_page("events", events, 12, cap, 0, "version", "asc")}
        assert (await http.get(f"/runs/{run_id}/trace")).json() == full, "legacy alias"

        ckpts = (await http.get(base, params={"event_type": "checkpoint.saved"})).json()
        expected = [e for e in events if e["type"] == "checkpoint.saved"]
        assert ckpts == {"run_id": run_id, **_page("events", expected, 3, cap, 0, "version", "asc")}
        page = (await http.get(base, params={"limit": 2, "offset": 1})).json()
        assert page == {"run_id": run_id, **_page("events", events[1:3], 12, 2, 1, "version", "asc")}
        desc = (await http.get(base, params={"sort_order": "desc", "limit": 3})).json()
        assert [e["version"] for e in desc["events"]] == [12, 11, 10]
        by_time = (await http.get(base, params={"sort_by": "recorded_at"})).json()
        assert by_time["events"] == events and by_time["sort_by"] == "recorded_at"
        by_time_desc = (await http.get(base, params={"sort_by": "recorded_at", "sort_order": "desc"})).json()
        assert by_time_desc["events"] == events[::-1]
        clamped = (await http.get(base, params={"limit": 5000, "event_type": "step.completed"})).json()
        assert (clamped["limit"], clamped["count"], clamped["total"]) == (cap, 3, 3)
        none = (await http.get(base, params={"event_type": "run.cancelled"})).json()
        assert (none["events"], none["total"]) == ([], 0)

        bad = await _error(http, f"{base}?sort_by=type", 400)
        assert bad == {
            "error": "invalid_request",
            "message": "unknown sort_by 'type'",
            "allowed": ["version", "recorded_at"],
        }
        assert (await _error(http, f"{base}?limit=-5", 400))["error"] == "invalid_request"
        assert (await _error(http, f"{base}?offset=-1", 400))["error"] == "invalid_request"
        assert (await _error(http, f"{base}?sort_order=random", 400))["error"] == "invalid_request"


async def test_oversized_checkpoint_comes_back_as_a_bounded_preview(platform_factory: Any) -> None:
    limits = {
        "checkpoint_max_bytes": 200,
        "checkpoint_preview_chars": 10,
        "checkpoint_max_list_items": 2,
        "checkpoint_max_dict_items": 2,
    }
    platform = await platform_factory(**limits)
    async with httpx.AsyncClient(base_url=platform.url, timeout=60) as http:
        run_id, events = await _research(http)
        out = _outputs(events)
        got = (await http.get(f"/v1/runs/{run_id}/checkpoints")).json()["checkpoints"]
    full = [e["data"]["state"] for e in events if e["type"] == "checkpoint.saved"]
    sizes = [_size(s) for s in full]
    assert sizes[2] > 200, "the last checkpoint holds three outputs: over the cap"
    assert [(c["truncated"], c["original_bytes"]) for c in got] == [(n > 200, n) for n in sizes]
    # JSONB keeps object keys shortest first, so the two dict items kept are step_outputs and visited_steps,
    # and inside step_outputs analyze and retrieve.
    assert got[2]["payload"] == {
        "step_outputs": {"analyze": out["analyze"][:10] + "…", "retrieve": out["retrieve"][:10] + "…"},
        "visited_steps": ["retrieve", "analyze"],
    }
    assert (got[2]["sequence"], got[2]["step_id"], got[2]["position"]) == (3, "summarize", 11)


def test_preview_bounds_strings_lists_and_dicts() -> None:
    limits = PreviewLimits(max_bytes=50, preview_chars=4, max_list_items=2, max_dict_items=2)
    value = {"a": "abcdefgh", "b": [1, 2, 3, {"c": "xyz", "d": "long text", "e": 1}], "f": "dropped"}
    assert preview_value(value, limits) == {"a": "abcd…", "b": [1, 2]}
    assert preview_value([{"c": "abcdef", "d": 1, "e": 2}], limits) == [{"c": "abcd…", "d": 1}]
    assert preview_value(7, limits) == 7
    assert bounded_payload({"a": "x"}, limits) == {"payload": {"a": "x"}, "truncated": False, "original_bytes": 9}
    big = {"text": "y" * 100}
    assert bounded_payload(big, limits) == {"payload": {"text": "yyyy…"}, "truncated": True, "original_bytes": 111}
    secret = bounded_payload({"api_key": "sk-abcdefghijklmnopqrstuvwxyz"}, limits)
    assert secret["payload"] == {"api_key": "[REDACTED]"}
    defaults = PreviewLimits.from_settings(object())
    assert (defaults.max_bytes, defaults.preview_chars, defaults.max_list_items, defaults.max_dict_items) == (
        1_048_576,
        1200,
        20,
        50,
    )
    assert defaults.compress_bytes == 65_536


def test_flatten_and_diff_paths() -> None:
    state = {"a": {"b": 1, "c": [1, {"d": 2}]}, "e": [], "f": {}}
    assert flatten(state) == {"a.b": 1, "a.c[0]": 1, "a.c[1].d": 2, "e": [], "f": {}}
    diff = diff_states({"a": 1, "b": [1, 2], "password": "x"}, {"a": 2, "b": [1], "c": {"token": "abc"}})
    assert diff == {
        "added": {"c.token": "[REDACTED]"},
        "removed": {"b[1]": 2, "password": "[REDACTED]"},
        "changed": {"a": {"from": 1, "to": 2}},
    }


async def test_large_checkpoints_are_stored_compressed_and_diff_still_reads_them(platform_factory: Any) -> None:
    p = await platform_factory(checkpoint_compress_bytes=300)
    spec = """
version: v1
agent: {name: a, model: {provider: dummy, params: {chunks: 60, call_tools: false}}}
workflow:
  name: w
  kind: sequential
  steps:
    - {id: one, kind: agent, prompt: "first"}
    - {id: two, kind: agent, prompt: "second"}
"""
    async with httpx.AsyncClient(base_url=p.url, timeout=30) as http:
        run = (await http.post("/v1/runs", json={"input": "x", "spec": spec})).json()
        assert run["status"] == "succeeded"
        events = (await http.get(f"/v1/runs/{run['run_id']}/events")).json()["events"]
        stored = [e["data"]["state"] for e in events if e["type"] == "checkpoint.saved"]
        assert [s.get("_encoding") for s in stored] == ["zlib+base64", "zlib+base64"]
        diff = (await http.get(f"/v1/runs/{run['run_id']}/checkpoints/diff")).json()
    assert "step_outputs.two" in diff["added"] and diff["added"]["step_outputs.two"].startswith("On second")
