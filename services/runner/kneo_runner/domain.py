"""Pure decisions of the runner: what a step's outcome means for the run. No I/O, no clock."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kneo_events.redaction import redact
from kneo_events.schemas import (
    CheckpointSaved,
    EventPayload,
    GuardrailFired,
    RunFailed,
    RunSucceeded,
    StepCompleted,
    StepFailed,
    StepRetrying,
    StepScheduled,
    StepToolCalled,
    step_command_id,
)
from kneo_runner.routing import after

JSON = dict[str, Any]


@dataclass(frozen=True)
class StepSucceeded:
    """The step produced its final message (``tool_calls`` / ``guardrails``: what happened on the way)."""

    output: Any
    chunks: int
    duration_ms: float
    tool_calls: tuple[StepToolCalled, ...] = ()
    guardrails: tuple[GuardrailFired, ...] = ()


@dataclass(frozen=True)
class StepErrored:
    """The step raised; ``retryable`` says whether a retry could help. Tool calls and guardrails that fired
    before the failure are facts of this attempt and are recorded too."""

    error: str
    retryable: bool = True
    tool_calls: tuple[StepToolCalled, ...] = ()
    guardrails: tuple[GuardrailFired, ...] = ()


def _trace(outcome: StepSucceeded | StepErrored) -> list[EventPayload]:
    """The attempt's tool calls and fired guardrails, in the order they happened (guardrails by stage)."""
    inputs = [g for g in outcome.guardrails if g.stage == "input"]
    outputs = [g for g in outcome.guardrails if g.stage != "input"]
    return [*inputs, *outcome.tool_calls, *outputs]


Outcome = StepSucceeded | StepErrored


@dataclass(frozen=True)
class Decision:
    """Events to append and the step to schedule next (if any; a retry carries its ``not_before``)."""

    events: list[EventPayload]
    next_step: StepScheduled | None


def should_run(state: JSON | None, command_id: str) -> bool:
    """A step command runs only if it is the run's scheduled step and the run is still going."""
    if state is None or state["status"] not in ("queued", "running"):
        return False
    if command_id in (state.get("pending") or {}):
        return True
    nxt = state.get("next_step")
    return isinstance(nxt, dict) and nxt.get("command_id") == command_id


def is_last_branch(plan: JSON, state: JSON, step_index: int) -> bool:
    """A concurrent run's branch that is the only one still pending (its outcome ends the fan-out)."""
    if plan["workflow"].get("kind") != "concurrent":
        return False
    others = [v for v in (state.get("pending") or {}).values() if v["step_index"] != step_index]
    return not others


def _schedule(
    run_id: str, plan: JSON, index: int, attempt: int, turn: int, not_before: float | None = None
) -> StepScheduled:
    step = plan["steps"][index]
    return StepScheduled(
        step_index=index,
        step_id=step["id"],
        attempt=attempt,
        command_id=step_command_id(run_id, turn, attempt),
        not_before=not_before,
        turn=turn,
    )


def _advance(
    run_id: str, plan: JSON, state: JSON, index: int, turn: int, last_output: Any
) -> tuple[list[EventPayload], StepScheduled | None]:
    route = after(plan, state, index, turn, last_output)
    if route.error is not None:
        return [*route.events, RunFailed(error=route.error, code="workflow_limit")], None
    if route.next_index is not None:
        nxt = _schedule(run_id, plan, route.next_index, 1, turn + 1)
        return [*route.events, nxt], nxt
    text = last_output if isinstance(last_output, str) or last_output is None else str(last_output)
    return [*route.events, RunSucceeded(output_text=text)], None


def decide(
    run_id: str,
    plan: JSON,
    state: JSON,
    step_index: int,
    attempt: int,
    outcome: Outcome,
    retry_backoff_seconds: float,
    now: float,
    turn: int | None = None,
    aggregate: Any = None,
) -> Decision:
    """Turn one step outcome into the run's next events.

    ``aggregate``: for the last branch of a concurrent run, the combined output of every branch (the runner
    computes it, since an aggregation function is I/O).
    """
    step = plan["steps"][step_index]
    turn = step_index if turn is None else turn
    if plan["workflow"].get("kind") == "concurrent":
        return _decide_branch(run_id, plan, state, step_index, attempt, outcome, retry_backoff_seconds, now, aggregate)
    trace = _trace(outcome)
    if isinstance(outcome, StepSucceeded):
        events = _completed(step, step_index, attempt, outcome, state, {"next_step_index": step_index + 1})
        more, nxt = _advance(run_id, plan, state, step_index, turn, outcome.output)
        return Decision(trace + events + more, nxt)
    max_attempts = 1 + int(step.get("max_retries") or 0)
    if outcome.retryable and attempt < max_attempts:
        backoff = retry_backoff_seconds * (2 ** (attempt - 1))
        nxt = _schedule(run_id, plan, step_index, attempt + 1, turn, not_before=round(now + backoff, 3))
        return Decision(
            [
                *trace,
                StepRetrying(
                    step_index=step_index,
                    step_id=step["id"],
                    error=outcome.error,
                    attempt=attempt,
                    backoff_seconds=backoff,
                ),
                nxt,
            ],
            nxt,
        )
    failed = StepFailed(
        step_index=step_index,
        step_id=step["id"],
        error=outcome.error,
        attempt=attempt,
        retryable=outcome.retryable,
    )
    if step.get("on_error") == "continue":
        more, nxt = _advance(run_id, plan, state, step_index, turn, state.get("output_text"))
        return Decision([*trace, failed, *more], nxt)
    return Decision(
        [
            *trace,
            failed,
            RunFailed(error=f"step {step['id']} failed: {outcome.error}", code="step_failed", step_id=step["id"]),
        ],
        None,
    )


