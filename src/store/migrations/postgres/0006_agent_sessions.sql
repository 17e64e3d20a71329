-- Whether a run resumed its agent's session from the pipeline's agent state, and the
-- session's total cost as the agent reported it (Claude Code reports a resumed
-- session's cost since its start): a run's own cost is the difference.
ALTER TABLE runs ADD COLUMN resumed BIGINT NOT NULL DEFAULT 0;
ALTER TABLE runs ADD COLUMN session_cost_micro_usd BIGINT;
