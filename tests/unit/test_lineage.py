"""Where a continuation or fork starts, decided from a run's events alone (kneo_gateway.lineage, pure)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import pytest

from kneo_events.errors import InvalidRequest, InvalidState
from kneo_events.projections import fold_run
from kneo_events.schemas import RecordedEvent
from kneo_gateway.lineage import continuation_point, edit_outputs, fork_point

AT = datetime(2026, 5, 10, tzinfo=UTC)


def _stream(*items: tuple[str, dict[str, Any]]) -> list[RecordedEvent]:
    return [
        RecordedEvent(
            position=v,
            tx_id=v,
            stream_id="run-r",
            version=v,
            event_id=uuid.uuid4(),
            type=t,
            data=d,
            metadata={},
            recorded_at=AT,
        )
        for v, (t, d) in enumerate(items, start=1)
    ]


def _opening(kind: str = "sequential") -> list[tuple[str, dict[str, Any]]]:
    return [
        ("run.created", {"run_id": "r", "input": "hi", "spec": {}}),
        ("run.compiled", {"plan": {}, "plan_hash": "h", "workflow_kind": kind, "step_count": 3}),
    ]


def _step(index: int, sid: str, turn: int, seq: int, attempt: int = 1) -> list[tuple[str, dict[str, Any]]]:
    cid = f"r:step:{turn}:{attempt}"
    return [
        ("step.scheduled", {"step_index": index, "step_id": sid, "attempt": attempt, "command_id": cid, "turn": turn}),
        ("step.completed", {"step_index": index, "step_id": sid, "output": f"out-{sid}"}),
        ("checkpoint.saved", {"sequence": seq, "step_index": index, "step_id": sid, "state": {}}),
    ]


def _scheduled(index: int, sid: str, turn: int, attempt: int = 1) -> tuple[str, dict[str, Any]]:
    cid = f"r:step:{turn}:{attempt}"
    return (
        "step.scheduled",
        {"step_index": index, "step_id": sid, "attempt": attempt, "command_id": cid, "turn": turn},
    )


def test_a_failed_step_runs_again_as_its_next_attempt() -> None:
    events = _stream(
        *_opening(),
        *_step(0, "one", 0, 1),
        _scheduled(1, "two", 1),
        ("step.retrying", {"step_index": 1, "step_id": "two", "error": "x", "attempt": 1, "backoff_seconds": 0}),
        _scheduled(1, "two", 1, attempt=2),
        ("step.failed", {"step_index": 1, "step_id": "two", "error": "x", "attempt": 2}),
        ("run.failed", {"error": "step two failed", "code": "step_failed", "step_id": "two"}),
    )
    cont = continuation_point(events)
    assert cont.reason is None and cont.failed_step == "two"
    start = cont.start
    assert start is not None
    assert (start.step_index, start.step_id, start.turn, start.attempt) == (1, "two", 1, 3)
    assert start.carried["step_outputs"] == {"one": "out-one"} and start.carried["checkpoint_count"] == 1
    assert start.source_version == len(events)


def test_a_cancelled_run_continues_with_its_scheduled_step_at_the_same_attempt() -> None:
    events = _stream(*_opening(), *_step(0, "one", 0, 1), _scheduled(1, "two", 1), ("run.cancelled", {}))
    start = continuation_point(events).start
    assert start is not None and (start.step_id, start.turn, start.attempt) == ("two", 1, 1)


def test_refusals_say_why() -> None:
    succeeded = _stream(*_opening(), *_step(0, "one", 0, 1), ("run.succeeded", {"output_text": "x"}))
    assert continuation_point(succeeded).reason == (
        "the run's status is succeeded; only a failed, cancelled or timed-out run can continue"
    )
    concurrent = _stream(*_opening("concurrent"), ("run.failed", {"error": "e", "step_id": "a"}))
    assert "this run is concurrent" in str(continuation_point(concurrent).reason)
    not_compiled = _stream(_opening()[0], ("run.cancelled", {}))
    assert "this run is not compiled" in str(continuation_point(not_compiled).reason)
    limit = _stream(
        *_opening("graph"), *_step(0, "a", 0, 1), ("run.failed", {"error": "max", "code": "workflow_limit"})
    )
    cont = continuation_point(limit)
    assert cont.start is None and "outside a step" in str(cont.reason)


def test_a_fork_starts_with_the_step_scheduled_after_its_checkpoint_and_the_edge_that_led_there() -> None:
    edge = ("graph.edge_taken", {"source": "a", "target": "a", "traversal": 1, "turn": 1})
    events = _stream(
        *_opening("graph"),
        *_step(0, "a", 0, 1),
        edge,
        _scheduled(0, "a", 1),
        ("step.completed", {"step_index": 0, "step_id": "a", "output": "again"}),
        ("checkpoint.saved", {"sequence": 2, "step_index": 0, "step_id": "a", "state": {}}),
        ("run.succeeded", {"output_text": "again"}),
    )
    start = fork_point(events, "r", 1)
    assert (start.step_index, start.step_id, start.turn, start.attempt) == (0, "a", 1, 1)
    assert start.carried["edge_counts"] == {"a->a": 1} and start.carried["transcript"] == [
        {"step_id": "a", "output": "out-a"}
    ]
    assert start.source_version == 6  # up to and including the edge (version 6; its step.scheduled is 7)
    with pytest.raises(InvalidState, match="no step follows checkpoint 2"):
        fork_point(events, "r", 2)
    with pytest.raises(InvalidRequest) as bad:
        fork_point(events, "r", 5)
    assert bad.value.context == {"field": "from_sequence", "available": [1, 2]}


def test_edited_outputs_replace_the_latest_output_and_transcript_entry() -> None:
    carried = fold_run(None, _stream(*_opening(), *_step(0, "one", 0, 1), *_step(1, "two", 1, 2)))
    edited = edit_outputs(
        {k: carried[k] for k in ("step_outputs", "transcript", "output_text")}, {"two": "new"}, "r", 2
    )
    assert edited["step_outputs"] == {"one": "out-one", "two": "new"}
    assert edited["transcript"][-1] == {"step_id": "two", "output": "new"} and edited["output_text"] == "new"
    assert carried["transcript"][-1]["output"] == "out-two", "the input is not modified"
    with pytest.raises(InvalidRequest) as bad:
        edit_outputs(carried, {"three": "x"}, "r", 2)
    assert bad.value.context["available"] == ["one", "two"]
