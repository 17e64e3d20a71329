-- Files attached to a thread message that started no run (JSON: [{name, source...}]),
-- given to the pipeline's next run with the message.
ALTER TABLE thread_messages ADD COLUMN files TEXT NOT NULL DEFAULT '[]';
