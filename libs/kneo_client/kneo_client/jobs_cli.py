"""``kneo jobs …``, ``kneo webhooks …`` and ``kneo workspaces …``: the Jobs face from the command line, thin over
the SDK (``create_job``, ``stream_job_cursor``, ``create_webhook``, ``upload_workspace`` …)."""

from __future__ import annotations

import asyncio
import base64
import io
import sys
import tarfile
from pathlib import Path
from typing import Annotated, Any

import orjson
import typer

from kneo_client.remote import (
    EXIT_FAILED,
    EXIT_USAGE,
    Profile,
    ServiceUrl,
    call,
    connection,
    fail,
    spinner,
    with_client,
)
from kneo_client.remote import table as make_table

jobs_app = typer.Typer(help="Submit and watch jobs (the Jobs face)", no_args_is_help=True)
webhooks_app = typer.Typer(help="Signed notifications of job and run events", no_args_is_help=True)
workspaces_app = typer.Typer(help="Upload file trees that jobs can mount", no_args_is_help=True)

AsJson = Annotated[bool, typer.Option("--json", help="Print JSON (one item per line when following).")]
JobId = Annotated[str, typer.Argument(help="The job's id (job_…).")]
ENDED = ("completed", "failed", "cancelled", "cleaned")


def _json(value: Any) -> None:
    sys.stdout.write(orjson.dumps(value, option=orjson.OPT_INDENT_2).decode() + "\n")


def _json_line(value: Any) -> None:
    sys.stdout.write(orjson.dumps(value).decode() + "\n")
    sys.stdout.flush()


def _out() -> Any:
    from kneo_client.cli import out

    return out


def _print_cursor_item(item: dict[str, Any]) -> None:
    out = _out()
    kind = item.get("type")
    if kind == "agent_message":
        if item.get("delta"):
            out.print(item.get("message", ""), end="", soft_wrap=True)
        else:
            out.print(f"[cyan]agent[/cyan]  {item.get('message', '')}", soft_wrap=True)
    elif kind == "tool_use":
        mark = "[green]ok[/green]" if item.get("ok", True) else "[red]failed[/red]"
        out.print(f"[dim]→ {item.get('tool')} {orjson.dumps(item.get('parameters') or {}).decode()}[/dim] {mark}")
    elif kind == "file_created":
        out.print(f"[dim]+ {item.get('path')}[/dim]")
    elif kind == "completed":
        status = item.get("status")
        colour = {"completed": "green", "failed": "red"}.get(str(status), "yellow")
        error = f"  {item['error']}" if item.get("error") else ""
        out.print(f"[bold]completed[/bold]  [{colour}]{status}[/{colour}]{error}")
    else:
        out.print(orjson.dumps(item).decode(), soft_wrap=True)


def _print_job(job: dict[str, Any]) -> None:
    out = _out()
    colour = {"completed": "green", "failed": "red", "cancelled": "yellow", "cleaned": "dim"}.get(job["status"], "cyan")
    out.print(f"[bold]job[/bold]  {job['job_id']}  [{colour}]{job['status']}[/{colour}]")
    for key in ("job_type", "model", "sandbox_id", "cursor_session_id", "parent_job_id", "queued_behind", "error"):
        if job.get(key) not in (None, ""):
            out.print(f"[bold]{key}[/bold]  {job[key]}")
    for key in ("created_at", "started_at", "completed_at", "cleaned_at"):
        if job.get(key):
            out.print(f"[bold]{key}[/bold]  {job[key]}")
    files = (job.get("artifacts") or {}).get("files")
    if files:
        out.print(f"[bold]artifacts[/bold]  {', '.join(files)}")


async def _follow(client: Any, job_id: str, as_json: bool) -> dict[str, Any]:
    """Stream a job's cursor items until ``completed``; answer the job as it ended."""
    async for item in client.stream_job_cursor(job_id):
        if as_json:
            _json_line(item)
        else:
            _print_cursor_item(item)
    job: dict[str, Any] = await client.get_job(job_id)
    return job


def _exit_for_job(job: dict[str, Any]) -> None:
    if job.get("status") in ("failed", "cancelled"):
        raise typer.Exit(EXIT_FAILED)


