CREATE TABLE pipelines (
    id TEXT PRIMARY KEY,
    repo TEXT NOT NULL,
    remote_url TEXT NOT NULL,
    local_only BIGINT NOT NULL,
    base_branch TEXT NOT NULL,
    branch TEXT NOT NULL UNIQUE,
    agent TEXT NOT NULL,
    title TEXT NOT NULL,
    origin_surface TEXT NOT NULL,
    origin_thread TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE INDEX pipelines_origin ON pipelines (origin_surface, origin_thread);

CREATE TABLE runs (
    id TEXT PRIMARY KEY,
    pipeline_id TEXT NOT NULL REFERENCES pipelines (id),
    seq BIGINT NOT NULL,
    prompt TEXT NOT NULL,
    agent TEXT NOT NULL,
    requested_by TEXT NOT NULL,
    state TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    started_at BIGINT,
    finished_at BIGINT,
    exit_code BIGINT,
    end_reason TEXT,
    error TEXT,
    start_commit TEXT,
    head_commit TEXT,
    changed BIGINT NOT NULL DEFAULT 0,
    files_changed BIGINT,
    insertions BIGINT,
    deletions BIGINT,
    pushed BIGINT NOT NULL DEFAULT 0,
    push_error TEXT,
    container_id TEXT,
    owner TEXT,
    cancel_requested BIGINT NOT NULL DEFAULT 0,
    summary TEXT,
    log_tail TEXT NOT NULL DEFAULT '',
    UNIQUE (pipeline_id, seq)
);
CREATE INDEX runs_state ON runs (state);

CREATE TABLE run_events (
    id BIGSERIAL PRIMARY KEY,
    run_id TEXT NOT NULL REFERENCES runs (id),
    state TEXT NOT NULL,
    at BIGINT NOT NULL,
    detail TEXT NOT NULL
);
CREATE INDEX run_events_run ON run_events (run_id);

-- Idempotency keys of inbound requests that started a run: a redelivery finds its run here.
CREATE TABLE requests (
    idempotency_key TEXT PRIMARY KEY,
    run_id TEXT NOT NULL REFERENCES runs (id),
    created_at BIGINT NOT NULL
);

-- Live Threadline processes; a run whose owner is gone is adopted on the next start.
CREATE TABLE instances (
    id TEXT PRIMARY KEY,
    hostname TEXT NOT NULL,
    pid BIGINT NOT NULL,
    started_at BIGINT NOT NULL,
    heartbeat_at BIGINT NOT NULL
);
