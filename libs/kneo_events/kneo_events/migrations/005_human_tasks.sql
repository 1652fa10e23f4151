-- Inline projection: one row per human request (human.requested … human.decided / human.cancelled).
CREATE TABLE IF NOT EXISTS human_tasks (
    continuation_id  text PRIMARY KEY,
    request_id       text        NOT NULL,
    run_id           text        NOT NULL,
    workflow_kind    text,
    step_id          text        NOT NULL,
    step_index       integer     NOT NULL,
    prompt           text        NOT NULL,
    options          jsonb       NOT NULL DEFAULT '[]'::jsonb,
    reviewers        jsonb       NOT NULL DEFAULT '[]'::jsonb,
    deadline_epoch   double precision,
    on_timeout       text        NOT NULL DEFAULT 'fail',
    escalated_at     timestamptz,
    status           text        NOT NULL,
    decision         jsonb,
    created_at       timestamptz NOT NULL,
    updated_at       timestamptz NOT NULL
);
CREATE INDEX IF NOT EXISTS human_tasks_run ON human_tasks (run_id);
CREATE INDEX IF NOT EXISTS human_tasks_status_created ON human_tasks (status, created_at DESC);