def _started(service_url: str | None, profile: str | None, start: Any, follow: bool, as_json: bool, what: str) -> None:
    """Run ``start(client)`` (create or continue); print the new job, or follow it to its end with ``--follow``."""

    async def go(client: Any) -> tuple[dict[str, Any], dict[str, Any] | None]:
        made: dict[str, Any] = await start(client)
        if not follow:
            return made, None
        if not as_json:
            _out().print(f"[bold]{what}[/bold] {made['job_id']}  (sandbox {made.get('sandbox_id')})")
        return made, await _follow(client, made["job_id"], as_json)

    with spinner(f"submitting the {what}…", quiet=as_json or follow):
        made, ended = asyncio.run(with_client(connection(service_url, profile), go))
    if ended is None:
        if as_json:
            _json(made)
        else:
            _out().print(f"{made['job_id']}  {made['status']}  sandbox {made.get('sandbox_id')}")
            _out().print(f"[dim]follow it with: kneo jobs cursor {made['job_id']} --follow[/dim]")
        return
    if as_json:
        _json_line({"job": ended})
    else:
        _print_job(ended)
    _exit_for_job(ended)


@jobs_app.command("create")
def jobs_create(
    job_type: Annotated[str, typer.Option("--type", help="cursor_task, gemini_task, claude_task, fh_e2e_tools, …")],
    prompt: Annotated[str | None, typer.Option("--prompt", help="What the agent should do.")] = None,
    model: Annotated[str | None, typer.Option("--model", help="auto (default), sonnet-4.5, gpt-5, …")] = None,
    workspace: Annotated[
        str | None, typer.Option("--workspace", help="An uploaded workspace: NAME or /workspaces/NAME.")
    ] = None,
    follow: Annotated[bool, typer.Option("--follow", help="Stream the agent's output until the job ends.")] = False,
    as_json: AsJson = False,
    service_url: ServiceUrl = None,
    profile: Profile = None,
) -> None:
    """Create a job (a run of the job type's template in a new sandbox); prints its id, or follows it with --follow
    (exit 1 when it fails)."""
    path = None if workspace is None else workspace if workspace.startswith("/") else f"/workspaces/{workspace}"

    async def start(client: Any) -> dict[str, Any]:
        made: dict[str, Any] = await client.create_job(job_type, prompt, model=model, workspace_path=path)
        return made

    _started(service_url, profile, start, follow, as_json, "job")


@jobs_app.command("list")
def jobs_list(
    status: Annotated[str | None, typer.Option(help="queued, running, completed, failed, cancelled, cleaned.")] = None,
    job_type: Annotated[str | None, typer.Option("--type", help="Only this job type.")] = None,
    page: Annotated[int, typer.Option(help="Page number, from 1.")] = 1,
    limit: Annotated[int, typer.Option(help="Jobs per page (at most 100).")] = 20,
    as_json: AsJson = False,
    service_url: ServiceUrl = None,
    profile: Profile = None,
) -> None:
    """List jobs, newest first."""
    body = call(service_url, profile, "list_jobs", status=status, job_type=job_type, page=page, limit=limit)
    if as_json:
        _json(body)
        return
    table = make_table("job_id", "type", "status", "created_at", "parent")
    for j in body["data"]:
        table.add_row(j["job_id"], j.get("job_type") or "", j["status"], j["created_at"], j.get("parent_job_id") or "")
    _out().print(table)
    p = body["pagination"]
    _out().print(f"page {p['page']} of {p['pages']} ({p['total']} jobs)")


@jobs_app.command("get")
def jobs_get(job_id: JobId, as_json: AsJson = False, service_url: ServiceUrl = None, profile: Profile = None) -> None:
    """Show a job: status, sandbox, times, error and artifact names."""
    job = call(service_url, profile, "get_job", job_id)
    if as_json:
        _json(job)
    else:
        _print_job(job)


@jobs_app.command("events")
def jobs_events(
    job_id: JobId, as_json: AsJson = False, service_url: ServiceUrl = None, profile: Profile = None
) -> None:
    """A job's stages (queued, sandbox_created, agent_started, …, completed)."""
    body = call(service_url, profile, "job_events", job_id)
    if as_json:
        _json(body)
        return
    colours = {"error": "red", "warning": "yellow"}
    for ev in body["events"]:
        level = ev.get("level", "info")
        colour = colours.get(level, "default")
        _out().print(f"{ev['ts']}  [{colour}]{ev['stage']}[/{colour}]  {ev.get('detail') or ''}")


