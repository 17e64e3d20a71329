-- Workers: processes that execute runs, each with a home (its data folder on its host),
-- a name for people and the labels runs may require.
ALTER TABLE instances ADD COLUMN worker_id TEXT NOT NULL DEFAULT '';
ALTER TABLE instances ADD COLUMN worker_name TEXT NOT NULL DEFAULT '';
ALTER TABLE instances ADD COLUMN labels TEXT NOT NULL DEFAULT '';

-- The labels a run needs of its worker (sorted, comma-separated), the worker that
-- executes it, and the front end that keeps its chat status message.
ALTER TABLE runs ADD COLUMN requires TEXT NOT NULL DEFAULT '';
ALTER TABLE runs ADD COLUMN worker_id TEXT;
ALTER TABLE runs ADD COLUMN poster TEXT;

-- The worker whose disk holds the pipeline's workspace: its follow-ups go there first.
ALTER TABLE pipelines ADD COLUMN holder TEXT;
CREATE INDEX runs_owner ON runs (owner);

-- Every worker home ever seen, by id: its name outlives its leases (a card says which
-- worker a local-only pipeline waits for, after that worker stopped).
CREATE TABLE workers (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    hostname TEXT NOT NULL,
    seen_at BIGINT NOT NULL
);

-- A process that stopped gracefully with runs in flight keeps its lease a while, marked:
-- its own restart (the same home) adopts them at once, other workers wait for it.
ALTER TABLE instances ADD COLUMN stopped INTEGER NOT NULL DEFAULT 0;

-- Files uploaded with a prompt (the web chat, the API), kept in the database so a
-- worker on any host gives them to its agent.
CREATE TABLE uploads (
    key TEXT PRIMARY KEY,
    bytes BLOB NOT NULL,
    created_at BIGINT NOT NULL
);
