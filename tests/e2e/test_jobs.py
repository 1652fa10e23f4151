"""The Jobs face over HTTP against the whole platform (real NATS + PostgreSQL, every service in-process).

Jobs run on the dummy provider (model ``auto``), so their transcript and files are deterministic.
"""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from kneo_events import sandboxes

PROMPT = "Write a fibonacci script"
USER_EXAM = {
    "job_type": "user_exam",
    "user_id": "user_12345",
    "time_range": {"from": "2025-01-01T00:00:00Z", "to": "2025-01-31T23:59:59Z"},
}
ENVELOPE = {"error", "detail", "code"}


async def _platform(platform_factory: Any, tmp_path: Path, **overrides: Any) -> Any:
    return await platform_factory(sandbox_root=tmp_path / "sandboxes", **overrides)


async def _create(http: httpx.AsyncClient, spec: dict[str, Any], **kw: Any) -> dict[str, Any]:
    resp = await http.post("/jobs", json={"spec": spec}, **kw)
    assert resp.status_code == 200, resp.text
    body: dict[str, Any] = resp.json()
    return body


async def _wait(http: httpx.AsyncClient, job_id: str, statuses: tuple[str, ...] = ("completed",), **kw: Any) -> Any:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    while True:
        job = (await http.get(f"/jobs/{job_id}", **kw)).json()
        if job["status"] in statuses:
            return job
        assert job["status"] not in ("failed", "cancelled", "cleaned"), job
        assert loop.time() < deadline, f"job {job_id} still {job['status']}"
        await asyncio.sleep(0.05)


async def test_each_job_type_runs_in_its_sandbox(platform_factory: Any, tmp_path: Path) -> None:
    platform = await _platform(platform_factory, tmp_path)
    specs = [
        {"job_type": "cursor_task", "prompt": PROMPT, "metadata": {"team": "eng"}},
        {"job_type": "gemini_task", "prompt": "Summarize the plan"},
        {"job_type": "claude_task", "prompt": "Review the code", "model": "auto"},
        {"job_type": "fh_e2e_tools", "prompt": "Create a test user using the runbook @create-user.md"},
        USER_EXAM,
    ]
    async with httpx.AsyncClient(base_url=platform.url, timeout=30) as http:
        created = [await _create(http, spec) for spec in specs]
        for spec, body in zip(specs, created, strict=True):
            assert body["job_id"].startswith("job_") and body["status"] in ("queued", "running")
            job = await _wait(http, body["job_id"])
            assert job["id"] == job["job_id"] == body["job_id"]
            assert job["spec"] == spec and job["job_type"] == spec["job_type"]
            assert job["sandbox_id"] == body["sandbox_id"] and job["sandbox_id"].startswith("sandbox_")
            assert job["cursor_session_id"].startswith("session_") and job["error"] is None
            assert job["created_at"] and job["started_at"] and job["completed_at"]
            stages = [e["stage"] for e in job["events"]]
            assert stages[:3] == ["queued", "sandbox_created", "agent_started"], job["events"]
            assert stages[-2:] == ["sandbox_paused", "completed"]
            assert "artifact_generated" in stages
            assert all(set(e) == {"ts", "stage", "level", "detail"} for e in job["events"])
            assert "result.json" in job["artifacts"]["files"]
            sandbox = tmp_path / "sandboxes" / job["sandbox_id"]
            assert (sandbox / "result.json").is_file()

            artifacts = (await http.get(f"/jobs/{body['job_id']}/artifacts")).json()
            result = artifacts["result.json"]
            assert isinstance(result, dict) and result["job_type"] == spec["job_type"]
            assert result["job_id"] == body["job_id"] and result["status"] == "success"
            events = (await http.get(f"/jobs/{body['job_id']}/events")).json()
            assert events == {"events": job["events"]}
        # the dummy agent called write_file with a path from the prompt: a file artifact besides result.json
        cursor_job = (await http.get(f"/jobs/{created[0]['job_id']}/artifacts")).json()
        assert cursor_job[PROMPT] == PROMPT
        assert cursor_job["result.json"]["metadata"] == {"team": "eng"}
        exam = (await http.get(f"/jobs/{created[4]['job_id']}/artifacts")).json()["result.json"]
        assert exam["user_id"] == "user_12345" and exam["time_range"] == USER_EXAM["time_range"]
        assert exam["prompt"].startswith("Investigate user user_12345")
        # a job is a run: the Kneo face shows the same run
        run = (await http.get(f"/v1/runs/{created[0]['job_id']}")).json()
        assert run["status"] == "succeeded" and run["metadata"]["job"]["job_type"] == "cursor_task"


