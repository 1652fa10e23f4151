"""The ``kneo`` command line (typer). A thin layer over the SDK and the platform bootstrap."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any

import orjson
import typer
from rich.console import Console

from kneo_client.config_cli import config_app
from kneo_client.human_cli import audit_app, human_app
from kneo_client.jobs_cli import jobs_app, webhooks_app, workspaces_app
from kneo_client.knap_cli import knap_app
from kneo_client.profiles import Connection
from kneo_client.remote import Profile, ServiceUrl, connection, spinner, with_client
from kneo_client.sdk import AsyncServiceClient, ServiceError
from kneo_client.spec_cli import spec_app

app = typer.Typer(help="Kneo Agent Platform CLI", no_args_is_help=True, pretty_exceptions_enable=False)
service_app = typer.Typer(help="Run or manage the Kneo service", no_args_is_help=True)
runs_app = typer.Typer(help="Inspect runs", no_args_is_help=True)
app.add_typer(config_app, name="config")
app.add_typer(spec_app, name="spec")
app.add_typer(service_app, name="service")
app.add_typer(runs_app, name="runs")
app.add_typer(human_app, name="human")
app.add_typer(audit_app, name="audit")
app.add_typer(knap_app, name="knap")
app.add_typer(jobs_app, name="jobs")
app.add_typer(webhooks_app, name="webhooks")
app.add_typer(workspaces_app, name="workspaces")

out = Console(highlight=False)
err = Console(stderr=True, highlight=False)

EXIT_FAILED = 1
EXIT_UNREACHABLE = 5
EXIT_NOT_FOUND = 4
EXIT_AUTH = 3


def _settings() -> Any:
    from kneo_events.settings import Settings

    try:
        return Settings()
    except Exception as exc:  # pydantic validation of env vars
        err.print(f"kneo: invalid settings: {exc}")
        raise typer.Exit(2) from None


def _print_json(value: Any) -> None:
    sys.stdout.write(orjson.dumps(value, option=orjson.OPT_INDENT_2).decode() + "\n")


def _service_url(explicit: str | None, profile: str | None = None) -> str | None:
    """The service URL by the profiles precedence (None: no service chosen, run in-process)."""
    return connection(explicit, profile, default=None).url


# ----------------------------------------------------------------------------- service


@service_app.command("serve")
def serve(
    host: Annotated[str, typer.Option(help="Interface to bind.", envvar="KNEO_HOST")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to bind.", envvar="KNEO_PORT")] = 8000,
    reload: Annotated[bool, typer.Option("--reload", help="Accepted for compatibility; has no effect.")] = False,
) -> None:
    """Run the Kneo FastAPI service (the whole platform; embedded NATS and Postgres when no URLs are set)."""
    from kneo_client.bootstrap import (
        ALL_SERVICES,
        configure_logging,
        redact_dsn,
        resolve_infra,
        run_platform,
        run_sync,
    )

    settings = _settings()
    configure_logging(settings.log_level)
    infra = resolve_infra(settings)
    try:

        def ready(running: Any) -> None:
            err.print(
                f"kneo: serving on {running.url}  (NATS {infra.settings.nats_url}, Postgres "
                f"{redact_dsn(infra.settings.database_url)}); Ctrl-C to stop"
            )

        run_sync(run_platform(infra.settings, ALL_SERVICES, host=host, port=port, on_ready=ready))
    except ConnectionError as exc:
        err.print(f"kneo: {exc}")
        raise typer.Exit(EXIT_UNREACHABLE) from None
    except ValueError as exc:  # a malformed setting found at start-up (API keys, rate limits)
        err.print(f"kneo: {exc}")
        raise typer.Exit(2) from None
    finally:
        infra.stop()
    err.print("kneo: stopped")


@service_app.command("run")
def run_service(
    service: Annotated[str, typer.Argument(help="gateway | compiler | runner | human | audit | webhooks")],
    host: Annotated[str, typer.Option(help="Interface to bind (gateway).", envvar="KNEO_HOST")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to bind (gateway).", envvar="KNEO_PORT")] = 8000,
) -> None:
    """Run one service alone against external servers (KNEO_NATS_URL and KNEO_DATABASE_URL)."""
    from kneo_client.bootstrap import ALL_SERVICES, configure_logging, resolve_infra, run_platform, run_sync

    if service not in ALL_SERVICES:
        err.print(f"kneo: unknown service {service!r}; choose one of {', '.join(ALL_SERVICES)}")
        raise typer.Exit(2)
    settings = _settings()
    configure_logging(settings.log_level)
    infra = resolve_infra(settings, allow_embedded=False)
    try:
        run_sync(
            run_platform(
                infra.settings,
                (service,),
                host=host,
                port=port,
                on_ready=lambda r: err.print(f"kneo: {service} running" + (f" on {r.url}" if r.url else "")),
            )
        )
    except ConnectionError as exc:
        err.print(f"kneo: {exc}")
        raise typer.Exit(EXIT_UNREACHABLE) from None


@service_app.command("status")
def status(
    service_url: ServiceUrl = None,
    profile: Profile = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print JSON (the readiness answer; also the default).")
    ] = False,
) -> None:
    """Show whether the service answers and its readiness checks (JSON); exit 1 when not ready, 5 unreachable."""
    import httpx

    url = _service_url(service_url, profile) or "http://127.0.0.1:8000"
    try:
        resp = httpx.get(f"{url}/readyz", timeout=5)
    except httpx.TransportError:
        err.print(f"kneo: no service answers at {url}; start one with `kneo service serve`")
        raise typer.Exit(EXIT_UNREACHABLE) from None
    _print_json(resp.json())
    raise typer.Exit(0 if resp.status_code == 200 else EXIT_FAILED)


@service_app.command("rebuild-projections")
def rebuild_projections(
    projection: Annotated[
        str,
        typer.Argument(
            help="Which projection to rebuild: runs (runs, plans, human tasks), audit, knaps, webhooks, or all."
        ),
    ] = "runs",
    as_json: Annotated[bool, typer.Option("--json", help="Print what was rebuilt as JSON.")] = False,
) -> None:
    """Truncate a projection and fold the whole event log into it again (the log is the truth)."""
    from kneo_audit.projection import rebuild as rebuild_audit
    from kneo_client.bootstrap import resolve_infra, run_sync
    from kneo_events.projections import rebuild_knaps, rebuild_policies, rebuild_runs, rebuild_webhooks
    from kneo_events.store import EventStore

    choices = ("runs", "audit", "knaps", "webhooks", "policies", "all")
    if projection not in choices:
        err.print(f"kneo: unknown projection {projection!r}; choose: {', '.join(choices)}")
        raise typer.Exit(2)
    settings = _settings()
    infra = resolve_infra(settings)

    async def go() -> list[str]:
        assert infra.settings.database_url
        store = await EventStore.connect(infra.settings.database_url, schema=infra.settings.database_schema)
        done = []
        try:
            await store.migrate()
            if projection in ("runs", "all"):
                async with store.pool.acquire() as conn:
                    done.append(f"runs ({await rebuild_runs(conn)} runs)")
            if projection in ("audit", "all"):
                done.append(f"audit ({await rebuild_audit(store)} records)")
            if projection in ("knaps", "all"):
                async with store.pool.acquire() as conn:
                    done.append(f"knaps ({await rebuild_knaps(conn)} Knaps)")
            if projection in ("policies", "all"):
                async with store.pool.acquire() as conn:
                    done.append(f"policies ({await rebuild_policies(conn)} environments)")
            if projection in ("webhooks", "all"):
                async with store.pool.acquire() as conn:
                    done.append(f"webhooks ({await rebuild_webhooks(conn)} webhooks)")
            return done
        finally:
            await store.close()

    try:
        done = run_sync(go())
    finally:
        infra.stop()
    if as_json:
        _print_json({"projection": projection, "rebuilt": done})
        return
    err.print(f"kneo: rebuilt from the log: {'; '.join(done)}")


# ----------------------------------------------------------------------------- run


async def _submit_and_follow(
    client: AsyncServiceClient,
    spec: Path,
    run_input: str | None,
    env: str | None,
    target: str,
    follow: bool,
    as_json: bool,
) -> dict[str, Any]:
    spec_text = await asyncio.to_thread(spec.read_text, encoding="utf-8")
    body = await client.create_run(input=run_input, spec=spec_text, environment=env, target=target, async_mode=follow)
    run_id = body["run_id"]
    if not follow:
        return {**body, **(await client.get_run(run_id))}
    if not as_json:
        err.print(f"[bold]run[/bold] {run_id}")
    current_step = None
    stream = client.stream_run(run_id)
    try:
        async for ev in stream:
            if ev.event == "human.requested":  # the run waits for a decision: stop following, say how to resume
                break
            if not as_json:
                _show_event(ev, current_step)
                if ev.event == "output":
                    current_step = ev.json()["step_id"]
    finally:
        await stream.aclose()  # type: ignore[attr-defined]  # an async generator
    if not as_json:
        out.print()
    state = await client.get_run(run_id)
    return {**body, **state, "human_intervention_required": state["status"] == "paused"}


def _show_event(ev: Any, current_step: str | None) -> None:
    """One event of a followed run: output chunks as they come (a header per step), trouble on its own line."""
    if ev.event == "output":
        chunk = ev.json()
        if chunk["step_id"] != current_step:
            out.print(f"\n[cyan]▸ {chunk['step_id']}[/cyan] ", end="")
        out.print(chunk["text"], end="", soft_wrap=True)
    elif ev.event in ("run.failed", "run.cancelled", "step.failed", "step.retrying", "step.restarted"):
        data = ev.json()
        out.print(f"\n[yellow]{ev.event}[/yellow] {data.get('data', data)}")


def _print_run(state: dict[str, Any], as_json: bool) -> None:
    if as_json:
        _print_json(state)
        return
    colour = {"succeeded": "green", "failed": "red", "cancelled": "yellow"}.get(state["status"], "cyan")
    out.print(f"[bold]status[/bold]  [{colour}]{state['status']}[/{colour}]   run_id {state['run_id']}")
    for key in ("workflow_name", "visited_steps", "trace_event_count", "error"):
        if state.get(key) not in (None, [], ""):
            out.print(f"[bold]{key}[/bold]  {state[key]}")
    if state.get("output_text"):
        out.print(f"[bold]output[/bold]  {state['output_text']}")
    pending = (state.get("metadata") or {}).get("pending_human_request") or {}
    cid = state.get("continuation_id") or pending.get("continuation_id")
    rid = pending.get("request_id")
    if state["status"] == "paused" and cid and rid:
        out.print(f"[bold]continuation_id[/bold]  {cid}")
        out.print(f"[bold]request_id[/bold]  {rid}")
        if pending.get("prompt"):
            out.print(f"[bold]prompt[/bold]  {pending['prompt']}")
        out.print(f"waiting for a human decision; resume with: kneo human resume {cid} --request-id {rid} --approve")


@app.command("run")
def run_cmd(
    spec: Annotated[Path, typer.Argument(help="Spec YAML file.", exists=True, dir_okay=False, readable=True)],
    run_input: Annotated[str | None, typer.Option("--input", "-i", help="Input text for the run.")] = None,
    target: Annotated[str, typer.Option(help="workflow or agent.")] = "workflow",
    env: Annotated[str | None, typer.Option("--env", help="Project environment (overlay).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the final state as JSON.")] = False,
    follow: Annotated[bool, typer.Option("--follow", help="Stream the run's output live.")] = False,
    service_url: Annotated[str | None, typer.Option("--service-url", help="Kneo service to use.")] = None,
    profile: Profile = None,
) -> None:
    """Run an agent/workflow spec: on a service when one is given, else on an in-process embedded platform.

    With a project config (``.kneo/config.yaml``), its overlays and the environment's ``policy_enforcement`` are
    checked first: a spec the policy refuses is not submitted (exit 1).
    """
    _enforce_project_policy(spec, env)
    conn = connection(service_url, profile, default=None)
    if conn.url:
        with spinner(f"running {spec.name} on {conn.url}…", quiet=as_json or follow):
            state = asyncio.run(_run_remote(conn, spec, run_input, env, target, follow, as_json))
    else:
        state = _run_local(spec, run_input, env, target, follow, as_json)
    _print_run(state, as_json)
    raise typer.Exit(0 if state["status"] in ("succeeded", "paused") else EXIT_FAILED)


async def _run_remote(
    url: Connection | str, spec: Path, run_input: str | None, env: str | None, target: str, follow: bool, as_json: bool
) -> dict[str, Any]:
    result: dict[str, Any] = await _with_client(
        url, lambda client: _submit_and_follow(client, spec, run_input, env, target, follow, as_json)
    )
    return result


async def _with_client(url: Connection | str, call: Callable[[AsyncServiceClient], Awaitable[Any]]) -> Any:
    """Run ``call`` with a client; service errors become one readable line and a distinct exit code."""
    return await with_client(url, call)


def _exit_for(exc: ServiceError) -> int:
    return {401: EXIT_AUTH, 403: EXIT_AUTH, 404: EXIT_NOT_FOUND}.get(exc.status, EXIT_FAILED)


def _enforce_project_policy(spec: Path, env: str | None) -> None:
    from kneo_client.spec_cli import print_diagnostics, project_config
    from kneo_compiler.project import select_environment
    from kneo_compiler.spec import check

    project, _ = project_config()
    if project is None:
        return
    environment = select_environment(env, os.environ, project)
    result = check(spec.read_bytes(), environment, project=project)
    errors = [d for d in result.diagnostics if d.severity == "error"]
    if errors:
        print_diagnostics(errors)
        err.print(f"kneo: the spec does not pass the project's checks for environment {environment!r}; nothing was run")
        raise typer.Exit(EXIT_FAILED)


def _run_local(
    spec: Path, run_input: str | None, env: str | None, target: str, follow: bool, as_json: bool
) -> dict[str, Any]:
    """Start the whole platform in this process (embedded servers), run over HTTP, stop."""
    from kneo_client.bootstrap import ALL_SERVICES, configure_logging, resolve_infra, run_platform, run_sync

    settings = _settings()
    configure_logging("WARNING")
    if not as_json:
        err.print("[dim]starting the embedded platform (NATS + PostgreSQL + services)…[/dim]")
    infra = resolve_infra(settings)
    result: dict[str, Any] = {}
    failure: list[BaseException] = []

    async def main() -> None:
        stop = asyncio.Event()

        async def on_ready(running: Any) -> None:
            url = running.url

            async def go() -> None:
                try:
                    assert url
                    async with AsyncServiceClient(url) as client:
                        result.update(await _submit_and_follow(client, spec, run_input, env, target, follow, as_json))
                except BaseException as exc:  # reported after shutdown
                    failure.append(exc)
                finally:
                    stop.set()

            asyncio.get_running_loop().create_task(go())

        await run_platform(infra.settings, ALL_SERVICES, host="127.0.0.1", port=0, stop=stop, on_ready=on_ready)

    try:
        run_sync(main())
    finally:
        infra.stop()
    if failure:
        exc = failure[0]
        if isinstance(exc, ServiceError):
            err.print(f"kneo: {exc}")
            raise typer.Exit(_exit_for(exc))
        raise exc
    if not result:
        err.print("kneo: the platform stopped before the run finished")
        raise typer.Exit(EXIT_FAILED)
    return result


@app.command("demo")
def demo(
    run_input: Annotated[str, typer.Option("--input")] = "Analyze Nvidia AI business",
    spec: Annotated[Path, typer.Option(help="Spec to run.")] = Path("examples/research_agent.yaml"),
) -> None:
    """Start the embedded platform, run examples/research_agent.yaml over HTTP, stream its output, stop."""
    state = _run_local(spec, run_input, None, "workflow", True, False)
    _print_run(state, False)
    raise typer.Exit(0 if state["status"] == "succeeded" else EXIT_FAILED)


# ----------------------------------------------------------------------------- runs


def _remote(service_url: str | None, profile: str | None = None) -> Connection:
    """The service (and API key) for ``--service-url`` / ``--profile``; default http://127.0.0.1:8000."""
    return connection(service_url, profile)


