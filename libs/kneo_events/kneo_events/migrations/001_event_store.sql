-- The append-only event log: the only source of truth.
CREATE TABLE IF NOT EXISTS events (
    position     bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- The writing transaction: catch-up readers order by (tx_id, position) and stop below the oldest
    -- transaction still running, so an event committed late by a slow writer is never skipped.
    tx_id        xid8        NOT NULL DEFAULT pg_current_xact_id(),
    stream_id    text        NOT NULL,
    version      integer     NOT NULL CHECK (version > 0),
    event_id     uuid        NOT NULL UNIQUE,
    type         text        NOT NULL,
    data         jsonb       NOT NULL,
    metadata     jsonb       NOT NULL DEFAULT '{}'::jsonb,
    command_id   text,
    recorded_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    UNIQUE (stream_id, version)
);
CREATE INDEX IF NOT EXISTS events_tx_position ON events (tx_id, position);
CREATE INDEX IF NOT EXISTS events_command ON events (command_id) WHERE command_id IS NOT NULL;

-- One row per command whose events were appended: a redelivered command appends nothing twice.
CREATE TABLE IF NOT EXISTS processed_commands (
    command_id   text PRIMARY KEY,
    stream_id    text        NOT NULL,
    recorded_at  timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- Appends whose events are not yet confirmed published on the bus (the relay's work list).
CREATE TABLE IF NOT EXISTS outbox (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    stream_id     text        NOT NULL,
    from_version  integer     NOT NULL,
    to_version    integer     NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- Checkpoints of catch-up subscribers (asynchronous projections).
CREATE TABLE IF NOT EXISTS subscriber_checkpoints (
    name        text PRIMARY KEY,
    tx_id       xid8   NOT NULL,
    position    bigint NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- Inline projection: the state of each run, updated in the append's transaction.
CREATE TABLE IF NOT EXISTS runs (
    run_id         text PRIMARY KEY,
    status         text        NOT NULL,
    workflow_name  text,
    face           text        NOT NULL DEFAULT 'kneo',
    version        integer     NOT NULL,
    state          jsonb       NOT NULL,
    created_at     timestamptz NOT NULL,
    updated_at     timestamptz NOT NULL
);
CREATE INDEX IF NOT EXISTS runs_status_created ON runs (status, created_at DESC);
CREATE INDEX IF NOT EXISTS runs_created ON runs (created_at DESC);

-- Inline projection: the compiled plan of each run (written once by run.compiled).
CREATE TABLE IF NOT EXISTS run_plans (
    run_id     text PRIMARY KEY,
    plan_hash  text  NOT NULL,
    plan       jsonb NOT NULL
);