async def test_bad_specs_are_400_with_the_reason(platform: Any) -> None:
    async with httpx.AsyncClient(base_url=platform.url, timeout=30) as http:
        cases = [
            ({"job_type": "nope", "prompt": "x"}, "unknown job_type"),
            ({"prompt": "x"}, "job_type is required"),
            ({"job_type": "cursor_task"}, "prompt is required"),
            ({"job_type": "cursor_task", "prompt": "  "}, "prompt is required"),
            ({"job_type": "user_exam", "time_range": USER_EXAM["time_range"]}, "user_id is required"),
            ({"job_type": "user_exam", "user_id": "u1"}, "time_range is required"),
            ({"job_type": "user_exam", "user_id": "u1", "time_range": {"from": "x"}}, "time_range is required"),
            ({"job_type": "cursor_task", "prompt": "x", "model": "gpt-99"}, "unknown model"),
            ({"job_type": "cursor_task", "prompt": "x", "colour": "red"}, "unknown spec field"),
            ({"job_type": "cursor_task", "prompt": "x", "workspace_path": "/workspaces/absent"}, "not found"),
        ]
        for spec, reason in cases:
            resp = await http.post("/jobs", json={"spec": spec})
            assert resp.status_code == 400, (spec, resp.text)
            body = resp.json()
            assert set(body) == ENVELOPE and body["code"] == "BAD_REQUEST", body
            assert reason in body["error"], (reason, body)
        unknown = (await http.post("/jobs", json={"spec": {"job_type": "nope"}})).json()
        assert unknown["detail"]["known_job_types"] == [
            "cursor_task",
            "gemini_task",
            "claude_task",
            "fh_e2e_tools",
            "user_exam",
        ]
        assert "cursor_task, gemini_task" in unknown["error"]
        missing = await http.post("/jobs", json={})
        assert missing.status_code == 400 and set(missing.json()) == ENVELOPE
        # nothing was started by any of them
        listed = (await http.get("/jobs")).json()
        assert listed["pagination"]["total"] == 0
        assert int(await platform.kernel.store.pool.fetchval("SELECT count(*) FROM events")) == 0


async def test_list_pages_and_filters(platform_factory: Any, tmp_path: Path) -> None:
    platform = await _platform(platform_factory, tmp_path)
    async with httpx.AsyncClient(base_url=platform.url, timeout=30) as http:
        ids = [(await _create(http, {"job_type": "cursor_task", "prompt": f"task {i}"}))["job_id"] for i in range(3)]
        ids.append((await _create(http, USER_EXAM))["job_id"])
        for job_id in ids:
            await _wait(http, job_id)
        first = (await http.get("/jobs", params={"limit": 3})).json()
        assert first["pagination"] == {"page": 1, "limit": 3, "total": 4, "pages": 2}
        second = (await http.get("/jobs", params={"limit": 3, "page": 2})).json()
        assert second["pagination"]["page"] == 2 and len(second["data"]) == 1
        listed = [j["id"] for j in first["data"] + second["data"]]
        assert listed == list(reversed(ids))  # newest first, no job twice
        item = first["data"][0]
        assert item["id"] == item["job_id"] and {"spec", "status", "created_at", "sandbox_id"} <= set(item)

        exams = (await http.get("/jobs", params={"job_type": "user_exam"})).json()
        assert [j["id"] for j in exams["data"]] == [ids[3]]
        done = (await http.get("/jobs", params={"status": "completed"})).json()
        assert done["pagination"]["total"] == 4
        assert (await http.get("/jobs", params={"status": "running"})).json()["pagination"]["total"] == 0
        clamped = (await http.get("/jobs", params={"limit": 500})).json()
        assert clamped["pagination"]["limit"] == 100
        for bad in ({"status": "weird"}, {"job_type": "weird"}, {"page": 0}, {"limit": 0}):
            resp = await http.get("/jobs", params=bad)
            assert resp.status_code == 400 and resp.json()["code"] == "BAD_REQUEST", (bad, resp.text)
        assert (await http.get("/jobs/job_0000000000000000")).status_code == 404
        not_job = (await http.get("/jobs/run_x")).json()
        assert set(not_job) == ENVELOPE and not_job["code"] == "NOT_FOUND"