@jobs_app.command("artifacts")
def jobs_artifacts(
    job_id: JobId,
    out_dir: Annotated[Path | None, typer.Option("--out", help="Write the files into this folder.")] = None,
    as_json: AsJson = False,
    service_url: ServiceUrl = None,
    profile: Profile = None,
) -> None:
    """A job's files: their names (and sizes), the whole answer with --json, or the files themselves with --out."""
    files: dict[str, Any] = call(service_url, profile, "job_artifacts", job_id)
    written: list[str] = []
    skipped: dict[str, str] = {}
    if out_dir is not None:
        written, skipped = _write_artifacts(files, out_dir)
    if as_json:
        _json(files if out_dir is None else {"out": str(out_dir), "written": written, "skipped": skipped})
        return
    if out_dir is not None:
        _out().print(f"wrote {len(written)} file(s) to {out_dir}")
        for name, why in skipped.items():
            _out().print(f"[yellow]skipped[/yellow] {name}: {why}")
        return
    for name, value in files.items():
        _out().print(f"{name}  [dim]{_describe(value)}[/dim]")


def _describe(value: Any) -> str:
    if isinstance(value, dict) and value.get("omitted"):
        return f"omitted ({value.get('reason')})"
    if isinstance(value, dict) and value.get("encoding") == "base64":
        return "binary"
    return "json" if isinstance(value, dict | list) else f"{len(str(value))} chars"


def _write_artifacts(files: dict[str, Any], out_dir: Path) -> tuple[list[str], dict[str, str]]:
    """Write each file under ``out_dir``; a name that would land outside it is skipped, never written."""
    root = out_dir.resolve()
    written: list[str] = []
    skipped: dict[str, str] = {}
    for name, value in files.items():
        target = (root / name).resolve()
        if not target.is_relative_to(root) or target == root:
            skipped[name] = "the name points outside the folder"
            continue
        if isinstance(value, dict) and value.get("omitted"):
            skipped[name] = str(value.get("reason") or "omitted by the service")
            continue
        if isinstance(value, dict) and value.get("encoding") == "base64":
            data = base64.b64decode(value.get("content") or "")
        elif isinstance(value, str):
            data = value.encode()
        else:
            data = orjson.dumps(value, option=orjson.OPT_INDENT_2)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        written.append(name)
    return written, skipped


@jobs_app.command("cursor")
def jobs_cursor(
    job_id: JobId,
    follow: Annotated[bool, typer.Option("--follow", help="Stream live until the job ends.")] = False,
    as_json: AsJson = False,
    service_url: ServiceUrl = None,
    profile: Profile = None,
) -> None:
    """The agent's transcript (tool calls, files, messages); --follow streams it live (resuming after a dropped
    connection) until the job ends."""
    if not follow:
        body = call(service_url, profile, "job_cursor", job_id)
        if as_json:
            _json(body)
        else:
            for item in body["events"]:
                _print_cursor_item(item)
        return
    ended = asyncio.run(with_client(connection(service_url, profile), lambda c: _follow(c, job_id, as_json)))
    _exit_for_job(ended)


@jobs_app.command("continue")
def jobs_continue(
    job_id: JobId,
    prompt: Annotated[str, typer.Option("--prompt", help="The next instruction, in the same sandbox and session.")],
    model: Annotated[str | None, typer.Option("--model", help="Model for the new job.")] = None,
    follow: Annotated[bool, typer.Option("--follow", help="Stream the new job until it ends.")] = False,
    as_json: AsJson = False,
    service_url: ServiceUrl = None,
    profile: Profile = None,
) -> None:
    """Continue a job: a new job in its sandbox, with the session's earlier turns (queues behind a running one)."""

    async def start(client: Any) -> dict[str, Any]:
        made: dict[str, Any] = await client.continue_job(job_id, prompt, model=model)
        return made

    _started(service_url, profile, start, follow, as_json, "continuation")


@jobs_app.command("cleanup")
def jobs_cleanup(
    job_id: JobId, as_json: AsJson = False, service_url: ServiceUrl = None, profile: Profile = None
) -> None:
    """Delete a job's sandbox for good (every job sharing it becomes ``cleaned``)."""
    body = call(service_url, profile, "cleanup_job", job_id)
    if as_json:
        _json(body)
    else:
        _out().print(f"{body.get('message')}  ({', '.join(body.get('cleaned_jobs') or [job_id])})")


# ----------------------------------------------------------------------------- webhooks


@webhooks_app.command("add")
def webhooks_add(
    url: Annotated[str, typer.Argument(help="Where to POST the signed notifications (http(s)://…).")],
    event: Annotated[
        list[str] | None, typer.Option("--event", "-e", help="job.completed, job.failed, run.succeeded, …; repeat.")
    ] = None,
    secret: Annotated[
        str | None,
        typer.Option("--secret", envvar="KNEO_WEBHOOK_SECRET", help="Signing secret, 16-256 chars (or the variable)."),
    ] = None,
    as_json: AsJson = False,
    service_url: ServiceUrl = None,
    profile: Profile = None,
) -> None:
    """Register a webhook (prints its id; the secret is never shown again)."""
    if not secret:
        fail("give the signing secret with --secret or KNEO_WEBHOOK_SECRET (16-256 characters)", EXIT_USAGE)
    events = event or ["job.completed", "job.failed", "job.cancelled"]
    made = call(service_url, profile, "create_webhook", url, events, secret)
    if as_json:
        _json(made)
    else:
        _out().print(f"{made['id']}  {made['url']}  {', '.join(made['events'])}")


