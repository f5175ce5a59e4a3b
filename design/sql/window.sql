-- Phase 1: the window (prev, statement's snapshot], both segments, ordered by seq; the full
-- rows when it is small; events already in the outbox skipped (a crash between an exception
-- and the position's move); `held`: the user has a pending exception.
PREPARE window_read(pg_snapshot, int) AS
WITH w AS (
    SELECT 0 AS segment, l.ctid AS pos, l.* FROM logproto.log_0 l
     WHERE $1 IS NULL OR (l.xid >= pg_snapshot_xmin($1) AND NOT pg_visible_in_snapshot(l.xid, $1))
    UNION ALL
    SELECT 1, l.ctid, l.* FROM logproto.log_1 l
     WHERE $1 IS NULL OR (l.xid >= pg_snapshot_xmin($1) AND NOT pg_visible_in_snapshot(l.xid, $1))
), n AS (SELECT count(*) AS n FROM w)
SELECT w.segment, w.pos, w.seq, w.id, w.user_id, w.kind,
       EXISTS (SELECT 1 FROM logproto.outbox o WHERE o.user_id = w.user_id AND o.status = 'pending') AS held,
       CASE WHEN n.n <= $2 THEN w.record::text END AS record,
       CASE WHEN n.n <= $2 THEN w.old_record::text END AS old_record,
       pg_current_snapshot()::text AS window_end
  FROM w CROSS JOIN n
 WHERE NOT EXISTS (SELECT 1 FROM logproto.outbox o WHERE o.id = w.id)
 ORDER BY w.seq, w.id;
-- Phase 2, for a large window: the rows by position in their segment.
PREPARE window_rows(tid[]) AS
SELECT l.ctid, l.record::text, l.old_record::text FROM logproto.log_0 l WHERE l.ctid = ANY ($1);
