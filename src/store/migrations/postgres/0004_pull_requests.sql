-- The pull request of a pipeline, once it was opened (or found, when opened by hand).
CREATE TABLE pull_requests (
    pipeline_id TEXT PRIMARY KEY REFERENCES pipelines (id),
    forge TEXT NOT NULL,
    number BIGINT NOT NULL,
    url TEXT NOT NULL,
    found BIGINT NOT NULL,
    opened_by TEXT NOT NULL,
    created_at BIGINT NOT NULL
);

-- Every Open PR decision: who, when, which pipeline, allowed or refused and why. The
-- request key (a click's id) makes a redelivered click count once.
CREATE TABLE approvals (
    request_key TEXT PRIMARY KEY,
    pipeline_id TEXT NOT NULL REFERENCES pipelines (id),
    run_id TEXT NOT NULL,
    actor TEXT NOT NULL,
    decision TEXT NOT NULL,
    reason TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE INDEX approvals_pipeline ON approvals (pipeline_id, created_at);
