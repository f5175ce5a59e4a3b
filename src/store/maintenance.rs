//! Keeping the queue tables small and planned well: the worker's own ANALYZE of the
//! outbox, the log's rotation (and a 0.7.0 schema's VACUUM of its capture table),
//! never waiting on a lock.

use crate::catalog::{capture, table_oid, Capture};
use crate::spi::message_of;
use crate::spi::{read_one, write};
use pgrx::prelude::*;

/// Takes the lock VACUUM and ANALYZE take, if nobody (autovacuum) holds it: held
/// until the transaction ends. False: waiting would hold up delivery.
fn lock_for_maintenance(relid: pg_sys::Oid) -> bool {
    unsafe {
        pg_sys::ConditionalLockRelationOid(
            relid,
            pg_sys::ShareUpdateExclusiveLock as pg_sys::LOCKMODE,
        )
    }
}

/// Refreshes the planner's statistics of the outbox (ANALYZE), in the round's
/// transaction, so that the claim that follows is planned for the events just taken
/// in (ANALYZE counts the rows its own transaction wrote). Skipped (false) while
/// autovacuum or another ANALYZE holds the table: waiting would hold up delivery.
pub fn analyze_outbox() -> bool {
    let free = table_oid(c"outbox").is_some_and(lock_for_maintenance);
    if free {
        // A small sample (3,000 rows, not 30,000): enough to see how many are pending
        // and when they are due, and quick enough (tens of ms with a large retention)
        // not to hold up deliveries. SET LOCAL: for this transaction only.
        Spi::run("SET LOCAL default_statistics_target = 10; ANALYZE new_user_hook.outbox")
            .expect("analyzing the outbox");
    }
    free
}

/// Vacuums the capture table (VACUUM cannot run in the worker's rounds): the rows the
/// takes deleted are made free space again, so the table stays the size of what
/// arrives between two vacuums. Never truncates it (that would need a lock signups
/// hold), and skips it at once, without waiting, while autovacuum or anyone else
/// holds a conflicting lock (SKIP_LOCKED): then it returns false, to try again later.
pub fn vacuum_captured() -> Result<bool, String> {
    unsafe {
        // VACUUM commits the transaction it is started in and starts another at its
        // end: what it is given, and the context it allocates in (under
        // PortalContext), must outlive that commit, so both live in a context of
        // their own, deleted here whether it succeeds or fails.
        let context = pg_sys::AllocSetContextCreateExtended(
            pg_sys::TopMemoryContext,
            c"pg_new_user_hook vacuum".as_ptr(),
            pg_sys::ALLOCSET_DEFAULT_MINSIZE as usize,
            pg_sys::ALLOCSET_DEFAULT_INITSIZE as usize,
            pg_sys::ALLOCSET_DEFAULT_MAXSIZE as usize,
        );
        let previous_portal_context = pg_sys::PortalContext;
        let previous = pg_sys::MemoryContextSwitchTo(context);
        pg_sys::PortalContext = context;
        let result = PgTryBuilder::new(|| {
            pg_sys::SetCurrentStatementStartTimestamp();
            pg_sys::StartTransactionCommand();
            pg_sys::MemoryContextSwitchTo(context);
            // Looked up and probed in the transaction VACUUM starts from: while
            // autovacuum holds the table, nothing is done (no wait, no log line).
            let exists = capture() == Capture::Captured;
            let free = exists && table_oid(c"captured").is_some_and(lock_for_maintenance);
            if !free {
                pg_sys::CommitTransactionCommand();
                // No capture table (an older schema): nothing to vacuum, done.
                return Ok(!exists);
            }
            let parsed = pg_sys::raw_parser(
                c"VACUUM (TRUNCATE false, SKIP_LOCKED) new_user_hook.captured".as_ptr(),
                pg_sys::RawParseMode::RAW_PARSE_DEFAULT,
            );
            let raw = (*(*parsed).elements).ptr_value as *mut pg_sys::RawStmt;
            // As PostgreSQL runs a VACUUM typed in a session: at top level, outside a
            // transaction block. SKIP_LOCKED: should another take the lock between
            // this transaction's end and VACUUM's own, VACUUM skips the table.
            pg_sys::ExecVacuum(
                pg_sys::make_parsestate(std::ptr::null_mut()),
                (*raw).stmt as *mut pg_sys::VacuumStmt,
                true,
            );
            pg_sys::CommitTransactionCommand();
            Ok(true)
        })
        .catch_others(|error| {
            pg_sys::AbortCurrentTransaction();
            Err(message_of(error))
        })
        .execute();
        pg_sys::MemoryContextSwitchTo(previous);
        pg_sys::PortalContext = previous_portal_context;
        pg_sys::MemoryContextDelete(context);
        result
    }
}

