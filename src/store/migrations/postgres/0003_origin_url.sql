-- A link to the chat thread a pipeline came from (empty for the CLI and the web chat).
ALTER TABLE pipelines ADD COLUMN origin_url TEXT NOT NULL DEFAULT '';
