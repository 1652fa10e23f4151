-- Idempotency records: (actor, route, key) → the request's hash, the resource it created and the first response.
-- A cache of responses, not state: the run itself is in the log. Expired records are replaced on reuse.
CREATE TABLE IF NOT EXISTS idempotency_records (
    actor         text        NOT NULL,
    route         text        NOT NULL,
    key           text        NOT NULL,
    request_hash  text        NOT NULL,
    resource_id   text,
    status_code   integer,
    body          jsonb,
    created_at    timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (actor, route, key)
);

-- Fixed-window request counters per API key, shared by every gateway process.
CREATE TABLE IF NOT EXISTS rate_limit_counters (
    bucket        text    NOT NULL,
    window_start  bigint  NOT NULL,
    count         integer NOT NULL,
    PRIMARY KEY (bucket, window_start)
);

-- Projection of policy.changed events: the service-managed policy of each environment.
CREATE TABLE IF NOT EXISTS environment_policies (
    environment  text PRIMARY KEY,
    policy       jsonb       NOT NULL,
    version      integer     NOT NULL,
    updated_at   timestamptz NOT NULL,
    updated_by   text
);
