-- Prototype of the log's SQL (design/queue-as-log.md), in a scratch schema.
DROP SCHEMA IF EXISTS logproto CASCADE;
CREATE SCHEMA logproto;
-- Segments: the capture appends to the one named log_0; the worker swaps names to rotate.
CREATE TABLE logproto.log_0 (
    id         uuid        NOT NULL,
    user_id    uuid        NOT NULL,
    source     text        NOT NULL,
    kind       text        NOT NULL,
    record     json        NOT NULL,
    old_record json,
    seq        bigint      NOT NULL DEFAULT (pg_catalog.pg_current_wal_insert_lsn() - '0/0')::bigint,
    created_at timestamptz NOT NULL DEFAULT now(),
    xid        xid8        NOT NULL DEFAULT pg_catalog.pg_current_xact_id()
);
CREATE INDEX log_0_xid ON logproto.log_0 (xid);
CREATE TABLE logproto.log_1 (LIKE logproto.log_0 INCLUDING DEFAULTS);
CREATE INDEX log_1_xid ON logproto.log_1 (xid);
-- Delivered outcomes, one row per record batch, rotated with their segment.
CREATE TABLE logproto.done_0 (ids uuid[] NOT NULL, codes int[] NOT NULL, at timestamptz NOT NULL DEFAULT clock_timestamp());
CREATE TABLE logproto.done_1 (LIKE logproto.done_0 INCLUDING DEFAULTS);
-- Rows written by SQL (COPY of a restore, backfill()) carry the writing transaction's xid:
-- a restored row's old xid means nothing in this cluster. The capture's heap insert fires no trigger.
CREATE FUNCTION logproto.stamp_xid() RETURNS trigger LANGUAGE plpgsql AS
$$ BEGIN NEW.xid := pg_catalog.pg_current_xact_id(); RETURN NEW; END $$;
CREATE TRIGGER stamp_xid BEFORE INSERT ON logproto.log_0 FOR EACH ROW EXECUTE FUNCTION logproto.stamp_xid();
CREATE TRIGGER stamp_xid BEFORE INSERT ON logproto.log_1 FOR EACH ROW EXECUTE FUNCTION logproto.stamp_xid();
-- The position: one row per endpoint; NULL reads everything.
CREATE TABLE logproto.position (
    endpoint text PRIMARY KEY DEFAULT 'default',
    snapshot pg_snapshot,
    moved_at timestamptz
);
INSERT INTO logproto.position DEFAULT VALUES;
-- Exceptions: the outbox as it is.
CREATE TABLE logproto.outbox (LIKE new_user_hook.outbox INCLUDING ALL);
