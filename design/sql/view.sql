-- Every event and its state: exceptions as today; a log row not in the outbox is delivered once
-- the position covers it (code and time from its done row), pending before.
CREATE VIEW logproto.deliveries AS
SELECT id, user_id, source, status, attempts, next_attempt_at, last_status_code, last_error, last_attempt_at,
       created_at, delivered_at, kind AS event_type
  FROM logproto.outbox
UNION ALL
SELECT l.id, l.user_id, l.source,
       CASE WHEN p.snapshot IS NOT NULL AND pg_visible_in_snapshot(l.xid, p.snapshot) THEN 'delivered' ELSE 'pending' END,
       CASE WHEN p.snapshot IS NOT NULL AND pg_visible_in_snapshot(l.xid, p.snapshot) THEN 1 ELSE 0 END,
       CASE WHEN p.snapshot IS NULL OR NOT pg_visible_in_snapshot(l.xid, p.snapshot) THEN l.created_at END,
       d.code, NULL, d.at, l.created_at, d.at, l.kind
  FROM (SELECT * FROM logproto.log_0 UNION ALL SELECT * FROM logproto.log_1) l
  CROSS JOIN logproto.position p
  LEFT JOIN LATERAL (SELECT c.code, x.at FROM (SELECT * FROM logproto.done_0 UNION ALL SELECT * FROM logproto.done_1) x,
                            unnest(x.ids, x.codes) AS c(id, code)
                      WHERE c.id = l.id LIMIT 1) d ON true
 WHERE p.endpoint = 'default' AND NOT EXISTS (SELECT 1 FROM logproto.outbox o WHERE o.id = l.id);
-- Rotation (the worker, when log_1 is all delivered and past the retention):
--   LOCK logproto.log_0, logproto.log_1, logproto.done_0, logproto.done_1 IN ACCESS EXCLUSIVE MODE NOWAIT;
--   SELECT NOT EXISTS (SELECT 1 FROM logproto.log_1 l, logproto.position p
--                       WHERE p.snapshot IS NULL OR NOT pg_visible_in_snapshot(l.xid, p.snapshot))
--          AND coalesce((SELECT max(created_at) FROM logproto.log_1) < now() - retention, true);
--   TRUNCATE logproto.log_1, logproto.done_1;
--   ALTER TABLE logproto.log_0 RENAME TO log_swap; ALTER TABLE logproto.log_1 RENAME TO log_0;
--   ALTER TABLE logproto.log_swap RENAME TO log_1; (the same for done_*, and the indexes' names)
