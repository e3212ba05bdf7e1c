-- Agents, requests and commands. Every hot query has a partial index matching its WHERE clause.

CREATE TABLE agents (
    agent_id text PRIMARY KEY,
    service_name text NOT NULL,
    hostname text NOT NULL,
    ip_address text NOT NULL DEFAULT '',
    labels jsonb NOT NULL DEFAULT '{}',
    agent_version text NOT NULL DEFAULT '',
    supported_modes text[] NOT NULL DEFAULT '{}',
    -- The stream currently held for this agent; NULL when disconnected.
    session_id uuid,
    server_id text,
    heartbeat_interval_ms integer NOT NULL,
    connected_at timestamptz,
    last_seen_at timestamptz,
    disconnected_at timestamptz,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX agents_service_host ON agents (service_name, hostname);

CREATE TABLE profile_requests (
    request_id uuid PRIMARY KEY,
    service_name text NOT NULL,
    hostnames text[] NOT NULL DEFAULT '{}',
    duration_seconds integer NOT NULL CHECK (duration_seconds BETWEEN 1 AND 3600),
    frequency_hz integer NOT NULL CHECK (frequency_hz BETWEEN 1 AND 1000),
    profiling_mode text NOT NULL,
    pids integer[] NOT NULL DEFAULT '{}',
    additional_args jsonb NOT NULL DEFAULT '{}',
    continuous boolean NOT NULL DEFAULT false,
    max_hosts integer NOT NULL DEFAULT 0,
    ttl_seconds integer NOT NULL,
    idempotency_key text UNIQUE,
    -- Hash of the submitted parameters, to refuse a reused idempotency key with other parameters.
    fingerprint text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    cancelled_at timestamptz
);
CREATE INDEX profile_requests_created ON profile_requests (created_at DESC, request_id DESC);
CREATE INDEX profile_requests_service_created
    ON profile_requests (service_name, created_at DESC, request_id DESC);

CREATE TABLE commands (
    command_id uuid PRIMARY KEY,
    -- Submission order: an agent's queued commands are sent oldest first.
    seq bigint GENERATED ALWAYS AS IDENTITY,
    request_id uuid NOT NULL REFERENCES profile_requests ON DELETE CASCADE,
    service_name text NOT NULL,
    hostname text NOT NULL,
    -- NULL while a target named by hostname has not been delivered to any agent yet.
    agent_id text,
    state text NOT NULL CHECK (state IN (
        'pending', 'sent', 'running', 'succeeded', 'failed', 'rejected', 'cancelled',
        'expired', 'timed_out')),
    attempts integer NOT NULL DEFAULT 0,
    -- The stream the command was last written to.
    session_id uuid,
    expires_at timestamptz NOT NULL,
    deadline_at timestamptz,
    sent_at timestamptz,
    started_at timestamptz,
    finished_at timestamptz,
    stop_requested boolean NOT NULL DEFAULT false,
    stop_sent_at timestamptz,
    error_message text NOT NULL DEFAULT '',
    result_location text NOT NULL DEFAULT '',
    result_samples bigint NOT NULL DEFAULT 0,
    result_bytes bigint NOT NULL DEFAULT 0,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX commands_request ON commands (request_id);
CREATE INDEX commands_agent_pending ON commands (agent_id, seq) WHERE state = 'pending';
CREATE INDEX commands_host_pending ON commands (service_name, hostname, seq)
    WHERE state = 'pending' AND agent_id IS NULL;
CREATE INDEX commands_agent_busy ON commands (agent_id) WHERE state IN ('sent', 'running');
CREATE INDEX commands_pending_expiry ON commands (expires_at) WHERE state = 'pending';
CREATE INDEX commands_running_deadline ON commands (deadline_at) WHERE state = 'running';
CREATE INDEX commands_sent_at ON commands (sent_at) WHERE state = 'sent';
CREATE INDEX commands_service_active ON commands (service_name, hostname)
    WHERE state IN ('pending', 'sent', 'running');
