-- pg_new_user_hook 0.1.0 → 0.2.0 (ALTER EXTENSION pg_new_user_hook UPDATE TO '0.2.0').
-- Queued events are kept as they are. Building the index reads the outbox while
-- new signups wait for it: with a large outbox, update at a quiet time.

-- new_user_hook.status finds the last error through an index instead of scanning every event.
CREATE INDEX outbox_last_error ON new_user_hook.outbox (last_attempt_at DESC NULLS LAST) WHERE last_error IS NOT NULL;