async def _read_sse(
    http: httpx.AsyncClient, url: str, headers: dict[str, str] | None = None, stop_after: int | None = None
) -> list[tuple[str | None, dict[str, Any]]]:
    """Read the stream as a browser's EventSource would: every event is ``data:`` (+ ``id:``); no named events."""
    out: list[tuple[str | None, dict[str, Any]]] = []
    eid: str | None = None
    data: list[str] = []
    async with http.stream("GET", url, headers=headers or {}) as resp:
        assert resp.status_code == 200, await resp.aread()
        assert resp.headers["content-type"].startswith("text/event-stream")
        async for line in resp.aiter_lines():
            if line.startswith(":"):
                continue
            if line == "":
                if data:
                    out.append((eid, json.loads("\n".join(data))))
                    data = []
                    if stop_after is not None and len(out) >= stop_after:
                        break
                continue
            key, _, value = line.partition(":")
            value = value.removeprefix(" ")
            assert key in ("data", "id"), f"unexpected SSE field {line!r}"  # onmessage gets every event
            if key == "data":
                data.append(value)
            else:
                eid = value
    return out


async def test_cursor_and_its_stream(platform_factory: Any, tmp_path: Path) -> None:
    platform = await _platform(platform_factory, tmp_path)
    async with httpx.AsyncClient(base_url=platform.url, timeout=30) as http:
        job_id = (await _create(http, {"job_type": "cursor_task", "prompt": PROMPT}))["job_id"]
        # the stream opened right away follows the job live and ends with `completed`
        live = await _read_sse(http, f"/jobs/{job_id}/cursor/stream")
        assert live[-1][1]["type"] == "completed" and live[-1][1]["status"] == "completed"
        await _wait(http, job_id)
        cursor = (await http.get(f"/jobs/{job_id}/cursor")).json()["events"]
        assert [item for _, item in live] == cursor
        types = [e["type"] for e in cursor]
        assert types[-1] == "completed" and "agent_message" in types and "file_created" in types
        tools = [e["tool"] for e in cursor if e["type"] == "tool_use"]
        assert tools == ["write_file", "read_file", "list_files"]
        write = next(e for e in cursor if e["type"] == "tool_use")
        assert write["parameters"] == {"path": PROMPT, "content": PROMPT} and write["ok"] is True
        created = [e["path"] for e in cursor if e["type"] == "file_created"]
        assert created == [PROMPT, "result.json"]
        message = next(e for e in cursor if e["type"] == "agent_message")
        assert message["message"].startswith(f"On {PROMPT}:") and message["timestamp"]

        # a finished job's stream replays the transcript; resuming after item 2 gives the rest, no duplicates
        again = await _read_sse(http, f"/jobs/{job_id}/cursor/stream")
        assert [i for _, i in again] == cursor
        ids = [eid for eid, _ in again]
        assert all(ids) and len(set(ids)) == len(ids)
        resumed = await _read_sse(http, f"/jobs/{job_id}/cursor/stream", {"Last-Event-ID": str(ids[1])})
        assert [eid for eid, _ in resumed] == ids[2:]
        assert [i for _, i in resumed] == cursor[2:]
        at_end = await _read_sse(http, f"/jobs/{job_id}/cursor/stream", {"Last-Event-ID": str(ids[-1])})
        assert at_end == []
        bad = await http.get(f"/jobs/{job_id}/cursor/stream", headers={"Last-Event-ID": "x.y"})
        assert bad.status_code == 400 and set(bad.json()) == ENVELOPE


