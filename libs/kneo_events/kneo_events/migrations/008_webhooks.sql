-- Webhooks (docs/webhooks.md).
-- Inline projection of webhook.registered / webhook.deleted (stream webhook-<id>). ``secret`` is the sealed secret
-- exactly as the event carries it (AES-256-GCM, never the plain text).
CREATE TABLE IF NOT EXISTS webhooks (
    webhook_id  text PRIMARY KEY,
    url         text        NOT NULL,
    events      text[]      NOT NULL,
    secret      jsonb       NOT NULL,
    status      text        NOT NULL,            -- active | deleted
    version     integer     NOT NULL,            -- the stream's version (DELETE appends at it)
    created_at  timestamptz NOT NULL,
    created_by  text,
    deleted_at  timestamptz
);
CREATE INDEX IF NOT EXISTS webhooks_active ON webhooks (created_at DESC) WHERE status = 'active';

-- The delivery log: operational state of the webhooks service, not a projection (docs/webhooks.md says why).
-- One row per (webhook, source event, webhook event type): the intent, recorded with the service's log position in
-- one transaction, so a replay of the log never doubles it; the row is the work item that senders lease.
CREATE TABLE IF NOT EXISTS webhook_deliveries (
    delivery_id      text PRIMARY KEY,            -- whd_<hex>, derived from the key below (stable across replays)
    webhook_id       text        NOT NULL,
    source_event_id  uuid        NOT NULL,
    event_type       text        NOT NULL,        -- job.completed, run.failed, ...
    run_id           text,
    body             text        NOT NULL,        -- the exact JSON bytes every attempt sends and signs
    status           text        NOT NULL DEFAULT 'pending',  -- pending | succeeded | failed | cancelled
    attempts         integer     NOT NULL DEFAULT 0,            -- attempts started (the last one's number)
    failures         integer     NOT NULL DEFAULT 0,            -- attempts that ended in a failure (max: KNEO_WEBHOOKS_MAX_ATTEMPTS)
    next_attempt_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    lease_until      timestamptz,                 -- a sender holds the delivery until then
    lease_owner      text,
    last_status_code integer,
    last_error       text,
    created_at       timestamptz NOT NULL DEFAULT clock_timestamp(),
    updated_at       timestamptz NOT NULL DEFAULT clock_timestamp(),
    completed_at     timestamptz,
    UNIQUE (webhook_id, source_event_id, event_type)
);
CREATE INDEX IF NOT EXISTS webhook_deliveries_due ON webhook_deliveries (next_attempt_at) WHERE status = 'pending';
CREATE INDEX IF NOT EXISTS webhook_deliveries_webhook ON webhook_deliveries (webhook_id, created_at DESC);

-- Every attempt of every delivery (finished_at NULL: in flight, or interrupted by a crash until the next claim).
CREATE TABLE IF NOT EXISTS webhook_delivery_attempts (
    delivery_id      text        NOT NULL REFERENCES webhook_deliveries (delivery_id) ON DELETE CASCADE,
    attempt          integer     NOT NULL,
    started_at       timestamptz NOT NULL,
    finished_at      timestamptz,
    status_code      integer,
    error            text,
    response_excerpt text,
    duration_ms      double precision,
    next_retry_at    timestamptz,
    PRIMARY KEY (delivery_id, attempt)
);
