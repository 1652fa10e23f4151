-- Inline projection of knap-<uuid> streams: the pre-configured Knaps (knap.registered / knap.deleted).
CREATE TABLE IF NOT EXISTS knaps (
    knap_uuid   text PRIMARY KEY,
    name        text        NOT NULL,
    definition  jsonb       NOT NULL,
    created_by  text,
    created_at  timestamptz NOT NULL,
    deleted_at  timestamptz
);
CREATE INDEX IF NOT EXISTS knaps_created ON knaps (created_at DESC) WHERE deleted_at IS NULL;

-- The smart cache of Knap tool calls: a cache (dropping it loses nothing but speed), not state of the log.
CREATE TABLE IF NOT EXISTS knap_tool_cache (
    chat_id     text        NOT NULL,
    cache_key   text        NOT NULL,
    tool        text        NOT NULL,
    ok          boolean     NOT NULL,
    content     text        NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (chat_id, cache_key)
);

-- A Knap chat is the Knap runs that carry its id (metadata.knap.chat_id), in order.
CREATE INDEX IF NOT EXISTS runs_knap_chat ON runs ((state->'metadata'->'knap'->>'chat_id'), created_at)
    WHERE face = 'knap';
