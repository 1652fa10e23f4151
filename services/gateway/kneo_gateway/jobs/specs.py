"""A job's run spec: the built-in template of its ``job_type`` filled from the request's spec (docs/jobs.md).

The request (seeds/002 "Create Job") is checked here, so a bad one is a 400 that names the reason and changes nothing.
The template's ``{{...}}`` slots are whole YAML strings replaced by values (the sandbox's absolute path, ids, the
agent's model, the job's extra result fields); the job's prompt becomes the run's input, never part of the spec.
"""

from __future__ import annotations

import copy
import json
import secrets
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from kneo_events.errors import InvalidRequest, NotFound, PayloadTooLarge
from kneo_events.jobs import JOB_TYPES
from kneo_events.schemas import dumps
from kneo_events.settings import Settings
from kneo_gateway import workspaces

JSON = dict[str, Any]
TEMPLATES = Path(__file__).resolve().parent / "templates"
SPEC_FIELDS = ("job_type", "prompt", "model", "workspace_path", "session_id", "user_id", "time_range", "metadata")
PROMPT_REQUIRED = frozenset({"cursor_task", "gemini_task", "claude_task", "fh_e2e_tools"})
DEFAULT_MODEL = "auto"
# The seed's model names and where they go when KNEO_JOBS_MODEL_MAP does not say otherwise. ``auto`` (the default)
# and ``composer-1`` (Cursor's own model, no public API) run on the offline dummy provider, so a fresh install runs
# jobs with no credentials; the others need their provider's key on the runner.
DEFAULT_MODELS: dict[str, JSON] = {
    "auto": {"provider": "dummy", "name": "auto"},
    "composer-1": {"provider": "dummy", "name": "composer-1"},
    "sonnet-4.5": {"provider": "anthropic", "name": "claude-sonnet-4-5"},
    "opus-4.1": {"provider": "anthropic", "name": "claude-opus-4-1"},
    "gpt-5": {"provider": "openai", "name": "gpt-5"},
}
MAX_ID_CHARS = 200


@cache
def template(job_type: str) -> JSON:
    """The parsed template of a job type (read once)."""
    loaded: JSON = yaml.safe_load((TEMPLATES / f"{job_type}.yaml").read_text(encoding="utf-8"))
    return loaded


def model_map(settings: Settings) -> dict[str, JSON]:
    """Model name -> the agent's ``model`` block: the defaults, overridden by ``KNEO_JOBS_MODEL_MAP``."""
    out = {k: dict(v) for k, v in DEFAULT_MODELS.items()}
    raw = settings.jobs_model_map.strip()
    for name, target in (json.loads(raw) if raw else {}).items():
        if isinstance(target, str):
            provider, _, model_name = target.partition(":")
            out[name] = {"provider": provider, "name": model_name or name}
        else:
            out[name] = {"provider": target.get("provider", "dummy"), "name": target.get("name") or name}
            if target.get("params"):
                out[name]["params"] = dict(target["params"])
    return out


def _bad(message: str, **detail: Any) -> InvalidRequest:
    return InvalidRequest(message, detail=detail)


def _text(spec: JSON, name: str, limit: int) -> str | None:
    value = spec.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise _bad(f"spec.{name} must be a string", field=f"spec.{name}")
    if len(value) > limit:
        raise PayloadTooLarge(f"spec.{name} exceeds {limit} characters", field=f"spec.{name}", limit=limit)
    return value


@dataclass(frozen=True)
class JobSpec:
    """A checked job request spec (what ``metadata.job.spec`` records)."""

    job_type: str
    prompt: str
    model: str
    workspace_path: str | None
    session_id: str | None
    user_id: str | None
    time_range: JSON | None
    metadata: JSON
    raw: JSON  # the request's spec as given (for the job's ``spec`` field)


