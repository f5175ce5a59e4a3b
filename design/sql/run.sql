\set ON_ERROR_STOP 1
\i /tmp/proto/window.sql
\i /tmp/proto/record.sql
-- Three events of two users, committed in separate transactions.
INSERT INTO logproto.log_0 (id, user_id, source, kind, record) VALUES (gen_random_uuid(), '00000000-0000-0000-0000-00000000000a', 'auth.users', 'created', '{"id":"a"}');
INSERT INTO logproto.log_0 (id, user_id, source, kind, record) VALUES (gen_random_uuid(), '00000000-0000-0000-0000-00000000000b', 'auth.users', 'created', '{"id":"b"}');
INSERT INTO logproto.log_0 (id, user_id, source, kind, record) VALUES (gen_random_uuid(), '00000000-0000-0000-0000-00000000000a', 'auth.users', 'updated', '{"id":"a2"}');
-- A row as a restore writes it: its old xid is replaced by this transaction's.
INSERT INTO logproto.log_0 (id, user_id, source, kind, record, xid) VALUES (gen_random_uuid(), '00000000-0000-0000-0000-00000000000c', 'auth.users', 'created', '{"id":"c"}', '999999999'::xid8);
SELECT count(*) FILTER (WHERE xid = '999999999'::xid8) AS old_xids_kept FROM logproto.log_0;
-- Window 1: everything (position NULL).
CREATE TEMP TABLE w1 AS EXECUTE window_read(NULL, 1000);
SELECT segment, seq > 0 AS has_seq, user_id, kind, held, record FROM w1 ORDER BY seq;
-- Outcomes: a and b delivered, a2 retried, c failed; the position moves to the window's end.
SELECT * FROM logproto.position;
SELECT array_agg(id::text ORDER BY seq) AS ids, max(window_end) AS window_end FROM w1 \gset
EXECUTE record_batch(:'ids', ARRAY[0,0,0,0],
  ARRAY['delivered','delivered','pending','failed'],
  ARRAY[204,204,503,400], ARRAY[1,1,1,1], ARRAY[NULL,NULL,'503 Service Unavailable','400 Bad Request'],
  ARRAY[NULL,NULL,1000,NULL]::int8[], ARRAY[0,0,0,0], :'window_end');
SELECT status, attempts, last_status_code, event_type, delivered_at IS NOT NULL AS has_delivered_at FROM logproto.deliveries ORDER BY created_at, status;
-- Window 2, from the new position: empty (nothing read twice).
SELECT snapshot AS pos FROM logproto.position \gset
CREATE TEMP TABLE w2 AS EXECUTE window_read(:'pos', 1000);
SELECT count(*) AS window_2 FROM w2;
-- A new event of user a: held behind its pending exception.
INSERT INTO logproto.log_0 (id, user_id, source, kind, record) VALUES (gen_random_uuid(), '00000000-0000-0000-0000-00000000000a', 'auth.users', 'updated', '{"id":"a3"}');
CREATE TEMP TABLE w3 AS EXECUTE window_read(:'pos', 1000);
SELECT kind, held, record FROM w3;
EXPLAIN (COSTS OFF) EXECUTE window_read('10:20:'::pg_snapshot, 1000);
