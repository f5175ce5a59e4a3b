-- One statement per record batch: first attempts from the log (delivered: one done row per
-- segment; failed or retried: an exception copied from the log row), retries of exceptions
-- (updated as today), the position moved, the counters added to.
PREPARE record_batch(text[], int[], text[], int[], int[], text[], int8[], int[], pg_snapshot) AS
WITH r AS (
    SELECT * FROM unnest($1::text[], $2::int[], $3::text[], $4::int[], $5::int[], $6::text[], $7::int8[], $8::int[])
        AS r(id, segment, outcome, code, attempt, error, delay_ms, block_offset)
), from_log AS (
    SELECT r.* FROM r WHERE r.segment IS NOT NULL
), excepted AS (
    INSERT INTO logproto.outbox (id, user_id, source, record, kind, old_record, seq, created_at,
                                 status, attempts, last_attempt_at, last_status_code, last_error, next_attempt_at)
    SELECT l.id, l.user_id, l.source, l.record, l.kind, l.old_record, l.seq, l.created_at,
           f.outcome, f.attempt, clock_timestamp(), f.code, f.error,
           CASE WHEN f.outcome = 'pending' THEN clock_timestamp() + f.delay_ms * interval '1 millisecond' END
      FROM from_log f JOIN logproto.log_0 l ON l.id = f.id::uuid   -- by ctid in the real thing
     WHERE f.outcome <> 'delivered'
    RETURNING id
), done0 AS (
    INSERT INTO logproto.done_0 (ids, codes)
    SELECT array_agg(id::uuid), array_agg(code) FROM from_log WHERE segment = 0 AND outcome = 'delivered'
    HAVING count(*) > 0
    RETURNING 1
), moved AS (
    UPDATE logproto.position SET snapshot = $9, moved_at = clock_timestamp()
     WHERE endpoint = 'default' AND $9 IS NOT NULL
    RETURNING 1
)
SELECT (SELECT count(*) FROM excepted), (SELECT count(*) FROM done0), (SELECT count(*) FROM moved);
