//! The SPI plumbing every SQL step runs on: a transaction of its own (errors come back
//! as messages, not restarts), a subtransaction, a read-only query (no transaction id,
//! no WAL) and a write.

use pgrx::bgworkers::BackgroundWorker;
use pgrx::datum::DatumWithOid;
use pgrx::pg_sys::panic::CaughtError;
use pgrx::pg_sys::PgOid;
use pgrx::prelude::*;
use pgrx::spi::{OwnedPreparedStatement, SpiClient};
use std::cell::RefCell;
use std::collections::HashMap;

/// Runs `work` in a transaction of its own, shown in pg_stat_activity while it runs.
/// A database error (or a panic) rolls the transaction back and comes back as the
/// error's message: the worker goes on with what it knows instead of restarting.
pub fn transaction<R>(
    work: impl FnOnce() -> R + std::panic::UnwindSafe + std::panic::RefUnwindSafe,
) -> Result<R, String> {
    unsafe {
        pg_sys::pgstat_report_activity(
            pg_sys::BackendState::STATE_RUNNING,
            c"pg_new_user_hook: claiming and recording events".as_ptr(),
        )
    };
    let result = PgTryBuilder::new(|| Ok(BackgroundWorker::transaction(work)))
        .catch_others(|error| {
            // Releases the locks, snapshot and SPI state of the failed transaction.
            unsafe { pg_sys::AbortCurrentTransaction() };
            Err(message_of(error))
        })
        .execute();
    unsafe { pg_sys::pgstat_report_activity(pg_sys::BackendState::STATE_IDLE, std::ptr::null()) };
    result
}

/// The message of an error caught in the worker's transactions.
pub(crate) fn message_of(error: CaughtError) -> String {
    match error {
        CaughtError::PostgresError(report)
        | CaughtError::ErrorReport(report)
        | CaughtError::RustPanic {
            ereport: report, ..
        } => report.message().to_string(),
    }
}

/// Runs `work` in a subtransaction of the current transaction: a failure rolls back
/// what `work` did only, and comes back as the error's message, so that one failing
/// step of a round (say, a take that a publication breaks) does not stop the others.
pub fn subtransaction<R>(
    work: impl FnOnce() -> R + std::panic::UnwindSafe + std::panic::RefUnwindSafe,
) -> Result<R, String> {
    unsafe {
        let context = pg_sys::CurrentMemoryContext;
        let owner = pg_sys::CurrentResourceOwner;
        pg_sys::BeginInternalSubTransaction(std::ptr::null());
        PgTryBuilder::new(|| {
            let result = work();
            pg_sys::ReleaseCurrentSubTransaction();
            pg_sys::MemoryContextSwitchTo(context);
            pg_sys::CurrentResourceOwner = owner;
            Ok(result)
        })
        .catch_others(|error| {
            pg_sys::RollbackAndReleaseCurrentSubTransaction();
            pg_sys::MemoryContextSwitchTo(context);
            pg_sys::CurrentResourceOwner = owner;
            Err(message_of(error))
        })
        .execute()
    }
}

thread_local! {
    /// The statements this process ran, each prepared once and kept (SPI_keepplan).
    /// Parsing, analysing and planning each statement again at every round cost
    /// most of the worker's time at a steady trickle of signups (two thirds of its
    /// CPU in base_yyparse, the planner and the catalog caches). PostgreSQL's plan
    /// cache re-plans a kept statement whose tables or functions changed (ALTER
    /// EXTENSION UPDATE, DROP and CREATE EXTENSION) or when the search_path differs.
    /// A handful of statements, never freed: they live as long as the process.
    static KEPT: RefCell<HashMap<(String, bool, Vec<pg_sys::Oid>), &'static OwnedPreparedStatement>> =
        RefCell::new(HashMap::new());
}

/// `sql` prepared for arguments of the types of `args` (`writes`: executed as a
/// statement that may write, without assigning a transaction id beforehand).
pub(crate) fn kept(
    client: &SpiClient<'_>,
    sql: &str,
    args: &[DatumWithOid],
    writes: bool,
) -> &'static OwnedPreparedStatement {
    let types: Vec<pg_sys::Oid> = args.iter().map(|a| a.oid()).collect();
    let key = (sql.to_string(), writes, types);
    if let Some(statement) = KEPT.with(|kept| kept.borrow().get(&key).copied()) {
        return statement;
    }
    let oids: Vec<PgOid> = key.2.iter().map(|&oid| PgOid::from(oid)).collect();
    let prepared = if writes {
        client.prepare_mut(sql, &oids)
    } else {
        client.prepare(sql, &oids)
    }
    .unwrap_or_else(|e| error!("pg_new_user_hook: {e}: {sql}"));
    let statement: &'static OwnedPreparedStatement = Box::leak(Box::new(prepared.keep()));
    KEPT.with(|kept| kept.borrow_mut().insert(key, statement));
    statement
}

/// The first column of a query's first row, read with read-only SPI: unlike pgrx's
/// `Spi::get_one`, it assigns no transaction id, so a worker that only looks writes
/// no WAL.
pub(crate) fn read_one<T: FromDatum + IntoDatum>(sql: &str, args: &[DatumWithOid]) -> Option<T> {
    Spi::connect(|client| {
        client
            .select(kept(client, sql, args, false), Some(1), args)?
            .first()
            .get_one::<T>()
    })
    .unwrap_or_else(|e| error!("pg_new_user_hook: {e}: {sql}"))
}

/// Runs a statement that may write, and returns how many rows it processed (an
/// INSERT, UPDATE or DELETE: the rows it wrote). A transaction id is assigned only
/// if it writes something (pgrx's `Spi::run` assigns one first): a take or a purge
/// that finds nothing costs no WAL.
pub(crate) fn write(sql: &str, args: &[DatumWithOid]) -> u64 {
    // A statement prepared to write, run through `select`: pgrx's `update` would
    // assign a transaction id first.
    Spi::connect(|client| {
        client
            .select(kept(client, sql, args, true), None, args)
            .map(|done| done.len() as u64)
    })
    .unwrap_or_else(|e| error!("pg_new_user_hook: {e}: {sql}"))
}
