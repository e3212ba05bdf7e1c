-- Audit trail: every state change of requests and commands, with who caused it and when.
--
-- Rows are written by triggers, in the transaction of the change itself, so no change can be
-- committed without its audit row. The actor is the transaction-local setting `pulse.actor`
-- (`SELECT set_config('pulse.actor', 'operator:alice', true)`), set by the store from the
-- authenticated caller; a change made without one (sweeps, dispatch) is recorded as `system`.
-- The table is append-only: UPDATE, DELETE and TRUNCATE are refused by triggers.

CREATE TABLE audit_events (
    event_id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    occurred_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    actor text NOT NULL,
    request_id uuid NOT NULL,
    -- NULL for request-level events.
    command_id uuid,
    hostname text NOT NULL DEFAULT '',
    agent_id text NOT NULL DEFAULT '',
    -- submitted | cancelled (requests); created | state_changed | stop_requested (commands).
    action text NOT NULL,
    from_state text NOT NULL DEFAULT '',
    to_state text NOT NULL DEFAULT '',
    detail text NOT NULL DEFAULT ''
);
CREATE INDEX audit_events_request ON audit_events (request_id, event_id);

CREATE FUNCTION pulse_actor() RETURNS text LANGUAGE sql STABLE AS $$
    SELECT coalesce(nullif(current_setting('pulse.actor', true), ''), 'system')
$$;

-- Batched agent statements (acks, completions, session opens and closes of many agents at once)
-- set the actor `agents`: each command row is then attributed to its own agent.
CREATE FUNCTION pulse_row_actor(agent text) RETURNS text LANGUAGE sql STABLE AS $$
    SELECT CASE WHEN pulse_actor() = 'agents' THEN 'agent:' || coalesce(agent, '')
                ELSE pulse_actor() END
$$;

CREATE FUNCTION audit_profile_requests() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO audit_events (actor, request_id, action, detail)
        VALUES (pulse_actor(), NEW.request_id, 'submitted', 'service ' || NEW.service_name);
    ELSIF NEW.cancelled_at IS DISTINCT FROM OLD.cancelled_at THEN
        INSERT INTO audit_events (actor, request_id, action)
        VALUES (pulse_actor(), NEW.request_id, 'cancelled');
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER profile_requests_audit
    AFTER INSERT OR UPDATE OF cancelled_at ON profile_requests
    FOR EACH ROW EXECUTE FUNCTION audit_profile_requests();

-- Commands change in bulk (submits, claims, sweeps): statement-level triggers with transition
-- tables write one INSERT ... SELECT per statement instead of one insert per row.
CREATE FUNCTION audit_commands_inserted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO audit_events (actor, request_id, command_id, hostname, agent_id, action,
        to_state)
    SELECT pulse_row_actor(n.agent_id), n.request_id, n.command_id, n.hostname, coalesce(n.agent_id, ''),
        'created', n.state
    FROM new_rows n ORDER BY n.seq;
    RETURN NULL;
END
$$;

CREATE FUNCTION audit_commands_updated() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO audit_events (actor, request_id, command_id, hostname, agent_id, action,
        from_state, to_state, detail)
    SELECT pulse_row_actor(n.agent_id), n.request_id, n.command_id, n.hostname, coalesce(n.agent_id, ''),
        'state_changed', o.state, n.state,
        CASE WHEN n.state IN ('failed', 'rejected', 'cancelled', 'expired', 'timed_out')
             THEN n.error_message ELSE '' END
    FROM new_rows n JOIN old_rows o ON o.command_id = n.command_id
    WHERE n.state IS DISTINCT FROM o.state
    ORDER BY n.seq;
    INSERT INTO audit_events (actor, request_id, command_id, hostname, agent_id, action,
        from_state, to_state, detail)
    SELECT pulse_row_actor(n.agent_id), n.request_id, n.command_id, n.hostname, coalesce(n.agent_id, ''),
        'stop_requested', n.state, n.state, n.error_message
    FROM new_rows n JOIN old_rows o ON o.command_id = n.command_id
    WHERE n.stop_requested AND NOT o.stop_requested
    ORDER BY n.seq;
    RETURN NULL;
END
$$;

CREATE TRIGGER commands_audit_insert
    AFTER INSERT ON commands REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION audit_commands_inserted();
CREATE TRIGGER commands_audit_update
    AFTER UPDATE ON commands REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION audit_commands_updated();

CREATE FUNCTION audit_events_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- (No percent sign here: the migration runner goes through the driver's placeholders.)
    RAISE EXCEPTION USING
        MESSAGE = 'audit_events is append-only: ' || TG_OP || ' refused',
        ERRCODE = 'insufficient_privilege';
END
$$;

CREATE TRIGGER audit_events_no_update_delete
    BEFORE UPDATE OR DELETE ON audit_events
    FOR EACH ROW EXECUTE FUNCTION audit_events_append_only();
CREATE TRIGGER audit_events_no_truncate
    BEFORE TRUNCATE ON audit_events
    FOR EACH STATEMENT EXECUTE FUNCTION audit_events_append_only();