async def _call(url: Connection | str, fn: str, *args: Any, **kwargs: Any) -> Any:
    return await _with_client(url, lambda client: getattr(client, fn)(*args, **kwargs))


AsJson = Annotated[bool, typer.Option("--json", help="Print JSON.")]


@runs_app.command("get")
def runs_get(run_id: str, service_url: ServiceUrl = None, profile: Profile = None, as_json: AsJson = False) -> None:
    """Show a run's state."""
    _print_run(asyncio.run(_call(_remote(service_url, profile), "get_run", run_id)), as_json)


@runs_app.command("list")
def runs_list(
    status: Annotated[str | None, typer.Option(help="Filter by status.")] = None,
    limit: Annotated[int, typer.Option(help="Page size.")] = 20,
    offset: Annotated[int, typer.Option(help="Offset.")] = 0,
    service_url: ServiceUrl = None,
    profile: Profile = None,
    as_json: AsJson = False,
) -> None:
    """List runs, newest first."""
    params: dict[str, Any] = {"limit": limit, "offset": offset}
    if status:
        params["status"] = status
    page = asyncio.run(_call(_remote(service_url, profile), "list_runs", **params))
    if as_json:
        _print_json(page)
        return
    from kneo_client.remote import table as make_table

    table = make_table("run_id", "status", "workflow", "created_at")
    for r in page["runs"]:
        table.add_row(r["run_id"], r["status"], r.get("workflow_name") or "", r.get("created_at") or "")
    out.print(table)
    out.print(f"{page['count']} of {page['total']}")