/// What a rotation of the log did.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Rotation {
    /// Nothing to do (until events are read again, or the position moves).
    Done,
    /// A step was taken (signups pointed to the other segment, or a segment found
    /// read and waiting for older snapshots to end): the next in ROTATE_AFTER.
    Again,
    /// The segment to empty is held by another transaction, or still seen unread by
    /// an older snapshot: to be tried again later. Says which.
    Busy(&'static str),
    /// The segment to empty is resolved, but its newest events are younger than the
    /// retention: to be looked at again after this long.
    Wait(std::time::Duration),
}

/// A segment found entirely read, and the transactions that held a snapshot then
/// (which may date from before the read): it is emptied once they have all ended.
#[derive(Clone, Debug)]
pub struct ReadSince {
    segment: usize,
    /// The newest transaction id in it then: a later one means it changed.
    top: i64,
    older: Vec<pg_sys::VirtualTransactionId>,
}

/// One step of the log's rotation. Signups append to one segment (shared memory says
/// which); the worker empties the other, with its done rows, once every event in it
/// has been resolved and is older than `retention` — by
/// TRUNCATE, never row by row — and then points signups to it. So the log holds what
/// arrives between two rotations, and only the segment signups do not write to is
/// ever locked: no signup waits for a rotation, and a rotation runs no DDL (which
/// would fire event triggers, such as the one that makes PostgREST reload its
/// schema). The segment is emptied only when:
/// - every event in it has been resolved (the position's snapshot sees its
///   transaction), and its newest (by transaction id) is older than `retention`:
///   the log keeps delivered events between one and two retentions;
/// - every transaction that held a snapshot when the segment was found read has
///   ended (`since`, kept from an earlier step; as CREATE INDEX CONCURRENTLY waits,
///   but without waiting): TRUNCATE is not MVCC-safe, and a snapshot from before the
///   read — a pg_dump's, a repeatable-read report's — would see the events in
///   neither the log nor the outbox. Transactions without a snapshot (a prepared
///   one) are not waited for;
/// - nobody holds it (pg_locks, looked at first: trying the lock itself takes a
///   transaction id, for the standby's sake), and the conditional lock is granted.
pub fn rotate_log(since: &mut Option<ReadSince>, retention: std::time::Duration) -> Rotation {
    const HELD: &str =
        "could not obtain lock on a segment of the log: another transaction holds it";
    const OLDER: &str =
        "a transaction whose snapshot is older than the worker's last read of the log still runs";
    let write_to = crate::shared::write_segment();
    let other = 1 - write_to;
    let names = [c"log_0", c"log_1"];
    let done = [c"done_0", c"done_1"];
    let (Some(other_oid), Some(_), Some(done_oid)) = (
        table_oid(names[other]),
        table_oid(names[write_to]),
        table_oid(done[other]),
    ) else {
        return Rotation::Done;
    };
    // (whether the segment written to has rows, whether the other has, whether any of
    // the other's is unresolved, the age in seconds of its newest, its newest xid):
    // each through the index on xid or the first row, whatever the log holds.
    let look = || -> (i64, i64, i64, i64, i64) {
        // The position's bounds as values: the plan reads the few events beyond them
        // through the index, where bounds it could not see made it read the segment.
        let (xmax, xip) = super::position_bounds();
        // Transaction ids as PostgreSQL printed them: digits only, nothing to quote.
        assert!(
            std::iter::once(&xmax)
                .chain(&xip)
                .all(|x| x.bytes().all(|b| b.is_ascii_digit())),
            "a transaction id of the position is not a number"
        );
        let xip = xip.join(",");
        let sql = format!(
            "WITH top AS (SELECT xid, created_at FROM new_user_hook.log_{other} ORDER BY xid DESC LIMIT 1)
             SELECT (SELECT count(*) FROM (SELECT FROM new_user_hook.log_{write_to} LIMIT 1) AS s),
                    (SELECT count(*) FROM top),
                    (SELECT count(*) FROM (SELECT FROM new_user_hook.log_{other} WHERE xid >= '{xmax}'
                                           UNION ALL
                                           SELECT FROM new_user_hook.log_{other} WHERE xid = ANY ('{{{xip}}}'::xid8[])
                                           LIMIT 1) AS s),
                    coalesce((SELECT extract(epoch FROM now() - created_at)::int8 FROM top), 0),
                    coalesce((SELECT xid::text::int8 FROM top), 0)"
        );
        // Each time with a new snapshot (after the lock: one that sees every commit
        // before it), where read-only SPI would reuse the transaction's first.
        match crate::spi::int8_row_now(&sql)[..] {
            [writing, rows, unread, age, top] => (writing, rows, unread, age, top),
            _ => (0, 0, 1, 0, 0),
        }
    };
    let (writing, other_rows, other_unread, newest_age, top) = look();
    if other_rows == 0 {
        *since = None;
        if writing == 0 {
            return Rotation::Done;
        }
        // The other segment is empty: signups go there from now on, and the one they
        // wrote to is emptied once resolved and past the retention.
        crate::shared::set_write_segment(other);
        return Rotation::Again;
    }
    if other_unread > 0 {
        *since = None;
        return Rotation::Done;
    }
    let age = std::time::Duration::from_secs(newest_age.max(0) as u64);
    if age < retention {
        *since = None;
        return Rotation::Wait(retention - age);
    }
    match since {
        Some(s) if s.segment == other && s.top == top => {
            // SAFETY: a look-up in the lock table, without waiting.
            let running = s
                .older
                .iter()
                .any(|vxid| !unsafe { pg_sys::VirtualXactLock(*vxid, false) });
            if running {
                return Rotation::Busy(OLDER);
            }
        }
        _ => {
            *since = Some(ReadSince {
                segment: other,
                top,
                older: snapshot_holders(),
            });
            return Rotation::Again;
        }
    }
    let held = read_one::<bool>(
        "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_locks
                         WHERE locktype = 'relation' AND relation IN ($1, $2)
                           AND database = (SELECT oid FROM pg_catalog.pg_database WHERE datname = current_database())
                           AND pid IS DISTINCT FROM pg_backend_pid())",
        &[other_oid.into(), done_oid.into()],
    )
    .unwrap_or(true);
    let locked = !held
        && [other_oid, done_oid].into_iter().all(|oid| unsafe {
            pg_sys::ConditionalLockRelationOid(oid, pg_sys::AccessExclusiveLock as pg_sys::LOCKMODE)
        });
    if !locked {
        return Rotation::Busy(HELD);
    }
    let (_, _, unread_now, _, top_now) = look();
    if unread_now > 0 || top_now != top {
        *since = None;
        return Rotation::Again;
    }
    let truncate = format!("TRUNCATE new_user_hook.log_{other}, new_user_hook.done_{other}\0");
    write(
        std::ffi::CStr::from_bytes_with_nul(truncate.as_bytes()).expect("one NUL, at the end"),
        &[],
    );
    *since = None;
    Rotation::Again
}

/// The transactions of this database that hold a snapshot now (vacuums and the
/// worker itself aside).
fn snapshot_holders() -> Vec<pg_sys::VirtualTransactionId> {
    unsafe {
        let mut count = 0;
        let list = pg_sys::GetCurrentVirtualXIDs(
            pg_sys::InvalidTransactionId,
            true,
            false,
            pg_sys::PROC_IN_VACUUM as i32,
            &mut count,
        );
        if list.is_null() || count <= 0 {
            return Vec::new();
        }
        let holders = std::slice::from_raw_parts(list, count as usize).to_vec();
        pg_sys::pfree(list.cast());
        holders
    }
}
