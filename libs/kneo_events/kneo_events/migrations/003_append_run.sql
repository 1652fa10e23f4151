-- One round trip for the hot path: append a run's events, record the command id, keep the run projections
-- current and note the outbox entry, atomically (a function call is one statement). The caller folds the new run
-- state itself from the state it loaded at p_base (the version check below guarantees that state was current).
CREATE OR REPLACE FUNCTION kneo_append_run(
    p_stream    text,
    p_base      integer,
    p_command   text,
    p_ids       uuid[],
    p_types     text[],
    p_data      jsonb[],
    p_meta      jsonb[],
    p_at        timestamptz,
    p_run_id    text,
    p_state     jsonb,
    p_status    text,
    p_workflow  text,
    p_face      text,
    p_created   timestamptz,
    p_plan_hash text,
    p_plan      jsonb
) RETURNS TABLE (outcome text, out_position bigint, out_tx_id bigint, out_version integer, out_event_id uuid,
                 out_outbox_id bigint)
LANGUAGE plpgsql AS $$
DECLARE
    v_current integer;
    v_outbox  bigint;
BEGIN
    IF p_command IS NOT NULL THEN
        INSERT INTO processed_commands (command_id, stream_id) VALUES (p_command, p_stream)
        ON CONFLICT DO NOTHING;
        IF NOT FOUND THEN
            RETURN QUERY SELECT 'duplicate'::text, e.position, e.tx_id::text::bigint, e.version, e.event_id,
                                NULL::bigint
                         FROM events e WHERE e.command_id = p_command ORDER BY e.position;
            RETURN;
        END IF;
    END IF;
    SELECT coalesce(max(e.version), 0) INTO v_current FROM events e WHERE e.stream_id = p_stream;
    IF v_current <> p_base THEN
        RAISE EXCEPTION USING ERRCODE = '40001', MESSAGE = format('stream %s is at version %s, not %s',
                                                                 p_stream, v_current, p_base);
    END IF;
    RETURN QUERY
        INSERT INTO events AS e (stream_id, version, event_id, type, data, metadata, command_id, recorded_at)
        SELECT p_stream, p_base + u.ord, u.event_id, u.type, u.data, u.metadata, p_command, p_at
        FROM unnest(p_ids, p_types, p_data, p_meta) WITH ORDINALITY AS u(event_id, type, data, metadata, ord)
        ORDER BY u.ord
        RETURNING 'ok'::text, e.position, e.tx_id::text::bigint, e.version, e.event_id, NULL::bigint;
    INSERT INTO runs AS r (run_id, status, workflow_name, face, version, state, created_at, updated_at)
    VALUES (p_run_id, p_status, p_workflow, p_face, p_base + cardinality(p_ids), p_state, p_created, p_at)
    ON CONFLICT (run_id) DO UPDATE SET status = EXCLUDED.status, workflow_name = EXCLUDED.workflow_name,
        version = EXCLUDED.version, state = EXCLUDED.state, updated_at = EXCLUDED.updated_at;
    IF p_plan IS NOT NULL THEN
        INSERT INTO run_plans (run_id, plan_hash, plan) VALUES (p_run_id, p_plan_hash, p_plan)
        ON CONFLICT (run_id) DO UPDATE SET plan_hash = EXCLUDED.plan_hash, plan = EXCLUDED.plan;
    END IF;
    INSERT INTO outbox (stream_id, from_version, to_version)
    VALUES (p_stream, p_base + 1, p_base + cardinality(p_ids)) RETURNING id INTO v_outbox;
    RETURN QUERY SELECT 'outbox'::text, NULL::bigint, NULL::bigint, NULL::integer, NULL::uuid, v_outbox;
END;
$$;
