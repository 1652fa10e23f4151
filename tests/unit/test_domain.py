"""Pure logic: run fold, runner decisions, spec compile, schemas, settings. Milliseconds, no I/O."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import pytest
from pydantic import ValidationError

from kneo_compiler.spec import SpecProblem, compile_spec, parse_yaml
from kneo_events.ids import new_run_id
from kneo_events.kernel import next_command
from kneo_events.projections import fold_run
from kneo_events.schemas import RecordedEvent, StepScheduled, event_types, new_event, upcast
from kneo_events.settings import Settings
from kneo_events.store import Position
from kneo_runner.domain import StepErrored, StepSucceeded, decide, should_run
from kneo_runner.engine import render_prompt
from kneo_runner.providers import DummyProvider, Message, TextDelta, TurnContext

SPEC = {
    "version": "v1",
    "name": "t",
    "agent": {"name": "a", "model": {"provider": "dummy", "params": {}}},
    "workflow": {"name": "w", "kind": "sequential", "steps": [{"id": "one"}, {"id": "two", "on_error": "continue"}]},
    "environments": {"prod": {"agent": {"model": {"params": {"latency_ms": 0}}}}},
}


def rec(version: int, etype: str, data: dict) -> RecordedEvent:
    return RecordedEvent(
        position=version,
        tx_id=1,
        stream_id="run-r",
        version=version,
        event_id=uuid.uuid4(),
        type=etype,
        data=data,
        metadata={},
        recorded_at=datetime(2026, 1, 1, tzinfo=UTC),
    )


def test_run_id_shape() -> None:
    rid = new_run_id(datetime(2026, 5, 10, 12, 34, 56, tzinfo=UTC))
    assert rid.startswith("run_2026-05-10T12:34:56_") and len(rid.split("_")[-1]) == 8


def test_compile_is_deterministic_and_applies_overlays() -> None:
    a, b = compile_spec(SPEC, "prod"), compile_spec(dict(SPEC), "prod")
    assert a == b and a["hash"].startswith("sha256:")
    assert a["agent"]["model"]["params"] == {"latency_ms": 0}
    assert compile_spec(SPEC, None)["hash"] != a["hash"]
    assert [s["id"] for s in a["steps"]] == ["one", "two"]


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("a: [1", "E_YAML_PARSE"),
        ("- 1\n- 2", "E_SPEC_SHAPE"),
        ("a: &x 1\nb: *x", "E_YAML_PARSE"),
        (b"\xff\xfe", "E_SPEC_ENCODING"),
    ],
)
def test_parse_errors_are_diagnostics(text: str | bytes, code: str) -> None:
    with pytest.raises(SpecProblem) as exc:
        parse_yaml(text)
    assert exc.value.diagnostics[0].code == code


def test_parse_error_has_a_location() -> None:
    with pytest.raises(SpecProblem) as exc:
        parse_yaml("version: v1\nagent: {name: [\n")
    assert exc.value.diagnostics[0].line is not None


@pytest.mark.parametrize(
    ("mutate", "code"),
    [
        (lambda s: s["workflow"]["steps"].append({"id": "one"}), "E_DUPLICATE_ID"),
        (lambda s: s["workflow"].update(steps=[]), "E_NO_STEPS"),
        (lambda s: s["agent"]["model"].update(provider="nope"), "E_PROVIDER_UNAVAILABLE"),
        (lambda s: s.pop("agent"), "E_SCHEMA"),
    ],
)
def test_invalid_specs_fail_with_codes(mutate, code: str) -> None:  # type: ignore[no-untyped-def]
    import copy

    spec = copy.deepcopy(SPEC)
    mutate(spec)
    with pytest.raises(SpecProblem) as exc:
        compile_spec(spec)
    assert code in [d.code for d in exc.value.diagnostics]


def test_fold_run_lifecycle_and_terminal_is_final() -> None:
    events = [
        rec(1, "run.created", {"run_id": "r", "input": "x", "spec": SPEC, "environment": "prod"}),
        rec(
            2,
            "run.compiled",
            {
                "plan": {},
                "plan_hash": "h",
                "workflow_kind": "sequential",
                "step_count": 2,
                "agent_name": "a",
                "workflow_name": "w",
            },
        ),
        rec(3, "step.scheduled", {"step_index": 0, "step_id": "one", "command_id": "c0"}),
        rec(4, "step.completed", {"step_index": 0, "step_id": "one", "output": "o1"}),
        rec(5, "run.succeeded", {"output_text": "o1"}),
        rec(6, "run.failed", {"error": "late"}),
    ]
    s = fold_run(None, events[:3])
    assert s["status"] == "running" and s["next_step"]["command_id"] == "c0"
    assert s["metadata"]["environment"] == "prod" and s["workflow_kind"] == "sequential"
    s = fold_run(s, events[3:])
    assert s["status"] == "succeeded" and s["output_text"] == "o1" and s["error"] is None
    assert s["visited_steps"] == ["one"] and s["trace_event_count"] == 6 and s["version"] == 6


def test_decide_success_schedules_next_then_succeeds() -> None:
    plan = compile_spec(SPEC)
    state = {"step_outputs": {}, "visited_steps": [], "checkpoint_count": 0}
    d = decide("r", plan, state, 0, 1, StepSucceeded("out", 3, 1.0), 0.1, 1000.0)
    assert [e.type for e in d.events] == ["step.completed", "checkpoint.saved", "step.scheduled"]
    assert d.next_step and d.next_step.command_id == "r:step:1:1"
    d2 = decide("r", plan, {**state, "checkpoint_count": 1}, 1, 1, StepSucceeded("fin", 1, 1.0), 0.1, 1000.0)
    assert [e.type for e in d2.events] == ["step.completed", "checkpoint.saved", "run.succeeded"]
    assert d2.events[1].sequence == 2 and d2.next_step is None


def test_decide_failure_retry_continue_and_fail() -> None:
    spec = {
        **SPEC,
        "workflow": {
            "name": "w",
            "steps": [
                {"id": "one", "on_error": "retry", "max_retries": 2},
                {"id": "two", "on_error": "continue"},
                {"id": "three"},
            ],
        },
    }
    plan = compile_spec(spec)
    state = {"step_outputs": {}, "visited_steps": []}
    r = decide("r", plan, state, 0, 1, StepErrored("boom"), 0.1, 1000.0)
    assert [e.type for e in r.events] == ["step.retrying", "step.scheduled"] and r.next_step.not_before == 1000.1
    assert r.next_step and r.next_step.attempt == 2
    r3 = decide("r", plan, state, 0, 3, StepErrored("boom"), 0.1, 1000.0)
    assert [e.type for e in r3.events] == ["step.failed", "run.failed"]
    c = decide("r", plan, state, 1, 1, StepErrored("meh"), 0.1, 1000.0)
    assert [e.type for e in c.events] == ["step.failed", "step.scheduled"] and c.next_step.step_id == "three"
    f = decide("r", plan, state, 2, 1, StepErrored("fatal", retryable=False), 0.1, 1000.0)
    assert [e.type for e in f.events] == ["step.failed", "run.failed"]


def test_should_run_only_the_scheduled_command() -> None:
    state = {"status": "running", "next_step": {"command_id": "c1"}}
    assert should_run(state, "c1") and not should_run(state, "c0")
    assert not should_run({**state, "status": "cancelled"}, "c1") and not should_run(None, "c1")


def test_next_command_for_reconciler() -> None:
    sched = StepScheduled(step_index=1, step_id="two", command_id="r:step:1:1")
    cmd = next_command({"run_id": "r", "status": "running", "next_step": sched.model_dump(), "metadata": {}})
    assert cmd and cmd.name == "execute_step" and cmd.command_id == "r:step:1:1"
    cmd = next_command({"run_id": "r", "status": "queued", "workflow_kind": None, "next_step": None})
    assert cmd and cmd.name == "compile_run"
    assert next_command({"run_id": "r", "status": "succeeded", "next_step": None, "workflow_kind": "x"}) is None


async def test_dummy_provider_is_deterministic_and_injects_failures() -> None:
    # more in tests/unit/test_agent_loop.py (tool calls, the agent loop)
    ctx = TurnContext(seed="s", step_id="one", attempt=1, turn=1)

    async def texts(prompt: str, params: dict) -> list[str]:
        items = DummyProvider({"params": params}).stream([Message("user", prompt)], [], ctx)
        return [i.text async for i in items if isinstance(i, TextDelta)]

    one, two = await texts("p", {"chunks": 4}), await texts("p", {"chunks": 4})
    assert one == two and len(one) == 5
    assert await texts("q", {"chunks": 4}) != one
    with pytest.raises(Exception, match="injected failure"):
        await texts("p", {"fail_attempts": 1})


def test_render_prompt() -> None:
    assert render_prompt("a {input} b {steps.x} {steps.y}", "IN", {"x": "X"}, "s") == "a IN b X {steps.y}"
    assert render_prompt(None, "IN", {"x": "X"}, "s") == "X"


def test_event_registry_and_upcast_keeps_unknown_fields() -> None:
    assert {"run.created", "step.completed", "run.succeeded", "command.dead_lettered"} <= set(event_types())
    payload = upcast("run.succeeded", {"output_text": "x", "added_later": 1})
    assert payload.output_text == "x" and payload.model_extra == {"added_later": 1}  # type: ignore[attr-defined]
    assert new_event(payload).data["added_later"] == 1


def test_position_roundtrip() -> None:
    assert Position.decode(Position(12, 34).encode()) == Position(12, 34)


def test_list_items_setting_is_capped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KNEO_SERV_MAX_LIST_ITEMS", "1001")
    with pytest.raises(ValidationError):
        Settings()
    monkeypatch.setenv("KNEO_SERV_MAX_LIST_ITEMS", "1000")
    assert Settings().max_list_items == 1000
    monkeypatch.setenv("KNEO_SERV_DATABASE_URL", "postgresql://x/y")
    assert Settings().database_url == "postgresql://x/y"
