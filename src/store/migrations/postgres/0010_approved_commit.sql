-- The branch head an Open PR approval approved: a later push makes it stale where a
-- repository requires fresh approvals.
ALTER TABLE approvals ADD COLUMN commit_sha TEXT;
