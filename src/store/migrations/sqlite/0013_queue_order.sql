-- The queue in the order runs are claimed: a claim walks it from the oldest queued run
-- and stops at the first that may start, instead of sorting every queued run.
CREATE INDEX runs_queued ON runs (created_at, seq) WHERE state = 'queued';