@runs_app.command("events")
def runs_events(run_id: str, service_url: ServiceUrl = None, profile: Profile = None, as_json: AsJson = False) -> None:
    """Show a run's event history."""
    page = asyncio.run(_call(_remote(service_url, profile), "run_events", run_id))
    if as_json:
        _print_json(page)
        return
    for ev in page["events"]:
        out.print(f"{ev['version']:>4}  {ev['recorded_at']}  [bold]{ev['type']}[/bold]")


@runs_app.command("watch")
def runs_watch(run_id: str, service_url: ServiceUrl = None, profile: Profile = None, as_json: AsJson = False) -> None:
    """Follow a run live (events and output) until it ends; --json prints one SSE event per line."""

    async def go(client: AsyncServiceClient) -> None:
        async for ev in client.stream_run(run_id):
            if as_json:
                sys.stdout.write(orjson.dumps({"event": ev.event, "id": ev.id, "data": ev.json()}).decode() + "\n")
                sys.stdout.flush()
                continue
            if ev.event == "output":
                out.print(ev.json()["text"], end="")
            else:
                out.print(f"\n[bold]{ev.event}[/bold] (v{ev.id})")
        if not as_json:
            out.print()

    asyncio.run(_with_client(_remote(service_url, profile), go))


@runs_app.command("cancel")
def runs_cancel(run_id: str, service_url: ServiceUrl = None, profile: Profile = None, as_json: AsJson = False) -> None:
    """Cancel a queued, running or paused run."""
    _print_run(asyncio.run(_call(_remote(service_url, profile), "cancel_run", run_id)), as_json)