async def test_continue_reuses_the_sandbox_and_cleanup_ends_it(platform_factory: Any, tmp_path: Path) -> None:
    platform = await _platform(platform_factory, tmp_path)
    async with httpx.AsyncClient(base_url=platform.url, timeout=30) as http:
        parent = await _create(http, {"job_type": "cursor_task", "prompt": PROMPT, "session_id": "session_mine"})
        await _wait(http, parent["job_id"])
        resp = await http.post(f"/jobs/{parent['job_id']}/continue", json={"spec": {"prompt": "Now add tests"}})
        assert resp.status_code == 200, resp.text
        child = resp.json()
        assert child["parent_job_id"] == parent["job_id"] and child["job_id"] != parent["job_id"]
        assert child["sandbox_id"] == parent["sandbox_id"] and child["cursor_session_id"] == "session_mine"
        job = await _wait(http, child["job_id"])
        assert job["parent_job_id"] == parent["job_id"] and job["spec"] == {
            "prompt": "Now add tests",
            "job_type": "cursor_task",
        }
        assert job["job_type"] == "cursor_task"
        assert "resumed" in next(e["detail"] for e in job["events"] if e["stage"] == "sandbox_created")
        # the parent's files are there: the child's list_files saw them, and they are its artifacts too
        cursor = (await http.get(f"/jobs/{child['job_id']}/cursor")).json()["events"]
        listed = next(e for e in cursor if e.get("tool") == "list_files")
        assert PROMPT in listed["result"] and "Now add tests" in listed["result"]
        assert {PROMPT, "Now add tests", "result.json"} <= set(job["artifacts"]["files"])
        result = (await http.get(f"/jobs/{child['job_id']}/artifacts")).json()["result.json"]
        assert result["job_id"] == child["job_id"] and PROMPT in result["files"]
        # the session carried the parent's turn into the child's prompt
        tool_args = next(e for e in cursor if e.get("tool") == "write_file")["parameters"]
        assert tool_args["path"] == "Now add tests"

        sandbox = tmp_path / "sandboxes" / parent["sandbox_id"]
        assert sandbox.is_dir()
        cleaned = await http.post(f"/jobs/{child['job_id']}/cleanup")
        assert cleaned.status_code == 200, cleaned.text
        assert cleaned.json()["success"] is True and "cleaned up" in cleaned.json()["message"]
        assert set(cleaned.json()["cleaned_jobs"]) == {parent["job_id"], child["job_id"]}
        assert not sandbox.exists()
        for job_id in (parent["job_id"], child["job_id"]):
            gone = (await http.get(f"/jobs/{job_id}")).json()
            assert gone["status"] == "cleaned" and gone["artifacts"] == {"files": []}
            assert gone["events"][-1]["stage"] == "cleaned"
            assert (await http.get(f"/jobs/{job_id}/artifacts")).json() == {}
        run = (await http.get(f"/v1/runs/{parent['job_id']}")).json()
        assert run["status"] == "succeeded"  # the run's own status never changes
        refused = await http.post(f"/jobs/{parent['job_id']}/continue", json={"spec": {"prompt": "more"}})
        assert refused.status_code == 409
        body = refused.json()
        assert set(body) == ENVELOPE and body["code"] == "CONFLICT" and "cleaned up" in body["error"]
        repeat = await http.post(f"/jobs/{parent['job_id']}/cleanup")
        assert repeat.status_code == 200 and repeat.json()["message"] == "Sandbox already cleaned up"
        assert [j["id"] for j in (await http.get("/jobs", params={"status": "cleaned"})).json()["data"]] == [
            child["job_id"],
            parent["job_id"],
        ]


