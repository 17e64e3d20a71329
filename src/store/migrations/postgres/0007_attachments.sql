-- Files attached to the message that started a run: where to get them when the run is
-- prepared (a file Threadline keeps, or a chat platform's URL), never their credentials.
CREATE TABLE attachments (
    run_id TEXT NOT NULL REFERENCES runs (id),
    name TEXT NOT NULL,
    source TEXT NOT NULL,
    location TEXT NOT NULL,
    auth TEXT NOT NULL,
    PRIMARY KEY (run_id, name)
);
