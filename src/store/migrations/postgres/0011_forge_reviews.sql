-- Who merged or closed a pipeline's pull request, where the forge said.
ALTER TABLE pull_requests ADD COLUMN state_by TEXT;

-- A run started by a review comment on a pipeline's pull request: the comment to
-- answer when the run ends, and the context its agent is given.
CREATE TABLE forge_requests (
    run_id TEXT PRIMARY KEY REFERENCES runs(id),
    pipeline_id TEXT NOT NULL REFERENCES pipelines(id),
    number BIGINT NOT NULL,
    comment TEXT NOT NULL,
    author TEXT NOT NULL,
    context TEXT NOT NULL,
    replied_at BIGINT,
    reply_error TEXT
);
CREATE INDEX forge_requests_unanswered ON forge_requests (replied_at);
