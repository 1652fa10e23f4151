"""The Knap face: POST /api/knap-tools/run streamed as the seed's events, chats, Knaps, the smart cache, errors."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
from pydantic import SecretStr

BOTH = [
    {"tool_type": "gmail", "tool_description": "Access Gmail emails"},
    {"tool_type": "google_calendar", "tool_description": "Access Google Calendar events"},
]


def _ask(content: str, **extra: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": content}], "tool_types": BOTH, **extra}


async def _events(http: httpx.AsyncClient, body: dict[str, Any], **kw: Any) -> tuple[list[dict[str, Any]], bytes]:
    """POST and read the SSE body; every event must be exactly one ``data:`` line followed by a blank line."""
    async with http.stream("POST", "/api/knap-tools/run", json=body, **kw) as resp:
        assert resp.status_code == 200, await resp.aread()
        assert resp.headers["content-type"].startswith("text/event-stream")
        raw = await resp.aread()
    events = []
    for block in raw.decode().split("\n\n"):
        if not block or block.startswith(":"):
            continue
        assert block.startswith("data: ") and "\n" not in block, block
        events.append(json.loads(block[6:]))
    return events, raw


async def _until(check: Any, what: str) -> Any:
    for _ in range(400):
        value = await check()
        if value:
            return value
        await asyncio.sleep(0.025)
    raise AssertionError(what)


async def test_a_run_streams_tool_events_message_chunks_and_done(platform: Any) -> None:
    async with httpx.AsyncClient(base_url=platform.url, timeout=30) as http:
        events, _ = await _events(http, _ask("Summarize my emails from last week"))
        types = [e["type"] for e in events]
        assert types[:4] == ["tool_execution", "tool_result", "tool_execution", "tool_result"]
        assert types[-1] == "done" and "message_chunk" in types and "error" not in types
        gmail_exec, gmail_result, cal_exec, cal_result = events[:4]
        assert gmail_exec == {
            "type": "tool_execution",
            "tool_name": "gmail",
            "status": "running",
            "queryUuid": gmail_exec["queryUuid"],
        }
        assert gmail_result["tool_name"] == "gmail" and gmail_result["queryUuid"] == gmail_exec["queryUuid"]
        subjects = [m["subject"] for m in gmail_result["result"]["emails"]]
        assert subjects[0] == "Hiring plan draft" and "Q4 budget approved" in subjects  # the fixture mailbox
        assert cal_exec["tool_name"] == "google_calendar" and cal_result["queryUuid"] == cal_exec["queryUuid"]
        assert {"Team standup"} <= {e["summary"] for e in cal_result["result"]["events"]}
        chunks = [e for e in events if e["type"] == "message_chunk"]
        done = events[-1]
        assert all(c["messageId"] == done["messageId"] for c in chunks)
        text = "".join(c["content"] for c in chunks)
        assert text.startswith("On Summarize my emails from last week:") and "From 2 tool results" in text
        assert done["chatId"].startswith("chat_")
        # a Knap run is a run: visible on the Kneo face with its face, its answer the streamed text
        chat = (await http.get(f"/api/knap-tools/chats/{done['chatId']}")).json()
        run_id = chat["runs"][0]["run_id"]
        listed = (await http.get("/v1/runs", params={"limit": 100})).json()["runs"]
        assert next(r for r in listed if r["run_id"] == run_id)["face"] == "knap"
        full = (await http.get(f"/v1/runs/{run_id}")).json()
        assert full["status"] == "succeeded" and full["output_text"] == text
        assert full["metadata"]["face"] == "knap" and full["metadata"]["knap"]["chat_id"] == done["chatId"]

        async def audited() -> Any:
            page = (await http.get("/v1/audit-events", params={"run_id": run_id})).json()
            return page["events"] or None

        records = await _until(audited, "the Knap run's creation is in the audit log")
        assert records[0]["event_type"] == "run.created" and records[0]["payload"]["face"] == "knap"


async def test_a_chat_continues_and_the_model_sees_earlier_turns(platform: Any) -> None:
    async with httpx.AsyncClient(base_url=platform.url, timeout=30) as http:
        first, _ = await _events(http, _ask("What meetings do I have tomorrow?"))
        chat_id = first[-1]["chatId"]
        second, _ = await _events(http, _ask("What about next week?", chat_id=chat_id))
        assert second[-1]["chatId"] == chat_id and second[-1]["messageId"] != first[-1]["messageId"]
        chat = (await http.get(f"/api/knap-tools/chats/{chat_id}")).json()
        roles = [(m["role"], (m["content"] or "")[:22]) for m in chat["messages"]]
        assert roles == [
            ("user", "What meetings do I hav"),
            ("assistant", "On What meetings do I "),
            ("user", "What about next week?"),
            ("assistant", roles[3][1]),
        ]
        assert len(chat["runs"]) == 2 and all(len(r["tool_calls"]) == 2 for r in chat["runs"])
        run_id = chat["runs"][1]["run_id"]
        created = (await http.get(f"/v1/runs/{run_id}/events")).json()["events"][0]
        prompt = created["data"]["input"]
        assert prompt.startswith("Earlier in this conversation:\nuser: What meetings do I have tomorrow?")
        assert prompt.endswith("Now:\nuser: What about next week?")
        # unknown chat: 404 in the Knap envelope
        missing = await http.post("/api/knap-tools/run", json=_ask("hi", chat_id="chat_nope"))
        assert missing.status_code == 404 and missing.json() == {"detail": "chat chat_nope not found"}
        assert (await http.get("/api/knap-tools/chats/chat_nope")).status_code == 404


async def test_the_smart_cache_skips_a_repeated_call_in_a_chat(platform: Any) -> None:
    async with httpx.AsyncClient(base_url=platform.url, timeout=30) as http:
        first, _ = await _events(http, _ask("Anything new?"))
        chat_id = first[-1]["chatId"]
        results = [e for e in first if e["type"] == "tool_result"]
        assert [r["cached"] for r in results] == [False, False]
        again, _ = await _events(http, _ask("Anything new?", chat_id=chat_id))
        cached = [e for e in again if e["type"] == "tool_result"]
        assert [r["cached"] for r in cached] == [True, True]  # identical calls: not run again
        assert [r["result"] for r in cached] == [r["result"] for r in results]
        off, _ = await _events(http, _ask("Anything new?", chat_id=chat_id, use_smart_cache=False))
        assert [r["cached"] for r in off if r["type"] == "tool_result"] == [False, False]
        chat = (await http.get(f"/api/knap-tools/chats/{chat_id}")).json()
        assert [[c["cached"] for c in r["tool_calls"]] for r in chat["runs"]] == [
            [False, False],
            [True, True],
            [False, False],
        ]


async def test_stream_updates_false_answers_one_body(platform: Any) -> None:
    async with httpx.AsyncClient(base_url=platform.url, timeout=30) as http:
        resp = await http.post("/api/knap-tools/run", json=_ask("Brief me", stream_updates=False))
        assert resp.status_code == 200
        body = resp.json()
        assert body["type"] == "done" and body["status"] == "succeeded" and body["chatId"].startswith("chat_")
        assert body["message"].startswith("On Brief me:")
        assert [c["tool_name"] for c in body["tool_calls"]] == ["gmail", "google_calendar"]
        assert all(c["ok"] and c["queryUuid"] for c in body["tool_calls"])


async def test_preconfigured_knaps(platform: Any) -> None:
    async with httpx.AsyncClient(base_url=platform.url, timeout=30) as http:
        made = await http.post(
            "/api/knaps",
            json={
                "name": "weekly-summary",
                "instructions": "Summarize the week.",
                "tool_types": [{"tool_type": "gmail", "tool_description": "Mail"}],
            },
        )
        assert made.status_code == 201, made.text
        knap_uuid = made.json()["knap_uuid"]
        listed = (await http.get("/api/knaps")).json()
        assert knap_uuid in [k["knap_uuid"] for k in listed["knaps"]]
        events, _ = await _events(
            http,
            {
                "messages": [{"role": "user", "content": "Run my weekly summary"}],
                "tool_types": [],
                "knap_tool_uuid": knap_uuid,
            },
        )
        assert [e["tool_name"] for e in events if e["type"] == "tool_execution"] == ["gmail"]
        assert events[-1]["type"] == "done"
        assert (await http.delete(f"/api/knaps/{knap_uuid}")).status_code == 200
        # the Knaps table is a projection of the log: a rebuild gives the same rows
        from kneo_events.projections import rebuild_knaps

        pool = platform.kernel.store.pool
        query = "SELECT knap_uuid, name, definition::text, created_by, created_at, deleted_at FROM knaps ORDER BY 1"
        live = [tuple(r) for r in await pool.fetch(query)]
        async with pool.acquire() as conn:
            await rebuild_knaps(conn)
        assert [tuple(r) for r in await pool.fetch(query)] == live and any(r[0] == knap_uuid and r[5] for r in live)
        gone = await http.post(
            "/api/knap-tools/run",
            json={"messages": [{"role": "user", "content": "x"}], "tool_types": [], "knap_tool_uuid": knap_uuid},
        )
        assert gone.status_code == 404 and gone.json() == {"detail": f"Knap {knap_uuid} not found"}
        assert (await http.get(f"/api/knaps/{knap_uuid}")).status_code == 404
        bad = await http.post("/api/knaps", json={"name": "x", "tool_types": [{"tool_type": "fax"}]})
        assert bad.status_code == 400 and "fax" in bad.json()["detail"]


async def test_bad_requests_are_400_detail_and_change_nothing(platform: Any) -> None:
    async with httpx.AsyncClient(base_url=platform.url, timeout=30) as http:
        before = (await http.get("/v1/runs")).json()["total"]
        unknown = await http.post("/api/knap-tools/run", json=_ask("x") | {"tool_types": [{"tool_type": "fax"}]})
        assert unknown.status_code == 400
        assert unknown.json() == {"detail": "unknown tool_type 'fax'; known: gmail, google_calendar"}
        cases = [
            {"tool_types": BOTH},  # no messages
            {"messages": [], "tool_types": BOTH},
            {"messages": [{"role": "robot", "content": "x"}], "tool_types": BOTH},
            {"messages": [{"role": "user"}], "tool_types": BOTH},
            {"messages": [{"role": "user", "content": "x"}]},  # no tool_types
            {"messages": [{"role": "user", "content": "x"}], "tool_types": []},  # empty without a Knap
            {"messages": [{"role": "assistant", "content": "x"}], "tool_types": BOTH},  # last is not the user's
            {**_ask("x"), "surprise": True},
        ]
        for body in cases:
            resp = await http.post("/api/knap-tools/run", json=body)
            assert resp.status_code == 400, (body, resp.text)
            assert set(resp.json()) == {"detail"} and resp.json()["detail"], resp.text
        garbled = await http.post(
            "/api/knap-tools/run", content=b"{not json", headers={"Content-Type": "application/json"}
        )
        assert garbled.status_code == 400 and set(garbled.json()) == {"detail"}
        huge = await http.post("/api/knap-tools/run", json=_ask("x" * 200_000))
        assert huge.status_code == 413 and set(huge.json()) == {"detail"}
        assert (await http.get("/v1/runs")).json()["total"] == before


async def test_auth_is_bearer_and_401_says_not_authenticated(platform_factory: Any) -> None:
    p = await platform_factory(api_keys=SecretStr("app:app-token:operator;viewer:view-token:viewer"))
    async with httpx.AsyncClient(base_url=p.url, timeout=30) as http:
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            resp = await http.post("/api/knap-tools/run", json=_ask("x"), headers=headers)
            assert resp.status_code == 401 and resp.json() == {"detail": "Not authenticated"}
        forbidden = await http.post(
            "/api/knap-tools/run", json=_ask("x"), headers={"Authorization": "Bearer view-token"}
        )
        assert forbidden.status_code == 403 and set(forbidden.json()) == {"detail"}
        events, _ = await _events(http, _ask("hello"), headers={"Authorization": "Bearer app-token"})
        assert events[-1]["type"] == "done"


async def test_a_connector_error_is_a_result_and_the_run_goes_on(platform_factory: Any) -> None:
    p = await platform_factory(knap_gmail_mailbox="examples/knap/no-such.mbox")
    async with httpx.AsyncClient(base_url=p.url, timeout=30) as http:
        events, _ = await _events(http, _ask("mail?"))
    gmail = next(e for e in events if e["type"] == "tool_result" and e["tool_name"] == "gmail")
    assert gmail["error"] is True and "no-such.mbox" in str(gmail["result"])
    assert events[-1]["type"] == "done" and "error" not in [e["type"] for e in events]
    calendar = next(e for e in events if e["type"] == "tool_result" and e["tool_name"] == "google_calendar")
    assert "error" not in calendar


async def test_a_failed_run_sends_error_then_done(platform_factory: Any) -> None:
    p = await platform_factory(knap_model_params='{"fail_steps": ["answer"]}')
    async with httpx.AsyncClient(base_url=p.url, timeout=30) as http:
        events, _ = await _events(http, _ask("x"))
    assert [e["type"] for e in events][-2:] == ["error", "done"]
    error = events[-2]
    assert error["error"] and error["details"]["status"] == "failed"


async def test_a_client_that_disconnects_does_not_stop_the_run(platform_factory: Any) -> None:
    p = await platform_factory(knap_model_params='{"latency_ms": 30, "chunks": 20}')
    async with httpx.AsyncClient(base_url=p.url, timeout=30) as http:
        async with http.stream("POST", "/api/knap-tools/run", json=_ask("Long answer please")) as resp:
            chat_id = resp.headers["X-Knap-Chat-Id"]
            async for line in resp.aiter_lines():
                if line.startswith("data: ") and json.loads(line[6:])["type"] == "message_chunk":
                    break  # hang up mid-answer

        async def answered() -> Any:
            chat = (await http.get(f"/api/knap-tools/chats/{chat_id}")).json()
            last = chat["messages"][-1]
            return last if last["role"] == "assistant" and last["content"] else None

        last = await _until(answered, "the answer reached the chat after the client left")
    assert last["content"].startswith("On Long answer please:") and last["content"].count(",") >= 19


async def test_more_connectors_from_a_file_python_and_mcp(platform_factory: Any, tmp_path: Any) -> None:
    connectors = tmp_path / "connectors.yaml"
    connectors.write_text(
        """
search:
  description: Search the web.
  tools:
    - function: examples.app_functions:web_search
facts:
  description: Facts from the example MCP server.
  tools:
    - mcp: "facts:lookup_fact"
  mcp:
    - {id: facts, transport: stdio, command: python, args: [examples/mcp_server.py], tools: [lookup_fact]}
"""
    )
    p = await platform_factory(knap_connectors_path=connectors)
    async with httpx.AsyncClient(base_url=p.url, timeout=60) as http:
        events, _ = await _events(
            http,
            {
                "messages": [{"role": "user", "content": "nats"}],
                "tool_types": [{"tool_type": "search"}, {"tool_type": "facts"}],
            },
        )
        unknown = await http.post("/api/knap-tools/run", json=_ask("x") | {"tool_types": [{"tool_type": "fax"}]})
    results = {e["tool_name"]: e for e in events if e["type"] == "tool_result"}
    assert set(results) == {"search", "facts"} and events[-1]["type"] == "done"
    assert results["search"]["result"][0]["title"].startswith("nats")  # the Python tool's JSON answer
    assert "error" not in results["facts"] and "NATS" in str(results["facts"]["result"])  # the MCP tool's answer
    assert unknown.json()["detail"].endswith("known: facts, gmail, google_calendar, search")