@runs_app.command("continue")
def runs_continue(
    run_id: str,
    async_mode: Annotated[bool, typer.Option("--async", help="Answer at once instead of waiting for the end.")] = False,
    idempotency_key: Annotated[str | None, typer.Option("--idempotency-key", help="Idempotency-Key header.")] = None,
    service_url: ServiceUrl = None,
    profile: Profile = None,
    as_json: AsJson = False,
) -> None:
    """Continue a failed, cancelled or timed-out run from its last completed step (as a new, linked run)."""
    body = asyncio.run(
        _call(
            _remote(service_url, profile),
            "continue_run",
            run_id,
            async_mode=async_mode,
            idempotency_key=idempotency_key,
        )
    )
    _print_run(body, as_json)
    raise typer.Exit(0 if body["status"] not in ("failed", "cancelled", "expired", "timed_out") else EXIT_FAILED)


@runs_app.command("fork")
def runs_fork(
    run_id: str,
    from_sequence: Annotated[int, typer.Option("--from-sequence", help="Checkpoint to start from.")],
    run_input: Annotated[str | None, typer.Option("--input", help="New input for the steps after it.")] = None,
    async_mode: Annotated[bool, typer.Option("--async", help="Answer at once instead of waiting for the end.")] = False,
    idempotency_key: Annotated[str | None, typer.Option("--idempotency-key", help="Idempotency-Key header.")] = None,
    service_url: ServiceUrl = None,
    profile: Profile = None,
    as_json: AsJson = False,
) -> None:
    """Start a new run from checkpoint N of a run (time travel): the steps after N run again."""
    body = asyncio.run(
        _call(
            _remote(service_url, profile),
            "fork_run",
            run_id,
            from_sequence,
            input=run_input,
            async_mode=async_mode,
            idempotency_key=idempotency_key,
        )
    )
    _print_run(body, as_json)
    raise typer.Exit(0 if body["status"] not in ("failed", "cancelled", "expired", "timed_out") else EXIT_FAILED)


