"""The Postgres event store (asyncpg).

* ``append`` is atomic and checks the stream's expected version in the same statement that inserts; a conflict
  raises :class:`ConcurrencyConflict` (retryable). With a ``command_id`` an append is idempotent: a repeat returns
  the events the first one recorded and appends nothing.
* Inline projections run inside the append's transaction.
* ``read_all`` is the gap-free catch-up read: it orders by ``(tx_id, position)`` and returns only events of
  transactions older than the oldest one still running, so an event committed late by a concurrent writer always
  sorts after anything a reader has already seen.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from typing import Any, NamedTuple

import asyncpg
import asyncpg.pool
import orjson

from kneo_events.errors import ConcurrencyConflict
from kneo_events.projections import INLINE_PROJECTORS, fold_run
from kneo_events.schemas import NewEvent, RecordedEvent
from kneo_events.subjects import split_stream_id

Conn = asyncpg.Connection | asyncpg.pool.PoolConnectionProxy
Projector = Callable[[Conn, str, list[RecordedEvent]], Awaitable[None]]

_EVENT_COLUMNS = (
    "position, tx_id::text::bigint AS tx_id, stream_id, version, event_id, type, data, metadata, recorded_at"
)
_MIGRATION_LOCK = 0x4B4E454F  # "KNEO"


class Position(NamedTuple):
    """A place in the global order: the writing transaction, then the row's position."""

    tx_id: int
    position: int

    def encode(self) -> str:
        """``"<tx_id>:<position>"``, e.g. for a checkpoint or a cursor in an API."""
        return f"{self.tx_id}:{self.position}"

    @classmethod
    def decode(cls, raw: str) -> Position:
        """Inverse of :meth:`encode`."""
        tx, _, pos = raw.partition(":")
        return cls(int(tx), int(pos))


START = Position(0, 0)
UNKNOWN: Any = object()  # "the caller did not say what the run's prior state is"


@dataclass(frozen=True)
class AppendResult:
    """What an append recorded (or, for a repeated command, what the first append recorded)."""

    stream_id: str
    events: list[RecordedEvent]
    duplicate: bool
    outbox_id: int | None

    @property
    def version(self) -> int:
        """The stream's version after this append."""
        return self.events[-1].version if self.events else 0


def _record(row: asyncpg.Record) -> RecordedEvent:
    return RecordedEvent.model_construct(**dict(row.items()))


async def _init_connection(conn: Conn) -> None:
    for typ in ("jsonb", "json"):
        await conn.set_type_codec(
            typ,
            encoder=lambda v: orjson.dumps(v).decode(),
            decoder=orjson.loads,
            schema="pg_catalog",
            format="text",
        )


async def _keep_session(conn: Conn) -> None:
    """Pool release hook: nothing to undo.

    asyncpg's default runs ``RESET ALL; UNLISTEN *; ...`` on every release, one extra round trip per query. Kneo
    never changes session state (search_path is a connection parameter; the reconciler unlocks its advisory lock
    itself, and an open transaction is still rolled back by asyncpg before this hook runs).
    """


