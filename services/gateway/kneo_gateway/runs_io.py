"""Request models and response views of the runs routes."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from kneo_events.redaction import redact

JSON = dict[str, Any]


class RunRequest(BaseModel):
    """``POST /v1/runs``: start a run of a spec (by path or inline)."""

    model_config = ConfigDict(extra="forbid")
    input: str | None = Field(default=None, description="The run's input text.")
    spec_path: str | None = Field(default=None, description="Path of a YAML spec, relative to the service's spec root.")
    spec: str | JSON | None = Field(default=None, description="Inline spec: YAML text or a JSON object.")
    target: Literal["workflow", "agent"] = "workflow"
    environment: str | None = Field(default=None, max_length=64)
    async_mode: bool = False
    metadata: JSON | None = None
    timeout_seconds: float | None = Field(default=None, gt=0)


class RunBody(BaseModel):
    """The create-run response (sync: terminal or paused; async: current)."""

    run_id: str
    status: str
    output_text: str | None = None
    human_intervention_required: bool = False
    continuation_id: str | None = None
    metadata: JSON = Field(default_factory=dict)


PUBLIC_FIELDS = (
    "run_id",
    "status",
    "agent_name",
    "workflow_name",
    "workflow_kind",
    "current_step_index",
    "current_node_id",
    "visited_steps",
    "visited_nodes",
    "trace_event_count",
    "output_text",
    "error",
    "metadata",
    "created_at",
    "updated_at",
)


def run_view(state: JSON) -> JSON:
    """The public shape of a run's state (``GET /v1/runs/{run_id}``), redacted."""
    out: JSON = redact({k: state.get(k) for k in PUBLIC_FIELDS})
    return out


def run_body(state: JSON) -> JSON:
    """The create-run response shape of the seed, redacted."""
    meta = dict(state.get("metadata") or {})
    meta.setdefault("workflow_kind", state.get("workflow_kind"))
    meta["trace_event_count"] = state.get("trace_event_count", 0)
    pending = meta.get("pending_human_request")
    return redact(
        {
            "run_id": state["run_id"],
            "status": state["status"],
            "output_text": state.get("output_text"),
            "human_intervention_required": state["status"] == "paused",
            "continuation_id": (pending or {}).get("continuation_id") if isinstance(pending, dict) else None,
            "metadata": meta,
            **({"error": state["error"]} if state.get("error") and state["status"] == "failed" else {}),
        }
    )
