"""Event and command envelopes and the versioned payload models.

Payload models at the edges (commands) forbid unknown fields; stored-event payloads are tolerant (``extra="allow"``)
so that fields written by a newer or older version survive a read. One registry maps event type names to models;
nothing builds event dicts by hand.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, ClassVar, TypeVar

import orjson
from pydantic import BaseModel, ConfigDict, Field

from kneo_events.ids import new_event_id

JSON = dict[str, Any]


def dumps(value: Any) -> bytes:
    """Serialize with orjson (the one JSON encoder of the platform)."""
    return orjson.dumps(value, default=_default)


def loads(raw: bytes | str) -> Any:
    """Parse JSON with orjson."""
    return orjson.loads(raw)


def _default(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


class EventPayload(BaseModel):
    """Base of stored-event payloads: tolerant of unknown fields, versioned by ``schema_version``."""

    model_config = ConfigDict(extra="allow", frozen=True)
    type: ClassVar[str] = ""
    schema_version: ClassVar[int] = 1


class NewEvent(BaseModel):
    """An event about to be appended."""

    model_config = ConfigDict(frozen=True)
    type: str
    data: JSON
    metadata: JSON = Field(default_factory=dict)
    event_id: uuid.UUID = Field(default_factory=new_event_id)


class RecordedEvent(BaseModel):
    """An event as stored: its global position, stream version and commit transaction."""

    model_config = ConfigDict(frozen=True)
    position: int
    tx_id: int
    stream_id: str
    version: int
    event_id: uuid.UUID
    type: str
    data: JSON
    metadata: JSON
    recorded_at: datetime

    def wire(self) -> JSON:
        """The JSON shape published on the bus and sent over SSE."""
        return {
            "position": self.position,
            "tx_id": self.tx_id,
            "stream_id": self.stream_id,
            "version": self.version,
            "event_id": str(self.event_id),
            "type": self.type,
            "data": self.data,
            "metadata": self.metadata,
            "recorded_at": self.recorded_at.isoformat(),
        }

    @classmethod
    def from_wire(cls, raw: JSON) -> RecordedEvent:
        """Inverse of :meth:`wire`."""
        return cls.model_validate(raw)


_REGISTRY: dict[str, type[EventPayload]] = {}
P = TypeVar("P", bound=EventPayload)


def register(model: type[P]) -> type[P]:
    """Class decorator: register a payload model under its ``type``."""
    if not model.type or model.type in _REGISTRY:
        raise ValueError(f"bad or duplicate event type {model.type!r}")
    _REGISTRY[model.type] = model
    return model


def payload_model(event_type: str) -> type[EventPayload] | None:
    """The registered payload model of an event type, if any."""
    return _REGISTRY.get(event_type)


def event_types() -> list[str]:
    """Every registered event type (the event catalogue)."""
    return sorted(_REGISTRY)


def upcast(event_type: str, data: JSON) -> EventPayload:
    """Parse a stored payload into its model; unknown fields survive as extras."""
    model = _REGISTRY.get(event_type)
    if model is None:
        raise KeyError(event_type)
    version = int(data.get("_v", 1))
    if version > model.schema_version:
        # A newer writer: keep everything, the extras carry what we don't know.
        pass
    return model.model_validate({k: v for k, v in data.items() if k != "_v"})


def new_event(payload: EventPayload, metadata: JSON | None = None) -> NewEvent:
    """Build a :class:`NewEvent` from a registered payload model."""
    data = payload.model_dump(mode="json")
    if payload.schema_version != 1:
        data["_v"] = payload.schema_version
    return NewEvent(type=payload.type, data=data, metadata=metadata or {})


# ---------------------------------------------------------------- run events


@register
class RunCreated(EventPayload):
    """A run was accepted: its input, its spec and how it was asked for."""

    type: ClassVar[str] = "run.created"
    run_id: str
    input: Any = None
    spec: JSON
    spec_path: str | None = None
    target: str = "workflow"
    environment: str | None = None
    async_mode: bool = False
    metadata: JSON = Field(default_factory=dict)
    face: str = "kneo"
    timeout_seconds: float | None = None


@register
class RunCompiled(EventPayload):
    """The compiler turned the spec into an executable plan."""

    type: ClassVar[str] = "run.compiled"
    plan: JSON
    plan_hash: str
    agent_name: str | None = None
    workflow_name: str | None = None
    workflow_kind: str = "sequential"
    step_count: int


@register
class StepScheduled(EventPayload):
    """Intent: the runner must execute this step next (recorded before the command is sent)."""

    type: ClassVar[str] = "step.scheduled"
    step_index: int
    step_id: str
    attempt: int = 1
    command_id: str
    not_before: float | None = None  # epoch seconds: a retry waits for its backoff
    turn: int | None = None  # the step's position in the run (None in runs recorded before turns: = step_index)


@register
class StepStarted(EventPayload):
    """A runner took the step (recorded on a retry or a redelivery, for the trace)."""

    type: ClassVar[str] = "step.started"
    step_index: int
    step_id: str
    attempt: int = 1
    runner: str | None = None


@register
class StepCompleted(EventPayload):
    """A step finished; ``output`` is its final message."""

    type: ClassVar[str] = "step.completed"
    step_index: int
    step_id: str
    output: Any = None
    attempt: int = 1
    chunks: int = 0
    duration_ms: float = 0.0


@register
class StepFailed(EventPayload):
    """A step failed for good (after its retries)."""

    type: ClassVar[str] = "step.failed"
    step_index: int
    step_id: str
    error: str
    attempt: int = 1
    retryable: bool = False


@register
class StepRetrying(EventPayload):
    """A step failed and will be tried again after ``backoff_seconds``."""

    type: ClassVar[str] = "step.retrying"
    step_index: int
    step_id: str
    error: str
    attempt: int
    backoff_seconds: float


@register
class StepToolCalled(EventPayload):
    """An agent step called one of its tools during a model turn (recorded with the step's outcome).

    ``turn`` is the model turn inside the step (1, 2, …), not the run's turn. ``arguments`` are redacted and
    ``result_preview`` is the redacted, bounded start of what the model was shown (the error text when not ``ok``).
    """

    type: ClassVar[str] = "step.tool_called"
    step_index: int
    step_id: str
    attempt: int = 1
    turn: int
    call_id: str | None = None
    tool: str
    arguments: JSON = Field(default_factory=dict)
    ok: bool
    result_preview: str = ""
    result_chars: int = 0
    duration_ms: float = 0.0
    cached: bool = False  # the result came from the smart cache of a Knap chat (the tool did not run)


@register
class GuardrailFired(EventPayload):
    """A guardrail of an agent step did something: ``blocked`` the step, ``rewritten`` the text, or ``warned``.

    ``stage`` is ``input`` (the rendered prompt, before the model) or ``output`` (the final answer). Guardrails that
    simply passed are not recorded.
    """

    type: ClassVar[str] = "guardrail.fired"
    step_index: int
    step_id: str
    attempt: int = 1
    stage: str
    guardrail_id: str
    action: str
    reason: str | None = None


@register
class GraphEdgeTaken(EventPayload):
    """A graph workflow routed from one node to the next (which edge, which traversal, on which condition)."""

    type: ClassVar[str] = "graph.edge_taken"
    source: str
    target: str
    traversal: int
    condition: JSON | None = None
    turn: int


@register
class HumanRequested(EventPayload):
    """A human step paused the run: who must decide what, by when."""

    type: ClassVar[str] = "human.requested"
    continuation_id: str
    request_id: str
    step_index: int
    step_id: str
    turn: int
    prompt: str
    options: list[str] = Field(default_factory=list)
    reviewers: list[str] = Field(default_factory=list)
    timeout_seconds: float | None = None
    deadline_epoch: float | None = None
    on_timeout: str = "fail"


@register
class HumanDecided(EventPayload):
    """A reviewer decided a human step (approved, rejected, edited, selected or provided)."""

    type: ClassVar[str] = "human.decided"
    continuation_id: str
    request_id: str
    decision: str
    content: str | None = None
    selected_option: str | None = None
    reviewer: str | None = None


@register
class HumanCancelled(EventPayload):
    """A pending human request was closed because its run was cancelled."""

    type: ClassVar[str] = "human.cancelled"
    continuation_id: str
    request_id: str


@register
class HumanExpired(EventPayload):
    """A human request passed its deadline with ``on_timeout: fail``."""

    type: ClassVar[str] = "human.expired"
    continuation_id: str
    request_id: str


@register
class HumanContinued(EventPayload):
    """A human request passed its deadline with ``on_timeout: continue``: an approval is synthesized."""

    type: ClassVar[str] = "human.continued"
    continuation_id: str
    request_id: str


@register
class HumanContinueFailed(EventPayload):
    """The approval synthesized by ``on_timeout: continue`` could not be carried out (the resume kept failing)."""

    type: ClassVar[str] = "human.continue_failed"
    continuation_id: str
    request_id: str
    error: str


@register
class HumanEscalated(EventPayload):
    """A human request passed its deadline with ``on_timeout: escalate``: marked once, still resumable."""

    type: ClassVar[str] = "human.escalated"
    continuation_id: str
    request_id: str


@register
class RunExpired(EventPayload):
    """The run ended because its human step expired (a terminal status)."""

    type: ClassVar[str] = "run.expired"
    continuation_id: str
    reason: str


@register
class CheckpointSaved(EventPayload):
    """The folded run state after a step boundary (the checkpoint)."""

    type: ClassVar[str] = "checkpoint.saved"
    sequence: int
    step_index: int
    step_id: str
    state: JSON


@register
class RunSucceeded(EventPayload):
    """The run finished; ``output_text`` is its result."""

    type: ClassVar[str] = "run.succeeded"
    output_text: str | None = None


@register
class RunFailed(EventPayload):
    """The run failed; ``diagnostics`` when the spec was the reason."""

    type: ClassVar[str] = "run.failed"
    error: str
    code: str = "run_failed"
    diagnostics: list[JSON] = Field(default_factory=list)
    step_id: str | None = None


@register
class RunCancelled(EventPayload):
    """The run was cancelled (a terminal fact; a late completion can never overwrite it)."""

    type: ClassVar[str] = "run.cancelled"
    reason: str | None = None


@register
class RunTimedOut(EventPayload):
    """The run passed its run-level deadline (``timeout_seconds``) and was force-cancelled (a terminal status)."""

    type: ClassVar[str] = "run.timed_out"
    reason: str
    timeout_seconds: float | None = None
    deadline_epoch: float | None = None


@register
class KnapRegistered(EventPayload):
    """A pre-configured Knap was registered (stream ``knap-<uuid>``): its tools, instructions and model."""

    type: ClassVar[str] = "knap.registered"
    knap_uuid: str
    name: str
    definition: JSON


@register
class KnapDeleted(EventPayload):
    """A pre-configured Knap was deleted."""

    type: ClassVar[str] = "knap.deleted"
    knap_uuid: str


@register
class CommandDeadLettered(EventPayload):
    """A command kept failing past its delivery limit; recorded so the queue moves on."""

    type: ClassVar[str] = "command.dead_lettered"
    command_id: str
    name: str
    deliveries: int
    error: str


class _RunBranched(EventPayload):
    """A new run that starts where another run stood: it carries that run's state at a step boundary.

    Recorded on the NEW run's stream, right after its ``run.created`` and ``run.compiled`` (the source run's plan)
    and before the ``step.scheduled`` of ``from_step_id``: the source run is never changed (a terminal status never
    changes). ``carried`` is the source's folded state at the boundary (step outputs, transcript, visited steps,
    turn, graph edge counts, checkpoint count); ``turn`` is the turn ``from_step_id`` runs at.
    """

    source_run_id: str
    source_version: int
    from_step_index: int
    from_step_id: str
    turn: int
    carried: JSON = Field(default_factory=dict)
    actor: str | None = None


@register
class RunContinued(_RunBranched):
    """``POST /v1/runs/{run_id}/continue``: the run continues a stopped one from its last completed step."""

    type: ClassVar[str] = "run.continued"
    source_status: str


@register
class RunForked(_RunBranched):
    """``POST /v1/runs/{run_id}/fork``: the run re-runs another from its checkpoint ``sequence`` on."""

    type: ClassVar[str] = "run.forked"
    sequence: int


# ---------------------------------------------------------------- webhooks (docs/webhooks.md)


@register
class WebhookRegistered(EventPayload):
    """``POST /webhooks``: a subscriber's URL and event types (stream ``webhook-<id>``).

    ``secret`` is the signing secret SEALED (AES-256-GCM, ``kneo_events.sealing``), never the plain text: the log is
    read by audit, history APIs and the bus.
    """

    type: ClassVar[str] = "webhook.registered"
    webhook_id: str
    url: str
    events: list[str]
    secret: JSON


@register
class WebhookDeleted(EventPayload):
    """``DELETE /webhooks/{id}``: no delivery is attempted for the webhook any more (pending ones are cancelled)."""

    type: ClassVar[str] = "webhook.deleted"
    webhook_id: str


# ---------------------------------------------------------------- governance


class EnvironmentPolicyEnforcement(BaseModel):
    """The gates one environment enforces on specs and runs (the seed's ``EnvironmentPolicyEnforcement``).

    Shared by the compiler (which enforces it after overlays and defaults) and the gateway (which stores it).
    """

    model_config = ConfigDict(extra="forbid")
    enabled: bool = True
    fail_on_warnings: bool = False
    blocked_diagnostic_codes: list[Annotated[str, Field(pattern=r"^[A-Z][A-Z0-9_]{1,63}$")]] = Field(
        default_factory=list, max_length=100
    )
    require_human_review: bool = False
    require_tool_permissions: bool = False
    deny_unrestricted_tools: bool = False
    require_guardrails: bool = False


NO_POLICY = EnvironmentPolicyEnforcement(enabled=False)  # what an environment without any policy enforces


# ---------------------------------------------------------------- governance events


@register
class JobCleaned(EventPayload):
    """A job's sandbox was deleted for good (``POST /jobs/{id}/cleanup`` or the retention sweep); on the run's stream.

    Every job sharing the sandbox (a job and its continuations) gets one. The run's status never changes.
    """

    type: ClassVar[str] = "job.cleaned"
    sandbox_id: str
    reason: str = "cleanup"  # cleanup | retention
    cleaned_at: str | None = None


@register
class PolicyChanged(EventPayload):
    """An environment's service-managed policy was set (stream ``policy-<environment>``)."""

    type: ClassVar[str] = "policy.changed"
    surface: str = "environment_policy"
    environment: str
    previous: JSON | None = None
    current: JSON
    changed_fields: list[str] = Field(default_factory=list)


@register
class CredentialInventoryAccessed(EventPayload):
    """Someone read the credential inventory (counts only, never names of values)."""

    type: ClassVar[str] = "credential.inventory_accessed"
    counts: dict[str, int]


class _SpecOperation(EventPayload):
    """A spec operation someone asked the service for (the audit log projects these)."""

    operation: str
    valid: bool
    environment: str | None = None
    spec_path: str | None = None
    diagnostic_count: int = 0
    source: str = "spec"  # "spec": a spec in the request; "run": the spec a run started with
    run_id: str | None = None


@register
class SpecValidated(_SpecOperation):
    """``POST /v1/specs/validate``."""

    type: ClassVar[str] = "spec.validated"


@register
class SpecCompiled(_SpecOperation):
    """``POST /v1/specs/compile``."""

    type: ClassVar[str] = "spec.compiled"


@register
class SpecExplained(_SpecOperation):
    """``POST /v1/specs/explain``."""

    type: ClassVar[str] = "spec.explained"


@register
class SpecPolicyReported(_SpecOperation):
    """``POST /v1/specs/policy-report`` or ``GET /v1/runs/{run_id}/policy-report`` (``source: "run"``)."""

    type: ClassVar[str] = "spec.policy_reported"


# ---------------------------------------------------------------- workspaces (Jobs face)


@register
class WorkspaceUploaded(EventPayload):
    """A workspace archive was unpacked under the workspace root (stream ``workspace-<name>``).

    The files live on disk, not in the log; this is the audit trail of who put which archive there.
    """

    type: ClassVar[str] = "workspace.uploaded"
    name: str
    files: int
    bytes: int
    sha256: str  # of the uploaded .tar.gz as received
    archive_bytes: int = 0
    replaced: bool = False


# ---------------------------------------------------------------- commands


class Command(BaseModel):
    """A command on ``kneo.cmd.<service>.<name>``. ``command_id`` makes its effects idempotent."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    command_id: str
    service: str
    name: str
    stream_id: str
    data: JSON = Field(default_factory=dict)
    metadata: JSON = Field(default_factory=dict)
    issued_at: datetime | None = None


def compile_run_command(run_id: str, stream_id: str, metadata: JSON) -> Command:
    """The command that asks the compiler to compile a new run's spec."""
    return Command(
        command_id=f"{run_id}:compile",
        service="compiler",
        name="compile_run",
        stream_id=stream_id,
        data={"run_id": run_id},
        metadata=metadata,
    )


def execute_step_command(run_id: str, stream_id: str, scheduled: StepScheduled, metadata: JSON) -> Command:
    """The command that asks a runner to execute one scheduled step."""
    return Command(
        command_id=scheduled.command_id,
        service="runner",
        name="execute_step",
        stream_id=stream_id,
        data={
            "run_id": run_id,
            "step_index": scheduled.step_index,
            "attempt": scheduled.attempt,
            "not_before": scheduled.not_before,
            "turn": scheduled.turn,
        },
        metadata=metadata,
    )


def step_command_id(run_id: str, turn: int, attempt: int) -> str:
    """Deterministic command id of one attempt of one turn (a step's execution at a position in the run)."""
    return f"{run_id}:step:{turn}:{attempt}"


def resume_human_command(run_id: str, stream_id: str, continuation_id: str, metadata: JSON) -> Command:
    """The command that lets a runner continue a run after its human step was decided."""
    return Command(
        command_id=f"{run_id}:human:{continuation_id}",
        service="runner",
        name="resume_human",
        stream_id=stream_id,
        data={"run_id": run_id, "continuation_id": continuation_id},
        metadata=metadata,
    )
