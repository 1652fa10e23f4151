"""Run continuation, fork (time travel) and cross-run checkpoint diff over HTTP against the whole platform (real NATS
+ PostgreSQL, every service in-process). A continuation or fork is a new run linked to its source; the source's log
never changes."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import httpx

SPEC = "examples/research_agent.yaml"
# Step two fails on its first attempt and has no retries: the run fails there. Its continuation runs step two as
# attempt 2, which the dummy provider lets through.
MIDFAIL = """
version: v1
name: midfail
agent: {name: steady, model: {provider: dummy, name: d, params: {chunks: 2}}}
components:
  agents:
    wobbly: {name: wobbly, model: {provider: dummy, name: d, params: {chunks: 2, fail_attempts: FAILS}}}
workflow:
  name: midfail-pipeline
  kind: sequential
  steps:
    - {id: one, prompt: "first {input}"}
    - {id: two, ref: wobbly, prompt: "second {steps.one}", on_error: fail}
    - {id: three, prompt: "third {steps.two}"}
"""
# draft loops once onto itself, then goes to review, which fails once; review → done.
GRAPH = """
version: v1
name: gloop
agent: {name: a, model: {provider: dummy, name: d, params: {chunks: 1}}}
components:
  agents:
    wobbly: {name: wobbly, model: {provider: dummy, name: d, params: {chunks: 1, fail_attempts: FAILS}}}
workflow:
  name: graph-review
  kind: graph
  start: draft
  nodes:
    - {id: draft, kind: agent, prompt: "Draft about {input}"}
    - {id: review, kind: agent, ref: wobbly, prompt: "Review {steps.draft}"}
    - {id: done, kind: agent, prompt: "Finish {steps.review}"}
  edges:
    - {from: draft, to: draft, when: {contains: "On "}, max_traversals: 1}
    - {from: draft, to: review}
    - {from: review, to: done}