def _completed(
    step: JSON, step_index: int, attempt: int, outcome: StepSucceeded, state: JSON, extra: JSON | None = None
) -> list[EventPayload]:
    """``step.completed`` and the checkpoint after it (the folded state at this boundary, redacted)."""
    outputs = {**state.get("step_outputs", {}), step["id"]: outcome.output}
    return [
        StepCompleted(
            step_index=step_index,
            step_id=step["id"],
            output=outcome.output,
            attempt=attempt,
            chunks=outcome.chunks,
            duration_ms=round(outcome.duration_ms, 3),
        ),
        CheckpointSaved(
            sequence=int(state.get("checkpoint_count", 0)) + 1,
            step_index=step_index,
            step_id=step["id"],
            state=redact(
                {
                    "step_outputs": outputs,
                    "visited_steps": [*state.get("visited_steps", []), step["id"]],
                    **(extra or {}),
                }
            ),
        ),
    ]


def _decide_branch(
    run_id: str,
    plan: JSON,
    state: JSON,
    step_index: int,
    attempt: int,
    outcome: Outcome,
    retry_backoff_seconds: float,
    now: float,
    aggregate: Any,
) -> Decision:
    """One branch of a concurrent fan-out finished; the last one to finish ends the run with the aggregate."""
    step = plan["steps"][step_index]
    last = is_last_branch(plan, state, step_index)
    trace = _trace(outcome)
    if isinstance(outcome, StepSucceeded):
        events = trace + _completed(step, step_index, attempt, outcome, state)
    else:
        max_attempts = 1 + int(step.get("max_retries") or 0)
        if outcome.retryable and attempt < max_attempts:
            backoff = retry_backoff_seconds * (2 ** (attempt - 1))
            nxt = _schedule(run_id, plan, step_index, attempt + 1, step_index, not_before=round(now + backoff, 3))
            retrying = StepRetrying(
                step_index=step_index, step_id=step["id"], error=outcome.error, attempt=attempt, backoff_seconds=backoff
            )
            return Decision([*trace, retrying, nxt], nxt)
        failed = StepFailed(
            step_index=step_index, step_id=step["id"], error=outcome.error, attempt=attempt, retryable=outcome.retryable
        )
        if step.get("on_error") != "continue":
            error = f"branch {step['id']} failed: {outcome.error}"
            return Decision([*trace, failed, RunFailed(error=error, code="step_failed", step_id=step["id"])], None)
        events = [*trace, failed]
    if not last:
        return Decision(events, None)
    text = aggregate if isinstance(aggregate, str) or aggregate is None else str(aggregate)
    return Decision([*events, RunSucceeded(output_text=text)], None)


def human_outcome(decision: JSON, state: JSON) -> Outcome:
    """What a reviewer's decision means for the human step.

    ``approved``: the step passes the previous output on (or the reviewer's note); ``edited`` / ``provided`` /
    ``selected``: the reviewer's content (or the selected option) is the step's output; ``rejected``: the step fails
    with the reviewer's reason (not retryable), and the step's ``on_error`` decides what follows.
    """
    kind = decision.get("decision")
    content = decision.get("content")
    if kind == "rejected":
        return StepErrored(
            f"rejected by {decision.get('reviewer') or 'the reviewer'}: {content or 'no reason given'}", retryable=False
        )
    if kind == "selected":
        return StepSucceeded(decision.get("selected_option"), 0, 0.0)
    if kind in ("edited", "provided"):
        return StepSucceeded(content, 0, 0.0)
    previous = state.get("output_text")
    return StepSucceeded(previous if previous is not None else content, 0, 0.0)
