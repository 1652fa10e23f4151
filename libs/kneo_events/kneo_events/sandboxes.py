"""Job sandboxes: where they live, deleting one for good, the retention sweep, and continuations held behind a job.

A job's sandbox is the folder ``<KNEO_SANDBOX_ROOT>/sandbox_<hex>`` (docs/jobs.md). The job's run creates it (the
template's first step) and its agent's file tools may touch nothing else; a continuation reuses its parent's. The
gateway (``POST /jobs/{id}/cleanup``) and the retention sweep delete it with :func:`clean_sandbox`, which appends
``job.cleaned`` to every job sharing it. Gateway and workers must see the same folder (one machine, or a shared
volume).

A continuation of a job that is still queued or running is *held*: its ``run.created`` is recorded without the
``compile_run`` command, and its lease is set far ahead so the reconciler leaves it alone. :class:`SandboxJanitor`
(run by the human service's timer loop) releases it once the job it waits for has ended, and sweeps sandboxes whose
jobs all ended more than ``KNEO_SANDBOX_RETENTION_DAYS`` ago.
"""

from __future__ import annotations

import logging
import re
import secrets
import shutil
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio.to_thread

from kneo_events.errors import ConcurrencyConflict, InvalidState
from kneo_events.ids import run_stream
from kneo_events.kernel import Kernel
from kneo_events.projections import TERMINAL_STATUSES
from kneo_events.schemas import JobCleaned, compile_run_command, new_event
from kneo_events.settings import Settings

log = logging.getLogger("kneo.sandboxes")

JSON = dict[str, Any]
SANDBOX_ID = re.compile(r"^sandbox_[0-9a-f]{8,64}$")
HOLD_SECONDS = 10 * 365 * 86_400.0  # the lease of a held continuation: "until released"
_TERMINAL = sorted(TERMINAL_STATUSES)


def new_sandbox_id() -> str:
    """``sandbox_<16 hex>``."""
    return f"sandbox_{secrets.token_hex(8)}"


def sandbox_path(settings: Settings, sandbox_id: str) -> Path:
    """The absolute folder of a sandbox (the id is checked: it can never name a path outside the root)."""
    if not SANDBOX_ID.match(sandbox_id):
        raise ValueError(f"not a sandbox id: {sandbox_id!r}")
    return settings.sandbox_dir / sandbox_id


def _delete(path: Path) -> bool:
    if not path.exists():
        return False
    shutil.rmtree(path)
    return True


async def jobs_of_sandbox(kernel: Kernel, sandbox_id: str) -> list[JSON]:
    """Every job (run state) that uses the sandbox: a job and its continuations."""
    rows = await kernel.store.pool.fetch(
        "SELECT state FROM runs WHERE face = 'jobs' AND state->'metadata'->'job'->>'sandbox_id' = $1 "
        "ORDER BY created_at",
        sandbox_id,
    )
    return [dict(r["state"]) for r in rows]


async def clean_sandbox(
    kernel: Kernel, sandbox_id: str, *, reason: str = "cleanup", metadata: JSON | None = None
) -> list[str]:
    """Delete the sandbox for good and append ``job.cleaned`` to each of its jobs not marked yet; returns those ids.

    Refused (:class:`InvalidState`) while one of its jobs is queued or running. Safe to repeat: the folder is deleted
    first, so a crash in between leaves jobs that a second call marks.
    """
    jobs = await jobs_of_sandbox(kernel, sandbox_id)
    busy = [j["run_id"] for j in jobs if j["status"] not in TERMINAL_STATUSES]
    if busy:
        raise InvalidState(
            f"sandbox {sandbox_id} is in use by job {busy[0]} (queued or running); cancel it or wait for it to end",
            detail={"sandbox_id": sandbox_id, "jobs": busy},
        )
    deleted = await anyio.to_thread.run_sync(_delete, sandbox_path(kernel.settings, sandbox_id))
    marked: list[str] = []
    at = datetime.now(UTC).isoformat()
    for job in jobs:
        for _ in range(10):
            if (job.get("metadata") or {}).get("cleaned_at"):
                break
            event = JobCleaned(sandbox_id=sandbox_id, reason=reason, cleaned_at=at)
            meta = {"correlation_id": job["run_id"], **(metadata or {})}
            try:
                await kernel.commit(
                    run_stream(job["run_id"]), [new_event(event, meta)], int(job["version"]), prior_state=job
                )
                marked.append(job["run_id"])
                break
            except ConcurrencyConflict:
                fresh = await kernel.store.get_run(job["run_id"])
                if fresh is None:
                    break
                job = fresh
    log.info("sandbox %s cleaned (%s): folder %s, jobs %s", sandbox_id, reason, deleted and "deleted", marked)
    return marked


