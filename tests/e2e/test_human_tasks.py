"""Human tasks over HTTP: list, get, resume (every decision), reviewers, the one-resume lock, cancel closes the task."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
from pydantic import SecretStr

KEYS = "release-manager:rm-token:reviewer;someone:other-token:reviewer;viewer:view-token:viewer;op:op-token:operator"
SPEC = "examples/human_approval_workflow.yaml"


def h(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def _terminal(http: httpx.AsyncClient, run_id: str, headers: dict[str, str]) -> dict[str, Any]:
    for _ in range(500):
        state = (await http.get(f"/v1/runs/{run_id}", headers=headers)).json()
        if state["status"] in ("succeeded", "failed", "cancelled"):
            return state
        await asyncio.sleep(0.02)
    raise AssertionError(state)


async def test_pause_list_resume_by_the_reviewer_only(platform_factory: Any) -> None:
    p = await platform_factory(api_keys=SecretStr(KEYS))
    async with httpx.AsyncClient(base_url=p.url, timeout=30) as http:
        run = (await http.post("/v1/runs", json={"input": "q3", "spec_path": SPEC}, headers=h("op-token"))).json()
        assert run["status"] == "paused"
        listed = (await http.get(f"/v1/human-tasks?run_id={run['run_id']}", headers=h("view-token"))).json()
        assert listed["count"] == 1 and listed["total"] == 1 and listed["limit"] == 100
        task = listed["tasks"][0]
        assert task["continuation_id"] == run["continuation_id"] and task["status"] == "pending"
        assert task["request"]["request_id"] == run["metadata"]["pending_human_request"]["request_id"]
        assert task["request"]["reviewers"] == ["release-manager"] and task["request"]["deadline_epoch"] > 0
        cid, rid = task["continuation_id"], task["request"]["request_id"]
        assert (await http.get(f"/human-tasks/{cid}", headers=h("view-token"))).json()["run_id"] == run["run_id"]
        body = {"request_id": rid, "decision": "approved", "content": "Looks good. Ship it."}
        viewer = await http.post(f"/v1/human-tasks/{cid}/resume", json=body, headers=h("view-token"))
        assert viewer.status_code == 403 and viewer.json()["required_scope"] == "human:write"
        stranger = await http.post(f"/v1/human-tasks/{cid}/resume", json=body, headers=h("other-token"))
        assert stranger.status_code == 403 and stranger.json()["required_reviewer"] == ["release-manager"]
        wrong = await http.post(
            f"/v1/human-tasks/{cid}/resume", json={**body, "request_id": "req_nope"}, headers=h("rm-token")
        )
        assert wrong.status_code == 400 and wrong.json()["field"] == "request_id"
        big = await http.post(
            f"/v1/human-tasks/{cid}/resume", json={**body, "content": "x" * 20001}, headers=h("rm-token")
        )
        assert big.status_code == 413
        bad = await http.post(
            f"/v1/human-tasks/{cid}/resume", json={**body, "decision": "maybe"}, headers=h("rm-token")
        )
        assert bad.status_code == 422
        notopt = await http.post(
            f"/v1/human-tasks/{cid}/resume",
            json={"request_id": rid, "decision": "selected", "selected_option": "ship"},
            headers=h("rm-token"),
        )
        assert notopt.status_code == 400 and notopt.json()["options"] == ["approve", "reject"]
        before = (await http.get(f"/v1/runs/{run['run_id']}/events", headers=h("view-token"))).json()["count"]
        assert before == (await http.get(f"/v1/runs/{run['run_id']}/events", headers=h("view-token"))).json()["count"]
        ok = await http.post(
            f"/continuations/{cid}/resume", json=body, headers={**h("rm-token"), "Idempotency-Key": "resume-1"}
        )
        assert ok.status_code == 200 and ok.json()["run_id"] == run["run_id"]
        replay = await http.post(
            f"/v1/human-tasks/{cid}/resume", json=body, headers={**h("rm-token"), "Idempotency-Key": "resume-1"}
        )
        assert replay.json() == ok.json() and replay.headers["idempotent-replayed"] == "true"
        again = await http.post(f"/v1/human-tasks/{cid}/resume", json=body, headers=h("rm-token"))
        assert again.status_code == 409 and again.json()["error"] == "invalid_state"
        final = await _terminal(http, run["run_id"], h("view-token"))
        assert final["status"] == "succeeded" and final["visited_steps"] == ["draft", "approval", "publish"]
        decided = (await http.get(f"/v1/human-tasks/{cid}", headers=h("view-token"))).json()
        assert decided["status"] == "decided" and decided["decision"]["reviewer"] == "release-manager"


async def test_concurrent_resumes_one_wins_and_cancel_closes_the_task(platform: Any) -> None:
    async with httpx.AsyncClient(base_url=platform.url, timeout=30) as http:
        run = (await http.post("/v1/runs", json={"input": "x", "spec_path": SPEC})).json()
        task = (await http.get(f"/v1/human-tasks/{run['continuation_id']}")).json()
        body = {"request_id": task["request"]["request_id"], "decision": "edited", "content": "better draft"}
        results = await asyncio.gather(
            *(http.post(f"/v1/human-tasks/{run['continuation_id']}/resume", json=body) for _ in range(5))
        )
        codes = sorted(r.status_code for r in results)
        assert codes.count(200) == 1 and set(codes) <= {200, 409}
        decided = [
            e
            for e in (await http.get(f"/v1/runs/{run['run_id']}/events")).json()["events"]
            if e["type"] == "human.decided"
        ]
        assert len(decided) == 1
        final = await _terminal(http, run["run_id"], {})
        assert final["status"] == "succeeded"
        other = (await http.post("/v1/runs", json={"input": "y", "spec_path": SPEC})).json()
        cancelled = await http.post(f"/v1/runs/{other['run_id']}/cancel")
        assert cancelled.status_code == 200
        closed = (await http.get(f"/v1/human-tasks/{other['continuation_id']}")).json()
        assert closed["status"] == "cancelled"
        late = await http.post(
            f"/v1/human-tasks/{other['continuation_id']}/resume",
            json={**body, "request_id": closed["request"]["request_id"]},
        )
        assert late.status_code == 409 and late.json()["status"] == "cancelled"
        assert (await http.get("/v1/human-tasks/cont_nope")).status_code == 404
        page = (await http.get("/v1/human-tasks?status=cancelled")).json()
        assert [t["continuation_id"] for t in page["tasks"]] == [other["continuation_id"]]