def _print_view(value: dict[str, Any], as_json: bool, rows: str | None = None, columns: tuple[str, ...] = ()) -> None:
    """JSON as is, or a table of ``value[rows]`` with ``columns``, or ``key  value`` lines."""
    if as_json:
        _print_json(value)
        return
    if rows is None:
        for key, item in value.items():
            out.print(f"[bold]{key}[/bold]  {orjson.dumps(item).decode() if isinstance(item, dict | list) else item}")
        return
    from kneo_client.remote import table as make_table

    table = make_table(*columns)
    for row in value[rows]:
        table.add_row(*("" if row.get(c) is None else str(row.get(c)) for c in columns))
    out.print(table)


@runs_app.command("recovery")
def runs_recovery(
    run_id: str, service_url: ServiceUrl = None, profile: Profile = None, as_json: AsJson = False
) -> None:
    """Completed steps, failed step, next step and whether the run can continue."""
    _print_view(asyncio.run(_call(_remote(service_url, profile), "run_recovery", run_id)), as_json)


@runs_app.command("checkpoints")
def runs_checkpoints(
    run_id: str, service_url: ServiceUrl = None, profile: Profile = None, as_json: AsJson = False
) -> None:
    """A run's checkpoints (one per step boundary)."""
    page = asyncio.run(_call(_remote(service_url, profile), "run_checkpoints", run_id))
    _print_view(page, as_json, "checkpoints", ("sequence", "step_id", "status", "position", "created_at"))