async def test_continuing_a_running_job_queues_behind_it(platform_factory: Any, tmp_path: Path) -> None:
    slow = json.dumps({"slow": {"provider": "dummy", "name": "slow", "params": {"latency_ms": 150, "chunks": 6}}})
    platform = await _platform(platform_factory, tmp_path, jobs_model_map=slow)
    async with httpx.AsyncClient(base_url=platform.url, timeout=30) as http:
        parent = await _create(http, {"job_type": "cursor_task", "prompt": PROMPT, "model": "slow"})
        child = (await http.post(f"/jobs/{parent['job_id']}/continue", json={"spec": {"prompt": "Then this"}})).json()
        assert child["status"] == "queued" and child["sandbox_id"] == parent["sandbox_id"]
        held = (await http.get(f"/jobs/{child['job_id']}")).json()
        assert held["queued_behind"] == parent["job_id"]
        cleanup = await http.post(f"/jobs/{parent['job_id']}/cleanup")
        assert cleanup.status_code == 409 and cleanup.json()["code"] == "CONFLICT"  # in use
        done_parent = await _wait(http, parent["job_id"])
        done_child = await _wait(http, child["job_id"])
        assert done_child["started_at"] >= done_parent["completed_at"]
        assert done_child["events"][0]["detail"] == f"Queued behind job {parent['job_id']} (same sandbox)"


async def test_idempotent_create(platform_factory: Any, tmp_path: Path) -> None:
    platform = await _platform(platform_factory, tmp_path)
    async with httpx.AsyncClient(base_url=platform.url, timeout=30) as http:
        spec = {"job_type": "cursor_task", "prompt": PROMPT}
        first = await http.post("/jobs", json={"spec": spec}, headers={"Idempotency-Key": "job-key-1"})
        again = await http.post("/jobs", json={"spec": spec}, headers={"Idempotency-Key": "job-key-1"})
        assert first.status_code == again.status_code == 200
        assert again.json() == first.json() and again.headers["idempotent-replayed"] == "true"
        other = await http.post(
            "/jobs", json={"spec": {**spec, "prompt": "else"}}, headers={"Idempotency-Key": "job-key-1"}
        )
        assert other.status_code == 409 and set(other.json()) == ENVELOPE
        assert (await http.get("/jobs")).json()["pagination"]["total"] == 1


