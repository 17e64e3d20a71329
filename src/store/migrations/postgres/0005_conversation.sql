-- What a run asks (a change, or only an answer), and what its agent reported: tokens,
-- cost (in millionths of a US dollar) and its progress (JSON) while it works.
ALTER TABLE runs ADD COLUMN mode TEXT NOT NULL DEFAULT 'change';
ALTER TABLE runs ADD COLUMN tokens_in BIGINT;
ALTER TABLE runs ADD COLUMN tokens_out BIGINT;
ALTER TABLE runs ADD COLUMN cost_micro_usd BIGINT;
ALTER TABLE runs ADD COLUMN progress TEXT;

-- Messages in a pipeline's thread that started no run: what people discussed, given to
-- the next run as context. The platform's message id makes a redelivery count once.
CREATE TABLE thread_messages (
    pipeline_id TEXT NOT NULL REFERENCES pipelines (id),
    message_id TEXT NOT NULL,
    author TEXT NOT NULL,
    text TEXT NOT NULL,
    at BIGINT NOT NULL,
    PRIMARY KEY (pipeline_id, message_id)
);