"""
UNKNOWN = "run_2026-01-01T00:00:00_deadbeef"


async def _post_run(http: httpx.AsyncClient, **body: Any) -> dict[str, Any]:
    resp = await http.post("/v1/runs", json={"input": "Summarize Nvidia AI strategy", **body})
    assert resp.status_code == 200, resp.text
    out: dict[str, Any] = resp.json()
    return out


async def _events(http: httpx.AsyncClient, run_id: str) -> list[dict[str, Any]]:
    resp = await http.get(f"/v1/runs/{run_id}/events")
    assert resp.status_code == 200, resp.text
    events: list[dict[str, Any]] = resp.json()["events"]
    return events


async def _total_runs(http: httpx.AsyncClient) -> int:
    total: int = (await http.get("/v1/runs")).json()["total"]
    return total


def _completed(events: list[dict[str, Any]]) -> Counter[str]:
    return Counter(e["data"]["step_id"] for e in events if e["type"] == "step.completed")


def _outputs(events: list[dict[str, Any]]) -> dict[str, Any]:
    return {e["data"]["step_id"]: e["data"]["output"] for e in events if e["type"] == "step.completed"}


async def _terminal(http: httpx.AsyncClient, run_id: str, timeout: float = 30) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        state: dict[str, Any] = (await http.get(f"/v1/runs/{run_id}")).json()
        if state["status"] in ("succeeded", "failed", "cancelled", "expired", "timed_out", "paused"):
            return state
        assert loop.time() < deadline, f"run {run_id} still {state['status']}"
        await asyncio.sleep(0.05)


async def test_continue_a_failed_sequential_run(platform: Any) -> None:
    async with httpx.AsyncClient(base_url=platform.url, timeout=60) as http:
        source = await _post_run(http, spec=MIDFAIL.replace("FAILS", "1"))
        run_id = source["run_id"]
        assert source["status"] == "failed", source
        source_events = await _events(http, run_id)
        assert _completed(source_events) == {"one": 1}
        recovery = (await http.get(f"/v1/runs/{run_id}/recovery")).json()
        assert (recovery["can_continue"], recovery["failed_step"], recovery["next_step_index"]) == (True, "two", 1)
        runs_before = await _total_runs(http)

        resp = await http.post(f"/v1/runs/{run_id}/continue", headers={"Idempotency-Key": "cont-1"})
        assert resp.status_code == 200, resp.text
        body = resp.json()
        new_id = body["run_id"]
        assert new_id != run_id and new_id.startswith("run_")
        assert body["status"] == "succeeded"
        link = {"run_id": run_id, "step_id": "two", "step_index": 1}
        assert body["metadata"]["continued_from"] == link
        assert await _total_runs(http) == runs_before + 1

        # the same key replays the first answer and starts nothing; another body with it is a conflict
        again = await http.post(f"/v1/runs/{run_id}/continue", headers={"Idempotency-Key": "cont-1"})
        assert again.status_code == 200 and again.json() == body
        assert again.headers["Idempotent-Replayed"] == "true"
        assert await _total_runs(http) == runs_before + 1
        clash = await http.post(
            f"/v1/runs/{run_id}/continue", json={"async_mode": True}, headers={"Idempotency-Key": "cont-1"}
        )
        assert clash.status_code == 409 and clash.json()["error"] == "idempotency_key_conflict"

        # the source's log is unchanged; the continuation ran only the steps after the boundary
        assert await _events(http, run_id) == source_events
        events = await _events(http, new_id)
        assert [e["type"] for e in events] == [
            "run.created",
            "run.compiled",
            "run.continued",
            "step.scheduled",
            "step.completed",
            "checkpoint.saved",
            "step.scheduled",
            "step.completed",
            "checkpoint.saved",
            "run.succeeded",
        ]
        assert _completed(events) == {"two": 1, "three": 1}
        continued = events[2]["data"]
        one = _outputs(source_events)["one"]
        assert continued["source_run_id"] == run_id and continued["source_status"] == "failed"
        assert (continued["from_step_index"], continued["from_step_id"], continued["turn"]) == (1, "two", 1)
        assert continued["source_version"] == source_events[-1]["version"]
        assert continued["actor"] == "anonymous"
        assert continued["carried"]["step_outputs"] == {"one": one}
        assert continued["carried"]["visited_steps"] == ["one"]
        assert events[2]["metadata"]["actor"] == "anonymous"
        assert events[3]["data"]["attempt"] == 2 and events[3]["data"]["step_id"] == "two"
        assert events[0]["data"]["input"] == "Summarize Nvidia AI strategy"
        assert events[1]["data"]["plan_hash"] == source_events[1]["data"]["plan_hash"]
        # checkpoints go on numbering from the source's
        assert [e["data"]["sequence"] for e in events if e["type"] == "checkpoint.saved"] == [2, 3]

        # the carried state is exactly the source's: the result equals a run that never failed
        clean = await _post_run(http, spec=MIDFAIL.replace("FAILS", "0"))
        assert clean["status"] == "succeeded"
        assert body["output_text"] == clean["output_text"]
        assert _outputs(events) == {
            k: v for k, v in _outputs(await _events(http, clean["run_id"])).items() if k != "one"
        }

        state = (await http.get(f"/v1/runs/{new_id}")).json()
        assert state["status"] == "succeeded" and state["visited_steps"] == ["one", "two", "three"]
        assert state["metadata"]["continued_from"] == link
        new_recovery = (await http.get(f"/v1/runs/{new_id}/recovery")).json()
        assert new_recovery["completed_steps"] == ["one", "two", "three"] and not new_recovery["can_continue"]

        # a succeeded run (the continuation itself) can't continue: 409, nothing appended, no run started
        before = len(events)
        for path in (f"/v1/runs/{new_id}/continue", f"/runs/{new_id}/continue"):
            refused = await http.post(path)
            assert refused.status_code == 409, refused.text
            reason = "the run's status is succeeded; only a failed, cancelled or timed-out run can continue"
            assert refused.json() == {
                "error": "invalid_state",
                "message": f"run {new_id} can't continue: {reason}",
                "run_id": new_id,
                "reason": reason,
            }
        assert len(await _events(http, new_id)) == before
        assert await _total_runs(http) == runs_before + 2  # + the clean run only

        missing = await http.post(f"/v1/runs/{UNKNOWN}/continue")
        assert missing.status_code == 404
        assert missing.json() == {"error": "not_found", "message": f"run {UNKNOWN} not found", "run_id": UNKNOWN}


async def test_continue_a_graph_run(platform: Any) -> None:
    async with httpx.AsyncClient(base_url=platform.url, timeout=60) as http:
        source = await _post_run(http, spec=GRAPH.replace("FAILS", "1"))
        run_id = source["run_id"]
        assert source["status"] == "failed", source
        source_events = await _events(http, run_id)
        assert _completed(source_events) == {"draft": 2}
        recovery = (await http.get(f"/v1/runs/{run_id}/recovery")).json()
        assert recovery["can_continue"] is True and recovery["reason"] is None
        assert (recovery["workflow_kind"], recovery["failed_step"], recovery["next_step_index"]) == (
            "graph",
            "review",
            1,
        )

        resp = await http.post(f"/runs/{run_id}/continue", json={"async_mode": True})  # legacy alias, async
        assert resp.status_code == 202, resp.text
        new_id = resp.json()["run_id"]
        assert resp.json()["metadata"]["continued_from"] == {"run_id": run_id, "step_id": "review", "step_index": 1}
        final = await _terminal(http, new_id)
        assert final["status"] == "succeeded", final
        assert final["visited_nodes"] == ["draft", "draft", "review", "done"]

        events = await _events(http, new_id)
        assert _completed(events) == {"review": 1, "done": 1}
        carried = next(e for e in events if e["type"] == "run.continued")["data"]["carried"]
        assert carried["edge_counts"] == {"draft->draft": 1, "draft->review": 1}
        edges = [
            (e["data"]["source"], e["data"]["target"], e["data"]["traversal"])
            for e in events
            if e["type"] == "graph.edge_taken"
        ]
        assert edges == [("review", "done", 1)]

        clean = await _post_run(http, spec=GRAPH.replace("FAILS", "0"))
        assert clean["status"] == "succeeded" and final["output_text"] == clean["output_text"]
        assert await _events(http, run_id) == source_events


async def test_continue_a_cancelled_run_waiting_for_a_human(platform: Any) -> None:
    async with httpx.AsyncClient(base_url=platform.url, timeout=60) as http:
        paused = await _post_run(http, spec_path="examples/human_approval_workflow.yaml")
        run_id = paused["run_id"]
        assert paused["status"] == "paused", paused
        cancelled = await http.post(f"/v1/runs/{run_id}/cancel")
        assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
        recovery = (await http.get(f"/v1/runs/{run_id}/recovery")).json()
        assert recovery["can_continue"] is True and recovery["completed_steps"] == ["draft"]

        resp = await http.post(f"/v1/runs/{run_id}/continue")
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert body["status"] == "paused" and body["human_intervention_required"] is True
        assert body["continuation_id"] != paused["continuation_id"]
        assert body["metadata"]["continued_from"]["step_id"] == "approval"
        events = await _events(http, body["run_id"])
        assert _completed(events) == {}
        assert [e["type"] for e in events][-1] == "human.requested"
        assert (await http.get(f"/v1/runs/{run_id}")).json()["status"] == "cancelled"


async def test_fork_from_a_checkpoint_and_diff_across_runs(platform: Any) -> None:
    async with httpx.AsyncClient(base_url=platform.url, timeout=60) as http:
        source = await _post_run(http, spec_path=SPEC, environment="prod")
        run_id = source["run_id"]
        source_events = await _events(http, run_id)
        out = _outputs(source_events)
        runs_before = await _total_runs(http)

        resp = await http.post(f"/v1/runs/{run_id}/fork", params={"from_sequence": 1})
        assert resp.status_code == 200, resp.text
        fork = resp.json()
        fork_id = fork["run_id"]
        assert fork["status"] == "succeeded" and fork["output_text"] == source["output_text"]
        link = {"run_id": run_id, "step_id": "analyze", "step_index": 1, "sequence": 1}
        assert fork["metadata"]["forked_from"] == link
        assert (await http.get(f"/v1/runs/{fork_id}")).json()["metadata"]["forked_from"] == link

        events = await _events(http, fork_id)
        assert _completed(events) == {"analyze": 1, "summarize": 1}
        forked = next(e for e in events if e["type"] == "run.forked")["data"]
        assert (forked["source_run_id"], forked["sequence"], forked["from_step_id"], forked["turn"]) == (
            run_id,
            1,
            "analyze",
            1,
        )
        assert forked["carried"]["step_outputs"] == {"retrieve": out["retrieve"]}
        first_checkpoint = next(e for e in source_events if e["type"] == "checkpoint.saved")
        assert forked["source_version"] == first_checkpoint["version"]  # folded up to checkpoint 1
        assert [e["type"] for e in events[:4]] == ["run.created", "run.compiled", "run.forked", "step.scheduled"]
        checkpoints = (await http.get(f"/v1/runs/{fork_id}/checkpoints")).json()["checkpoints"]
        assert [c["sequence"] for c in checkpoints] == [2, 3]

        # cross-run diff: the fork re-ran deterministically, so its checkpoint 3 equals the source's
        diff = await http.get(
            f"/v1/runs/{fork_id}/checkpoints/diff", params={"other_run_id": run_id, "other_sequence": 3}
        )
        assert diff.status_code == 200, diff.text
        assert diff.json() == {
            "run_id": fork_id,
            "from_sequence": 3,
            "other_run_id": run_id,
            "other_sequence": 3,
            "added": {},
            "removed": {},
            "changed": {},
        }

        # time travel with an edit: a changed past changes every step after it
        edited = await http.post(
            f"/runs/{run_id}/fork", params={"from_sequence": 1}, json={"step_outputs": {"retrieve": "edited sources"}}
        )
        assert edited.status_code == 200, edited.text
        edit_id = edited.json()["run_id"]
        edit_out = _outputs(await _events(http, edit_id))
        assert set(edit_out) == {"analyze", "summarize"} and edit_out["analyze"] != out["analyze"]
        cross = (
            await http.get(f"/v1/runs/{run_id}/checkpoints/diff", params={"other_run_id": edit_id})
        ).json()  # defaults: the latest checkpoint of each
        assert cross == {
            "run_id": run_id,
            "from_sequence": 3,
            "other_run_id": edit_id,
            "other_sequence": 3,
            "added": {},
            "removed": {},
            "changed": {
                "step_outputs.retrieve": {"from": out["retrieve"], "to": "edited sources"},
                "step_outputs.analyze": {"from": out["analyze"], "to": edit_out["analyze"]},
                "step_outputs.summarize": {"from": out["summarize"], "to": edit_out["summarize"]},
            },
        }
        older = (
            await http.get(
                f"/v1/runs/{run_id}/checkpoints/diff",
                params={"from_sequence": 1, "other_run_id": fork_id, "other_sequence": 2},
            )
        ).json()
        assert older["added"] == {"step_outputs.analyze": out["analyze"], "visited_steps[1]": "analyze"}
        assert older["changed"] == {"next_step_index": {"from": 1, "to": 2}}
        assert await _total_runs(http) == runs_before + 2
        assert await _events(http, run_id) == source_events

        # refusals: nothing appended, no run started
        refusals = [
            ({"from_sequence": 9}, None, 400),
            ({"from_sequence": 3}, None, 409),
            ({"from_sequence": 1}, {"step_outputs": {"nope": "x"}}, 400),
            ({}, None, 422),
        ]
        bodies = []
        for params, body, status in refusals:
            r = await http.post(f"/v1/runs/{run_id}/fork", params=params, json=body)
            assert r.status_code == status, r.text
            bodies.append(r.json())
        assert bodies[0] == {
            "error": "invalid_request",
            "message": f"checkpoint sequence 9 does not exist in run {run_id}",
            "field": "from_sequence",
            "available": [1, 2, 3],
        }
        assert bodies[1] == {
            "error": "invalid_state",
            "message": f"no step follows checkpoint 3 of run {run_id}: the run ended there (or has not gone on yet)",
            "run_id": run_id,
            "sequence": 3,
        }
        assert bodies[2]["error"] == "invalid_request" and bodies[2]["available"] == ["retrieve"]
        assert bodies[3]["error"] == "invalid_request"
        missing = await http.post(f"/v1/runs/{UNKNOWN}/fork", params={"from_sequence": 1})
        assert missing.status_code == 404 and missing.json()["error"] == "not_found"
        assert await _total_runs(http) == runs_before + 2
        assert await _events(http, run_id) == source_events

        # cross-run diff refusals
        for params, status, field in (
            ({"other_run_id": UNKNOWN}, 404, None),
            ({"other_run_id": fork_id, "other_sequence": 1}, 400, "other_sequence"),
            ({"other_run_id": fork_id, "to_sequence": 2}, 400, "to_sequence"),
            ({"other_sequence": 2}, 400, "other_sequence"),
        ):
            r = await http.get(f"/v1/runs/{run_id}/checkpoints/diff", params=params)
            assert r.status_code == status, r.text
            assert r.json().get("field") == field


async def test_cli_recovery_continue_fork_and_diff(platform: Any) -> None:
    import orjson
    from typer.testing import CliRunner

    from kneo_client.cli import app

    runner = CliRunner()

    async def kneo(*args: str) -> Any:
        # the CLI runs its own event loop: give it a thread (the platform runs on this test's loop)
        return await asyncio.to_thread(runner.invoke, app, [*args, "--service-url", platform.url])

    async with httpx.AsyncClient(base_url=platform.url, timeout=60) as http:
        source = await _post_run(http, spec=MIDFAIL.replace("FAILS", "1"))
    run_id = source["run_id"]
    recovery = await kneo("runs", "recovery", run_id, "--json")
    assert recovery.exit_code == 0, recovery.output
    assert orjson.loads(recovery.stdout)["can_continue"] is True

    continued = await kneo("runs", "continue", run_id, "--json", "--idempotency-key", "cli-1")
    assert continued.exit_code == 0, continued.output
    body = orjson.loads(continued.stdout)
    assert body["status"] == "succeeded" and body["metadata"]["continued_from"]["run_id"] == run_id
    new_id = body["run_id"]

    checkpoints = await kneo("runs", "checkpoints", new_id, "--json")
    assert [c["sequence"] for c in orjson.loads(checkpoints.stdout)["checkpoints"]] == [2, 3]
    forked = await kneo("runs", "fork", new_id, "--from-sequence", "2", "--json")
    assert forked.exit_code == 0, forked.output
    fork = orjson.loads(forked.stdout)
    assert fork["metadata"]["forked_from"] == {"run_id": new_id, "step_id": "three", "step_index": 2, "sequence": 2}
    diff = await kneo("runs", "checkpoint-diff", fork["run_id"], "--other-run-id", new_id, "--json")
    assert orjson.loads(diff.stdout) == {
        "run_id": fork["run_id"],
        "from_sequence": 3,
        "other_run_id": new_id,
        "other_sequence": 3,
        "added": {},
        "removed": {},
        "changed": {},
    }
    diff_text = await kneo("runs", "checkpoint-diff", new_id, "--from-sequence", "2", "--to-sequence", "3")
    assert diff_text.exit_code == 0 and "+ step_outputs.three:" in diff_text.stdout
    for command in ("replay", "trace"):
        shown = await kneo("runs", command, new_id, "--json")
        assert shown.exit_code == 0 and orjson.loads(shown.stdout)["run_id"] == new_id

    refused = await kneo("runs", "continue", new_id)
    assert refused.exit_code == 1 and "409 invalid_state" in refused.stderr
    # a fork of the failed source from checkpoint 1 runs step two at attempt 1 again: it fails the same way
    again = await kneo("runs", "fork", run_id, "--from-sequence", "1", "--json")
    assert again.exit_code == 1 and orjson.loads(again.stdout)["status"] == "failed"
    missing = await kneo("runs", "fork", run_id, "--from-sequence", "9")
    assert missing.exit_code == 1 and "400 invalid_request" in missing.stderr
