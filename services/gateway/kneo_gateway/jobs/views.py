"""What the Jobs face shows of a job's run: progress stages, the Cursor-style transcript, and its sandbox's files.

Everything here is derived from the run's stored events (the one source of truth) or read from the sandbox on disk;
nothing is kept a second time. The step ids are the templates' (jobs/templates/*.yaml): ``sandbox`` (create or
reuse the sandbox, mount the workspace), ``context``, ``work`` (the agent), ``report`` (``result.json``).
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from typing import Any

JSON = dict[str, Any]
INTERNAL_DIR = ".kneo"
RESULT_FILE = "result.json"
WRITE_TOOLS = frozenset({"write_file"})
MAX_FILES = 1000
_FAILED = {"run.failed", "run.expired", "run.timed_out"}
TERMINAL_EVENTS = frozenset({"run.succeeded", "run.cancelled", *_FAILED})


def _ts(ev: JSON) -> str:
    return str(ev.get("recorded_at"))


def _stage(ev: JSON, stage: str, detail: str, level: str = "info") -> JSON:
    return {"ts": _ts(ev), "stage": stage, "level": level, "detail": detail}


def _agent_label(job: JSON) -> str:
    return "Cursor agent" if job.get("job_type") == "cursor_task" else "Agent"


def stages(events: list[JSON], job: JSON) -> list[JSON]:
    """The job's progress (``GET /jobs/{id}/events``): sandbox_created, workspace_mounted, agent_started,
    artifact_generated, sandbox_paused, then completed / failed / cancelled (and cleaned), from the run's events."""
    out: list[JSON] = []
    agent_started = False
    for ev in events:
        etype, d = ev["type"], ev.get("data") or {}
        step = d.get("step_id")
        if etype == "run.created":
            behind = job.get("queued_behind")
            out.append(
                _stage(ev, "queued", f"Queued behind job {behind} (same sandbox)")
                if behind
                else _stage(ev, "queued", "Job created, waiting for sandbox provisioning")
            )
        elif etype == "step.completed" and step == "sandbox" and isinstance(d.get("output"), dict):
            o = d["output"]
            if o.get("created"):
                out.append(_stage(ev, "sandbox_created", f"Sandbox {o.get('sandbox_id')} provisioned"))
            else:
                parent = o.get("parent_job_id")
                out.append(
                    _stage(
                        ev,
                        "sandbox_created",
                        f"Sandbox {o.get('sandbox_id')} resumed" + (f" (continuation of {parent})" if parent else ""),
                    )
                )
            if o.get("workspace_mounted"):
                files = o.get("workspace_files")
                out.append(_stage(ev, "workspace_mounted", f"Workspace {o.get('workspace')} mounted ({files} files)"))
            elif o.get("workspace"):
                out.append(_stage(ev, "workspace_mounted", str(o.get("workspace_note") or "not mounted"), "warning"))
        elif etype in ("step.scheduled", "step.started") and step == "work" and not agent_started:
            agent_started = True
            out.append(_stage(ev, "agent_started", f"{_agent_label(job)} executing (model {job.get('model')})"))
        elif etype == "step.retrying" and step == "work":
            out.append(_stage(ev, "agent_retrying", f"Attempt {d.get('attempt')} failed: {d.get('error')}", "warning"))
        elif etype == "step.tool_called" and d.get("tool") in WRITE_TOOLS and d.get("ok"):
            path = (d.get("arguments") or {}).get("path")
            out.append(_stage(ev, "artifact_generated", f"{path} written by the agent"))
        elif etype == "step.completed" and step == "report":
            out.append(_stage(ev, "artifact_generated", f"{RESULT_FILE} written"))
        elif etype in TERMINAL_EVENTS:
            out.append(_stage(ev, "sandbox_paused", "Sandbox paused (ready for continuation)"))
            if etype == "run.succeeded":
                out.append(_stage(ev, "completed", "Job completed successfully"))
            elif etype == "run.cancelled":
                out.append(_stage(ev, "cancelled", f"Job cancelled: {d.get('reason') or 'cancelled'}", "warning"))
            else:
                out.append(_stage(ev, "failed", f"Job failed: {d.get('error') or etype}", "error"))
        elif etype == "job.cleaned":
            why = "retention period over" if d.get("reason") == "retention" else "cleanup requested"
            out.append(_stage(ev, "cleaned", f"Sandbox {d.get('sandbox_id')} deleted ({why})"))
    return out


