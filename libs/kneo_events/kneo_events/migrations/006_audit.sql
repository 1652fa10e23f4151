-- Asynchronous projection (the audit service): one redacted record per audited event of the log.
CREATE TABLE IF NOT EXISTS audit_events (
    id               text PRIMARY KEY,            -- evt_<event uuid hex>: the source event, so a replay is idempotent
    position         bigint      NOT NULL,        -- the source event's global position
    event_type       text        NOT NULL,
    actor            text        NOT NULL,
    occurred_at      timestamptz NOT NULL,        -- when the event was recorded
    projected_at     timestamptz NOT NULL DEFAULT clock_timestamp(),  -- when this record was written (lag)
    run_id           text,
    continuation_id  text,
    request_id       text,
    payload          jsonb       NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_events_occurred ON audit_events (occurred_at DESC, position DESC);
CREATE INDEX IF NOT EXISTS audit_events_type ON audit_events (event_type, occurred_at DESC);
CREATE INDEX IF NOT EXISTS audit_events_run ON audit_events (run_id) WHERE run_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS audit_events_continuation ON audit_events (continuation_id) WHERE continuation_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS audit_events_actor ON audit_events (actor, occurred_at DESC);

-- Run-level deadlines (timeout_seconds) of runs still going: what the timer looks for.
CREATE INDEX IF NOT EXISTS runs_deadline ON runs (((state->>'deadline_epoch')::double precision))
    WHERE status IN ('queued', 'running', 'paused') AND state ? 'deadline_epoch';
