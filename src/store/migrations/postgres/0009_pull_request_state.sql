-- What the forge last said of a pipeline's pull request (open, merged or closed), and
-- when Threadline saw it change: cards tell the truth after a merge.
ALTER TABLE pull_requests ADD COLUMN state TEXT NOT NULL DEFAULT 'open';
ALTER TABLE pull_requests ADD COLUMN state_at BIGINT;