def cursor_items(ev: JSON, state: JSON) -> list[JSON]:
    """The transcript items (``GET /jobs/{id}/cursor``) one stored event gives: agent_message, tool_use,
    file_created, completed."""
    etype, d = ev["type"], ev.get("data") or {}
    ts = _ts(ev)
    if etype == "step.tool_called":
        args = d.get("arguments") or {}
        items: list[JSON] = [
            {
                "type": "tool_use",
                "tool": d.get("tool"),
                "parameters": args,
                "ok": bool(d.get("ok")),
                "result": d.get("result_preview", ""),
                "timestamp": ts,
            }
        ]
        if d.get("tool") in WRITE_TOOLS and d.get("ok") and isinstance(args.get("path"), str):
            items.append({"type": "file_created", "path": args["path"], "timestamp": ts})
        return items
    if etype == "step.completed" and d.get("step_id") == "work":
        output = d.get("output")
        text = output if isinstance(output, str) else json.dumps(output)
        return [{"type": "agent_message", "message": text, "timestamp": ts}]
    if etype == "step.completed" and d.get("step_id") == "report":
        return [{"type": "file_created", "path": RESULT_FILE, "timestamp": ts}]
    if etype in TERMINAL_EVENTS:
        status = {"run.succeeded": "completed", "run.cancelled": "cancelled"}.get(etype, "failed")
        return [
            {
                "type": "completed",
                "status": status,
                "error": d.get("error") or d.get("reason") if status != "completed" else None,
                "timestamp": ts,
            }
        ]
    return []


# --------------------------------------------------------------------------------------------------- the sandbox


def list_files(root: Path) -> list[str]:
    """The artifacts: every file in the sandbox (relative POSIX paths, sorted), without the runner's own folder."""
    if not root.is_dir():
        return []
    out: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel = Path(dirpath).relative_to(root)
        dirnames[:] = sorted(d for d in dirnames if not (rel == Path(".") and d == INTERNAL_DIR))
        for name in sorted(filenames):
            out.append((rel / name).as_posix())
            if len(out) >= MAX_FILES:
                return out
    return out


def read_artifacts(root: Path, max_bytes: int, max_total: int) -> JSON:
    """File name -> content: ``.json`` parsed, text as text, binary as ``{"encoding": "base64", "content"}``; files
    past the per-file or total bound are ``{"omitted": true, "size", "reason"}``. Symlinks are not followed out."""
    out: JSON = {}
    total = 0
    real_root = Path(os.path.realpath(root))
    for name in list_files(root):
        path = root / name
        real = Path(os.path.realpath(path))
        if not real.is_relative_to(real_root) or not real.is_file():
            out[name] = {"omitted": True, "reason": "not a regular file inside the sandbox"}
            continue
        size = real.stat().st_size
        if size > max_bytes or total + size > max_total:
            limit = "KNEO_JOBS_ARTIFACT_MAX_BYTES" if size > max_bytes else "KNEO_JOBS_ARTIFACTS_MAX_TOTAL_BYTES"
            out[name] = {"omitted": True, "size": size, "reason": f"larger than {limit}"}
            continue
        total += size
        raw = real.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            out[name] = {"encoding": "base64", "content": base64.b64encode(raw).decode("ascii")}
            continue
        if name.endswith(".json"):
            try:
                out[name] = json.loads(text)
                continue
            except ValueError:
                pass
        out[name] = text
    return out


def job_detail(state: JSON, summary: JSON, events: list[JSON], files: list[str]) -> JSON:
    """``GET /jobs/{id}``: the summary plus model, events, artifact names."""
    job = (state.get("metadata") or {}).get("job") or {}
    return {
        **summary,
        "model": job.get("model"),
        "queued_behind": job.get("queued_behind"),
        "cleaned_at": (state.get("metadata") or {}).get("cleaned_at"),
        "events": stages(events, job),
        "artifacts": {"files": files},
        "error": state.get("error"),
    }
