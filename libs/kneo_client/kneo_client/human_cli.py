"""``kneo human …`` (get, list, resume, sweep) and ``kneo audit list``: thin commands over the SDK."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from kneo_client.remote import Profile, ServiceUrl, call

human_app = typer.Typer(help="Manage human-in-the-loop tasks", no_args_is_help=True)
audit_app = typer.Typer(help="Read the audit log", no_args_is_help=True)

AsJson = Annotated[bool, typer.Option("--json", help="Print JSON.")]


def _print_task(task: dict[str, Any], as_json: bool) -> None:
    from kneo_client.cli import _print_json, out

    if as_json:
        _print_json(task)
        return
    req = task["request"]
    out.print(f"[bold]{task['continuation_id']}[/bold]  {task['status']}  run {task['run_id']}  step {task['step_id']}")
    out.print(f"  request_id: {req['request_id']}")
    out.print(f"  prompt: {req['prompt']}")
    if req.get("options"):
        out.print(f"  options: {', '.join(req['options'])}")
    if req.get("reviewers"):
        out.print(f"  reviewers: {', '.join(req['reviewers'])}")
    if task.get("escalated_at"):
        out.print(f"  escalated_at: {task['escalated_at']}")
    if task.get("decision"):
        out.print(f"  decision: {task['decision']}")


@human_app.command("get")
def human_get(
    continuation_id: str, as_json: AsJson = False, service_url: ServiceUrl = None, profile: Profile = None
) -> None:
    """Show one human task (its request, reviewers, deadline and decision)."""
    _print_task(call(service_url, profile, "get_human_task", continuation_id), as_json)


@human_app.command("list")
def human_list(
    run_id: Annotated[str | None, typer.Option("--run-id", help="Only this run's tasks.")] = None,
    status: Annotated[str | None, typer.Option(help="pending, decided, expired or cancelled.")] = None,
    limit: Annotated[int, typer.Option(help="Page size.")] = 20,
    offset: Annotated[int, typer.Option(help="Offset.")] = 0,
    as_json: AsJson = False,
    service_url: ServiceUrl = None,
    profile: Profile = None,
) -> None:
    """List human tasks, newest first."""
    from kneo_client.cli import _print_json, out

    params: dict[str, Any] = {"limit": limit, "offset": offset}
    if run_id:
        params["run_id"] = run_id
    if status:
        params["status"] = status
    page = call(service_url, profile, "list_human_tasks", **params)
    if as_json:
        _print_json(page)
        return
    from kneo_client.remote import table as make_table

    table = make_table("continuation_id", "status", "run_id", "step", "request_id", "prompt")
    for t in page["tasks"]:
        prompt = t["request"]["prompt"]
        table.add_row(
            t["continuation_id"],
            t["status"],
            t["run_id"],
            t["step_id"],
            t["request"]["request_id"],
            prompt if len(prompt) <= 40 else prompt[:39] + "…",
        )
    out.print(table)
    out.print(f"{page['count']} of {page['total']}")


@human_app.command("resume")
def human_resume(
    continuation_id: str,
    request_id: Annotated[str, typer.Option("--request-id", help="The request being answered.")],
    approve: Annotated[bool, typer.Option("--approve", help="Approve.")] = False,
    reject: Annotated[bool, typer.Option("--reject", help="Reject (the run fails with --reason).")] = False,
    edit: Annotated[str | None, typer.Option("--edit", help="Replace the step's output with this text.")] = None,
    provide: Annotated[str | None, typer.Option("--provide", help="Answer with this content.")] = None,
    select: Annotated[str | None, typer.Option("--select", help="Choose one of the request's options.")] = None,
    reason: Annotated[str | None, typer.Option("--reason", help="A note kept with the decision.")] = None,
    as_json: AsJson = False,
    service_url: ServiceUrl = None,
    profile: Profile = None,
) -> None:
    """Decide a human task: exactly one of --approve, --reject, --edit, --provide, --select."""
    from kneo_client.cli import _print_json, _print_run, err

    chosen = [
        (name, value)
        for name, value in (
            ("approved", approve or None),
            ("rejected", reject or None),
            ("edited", edit),
            ("provided", provide),
            ("selected", select),
        )
        if value is not None
    ]
    if len(chosen) != 1:
        err.print("kneo: give exactly one of --approve, --reject, --edit TEXT, --provide TEXT, --select OPTION")
        raise typer.Exit(2)
    decision, value = chosen[0]
    content = value if decision in ("edited", "provided") else reason
    from kneo_client.remote import spinner

    with spinner(f"resuming {continuation_id} ({decision})…", quiet=as_json):
        body = call(
            service_url,
            profile,
            "resume_human_task",
            continuation_id,
            request_id,
            decision,
            content=content,
            selected_option=value if decision == "selected" else None,
        )
    if as_json:
        _print_json(body)
        return
    _print_run(body, False) if "status" in body and "run_id" in body else _print_json(body)


@human_app.command("sweep")
def human_sweep(as_json: AsJson = False, service_url: ServiceUrl = None, profile: Profile = None) -> None:
    """Fire every due human-task timeout and run-level deadline now (admin; the service also does it by itself)."""
    from kneo_client.cli import _print_json, out

    body = call(service_url, profile, "sweep_human_tasks")
    if as_json:
        _print_json(body)
        return
    for f in body.get("fired", []):
        out.print(f"{f['continuation_id']}  run {f['run_id']}  on_timeout: {f['on_timeout']}")
    for run_id in body.get("timed_out_runs", []):
        out.print(f"run {run_id} timed out")
    out.print(f"{body.get('count', 0)} task timeout(s) fired, {len(body.get('timed_out_runs', []))} run(s) timed out")


@audit_app.command("list")
def audit_list(
    event_type: Annotated[str | None, typer.Option("--event-type", help="e.g. run.created, human.decision")] = None,
    run_id: Annotated[str | None, typer.Option("--run-id")] = None,
    continuation_id: Annotated[str | None, typer.Option("--continuation-id")] = None,
    actor: Annotated[str | None, typer.Option("--actor", help="API-key name, or system")] = None,
    since: Annotated[str | None, typer.Option("--since", help="ISO 8601")] = None,
    until: Annotated[str | None, typer.Option("--until", help="ISO 8601")] = None,
    limit: Annotated[int, typer.Option(help="Page size.")] = 20,
    offset: Annotated[int, typer.Option(help="Offset.")] = 0,
    as_json: AsJson = False,
    service_url: ServiceUrl = None,
    profile: Profile = None,
) -> None:
    """List audit records, newest first (redacted)."""
    from kneo_client.cli import _print_json, out

    filters = {
        "event_type": event_type,
        "run_id": run_id,
        "continuation_id": continuation_id,
        "actor": actor,
        "since": since,
        "until": until,
    }
    params: dict[str, Any] = {k: v for k, v in filters.items() if v is not None}
    page = call(service_url, profile, "list_audit_events", limit=limit, offset=offset, **params)
    if as_json:
        _print_json(page)
        return
    from kneo_client.remote import table as make_table

    table = make_table("occurred_at", "event_type", "actor", "run_id", "request_id")
    for e in page["events"]:
        table.add_row(e["occurred_at"], e["event_type"], e["actor"], e.get("run_id") or "", e.get("request_id") or "")
    out.print(table)
    out.print(f"{page['count']} of {page['total']}")