@webhooks_app.command("list")
def webhooks_list(
    page: Annotated[int, typer.Option(help="Page number, from 1.")] = 1,
    limit: Annotated[int, typer.Option(help="Webhooks per page.")] = 100,
    as_json: AsJson = False,
    service_url: ServiceUrl = None,
    profile: Profile = None,
) -> None:
    """List the registered webhooks, newest first."""
    body = call(service_url, profile, "list_webhooks", page=page, limit=limit)
    if as_json:
        _json(body)
        return
    table = make_table("id", "url", "events", "created_at")
    for w in body["data"]:
        table.add_row(w["id"], w["url"], ", ".join(w["events"]), w["created_at"])
    _out().print(table)


@webhooks_app.command("delete")
def webhooks_delete(
    webhook_id: str, as_json: AsJson = False, service_url: ServiceUrl = None, profile: Profile = None
) -> None:
    """Delete a webhook (its delivery log stays readable)."""
    body = call(service_url, profile, "delete_webhook", webhook_id)
    if as_json:
        _json(body)
    else:
        _out().print(f"deleted {body['id']}")


@webhooks_app.command("deliveries")
def webhooks_deliveries(
    webhook_id: str,
    page: Annotated[int, typer.Option(help="Page number, from 1.")] = 1,
    limit: Annotated[int, typer.Option(help="Deliveries per page.")] = 100,
    as_json: AsJson = False,
    service_url: ServiceUrl = None,
    profile: Profile = None,
) -> None:
    """A webhook's delivery log, newest first."""
    body = call(service_url, profile, "webhook_deliveries", webhook_id, page=page, limit=limit)
    if as_json:
        _json(body)
        return
    rows = body.get("data", [])
    columns = ("id", "event_type", "status", "attempt_count", "last_status_code", "updated_at")
    table = make_table(*columns)
    for d in rows:
        table.add_row(*("" if d.get(c) is None else str(d.get(c)) for c in columns))
    _out().print(table)


# ----------------------------------------------------------------------------- workspaces


def _pack(folder: Path) -> bytes:
    """A folder as a .tar.gz: regular files and folders only (links are left out; the service refuses them)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for path in sorted(folder.rglob("*")):
            if path.is_symlink() or not (path.is_file() or path.is_dir()):
                continue
            tar.add(path, arcname=path.relative_to(folder).as_posix(), recursive=False)
    return buf.getvalue()


@workspaces_app.command("upload")
def workspaces_upload(
    source: Annotated[Path, typer.Argument(help="A folder (packed for you) or a .tar.gz / .tgz file.", exists=True)],
    name: Annotated[str | None, typer.Option("--name", help="Workspace name (default: the folder/file name).")] = None,
    replace: Annotated[bool, typer.Option("--replace", help="Replace a workspace of that name.")] = False,
    as_json: AsJson = False,
    service_url: ServiceUrl = None,
    profile: Profile = None,
) -> None:
    """Upload a workspace; jobs mount it with `kneo jobs create --workspace NAME`."""
    if source.is_dir():
        archive: bytes | str = _pack(source)
        name = name or source.resolve().name
    else:
        archive = str(source)
    with spinner("uploading…", quiet=as_json):
        made = call(service_url, profile, "upload_workspace", archive, name, replace=replace)
    if as_json:
        _json(made)
    else:
        _out().print(f"{made['name']}  {made['path']}  {made['files']} file(s), {made['bytes']} bytes")


@workspaces_app.command("list")
def workspaces_list(
    page: Annotated[int, typer.Option(help="Page number, from 1.")] = 1,
    limit: Annotated[int, typer.Option(help="Workspaces per page (at most 100).")] = 20,
    as_json: AsJson = False,
    service_url: ServiceUrl = None,
    profile: Profile = None,
) -> None:
    """List the uploaded workspaces."""
    body = call(service_url, profile, "list_workspaces", page=page, limit=limit)
    if as_json:
        _json(body)
        return
    table = make_table("name", "path", "files", "bytes", "uploaded_at")
    for w in body["data"]:
        table.add_row(w["name"], w["path"], str(w["files"]), str(w["bytes"]), w["uploaded_at"])
    _out().print(table)
