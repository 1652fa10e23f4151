"""Python client SDK for the Kneo service (httpx).

``AsyncServiceClient.stream_run`` follows a run over SSE and resumes with ``Last-Event-ID`` after a dropped
connection, so a caller sees every event once, in order.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import orjson

from kneo_client.errors import ServiceError as ServiceError  # re-exported: existing callers import it from here
from kneo_client.errors import error_for
from kneo_client.transport import ClientSettings, RetryTransport

DEFAULT_URL = "http://127.0.0.1:8000"


@dataclass(frozen=True)
class SseEvent:
    """One server-sent event."""

    event: str
    data: str
    id: str | None

    def json(self) -> Any:
        """The data parsed as JSON."""
        return orjson.loads(self.data)


def _api_key() -> str | None:
    return os.environ.get("KNEO_API_KEY") or os.environ.get("KNEO_SERV_API_KEY") or None


class AsyncServiceClient:
    """Async client for the Kneo face."""

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        api_key: str | None = None,
        timeout: float | None = None,
        *,
        retries: int | None = None,
        retry_backoff_seconds: float | None = None,
        idempotency_key: str | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        """Connect to ``base_url`` with ``api_key`` (default ``KNEO_API_KEY`` / ``KNEO_SERV_API_KEY``).

        ``timeout``, ``retries``, ``retry_backoff_seconds`` and ``idempotency_key`` default to
        ``KNEO_SERV_CLIENT_TIMEOUT`` (120), ``KNEO_SERV_CLIENT_RETRIES`` (2),
        ``KNEO_SERV_CLIENT_RETRY_BACKOFF_SECONDS`` (0.25) and ``KNEO_SERV_IDEMPOTENCY_KEY`` (a fresh key per POST);
        see :mod:`kneo_client.transport` for what is retried.
        """
        headers = {}
        key = api_key or _api_key()
        if key:
            headers["Authorization"] = f"Bearer {key}"
        given: dict[str, Any] = {
            "timeout": timeout,
            "retries": retries,
            "retry_backoff_seconds": retry_backoff_seconds,
            "idempotency_key": idempotency_key,
        }
        self.settings = ClientSettings(**{k: v for k, v in given.items() if v is not None})
        self.base_url = base_url.rstrip("/")
        self.http = httpx.AsyncClient(
            base_url=self.base_url,
            headers=headers,
            timeout=self.settings.timeout,
            transport=RetryTransport(transport or httpx.AsyncHTTPTransport(), self.settings),
        )

    async def __aenter__(self) -> AsyncServiceClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self.http.aclose()

    @staticmethod
    def _check(resp: httpx.Response) -> Any:
        try:
            body = resp.json()
        except ValueError:
            body = resp.text
        if resp.status_code >= 400:
            raise error_for(resp.status_code, body, dict(resp.headers))
        return body

    async def _call(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        """One request; the body of a 2xx answer, or the typed error of any other."""
        result: dict[str, Any] = self._check(await self.http.request(method, path, **kwargs))
        return result

    async def create_run(
        self,
        *,
        input: str | None = None,
        spec_path: str | None = None,
        spec: str | dict[str, Any] | None = None,
        environment: str | None = None,
        target: str = "workflow",
        async_mode: bool = False,
        metadata: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """``POST /v1/runs``."""
        payload: dict[str, Any] = {"input": input, "target": target, "async_mode": async_mode}
        if spec_path is not None:
            payload["spec_path"] = spec_path
        if spec is not None:
            payload["spec"] = spec
        if environment is not None:
            payload["environment"] = environment
        if metadata is not None:
            payload["metadata"] = metadata
        return await self._call("POST", "/v1/runs", json=payload)

    async def get_run(self, run_id: str) -> dict[str, Any]:
        """``GET /v1/runs/{run_id}``."""
        return await self._call("GET", f"/v1/runs/{run_id}")

    async def list_runs(self, **params: Any) -> dict[str, Any]:
        """``GET /v1/runs``."""
        return await self._call("GET", "/v1/runs", params=params)

    async def run_events(self, run_id: str) -> dict[str, Any]:
        """``GET /v1/runs/{run_id}/events``."""
        return await self._call("GET", f"/v1/runs/{run_id}/events")

    # ------------------------------------------------------------------ specs and health

    async def _spec_call(
        self, operation: str, spec: str | dict[str, Any] | None, spec_path: str | None, environment: str | None
    ) -> dict[str, Any]:
        payload: dict[str, Any] = {"environment": environment}
        if spec is not None:
            payload["spec"] = spec
        if spec_path is not None:
            payload["spec_path"] = spec_path
        return await self._call("POST", f"/v1/specs/{operation}", json=payload)

    async def validate_spec(
        self, spec: str | dict[str, Any] | None = None, *, spec_path: str | None = None, environment: str | None = None
    ) -> dict[str, Any]:
        """``POST /v1/specs/validate``: ``{"valid", "diagnostics", "report"}`` for an inline spec or a spec path."""
        return await self._spec_call("validate", spec, spec_path, environment)

    async def compile_spec(
        self, spec: str | dict[str, Any] | None = None, *, spec_path: str | None = None, environment: str | None = None
    ) -> dict[str, Any]:
        """``POST /v1/specs/compile``: ``{"valid", "diagnostics", "plan"}``."""
        return await self._spec_call("compile", spec, spec_path, environment)

    async def explain_spec(
        self, spec: str | dict[str, Any] | None = None, *, spec_path: str | None = None, environment: str | None = None
    ) -> dict[str, Any]:
        """``POST /v1/specs/explain``."""
        return await self._spec_call("explain", spec, spec_path, environment)

    async def spec_policy_report(
        self, spec: str | dict[str, Any] | None = None, *, spec_path: str | None = None, environment: str | None = None
    ) -> dict[str, Any]:
        """``POST /v1/specs/policy-report``: ``{"valid", "report"}``."""
        return await self._spec_call("policy-report", spec, spec_path, environment)

    async def run_policy_report(self, run_id: str) -> dict[str, Any]:
        """``GET /v1/runs/{run_id}/policy-report``: the policy report of the spec the run was started with."""
        return await self._call("GET", f"/v1/runs/{run_id}/policy-report")

    async def health(self) -> dict[str, Any]:
        """``GET /v1/healthz``."""
        return await self._call("GET", "/v1/healthz")

    async def ready(self) -> dict[str, Any]:
        """``GET /readyz``: the readiness checks (raises :class:`ServiceUnavailable` with them when not ready)."""
        return await self._call("GET", "/readyz")

    # ------------------------------------------------------------------ human tasks and the audit log

    async def list_human_tasks(self, **params: Any) -> dict[str, Any]:
        """``GET /v1/human-tasks`` (filters run_id, workflow_kind, status; limit, offset, sort_by, sort_order)."""
        return await self._call("GET", "/v1/human-tasks", params=params)

    async def get_human_task(self, continuation_id: str) -> dict[str, Any]:
        """``GET /v1/human-tasks/{continuation_id}``."""
        return await self._call("GET", f"/v1/human-tasks/{continuation_id}")

    async def resume_human_task(
        self,
        continuation_id: str,
        request_id: str,
        decision: str,
        content: str | None = None,
        selected_option: str | None = None,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        """``POST /v1/human-tasks/{continuation_id}/resume`` with one decision (approved, rejected, edited,
        selected, provided)."""
        payload: dict[str, Any] = {"request_id": request_id, "decision": decision}
        if content is not None:
            payload["content"] = content
        if selected_option is not None:
            payload["selected_option"] = selected_option
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        return await self._call("POST", f"/v1/human-tasks/{continuation_id}/resume", json=payload, headers=headers)

    async def sweep_human_tasks(self) -> dict[str, Any]:
        """``POST /v1/human-tasks/sweep`` (admin): fire every due human-task timeout and run deadline now."""
        return await self._call("POST", "/v1/human-tasks/sweep")

    async def list_audit_events(self, **params: Any) -> dict[str, Any]:
        """``GET /v1/audit-events`` (filters event_type, run_id, continuation_id, actor, since, until)."""
        return await self._call("GET", "/v1/audit-events", params=params)

    async def cancel_run(self, run_id: str, reason: str | None = None) -> dict[str, Any]:
        """``POST /v1/runs/{run_id}/cancel``."""
        body = {"reason": reason} if reason is not None else None
        return await self._call("POST", f"/v1/runs/{run_id}/cancel", json=body)

    async def continue_run(
        self, run_id: str, *, async_mode: bool = False, idempotency_key: str | None = None
    ) -> dict[str, Any]:
        """``POST /v1/runs/{run_id}/continue``: a new run that goes on from the source's last completed step."""
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        return await self._call("POST", f"/v1/runs/{run_id}/continue", json={"async_mode": async_mode}, headers=headers)

    async def fork_run(
        self,
        run_id: str,
        from_sequence: int,
        *,
        input: str | None = None,
        step_outputs: dict[str, Any] | None = None,
        async_mode: bool = False,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        """``POST /v1/runs/{run_id}/fork?from_sequence=N``: a new run from checkpoint ``N`` of the source."""
        payload: dict[str, Any] = {"async_mode": async_mode}
        if input is not None:
            payload["input"] = input
        if step_outputs is not None:
            payload["step_outputs"] = step_outputs
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        return await self._call(
            "POST", f"/v1/runs/{run_id}/fork", params={"from_sequence": from_sequence}, json=payload, headers=headers
        )

    async def run_recovery(self, run_id: str) -> dict[str, Any]:
        """``GET /v1/runs/{run_id}/recovery``."""
        return await self._call("GET", f"/v1/runs/{run_id}/recovery")

    async def run_replay(self, run_id: str) -> dict[str, Any]:
        """``GET /v1/runs/{run_id}/replay``."""
        return await self._call("GET", f"/v1/runs/{run_id}/replay")

    async def run_trace(self, run_id: str, **params: Any) -> dict[str, Any]:
        """``GET /v1/runs/{run_id}/trace`` (``event_type``, ``limit``, ``offset``, ``sort_by``, ``sort_order``)."""
        return await self._call("GET", f"/v1/runs/{run_id}/trace", params=params)

    async def run_checkpoints(self, run_id: str, **params: Any) -> dict[str, Any]:
        """``GET /v1/runs/{run_id}/checkpoints``."""
        return await self._call("GET", f"/v1/runs/{run_id}/checkpoints", params=params)

    async def checkpoint_diff(
        self,
        run_id: str,
        *,
        from_sequence: int | None = None,
        to_sequence: int | None = None,
        other_run_id: str | None = None,
        other_sequence: int | None = None,
    ) -> dict[str, Any]:
        """``GET /v1/runs/{run_id}/checkpoints/diff`` (across runs with ``other_run_id``)."""
        given = {
            "from_sequence": from_sequence,
            "to_sequence": to_sequence,
            "other_run_id": other_run_id,
            "other_sequence": other_sequence,
        }
        params = {k: v for k, v in given.items() if v is not None}
        return await self._call("GET", f"/v1/runs/{run_id}/checkpoints/diff", params=params)

    # ------------------------------------------------------------------ the Knap face

    @staticmethod
    def _knap_body(
        content: str | list[dict[str, str]],
        tool_types: list[str | dict[str, str]] | None,
        chat_id: str | None,
        use_smart_cache: bool,
        knap_tool_uuid: str | None,
        stream_updates: bool,
    ) -> dict[str, Any]:
        messages = [{"role": "user", "content": content}] if isinstance(content, str) else content
        types = [t if isinstance(t, dict) else {"tool_type": t} for t in tool_types or []]
        body: dict[str, Any] = {
            "messages": messages,
            "tool_types": types,
            "stream_updates": stream_updates,
            "use_smart_cache": use_smart_cache,
        }
        if chat_id:
            body["chat_id"] = chat_id
        if knap_tool_uuid:
            body["knap_tool_uuid"] = knap_tool_uuid
        return body

    async def knap_run(
        self,
        content: str | list[dict[str, str]],
        tool_types: list[str | dict[str, str]] | None = None,
        chat_id: str | None = None,
        use_smart_cache: bool = True,
        knap_tool_uuid: str | None = None,
    ) -> AsyncIterator[dict[str, Any]]:
        """``POST /api/knap-tools/run``, streamed: yields the seed's events (``tool_execution``, ``tool_result``,
        ``message_chunk``, ``error``, ``done``) as dicts. ``content`` is the user's message (or a message list);
        ``tool_types`` names connectors (``"gmail"``) or gives ``{"tool_type", "tool_description"}``."""
        body = self._knap_body(content, tool_types, chat_id, use_smart_cache, knap_tool_uuid, True)
        async with self.http.stream(
            "POST", "/api/knap-tools/run", json=body, timeout=httpx.Timeout(30.0, read=None)
        ) as resp:
            if resp.status_code >= 400:
                await resp.aread()
                self._check(resp)
            async for ev in parse_sse(resp.aiter_lines()):
                yield ev.json()

    async def knap_run_once(
        self,
        content: str | list[dict[str, str]],
        tool_types: list[str | dict[str, str]] | None = None,
        chat_id: str | None = None,
        use_smart_cache: bool = True,
        knap_tool_uuid: str | None = None,
    ) -> dict[str, Any]:
        """``POST /api/knap-tools/run`` with ``stream_updates: false``: one body (message, tool_calls, chatId)."""
        body = self._knap_body(content, tool_types, chat_id, use_smart_cache, knap_tool_uuid, False)
        return await self._call("POST", "/api/knap-tools/run", json=body)

    async def knap_chat(self, chat_id: str) -> dict[str, Any]:
        """``GET /api/knap-tools/chats/{chat_id}``: a chat's transcript."""
        return await self._call("GET", f"/api/knap-tools/chats/{chat_id}")

    async def register_knap(
        self,
        name: str,
        tool_types: list[str | dict[str, str]],
        instructions: str | None = None,
        description: str | None = None,
    ) -> dict[str, Any]:
        """``POST /api/knaps``: a pre-configured Knap (run it with ``knap_tool_uuid``)."""
        body: dict[str, Any] = {
            "name": name,
            "tool_types": [t if isinstance(t, dict) else {"tool_type": t} for t in tool_types],
        }
        if instructions is not None:
            body["instructions"] = instructions
        if description is not None:
            body["description"] = description
        return await self._call("POST", "/api/knaps", json=body)

    async def list_knaps(self) -> dict[str, Any]:
        """``GET /api/knaps``."""
        return await self._call("GET", "/api/knaps")

    async def get_knap(self, knap_uuid: str) -> dict[str, Any]:
        """``GET /api/knaps/{knap_uuid}``."""
        return await self._call("GET", f"/api/knaps/{knap_uuid}")

    async def delete_knap(self, knap_uuid: str) -> dict[str, Any]:
        """``DELETE /api/knaps/{knap_uuid}``."""
        return await self._call("DELETE", f"/api/knaps/{knap_uuid}")

    # ------------------------------------------------------------------ the Jobs face, webhooks, workspaces

    async def create_job(
        self,
        job_type: str,
        prompt: str | None = None,
        *,
        model: str | None = None,
        workspace_path: str | None = None,
        idempotency_key: str | None = None,
        **spec: Any,
    ) -> dict[str, Any]:
        """``POST /jobs`` ``{"spec": {job_type, prompt, model, workspace_path, …}}``: ``{"job_id", "status",
        "sandbox_id", "cursor_session_id"}`` at once. Further spec fields (``session_id``, ``user_id``,
        ``time_range``, ``metadata``) go in ``**spec``."""
        body = {"job_type": job_type, "prompt": prompt, "model": model, "workspace_path": workspace_path, **spec}
        payload = {"spec": {k: v for k, v in body.items() if v is not None}}
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        return await self._call("POST", "/jobs", json=payload, headers=headers)

    async def list_jobs(
        self, *, status: str | None = None, job_type: str | None = None, page: int = 1, limit: int = 20
    ) -> dict[str, Any]:
        """``GET /jobs``: ``{"data": [job…], "pagination": {page, limit, total, pages}}``, newest first."""
        params: dict[str, Any] = {"page": page, "limit": limit}
        if status is not None:
            params["status"] = status
        if job_type is not None:
            params["job_type"] = job_type
        return await self._call("GET", "/jobs", params=params)

    async def get_job(self, job_id: str) -> dict[str, Any]:
        """``GET /jobs/{job_id}``: the job with its ``events``, ``artifacts`` and ``error``."""
        return await self._call("GET", f"/jobs/{job_id}")

    async def job_events(self, job_id: str) -> dict[str, Any]:
        """``GET /jobs/{job_id}/events``: ``{"events": [{ts, stage, level, detail}]}``."""
        return await self._call("GET", f"/jobs/{job_id}/events")

    async def job_artifacts(self, job_id: str) -> dict[str, Any]:
        """``GET /jobs/{job_id}/artifacts``: file name -> content (JSON parsed, text, or ``{"encoding": "base64"}``)."""
        return await self._call("GET", f"/jobs/{job_id}/artifacts")

    async def job_cursor(self, job_id: str) -> dict[str, Any]:
        """``GET /jobs/{job_id}/cursor``: ``{"events": [{type, …, timestamp}]}``, the agent's transcript."""
        return await self._call("GET", f"/jobs/{job_id}/cursor")

    async def stream_job_cursor(
        self, job_id: str, last_event_id: str | None = None, max_reconnects: int = 10
    ) -> AsyncIterator[dict[str, Any]]:
        """Follow ``GET /jobs/{job_id}/cursor/stream``: yields the cursor items (dicts) live, ending after the
        ``completed`` item; reconnects with ``Last-Event-ID`` after a dropped connection (no item twice)."""
        async for ev in self._follow(f"/jobs/{job_id}/cursor/stream", last_event_id, max_reconnects):
            yield ev.json()

    async def continue_job(
        self, job_id: str, prompt: str | None = None, *, idempotency_key: str | None = None, **spec: Any
    ) -> dict[str, Any]:
        """``POST /jobs/{job_id}/continue`` ``{"spec": {prompt, …}}``: a new job in the parent's sandbox."""
        body = {"prompt": prompt, **spec}
        payload = {"spec": {k: v for k, v in body.items() if v is not None}}
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        return await self._call("POST", f"/jobs/{job_id}/continue", json=payload, headers=headers)

    async def cleanup_job(self, job_id: str) -> dict[str, Any]:
        """``POST /jobs/{job_id}/cleanup``: delete the job's sandbox (and mark every job sharing it ``cleaned``)."""
        return await self._call("POST", f"/jobs/{job_id}/cleanup")

    async def create_webhook(self, url: str, events: list[str], secret: str) -> dict[str, Any]:
        """``POST /webhooks``: ``{id, url, events, created_at}`` (the secret is never echoed)."""
        body = {"url": url, "events": events, "secret": secret}
        return await self._call("POST", "/webhooks", json=body)

    async def list_webhooks(self, *, page: int = 1, limit: int = 100) -> dict[str, Any]:
        """``GET /webhooks``: ``{"data": [webhook…], "pagination"}``."""
        params = {"page": page, "limit": limit}
        return await self._call("GET", "/webhooks", params=params)

    async def delete_webhook(self, webhook_id: str) -> dict[str, Any]:
        """``DELETE /webhooks/{id}``: ``{id, deleted: true, deleted_at}``."""
        return await self._call("DELETE", f"/webhooks/{webhook_id}")

    async def webhook_deliveries(self, webhook_id: str, *, page: int = 1, limit: int = 100) -> dict[str, Any]:
        """``GET /webhooks/{id}/deliveries``: the delivery log, newest first."""
        params = {"page": page, "limit": limit}
        return await self._call("GET", f"/webhooks/{webhook_id}/deliveries", params=params)

    async def upload_workspace(
        self, archive: str | os.PathLike[str] | bytes, name: str | None = None, *, replace: bool = False
    ) -> dict[str, Any]:
        """``POST /workspaces`` (multipart): upload a ``.tar.gz`` (a path, or its bytes) as workspace ``name``
        (default: the file's name); 201 with the manifest. Jobs mount it with ``workspace_path="/workspaces/<name>"``.
        To upload a folder, pack it first (``kneo workspaces upload DIR`` does)."""
        if isinstance(archive, bytes):
            data, filename = archive, f"{name or 'workspace'}.tar.gz"
        else:
            path = os.fspath(archive)
            data, filename = await asyncio.to_thread(_read_bytes, path), os.path.basename(path)
        form: dict[str, str] = {"replace": "true" if replace else "false"}
        if name is not None:
            form["name"] = name
        files = {"workspace": (filename, data, "application/gzip")}
        return await self._call("POST", "/workspaces", data=form, files=files)

    async def list_workspaces(self, *, page: int = 1, limit: int = 20) -> dict[str, Any]:
        """``GET /workspaces``: ``{"data": [manifest…], "pagination"}``, by name."""
        params = {"page": page, "limit": limit}
        return await self._call("GET", "/workspaces", params=params)

    async def stream_run(
        self, run_id: str, last_event_id: str | None = None, max_reconnects: int = 10
    ) -> AsyncIterator[SseEvent]:
        """Follow ``GET /v1/runs/{run_id}/stream``; reconnects with ``Last-Event-ID`` after a dropped connection."""
        async for ev in self._follow(f"/v1/runs/{run_id}/stream", last_event_id, max_reconnects):
            yield ev

    async def _follow(self, path: str, last_event_id: str | None, max_reconnects: int) -> AsyncIterator[SseEvent]:
        """An SSE stream that the server ends; resumed with ``Last-Event-ID`` after a dropped connection."""
        reconnects = 0
        while True:
            headers = {"Accept": "text/event-stream"}
            if last_event_id:
                headers["Last-Event-ID"] = last_event_id
            try:
                async with self.http.stream(
                    "GET",
                    path,
                    headers=headers,
                    timeout=httpx.Timeout(30.0, read=60.0),
                ) as resp:
                    if resp.status_code >= 400:
                        await resp.aread()
                        self._check(resp)
                    async for ev in parse_sse(resp.aiter_lines()):
                        if ev.id:
                            last_event_id = ev.id
                        yield ev
                return  # the server ended the stream after the terminal event
            except (httpx.TransportError, httpx.RemoteProtocolError):
                reconnects += 1
                if reconnects > max_reconnects:
                    raise
                await asyncio.sleep(min(2.0, 0.1 * 2**reconnects))


def _read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


async def parse_sse(lines: AsyncIterator[str]) -> AsyncIterator[SseEvent]:
    """Parse an SSE line stream into events (comments and pings skipped)."""
    data: list[str] = []
    event, eid = "message", None
    async for line in lines:
        if line == "":
            if data:
                yield SseEvent(event, "\n".join(data), eid)
            event, data, eid = "message", [], None
            continue
        if line.startswith(":"):
            continue
        key, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if key == "event":
            event = value
        elif key == "data":
            data.append(value)
        elif key == "id":
            eid = value
    if data:
        yield SseEvent(event, "\n".join(data), eid)