async def test_scopes_and_error_envelopes(platform_factory: Any, tmp_path: Path) -> None:
    keys = "ops:k-ops:operator;view:k-view:viewer;rev:k-rev:reviewer;adm:k-adm:admin"
    platform = await _platform(platform_factory, tmp_path, api_keys=SecretStr(keys))
    spec = {"job_type": "cursor_task", "prompt": PROMPT}

    def auth(key: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {key}"}

    async with httpx.AsyncClient(base_url=platform.url, timeout=30) as http:
        anonymous = await http.post("/jobs", json={"spec": spec})
        assert anonymous.status_code == 401
        assert set(anonymous.json()) == ENVELOPE and anonymous.json()["code"] == "UNAUTHORIZED"
        wrong = await http.get("/jobs", headers=auth("nope"))
        assert wrong.status_code == 401 and wrong.json()["code"] == "UNAUTHORIZED"
        reviewer = await http.get("/jobs", headers=auth("k-rev"))
        assert reviewer.status_code == 403
        assert set(reviewer.json()) == ENVELOPE and reviewer.json()["code"] == "FORBIDDEN"
        viewer = await http.post("/jobs", json={"spec": spec}, headers=auth("k-view"))
        assert viewer.status_code == 403 and viewer.json()["code"] == "FORBIDDEN"
        job = await _create(http, spec, headers=auth("k-ops"))
        await _wait(http, job["job_id"], headers=auth("k-view"))
        admin = await http.post(
            f"/jobs/{job['job_id']}/continue", json={"spec": {"prompt": "x"}}, headers=auth("k-adm")
        )
        assert admin.status_code == 200
        assert (await http.post(f"/jobs/{job['job_id']}/cleanup", headers=auth("k-view"))).status_code == 403
        # the SSE route takes ?access_token= (EventSource cannot send headers); other routes do not
        items = await _read_sse(http, f"/jobs/{job['job_id']}/cursor/stream?access_token=k-view")
        assert items[-1][1]["type"] == "completed"
        assert (await http.get(f"/jobs/{job['job_id']}/cursor/stream")).status_code == 401
        assert (await http.get(f"/jobs/{job['job_id']}?access_token=k-view")).status_code == 401
        root = await http.get("/")
        assert root.status_code == 200 and root.json()["status"] == "ok" and root.json()["version"]
        assert "/jobs/{job_id}/cursor/stream" in (await http.get("/openapi.json")).json()["paths"]


async def test_retention_sweep_cleans_old_sandboxes(platform_factory: Any, tmp_path: Path) -> None:
    platform = await _platform(platform_factory, tmp_path, sandbox_retention_days=2.0)
    async with httpx.AsyncClient(base_url=platform.url, timeout=30) as http:
        job = await _create(http, {"job_type": "cursor_task", "prompt": PROMPT})
        await _wait(http, job["job_id"])
        sandbox = tmp_path / "sandboxes" / job["sandbox_id"]
        assert sandbox.is_dir()
        now = datetime.now(UTC)
        assert await sandboxes.sweep_expired(platform.kernel, now + timedelta(days=1)) == []
        assert sandbox.is_dir() and (await http.get(f"/jobs/{job['job_id']}")).json()["status"] == "completed"
        assert await sandboxes.sweep_expired(platform.kernel, now + timedelta(days=3)) == [job["sandbox_id"]]
        assert not sandbox.exists()
        swept = (await http.get(f"/jobs/{job['job_id']}")).json()
        assert swept["status"] == "cleaned"
        assert swept["events"][-1] == {
            "ts": swept["events"][-1]["ts"],
            "stage": "cleaned",
            "level": "info",
            "detail": f"Sandbox {job['sandbox_id']} deleted (retention period over)",
        }
        assert await sandboxes.sweep_expired(platform.kernel, now + timedelta(days=3)) == []  # once


@pytest.mark.parametrize("path", ["../escape.txt", "/tmp/kneo-escape.txt", "sub/../../escape.txt"])
def test_sandbox_tools_cannot_leave_the_sandbox(tmp_path: Path, path: str) -> None:
    from kneo_runner.connectors import sandbox as connector
    from kneo_runner.tools import FilesystemNotAllowed, Permissions, ToolContext

    box = tmp_path / "sandbox_0123456789abcdef"
    box.mkdir()
    perms = Permissions.from_spec({"filesystem": {"read": [str(box)], "write": [str(box)]}}, tmp_path)
    ctx = ToolContext("write_file", perms, tmp_path, 5.0)
    assert connector.write_file(ctx, str(box), "ok/inside.txt", "fine") == {"path": "ok/inside.txt", "chars": 4}
    assert connector.read_file(ctx, str(box), "ok/inside.txt") == "fine"
    assert connector.list_files(ctx, str(box)) == ["ok/inside.txt"]
    with pytest.raises(FilesystemNotAllowed):
        connector.write_file(ctx, str(box), path, "nope")
    with pytest.raises(FilesystemNotAllowed):
        connector.read_file(ctx, str(box), path)
    (box / "link").symlink_to(tmp_path)  # a symlink out of the sandbox is refused too
    with pytest.raises(FilesystemNotAllowed):
        connector.write_file(ctx, str(box), "link/escape.txt", "nope")
    assert not (tmp_path / "escape.txt").exists() and not Path("/tmp/kneo-escape.txt").exists()
    with pytest.raises(ValueError, match="not a job sandbox"):
        connector.prepare(str(tmp_path))
