-- The status message a chat surface keeps for each run, so edits continue after a restart.
CREATE TABLE chat_messages (
    run_id TEXT PRIMARY KEY REFERENCES runs (id),
    surface TEXT NOT NULL,
    channel TEXT NOT NULL,
    message_id TEXT NOT NULL
);
