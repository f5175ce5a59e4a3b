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
    /// Nothing to do, or done for now.
    Done,
    /// The segments swapped: the one now read holds events, to be emptied next.
    Again,
    /// A segment was held by another transaction: to be tried again in a moment.
    Busy,
}

/// Empties log_1 once every event of it has been read (TRUNCATE: new files, no row
/// deleted), and if log_0 holds events swaps the segments' names, so that signups
/// write into the empty one: the log holds what arrives between two rotations, and
/// an idle log ends empty. Skipped at once (Busy) while anyone holds either segment —
/// a signup committing, autovacuum, a reader — since waiting would hold signups up
/// behind the worker. A few catalog rows are all it writes.
pub fn rotate_log() -> Rotation {
    // (log_0 holds events, log_1 holds events, every event of log_1 has been read)
    let look = || {
        let row = read_one::<pgrx::datum::Array<bool>>(
            "SELECT ARRAY[EXISTS (SELECT 1 FROM new_user_hook.log_0), EXISTS (SELECT 1 FROM new_user_hook.log_1),
                          NOT EXISTS (SELECT 1 FROM new_user_hook.log_1 AS l
                                       WHERE NOT coalesce(pg_visible_in_snapshot(l.xid,
                                                 (SELECT snapshot FROM new_user_hook.positions
                                                   WHERE endpoint = 'default')), false))]",
            &[],
        );
        let flags: Vec<bool> = row
            .map(|a| a.iter().map(|f| f.unwrap_or(false)).collect())
            .unwrap_or_default();
        match flags[..] {
            [fill, read, all_read] => (fill, read, all_read),
            _ => (false, false, false),
        }
    };
    let (Some(log_0), Some(log_1)) = (table_oid(c"log_0"), table_oid(c"log_1")) else {
        return Rotation::Done;
    };
    // Looked at before the locks (an exclusive lock takes a transaction id, for the
    // WAL that tells standbys), and again once they are held: no transaction can be
    // adding to either segment then.
    let (filling, read, all_read) = look();
    if !all_read || !(filling || read) {
        return Rotation::Done;
    }
    let locked = [log_1, log_0].into_iter().all(|relid| unsafe {
        pg_sys::ConditionalLockRelationOid(relid, pg_sys::AccessExclusiveLock as pg_sys::LOCKMODE)
    });
    if !locked {
        return Rotation::Busy;
    }
    let (filling, read, all_read) = look();
    if !all_read {
        return Rotation::Done;
    }
    if read {
        write(c"TRUNCATE new_user_hook.log_1", &[]);
    }
    if !filling {
        return Rotation::Done;
    }
    write(
        c"ALTER TABLE new_user_hook.log_0 RENAME TO log_swap;
          ALTER TABLE new_user_hook.log_1 RENAME TO log_0;
          ALTER TABLE new_user_hook.log_swap RENAME TO log_1;
          ALTER INDEX new_user_hook.log_0_xid RENAME TO log_swap_xid;
          ALTER INDEX new_user_hook.log_1_xid RENAME TO log_0_xid;
          ALTER INDEX new_user_hook.log_swap_xid RENAME TO log_1_xid",
        &[],
    );
    Rotation::Again
}