class EventStore:
    """The event store on one asyncpg pool (one pool per process)."""

    def __init__(self, pool: asyncpg.Pool, schema: str) -> None:
        self.pool = pool
        self.schema = schema
        self.projectors: dict[str, Projector] = dict(INLINE_PROJECTORS)

    @classmethod
    async def connect(
        cls, dsn: str, *, schema: str = "public", min_size: int = 2, max_size: int = 10, migrate: bool = True
    ) -> EventStore:
        """Open a pool on ``dsn`` using ``schema`` (created if missing) and apply migrations."""
        if schema != "public":
            conn = await asyncpg.connect(dsn, timeout=10)
            try:
                await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
            finally:
                await conn.close()
        pool = await asyncpg.create_pool(
            dsn,
            min_size=min_size,
            max_size=max_size,
            init=_init_connection,
            server_settings={"search_path": schema, "application_name": "kneo"},
            reset=_keep_session,
            timeout=10,
            command_timeout=60,
        )
        store = cls(pool, schema)
        if migrate:
            await store.migrate()
        return store

    async def close(self) -> None:
        """Close the pool (waits for connections in use, bounded)."""
        await self.pool.close()

    async def migrate(self) -> list[str]:
        """Apply pending SQL migrations in order, recording each in ``schema_migrations``."""
        applied: list[str] = []
        files = sorted(
            (f for f in resources.files("kneo_events.migrations").iterdir() if f.name.endswith(".sql")),
            key=lambda f: f.name,
        )
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations "
                "(version text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
            for f in files:
                version = f.name.removesuffix(".sql")
                if version in done:
                    continue
                await conn.execute(f.read_text())
                await conn.execute("INSERT INTO schema_migrations (version) VALUES ($1)", version)
                applied.append(version)
        return applied

    # ------------------------------------------------------------------ writes

    async def append(
        self,
        stream_id: str,
        events: Sequence[NewEvent],
        expected_version: int | None,
        command_id: str | None = None,
        *,
        conn: Conn | None = None,
        prior_state: dict[str, Any] | object | None = UNKNOWN,
    ) -> AppendResult:
        """Append ``events`` to ``stream_id`` atomically.

        ``expected_version``: the stream's current version as the caller knows it (0 = the stream must not exist),
        or ``None`` to append at the end whatever it is. A mismatch raises :class:`ConcurrencyConflict`.
        ``command_id``: a repeated command returns the first append's events with ``duplicate=True``.
        ``prior_state``: for a ``run-*`` stream, the run state the caller loaded at ``expected_version`` (``None``
        for a new run). With it, the append, the projection update and the outbox entry take one round trip.
        """
        if (
            prior_state is not UNKNOWN
            and conn is None
            and expected_version is not None
            and events
            and split_stream_id(stream_id)[0] == "run"
            # events that other projections (human tasks) follow take the transactional path with the projector
            and not any(
                e.type.startswith("human.") or e.type in ("run.cancelled", "run.expired", "run.timed_out")
                for e in events
            )
        ):
            return await self._append_run(stream_id, events, expected_version, command_id, prior_state)
        if conn is None:
            async with self.pool.acquire() as c:
                return await self.append(stream_id, events, expected_version, command_id, conn=c)
        try:
            async with conn.transaction():
                return await self._append_in_tx(conn, stream_id, events, expected_version, command_id)
        except asyncpg.UniqueViolationError as exc:
            if exc.constraint_name and "event_id" in exc.constraint_name:
                raise
            raise ConcurrencyConflict(
                f"stream {stream_id} moved past version {expected_version}", stream_id=stream_id
            ) from exc

    async def _append_run(
        self,
        stream_id: str,
        events: Sequence[NewEvent],
        base: int,
        command_id: str | None,
        prior_state: Any,
    ) -> AppendResult:
        at = datetime.now(UTC)
        recorded = [
            RecordedEvent.model_construct(
                position=0,
                tx_id=0,
                stream_id=stream_id,
                version=base + i,
                event_id=e.event_id,
                type=e.type,
                data=e.data,
                metadata=e.metadata,
                recorded_at=at,
            )
            for i, e in enumerate(events, start=1)
        ]
        state = fold_run(prior_state, recorded)
        compiled = next((e.data for e in events if e.type == "run.compiled"), None)
        try:
            rows = await self.pool.fetch(
                "SELECT * FROM kneo_append_run($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)",
                stream_id,
                base,
                command_id,
                [e.event_id for e in events],
                [e.type for e in events],
                [e.data for e in events],
                [e.metadata for e in events],
                at,
                state["run_id"],
                state,
                state["status"],
                state["workflow_name"],
                state["face"],
                datetime.fromisoformat(state["created_at"]) if state["created_at"] else at,
                compiled["plan_hash"] if compiled else None,
                compiled["plan"] if compiled else None,
            )
        except (asyncpg.SerializationError, asyncpg.UniqueViolationError) as exc:
            if isinstance(exc, asyncpg.UniqueViolationError) and "event_id" in (exc.constraint_name or ""):
                raise
            raise ConcurrencyConflict(
                f"stream {stream_id} moved past version {base}", stream_id=stream_id, expected_version=base
            ) from exc
        if rows and rows[0]["outcome"] == "duplicate":
            first = await self.pool.fetch(
                f"SELECT {_EVENT_COLUMNS} FROM events WHERE command_id = $1 ORDER BY position", command_id
            )
            return AppendResult(stream_id, [_record(r) for r in first], duplicate=True, outbox_id=None)
        out: list[RecordedEvent] = []
        outbox_id = None
        for row, ev in zip((r for r in rows if r["outcome"] == "ok"), recorded, strict=True):
            out.append(ev.model_copy(update={"position": row["out_position"], "tx_id": row["out_tx_id"]}))
        for row in rows:
            if row["outcome"] == "outbox":
                outbox_id = int(row["out_outbox_id"])
        return AppendResult(stream_id, out, duplicate=False, outbox_id=outbox_id)

    async def _append_in_tx(
        self,
        conn: Conn,
        stream_id: str,
        events: Sequence[NewEvent],
        expected_version: int | None,
        command_id: str | None,
    ) -> AppendResult:
        if command_id is not None:
            fresh = await conn.fetchval(
                "INSERT INTO processed_commands (command_id, stream_id) VALUES ($1, $2) "
                "ON CONFLICT DO NOTHING RETURNING true",
                command_id,
                stream_id,
            )
            if not fresh:
                rows = await conn.fetch(
                    f"SELECT {_EVENT_COLUMNS} FROM events WHERE command_id = $1 ORDER BY position", command_id
                )
                return AppendResult(stream_id, [_record(r) for r in rows], duplicate=True, outbox_id=None)
        if not events:
            return AppendResult(stream_id, [], duplicate=False, outbox_id=None)
        if expected_version is None:
            # "At the end, whatever the version": writers of the same stream take turns (a lock held to commit),
            # so none of them loses a race it did not ask to take part in.
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", stream_id)
            base = await conn.fetchval("SELECT coalesce(max(version), 0) FROM events WHERE stream_id = $1", stream_id)
        else:
            base = expected_version
        rows = await conn.fetch(
            f"""
            INSERT INTO events (stream_id, version, event_id, type, data, metadata, command_id)
            SELECT $1, $2 + e.ord, e.event_id, e.type, e.data, e.metadata, $7
            FROM unnest($3::uuid[], $4::text[], $5::jsonb[], $6::jsonb[]) WITH ORDINALITY
                 AS e(event_id, type, data, metadata, ord)
            WHERE $2 = (SELECT coalesce(max(version), 0) FROM events WHERE stream_id = $1)
            ORDER BY e.ord
            RETURNING {_EVENT_COLUMNS}
            """,
            stream_id,
            base,
            [e.event_id for e in events],
            [e.type for e in events],
            [e.data for e in events],
            [e.metadata for e in events],
            command_id,
        )
        if not rows:
            raise ConcurrencyConflict(
                f"stream {stream_id} is not at version {base}", stream_id=stream_id, expected_version=base
            )
        recorded = sorted((_record(r) for r in rows), key=lambda e: e.version)
        projector = self.projectors.get(split_stream_id(stream_id)[0])
        if projector is not None:
            await projector(conn, stream_id, recorded)
        outbox_id = await conn.fetchval(
            "INSERT INTO outbox (stream_id, from_version, to_version) VALUES ($1, $2, $3) RETURNING id",
            stream_id,
            recorded[0].version,
            recorded[-1].version,
        )
        return AppendResult(stream_id, recorded, duplicate=False, outbox_id=outbox_id)

    # ------------------------------------------------------------------ reads

    async def read_stream(self, stream_id: str, from_version: int = 1, limit: int | None = None) -> list[RecordedEvent]:
        """Events of one stream with ``version >= from_version``, in version order."""
        rows = await self.pool.fetch(
            f"SELECT {_EVENT_COLUMNS} FROM events WHERE stream_id = $1 AND version >= $2 ORDER BY version LIMIT $3",
            stream_id,
            from_version,
            limit,
        )
        return [_record(r) for r in rows]

    async def stream_version(self, stream_id: str) -> int:
        """The current version of a stream (0 when it has no events)."""
        v = await self.pool.fetchval("SELECT coalesce(max(version), 0) FROM events WHERE stream_id = $1", stream_id)
        return int(v)

    async def read_all(
        self, after: Position = START, limit: int = 500, conn: Conn | None = None
    ) -> list[RecordedEvent]:
        """The next events of the global log after ``after``, in commit-safe order.

        Only events of transactions older than every transaction still running are returned, ordered by
        ``(tx_id, position)``; a later call can therefore never return an event that sorts before one already
        returned. Follow it with ``after = Position(last.tx_id, last.position)``. Pass ``conn`` to read inside a
        projection's transaction.
        """
        rows = await (conn or self.pool).fetch(
            f"""
            SELECT {_EVENT_COLUMNS} FROM events
            WHERE (tx_id, position) > ($1::text::xid8, $2::bigint)
              AND tx_id < pg_snapshot_xmin(pg_current_snapshot())
            ORDER BY tx_id, position
            LIMIT $3
            """,
            str(after.tx_id),
            after.position,
            limit,
        )
        return [_record(r) for r in rows]

    async def read_all_of(
        self, after: Position, types: Collection[str], limit: int = 1000, conn: Conn | None = None
    ) -> tuple[list[RecordedEvent], Position]:
        """Like :meth:`read_all`, for a follower that needs only some event types: the events of ``types`` among
        the next ``limit`` of the log, and the position read up to (save that, so the others are not read again).

        The other events' payloads are never transferred or decoded; a follower of a few types then costs the
        database an index walk, not the whole log's JSON.
        """
        rows = await (conn or self.pool).fetch(
            """
            SELECT position, tx_id::text::bigint AS tx_id, type, type = ANY($4::text[]) AS wanted,
                   CASE WHEN type = ANY($4::text[]) THEN stream_id END AS stream_id,
                   CASE WHEN type = ANY($4::text[]) THEN version END AS version,
                   CASE WHEN type = ANY($4::text[]) THEN event_id END AS event_id,
                   CASE WHEN type = ANY($4::text[]) THEN data END AS data,
                   CASE WHEN type = ANY($4::text[]) THEN metadata END AS metadata,
                   CASE WHEN type = ANY($4::text[]) THEN recorded_at END AS recorded_at
            FROM events
            WHERE (tx_id, position) > ($1::text::xid8, $2::bigint)
              AND tx_id < pg_snapshot_xmin(pg_current_snapshot())
            ORDER BY tx_id, position
            LIMIT $3
            """,
            str(after.tx_id),
            after.position,
            limit,
            list(types),
        )
        if not rows:
            return [], after
        last = rows[-1]
        events = [
            RecordedEvent.model_construct(**{k: v for k, v in r.items() if k != "wanted"}) for r in rows if r["wanted"]
        ]
        return events, Position(int(last["tx_id"]), int(last["position"]))

    async def events_by_ids(self, event_ids: Sequence[uuid.UUID]) -> list[RecordedEvent]:
        """Events by id, in global order."""
        rows = await self.pool.fetch(
            f"SELECT {_EVENT_COLUMNS} FROM events WHERE event_id = ANY($1::uuid[]) ORDER BY position",
            event_ids,
        )
        return [_record(r) for r in rows]

    # ------------------------------------------------------------------ outbox and checkpoints

    async def outbox_done(self, ids: Sequence[int]) -> None:
        """Forget outbox entries whose events are confirmed published."""
        if ids:
            await self.pool.execute("DELETE FROM outbox WHERE id = ANY($1::bigint[])", list(ids))

    @contextlib.asynccontextmanager
    async def claim_outbox(
        self, older_than_seconds: float, limit: int = 200
    ) -> AsyncIterator[tuple[list[int], list[RecordedEvent]]]:
        """Lock outbox entries older than the grace period (skipping ones another relay holds).

        Yields their ids and events; the entries are deleted when the block exits without error.
        """
        async with self.pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(
                "SELECT id, stream_id, from_version, to_version FROM outbox "
                "WHERE created_at < clock_timestamp() - make_interval(secs => $1) "
                "ORDER BY id LIMIT $2 FOR UPDATE SKIP LOCKED",
                older_than_seconds,
                limit,
            )
            events: list[RecordedEvent] = []
            for r in rows:
                evs = await conn.fetch(
                    f"SELECT {_EVENT_COLUMNS} FROM events WHERE stream_id = $1 AND version BETWEEN $2 AND $3 "
                    "ORDER BY version",
                    r["stream_id"],
                    r["from_version"],
                    r["to_version"],
                )
                events.extend(_record(e) for e in evs)
            ids = [int(r["id"]) for r in rows]
            yield ids, events
            if ids:
                await conn.execute("DELETE FROM outbox WHERE id = ANY($1::bigint[])", ids)

    async def load_checkpoint(self, name: str) -> Position:
        """A catch-up subscriber's saved position (``START`` when it has none)."""
        row = await self.pool.fetchrow(
            "SELECT tx_id::text::bigint AS tx_id, position FROM subscriber_checkpoints WHERE name = $1", name
        )
        return Position(int(row["tx_id"]), int(row["position"])) if row else START

    async def save_checkpoint(self, name: str, pos: Position, conn: Conn | None = None) -> None:
        """Save a catch-up subscriber's position (pass ``conn`` to save it in the projection's transaction)."""
        sql = (
            "INSERT INTO subscriber_checkpoints (name, tx_id, position) VALUES ($1, $2::text::xid8, $3) "
            "ON CONFLICT (name) DO UPDATE SET tx_id = EXCLUDED.tx_id, position = EXCLUDED.position, "
            "updated_at = clock_timestamp()"
        )
        if conn is not None:
            await conn.execute(sql, name, str(pos.tx_id), pos.position)
        else:
            await self.pool.execute(sql, name, str(pos.tx_id), pos.position)

    # ------------------------------------------------------------------ run projection reads

    async def get_run(self, run_id: str) -> dict[str, Any] | None:
        """The projected state of a run."""
        row = await self.pool.fetchrow("SELECT state FROM runs WHERE run_id = $1", run_id)
        return dict(row["state"]) if row else None

    async def get_run_with_plan(self, run_id: str) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        """A run's projected state and its compiled plan (``None`` before ``run.compiled``)."""
        row = await self.pool.fetchrow(
            "SELECT r.state, p.plan FROM runs r LEFT JOIN run_plans p USING (run_id) WHERE r.run_id = $1",
            run_id,
        )
        if row is None:
            return None, None
        return dict(row["state"]), (dict(row["plan"]) if row["plan"] is not None else None)

    async def list_runs(
        self, *, status: str | None, limit: int, offset: int, sort_by: str, sort_order: str
    ) -> tuple[list[dict[str, Any]], int]:
        """A page of runs and the total count (``sort_by`` and ``sort_order`` must be pre-validated)."""
        column = {
            "created_at": "created_at",
            "updated_at": "updated_at",
            "status": "status",
            "run_id": "run_id",
        }[sort_by]
        order = "ASC" if sort_order == "asc" else "DESC"
        where = "WHERE status = $1" if status else "WHERE $1::text IS NULL"
        rows = await self.pool.fetch(
            f"SELECT state FROM runs {where} ORDER BY {column} {order}, run_id {order} LIMIT $2 OFFSET $3",
            status,
            limit,
            offset,
        )
        total = await self.pool.fetchval(f"SELECT count(*) FROM runs {where}", status)
        return [dict(r["state"]) for r in rows], int(total)

    async def stalled_runs(self, older_than_seconds: float, limit: int = 100) -> list[dict[str, Any]]:
        """Runs that are neither terminal nor paused and made no progress within the deadline."""
        rows = await self.pool.fetch(
            "SELECT state FROM runs WHERE status IN ('queued', 'running') "
            "AND updated_at < clock_timestamp() - make_interval(secs => $1) "
            "AND (lease_until IS NULL OR lease_until < clock_timestamp()) ORDER BY updated_at LIMIT $2",
            older_than_seconds,
            limit,
        )
        return [dict(r["state"]) for r in rows]

    async def extend_lease(self, run_id: str, seconds: float) -> None:
        """Mark a run as being worked on for ``seconds`` (the reconciler leaves it alone meanwhile)."""
        await self.pool.execute(
            "UPDATE runs SET lease_until = clock_timestamp() + make_interval(secs => $2) WHERE run_id = $1",
            run_id,
            seconds,
        )