def parse_spec(raw: Any, settings: Settings) -> JobSpec:
    """Check a request's ``spec``; 400 with the reason (and the known job types or models) when it is not usable."""
    if not isinstance(raw, dict):
        raise _bad("spec must be an object with at least job_type", known_job_types=list(JOB_TYPES))
    unknown = sorted(set(raw) - set(SPEC_FIELDS))
    if unknown:
        raise _bad(f"unknown spec field(s): {', '.join(unknown)}", allowed_fields=list(SPEC_FIELDS))
    job_type = raw.get("job_type")
    if job_type not in JOB_TYPES:
        reason = "spec.job_type is required" if job_type is None else f"unknown job_type {str(job_type)[:100]!r}"
        raise _bad(f"{reason}; known job types: {', '.join(JOB_TYPES)}", known_job_types=list(JOB_TYPES))
    prompt = _text(raw, "prompt", settings.max_input_chars)
    if job_type in PROMPT_REQUIRED and not (prompt and prompt.strip()):
        raise _bad(f"spec.prompt is required for {job_type} jobs", field="spec.prompt", job_type=job_type)
    model = _text(raw, "model", MAX_ID_CHARS) or DEFAULT_MODEL
    models = model_map(settings)
    if model not in models:
        raise _bad(f"unknown model {model!r}; known models: {', '.join(models)}", known_models=list(models))
    workspace_path = _text(raw, "workspace_path", settings.max_path_chars)
    session_id = _text(raw, "session_id", MAX_ID_CHARS)
    user_id = _text(raw, "user_id", MAX_ID_CHARS)
    time_range = raw.get("time_range")
    if job_type == "user_exam":
        if not (user_id and user_id.strip()):
            raise _bad("spec.user_id is required for user_exam jobs", field="spec.user_id", job_type=job_type)
        if not isinstance(time_range, dict) or not {"from", "to"} <= set(time_range):
            raise _bad(
                'spec.time_range is required for user_exam jobs: {"from": <ISO time>, "to": <ISO time>}',
                field="spec.time_range",
                job_type=job_type,
            )
        if not all(isinstance(time_range[k], str) for k in ("from", "to")):
            raise _bad("spec.time_range.from and .to must be ISO 8601 strings", field="spec.time_range")
    elif time_range is not None and not isinstance(time_range, dict):
        raise _bad("spec.time_range must be an object", field="spec.time_range")
    metadata = raw.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise _bad("spec.metadata must be an object", field="spec.metadata")
    if len(dumps(metadata)) > settings.max_metadata_bytes:
        raise PayloadTooLarge(
            f"spec.metadata exceeds {settings.max_metadata_bytes} bytes",
            field="spec.metadata",
            limit=settings.max_metadata_bytes,
        )
    if not prompt or not prompt.strip():
        # user_exam: the prompt is optional; the template's agent gets the investigation as its task
        assert isinstance(time_range, dict)
        prompt = f"Investigate user {user_id} from {time_range['from']} to {time_range['to']}."
    return JobSpec(job_type, prompt, model, workspace_path, session_id, user_id, time_range, metadata, raw)


def workspace_source(settings: Settings, workspace_path: str | None) -> str:
    """The folder a job's ``workspace_path`` copies into its sandbox ("" for none); 400 if it names none."""
    if not workspace_path:
        return ""
    try:
        return str(workspaces.workspace_dir(settings, workspace_path))
    except NotFound as exc:
        raise _bad(
            f"{exc.message}: upload it first (POST /workspaces) or leave workspace_path out",
            field="spec.workspace_path",
        ) from None


def new_session_id() -> str:
    """``session_<hex>``: a job's conversation (kept in its sandbox, carried by continuations)."""
    return f"session_{secrets.token_hex(8)}"


def build_spec(
    spec: JobSpec,
    settings: Settings,
    *,
    job_id: str,
    sandbox: Path,
    session_id: str,
    parent_job_id: str | None,
    workspace: str,
) -> JSON:
    """The job's run spec: its template with every slot filled."""
    extra: JSON = {}
    if spec.user_id is not None:
        extra["user_id"] = spec.user_id
    if spec.time_range is not None:
        extra["time_range"] = spec.time_range
    if spec.metadata:
        extra["metadata"] = spec.metadata
    values: JSON = {
        "{{sandbox}}": str(sandbox),
        "{{job_id}}": job_id,
        "{{job_type}}": spec.job_type,
        "{{session_id}}": session_id,
        # None, not "": the runner renders an empty string argument as the previous step's output
        "{{parent_job_id}}": parent_job_id,
        "{{workspace}}": workspace or None,
        "{{model}}": model_map(settings)[spec.model],
        "{{extra}}": extra,
    }

    def fill(node: Any) -> Any:
        if isinstance(node, str) and node in values:
            return copy.deepcopy(values[node])
        if isinstance(node, dict):
            return {k: fill(v) for k, v in node.items()}
        if isinstance(node, list):
            return [fill(v) for v in node]
        return node

    filled: JSON = fill(template(spec.job_type))
    return filled