@runs_app.command("checkpoint-diff")
def runs_checkpoint_diff(
    run_id: str,
    from_sequence: Annotated[int | None, typer.Option("--from-sequence")] = None,
    to_sequence: Annotated[int | None, typer.Option("--to-sequence")] = None,
    other_run_id: Annotated[str | None, typer.Option("--other-run-id", help="Compare with this run.")] = None,
    other_sequence: Annotated[int | None, typer.Option("--other-sequence")] = None,
    service_url: ServiceUrl = None,
    profile: Profile = None,
    as_json: AsJson = False,
) -> None:
    """Added, removed and changed paths between two checkpoints (of one run, or of two runs)."""
    diff = asyncio.run(
        _call(
            _remote(service_url, profile),
            "checkpoint_diff",
            run_id,
            from_sequence=from_sequence,
            to_sequence=to_sequence,
            other_run_id=other_run_id,
            other_sequence=other_sequence,
        )
    )
    if as_json:
        _print_json(diff)
        return
    for kind, mark in (("added", "+"), ("removed", "-")):
        for path, value in diff[kind].items():
            out.print(f"{mark} {path}: {value}")
    for path, change in diff["changed"].items():
        out.print(f"~ {path}: {change['from']} -> {change['to']}")


@runs_app.command("replay")
def runs_replay(run_id: str, service_url: ServiceUrl = None, profile: Profile = None, as_json: AsJson = False) -> None:
    """The run's compact timeline (no checkpoint payloads)."""
    replay = asyncio.run(_call(_remote(service_url, profile), "run_replay", run_id))
    _print_view(replay, as_json, "timeline", ("position", "sequence", "type", "step_id", "status", "error"))


@runs_app.command("trace")
def runs_trace(run_id: str, service_url: ServiceUrl = None, profile: Profile = None, as_json: AsJson = False) -> None:
    """The run's stored events (redacted), first page."""
    page = asyncio.run(_call(_remote(service_url, profile), "run_trace", run_id))
    _print_view(page, as_json, "events", ("version", "type", "recorded_at"))


def main() -> None:
    """Entry point of the ``kneo`` script."""
    app()


if __name__ == "__main__":
    main()
