"""Where a continuation or a fork of a run starts (pure: events in, a start point or a refusal out; no I/O).

A continuation or a fork is a NEW run: a terminal status never changes, so a stopped run is continued by a run
linked to it (``metadata.continued_from``), and time travel from a checkpoint is a run linked to its source
(``metadata.forked_from``). Both start with the source's folded state at a step boundary (its step outputs,
transcript, visited steps, turn, graph edge counts and checkpoint count) and its compiled plan, and execute from the
step that follows the boundary. Every routing decision of the source is in its log (``step.scheduled``,
``graph.edge_taken``), so the step that follows is read from the log, never recomputed: graph runs continue too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kneo_events.errors import InvalidRequest, InvalidState
from kneo_events.projections import carried_state, fold_run
from kneo_events.schemas import RecordedEvent

JSON = dict[str, Any]

# Kinds with one cursor: one step runs at a time, so one step is "next" (a concurrent fan-out has several).
BRANCHABLE_KINDS = ("sequential", "handoff", "group_chat", "graph")
# Statuses a run can be continued from: it stopped before its last step (succeeded and expired runs are done:
# an expired run's human step already had its `on_timeout: fail` outcome).
CONTINUABLE_STATUSES = ("failed", "cancelled", "timed_out")
_STOP_EVENTS = frozenset({"run.failed", "run.cancelled", "run.timed_out"})


@dataclass(frozen=True)
class StartPoint:
    """The first step of the new run (and at which turn and attempt), with the state it carries over."""

    step_index: int
    step_id: str
    turn: int
    attempt: int
    carried: JSON
    source_version: int  # the source stream's version the carried state was folded to


@dataclass(frozen=True)
class Continuation:
    """A run's continuation point, or why there is none (``reason``)."""

    start: StartPoint | None
    reason: str | None
    failed_step: str | None


def workflow_kind(events: list[RecordedEvent]) -> str | None:
    """The kind the run was compiled to (``None`` before ``run.compiled``)."""
    compiled = next((e for e in events if e.type == "run.compiled"), None)
    return str(compiled.data.get("workflow_kind") or "sequential") if compiled else None


def _turn(data: JSON) -> int:
    return int(data["turn"]) if data.get("turn") is not None else int(data["step_index"])


def continuation_point(events: list[RecordedEvent]) -> Continuation:
    """Where ``POST /runs/{id}/continue`` would start the run's continuation.

    * a failed run: its failed step (the one ``run.failed`` names) runs again, as its next attempt (attempt numbers
      continue across the lineage; the step's retry budget was spent by the source run);
    * a cancelled or timed-out run: the step that was scheduled (or waiting for a human) when it stopped, at the
      same attempt (it never finished).
    """
    state = fold_run(None, events)
    status, kind = state["status"], workflow_kind(events)
    failed = next((e.data for e in reversed(events) if e.type == "run.failed"), None)
    failed_step = failed.get("step_id") if failed else None
    if status not in CONTINUABLE_STATUSES:
        reason = f"the run's status is {status}; only a failed, cancelled or timed-out run can continue"
        return Continuation(None, reason, failed_step)
    if kind not in BRANCHABLE_KINDS:
        return Continuation(
            None,
            f"continuation is limited to one-step-at-a-time workflows ({', '.join(BRANCHABLE_KINDS)}); "
            f"this run is {kind or 'not compiled'}",
            failed_step,
        )
    stop = max(i for i, e in enumerate(events) if e.type in _STOP_EVENTS)
    before = events[:stop]
    start: tuple[int, str, int, int] | None = None
    if failed_step is not None:
        scheduled = next(
            (e.data for e in reversed(before) if e.type == "step.scheduled" and e.data["step_id"] == failed_step), None
        )
        if scheduled is not None:
            start = (int(scheduled["step_index"]), failed_step, _turn(scheduled), int(scheduled.get("attempt", 1)) + 1)
    else:
        at_stop = fold_run(None, before)
        pending = list((at_stop.get("pending") or {}).values())
        waiting = at_stop.get("awaiting_human")
        if pending:
            p = pending[-1]
            start = (int(p["step_index"]), str(p["step_id"]), _turn(p), int(p.get("attempt") or 1))
        elif isinstance(waiting, dict):
            start = (int(waiting["step_index"]), str(waiting["step_id"]), _turn(waiting), 1)
    if start is None:
        reason = "the run stopped outside a step (spec, compile or workflow limit): there is no step to continue from"
        return Continuation(None, reason, failed_step)
    index, step_id, turn, attempt = start
    return Continuation(
        StartPoint(index, step_id, turn, attempt, carried_state(state), events[-1].version), None, failed_step
    )


def fork_point(events: list[RecordedEvent], run_id: str, sequence: int) -> StartPoint:
    """Where a fork from checkpoint ``sequence`` starts: the step the source scheduled right after that checkpoint.

    Raises :class:`InvalidRequest` for a sequence the run doesn't have and :class:`InvalidState` when no step
    follows the checkpoint (the run ended there, or has not decided yet) or the run's kind can't be forked.
    """
    checkpoints = [i for i, e in enumerate(events) if e.type == "checkpoint.saved"]
    at = next((i for i in checkpoints if int(events[i].data["sequence"]) == sequence), None)
    if at is None:
        available = [int(events[i].data["sequence"]) for i in checkpoints]
        raise InvalidRequest(
            f"checkpoint sequence {sequence} does not exist in run {run_id}",
            field="from_sequence",
            available=available,
        )
    kind = workflow_kind(events)
    if kind not in BRANCHABLE_KINDS:
        raise InvalidState(
            f"a {kind} run can't be forked: forks are limited to one-step-at-a-time workflows "
            f"({', '.join(BRANCHABLE_KINDS)})",
            run_id=run_id,
            workflow_kind=kind,
        )
    for j in range(at + 1, len(events)):
        ev = events[j]
        if ev.type == "graph.edge_taken":  # the routing decision that leads to the next step
            continue
        if ev.type != "step.scheduled":
            break
        carried = carried_state(fold_run(None, events[:j]))
        return StartPoint(
            int(ev.data["step_index"]), str(ev.data["step_id"]), _turn(ev.data), 1, carried, events[j - 1].version
        )
    raise InvalidState(
        f"no step follows checkpoint {sequence} of run {run_id}: the run ended there (or has not gone on yet)",
        run_id=run_id,
        sequence=sequence,
    )


def edit_outputs(carried: JSON, outputs: JSON, run_id: str, sequence: int) -> JSON:
    """The carried state with some completed steps' outputs replaced (a fork that changes the past).

    Each replaced output is the step's latest one: ``step_outputs`` and that step's last transcript entry change,
    and ``output_text`` follows the last transcript entry. A step not completed at the checkpoint: 400.
    """
    known = carried.get("step_outputs") or {}
    unknown = sorted(k for k in outputs if k not in known)
    if unknown:
        raise InvalidRequest(
            f"step_outputs names steps not completed at checkpoint {sequence} of run {run_id}: {', '.join(unknown)}",
            field="step_outputs",
            available=sorted(known),
        )
    transcript = [dict(t) for t in carried.get("transcript") or []]
    for step_id, value in outputs.items():
        last = max((i for i, t in enumerate(transcript) if t.get("step_id") == step_id), default=None)
        if last is not None:
            transcript[last]["output"] = value
    edited = {**carried, "step_outputs": {**known, **outputs}, "transcript": transcript}
    if transcript and isinstance(transcript[-1].get("output"), str):
        edited["output_text"] = transcript[-1]["output"]
    return edited