async def hold(kernel: Kernel, job_id: str) -> None:
    """Keep the reconciler away from a held continuation until :func:`release_held` starts it."""
    await kernel.store.extend_lease(job_id, HOLD_SECONDS)


async def release_held(kernel: Kernel) -> list[str]:
    """Start held continuations whose job ended (or vanished); returns their ids.

    At most one per sandbox, the oldest, and only when no other job of that sandbox is active (running, paused, or
    queued and not held): two continuations queued behind one job must not start together in one folder.
    """
    rows = await kernel.store.pool.fetch(
        "SELECT DISTINCT ON (c.state->'metadata'->'job'->>'sandbox_id') c.run_id FROM runs c "
        "LEFT JOIN runs p ON p.run_id = c.state->'metadata'->'job'->>'queued_behind' "
        "WHERE c.face = 'jobs' AND c.status = 'queued' AND c.lease_until > clock_timestamp() + interval '365 days' "
        "AND (p.run_id IS NULL OR p.status = ANY($1::text[])) "
        "AND NOT EXISTS (SELECT 1 FROM runs o WHERE o.face = 'jobs' AND o.run_id <> c.run_id "
        "AND o.state->'metadata'->'job'->>'sandbox_id' = c.state->'metadata'->'job'->>'sandbox_id' "
        "AND NOT (o.status = ANY($1::text[])) "
        "AND NOT (o.status = 'queued' AND COALESCE(o.lease_until > clock_timestamp() + interval '365 days', false))) "
        "ORDER BY c.state->'metadata'->'job'->>'sandbox_id', c.created_at LIMIT 100",
        _TERMINAL,
    )
    released = []
    for row in rows:
        job_id = str(row["run_id"])
        await kernel.store.pool.execute("UPDATE runs SET lease_until = NULL WHERE run_id = $1", job_id)
        # a lost publish is re-sent by the reconciler: the run is queued, uncompiled and no longer leased
        await kernel.bus.publish_command(compile_run_command(job_id, run_stream(job_id), {"actor": "sandboxes"}))
        released.append(job_id)
    if released:
        log.info("released continuations %s", released)
    return released


async def expired_sandboxes(kernel: Kernel, now: datetime, retention_days: float) -> list[str]:
    """Sandboxes whose jobs all ended before ``now - retention`` and that are not cleaned yet."""
    cutoff = now - timedelta(days=retention_days)
    rows = await kernel.store.pool.fetch(
        "SELECT state->'metadata'->'job'->>'sandbox_id' AS sandbox_id FROM runs WHERE face = 'jobs' "
        "AND state->'metadata'->'job'->>'sandbox_id' IS NOT NULL GROUP BY 1 "
        "HAVING bool_and(status = ANY($1::text[])) AND bool_or(state->'metadata'->>'cleaned_at' IS NULL) "
        "AND max((state->>'finished_at')::timestamptz) < $2::timestamptz LIMIT 500",
        _TERMINAL,
        cutoff,
    )
    return [str(r["sandbox_id"]) for r in rows if SANDBOX_ID.match(str(r["sandbox_id"]))]


async def sweep_expired(kernel: Kernel, now: datetime | None = None) -> list[str]:
    """Clean every sandbox past the retention (``KNEO_SANDBOX_RETENTION_DAYS``); returns the sandbox ids."""
    now = now or datetime.now(UTC)
    cleaned = []
    for sandbox_id in await expired_sandboxes(kernel, now, kernel.settings.sandbox_retention_days):
        try:
            await clean_sandbox(kernel, sandbox_id, reason="retention", metadata={"actor": "retention-sweep"})
            cleaned.append(sandbox_id)
        except InvalidState:  # a continuation started meanwhile: the sandbox is in use again
            continue
    return cleaned


class SandboxJanitor:
    """The periodic part: release held continuations on every tick, sweep expired sandboxes every
    ``KNEO_SANDBOX_SWEEP_INTERVAL_SECONDS``. Safe to run in several processes (appends are optimistic)."""

    def __init__(self, kernel: Kernel) -> None:
        self.kernel = kernel
        self._last_sweep = 0.0

    async def tick(self, now: float | None = None) -> JSON:
        """One pass; ``now`` is epoch seconds."""
        now = time.time() if now is None else now
        out: JSON = {"released": await release_held(self.kernel), "cleaned": []}
        if now - self._last_sweep >= self.kernel.settings.sandbox_sweep_interval_seconds:
            self._last_sweep = now
            out["cleaned"] = await sweep_expired(self.kernel, datetime.fromtimestamp(now, UTC))
        return out
