"""The Jobs face's view of a run (shared by the gateway's job routes and the webhooks service).

A job is a run whose ``run.created`` has ``face: "jobs"`` and ``metadata.job`` (job_type, model, the job's spec,
parent_job_id, sandbox_id, cursor_session_id); its run id is its job id (``job_<hex>``), so ``GET /v1/runs/<job_id>``
shows the same run. Job statuses are the run's, renamed (DECISIONS "Jobs face"), plus ``cleaned`` once its sandbox
was deleted (``job.cleaned`` on the run's stream; the run's own status never changes).
"""

from __future__ import annotations

import secrets
from typing import Any

JSON = dict[str, Any]

JOB_TYPES = ("cursor_task", "gemini_task", "claude_task", "fh_e2e_tools", "user_exam")
JOB_STATUSES = ("queued", "running", "completed", "failed", "cancelled", "cleaned")
_STATUS = {
    "queued": "queued",
    "running": "running",
    "paused": "running",
    "succeeded": "completed",
    "failed": "failed",
    "expired": "failed",
    "timed_out": "failed",
    "cancelled": "cancelled",
}
# The run event that ends a job -> the webhook event type subscribers receive.
TERMINAL_JOB_EVENTS = {
    "run.succeeded": "job.completed",
    "run.failed": "job.failed",
    "run.expired": "job.failed",
    "run.timed_out": "job.failed",
    "run.cancelled": "job.cancelled",
}


def new_job_id() -> str:
    """``job_<16 hex>``: a job's id, also its run id."""
    return f"job_{secrets.token_hex(8)}"


def is_job(state: JSON | None) -> bool:
    """Whether a run state is a job's."""
    return bool(state) and state.get("face") == "jobs"  # type: ignore[union-attr]


def job_status(state: JSON) -> str:
    """The job status of a run state."""
    if (state.get("metadata") or {}).get("cleaned_at"):
        return "cleaned"
    return _STATUS.get(str(state.get("status")), str(state.get("status")))


def job_summary(state: JSON) -> JSON:
    """The job as ``GET /jobs`` lists it (and webhooks deliver it): id, spec, status, timestamps, sandbox, error."""
    meta = state.get("metadata") or {}
    job = meta.get("job") or {}
    job_id = state.get("run_id")
    return {
        "id": job_id,
        "job_id": job_id,
        "job_type": job.get("job_type"),
        "spec": job.get("spec") or {},
        "status": job_status(state),
        "created_at": state.get("created_at"),
        "started_at": state.get("started_at"),
        "completed_at": state.get("finished_at"),
        "sandbox_id": job.get("sandbox_id"),
        "cursor_session_id": job.get("cursor_session_id"),
        "parent_job_id": job.get("parent_job_id"),
        "error": state.get("error"),
    }
