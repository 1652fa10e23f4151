"""Live items → the seed's events, and the log filling in what the ephemeral items did not bring."""

from __future__ import annotations

from kneo_gateway.routers.knap import _Translator


def _item(seq: int, **kw: object) -> dict[str, object]:
    return {"step_id": "answer", "execution": "e1", "seq": seq, **kw}


def test_live_items_translate_once_each() -> None:
    t = _Translator("run_x_abcd1234", "chat_1")
    running = {"status": "running", "name": "gmail", "call_id": "c1"}
    assert t.chunk(_item(0, tool=running)) == {
        "type": "tool_execution",
        "tool_name": "gmail",
        "status": "running",
        "queryUuid": "c1",
    }
    assert t.chunk(_item(0, tool=running)) is None  # a duplicate delivery
    done = {"status": "completed", "name": "gmail", "call_id": "c1", "ok": True, "cached": True, "result": {"n": 1}}
    assert t.chunk(_item(1, tool=done)) == {
        "type": "tool_result",
        "tool_name": "gmail",
        "result": {"n": 1},
        "queryUuid": "c1",
        "cached": True,
    }
    assert t.chunk(_item(2, text="Hello")) == {"type": "message_chunk", "content": "Hello", "messageId": "msg_abcd1234"}
    assert t.finish({"status": "succeeded", "output_text": "Hello world"}) == [
        {"type": "message_chunk", "content": " world", "messageId": "msg_abcd1234"},
        {"type": "done", "messageId": "msg_abcd1234", "chatId": "chat_1"},
    ]


def test_tool_calls_missed_live_come_from_the_log_and_errors_end_with_done() -> None:
    t = _Translator("run_x_abcd1234", "chat_1")
    t.chunk(_item(0, tool={"status": "running", "name": "gmail", "call_id": "c1"}))
    calls = [
        {"tool_name": "gmail", "queryUuid": "c1", "result": '{"emails": []}', "ok": True, "cached": False},
        {"tool_name": "google_calendar", "queryUuid": "c2", "result": "calendar gone", "ok": False, "cached": False},
    ]
    assert t.backfill(calls) == [
        {"type": "tool_result", "tool_name": "gmail", "result": {"emails": []}, "queryUuid": "c1", "cached": False},
        {"type": "tool_execution", "tool_name": "google_calendar", "status": "running", "queryUuid": "c2"},
        {
            "type": "tool_result",
            "tool_name": "google_calendar",
            "result": "calendar gone",
            "queryUuid": "c2",
            "cached": False,
            "error": True,
        },
    ]
    assert t.backfill(calls) == []  # never twice
    end = t.finish({"status": "failed", "error": "boom"})
    assert [e["type"] for e in end] == ["error", "done"] and end[0]["error"] == "boom"
