//! The SPI plumbing every SQL step runs on: a transaction of its own (errors come back
//! as messages, not restarts), a subtransaction, a read-only query (no transaction id,
//! no WAL) and a write.

use pgrx::bgworkers::BackgroundWorker;
use pgrx::datum::DatumWithOid;
use pgrx::pg_sys::panic::CaughtError;
use pgrx::prelude::*;
use std::ffi::CStr;

/// A statement assembled from parts (macros that expand to string literals), as the
/// C string SPI takes.
macro_rules! statement {
    ($($part:expr),+ $(,)?) => {
        match ::std::ffi::CStr::from_bytes_with_nul(concat!($($part),+, "\0").as_bytes()) {
            Ok(sql) => sql,
            Err(_) => panic!("a NUL in a statement"),
        }
    };
}
pub(crate) use statement;

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

/// The first column of a query's first row, read with read-only SPI: unlike pgrx's
/// `Spi::get_one`, it assigns no transaction id, so a worker that only looks writes
/// no WAL.
pub(crate) fn read_one<T: FromDatum + IntoDatum>(sql: &str, args: &[DatumWithOid]) -> Option<T> {
    Spi::connect(|client| client.select(sql, Some(1), args)?.first().get_one::<T>())
        .unwrap_or_else(|e| error!("pg_new_user_hook: {e}: {sql}"))
}

/// The first row of a query whose columns are all bigint, read with a new snapshot
/// (as a statement that may write is: read-only SPI reuses the transaction's
/// snapshot), without assigning a transaction id. Empty when there is no row.
pub(crate) fn int8_row_now(sql: &str) -> Vec<i64> {
    let sql = std::ffi::CString::new(sql).expect("no NUL in the worker's SQL");
    unsafe {
        if pg_sys::SPI_connect() != pg_sys::SPI_OK_CONNECT as i32 {
            error!("pg_new_user_hook: SPI_connect failed");
        }
        let rc = pg_sys::SPI_execute(sql.as_ptr(), false, 1);
        if rc < 0 {
            error!(
                "pg_new_user_hook: SPI error {rc} in: {}",
                sql.to_string_lossy()
            );
        }
        let mut row = Vec::new();
        let table = pg_sys::SPI_tuptable;
        if pg_sys::SPI_processed > 0 && !table.is_null() {
            let desc = (*table).tupdesc;
            let tuple = *(*table).vals;
            for column in 1..=(*desc).natts {
                let mut null = false;
                let datum = pg_sys::SPI_getbinval(tuple, desc, column, &mut null);
                row.push(if null { 0 } else { datum.value() as i64 });
            }
        }
        pg_sys::SPI_finish();
        row
    }
}

/// A statement's arguments as SPI takes them: types, values, and ' ' or 'n' for NULL.
struct SpiArgs {
    types: Vec<pg_sys::Oid>,
    values: Vec<pg_sys::Datum>,
    nulls: Vec<std::ffi::c_char>,
}

impl SpiArgs {
    fn of(args: &[DatumWithOid]) -> SpiArgs {
        SpiArgs {
            types: args.iter().map(|a| a.oid()).collect(),
            values: args
                .iter()
                .map(|a| {
                    a.datum()
                        .map_or(pg_sys::Datum::from(0), |d| d.sans_lifetime())
                })
                .collect(),
            nulls: args
                .iter()
                .map(|a| if a.datum().is_some() { b' ' } else { b'n' } as std::ffi::c_char)
                .collect(),
        }
    }
}

/// Runs a statement that may write, and returns how many rows it processed (an
/// INSERT, UPDATE or DELETE: the rows it wrote). A transaction id is assigned only
/// if it writes something (pgrx's `Spi::run` assigns one first): a take or a purge
/// that finds nothing costs no WAL.
pub(crate) fn write(sql: &CStr, args: &[DatumWithOid]) -> u64 {
    unsafe {
        if pg_sys::SPI_connect() != pg_sys::SPI_OK_CONNECT as i32 {
            error!("pg_new_user_hook: SPI_connect failed");
        }
        let SpiArgs {
            mut types,
            mut values,
            nulls,
        } = SpiArgs::of(args);
        let rc = pg_sys::SPI_execute_with_args(
            sql.as_ptr(),
            args.len() as i32,
            types.as_mut_ptr(),
            values.as_mut_ptr(),
            nulls.as_ptr(),
            false,
            0,
        );
        if rc < 0 {
            error!(
                "pg_new_user_hook: SPI error {rc} in: {}",
                sql.to_string_lossy()
            );
        }
        let processed = pg_sys::SPI_processed;
        pg_sys::SPI_finish();
        processed
    }
}

/// How a kept statement is planned when it runs.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub(crate) enum Planning {
    /// Anew at each run, with its arguments' values: for a statement whose best plan
    /// depends on them, or on how much is queued. Only the parsing is saved.
    Custom,
    /// Once, until a table it reads is changed or analyzed: for a statement whose
    /// best plan is the same whatever is queued (a lookup by key).
    Generic,
    /// Once, as Generic, and never by a sequential scan where an index serves: a
    /// plan made while a table was small (a log segment just emptied) is kept while
    /// it grows, and a scan of it whole at each run would cost more each time.
    GenericIndexed,
}

thread_local! {
    /// The worker's statements, parsed once (at a trickle, parsing and planning a
    /// round's statements cost several times what running them does), by statement,
    /// then by its arguments' types.
    #[allow(clippy::type_complexity)]
    static KEPT: std::cell::RefCell<std::collections::HashMap<Box<[u8]>, Vec<(Vec<pg_sys::Oid>, usize)>>> =
        std::cell::RefCell::new(std::collections::HashMap::new());
}

/// The kept plan of `sql` for arguments of these types, prepared on first use. Called
/// inside SPI_connect. A plan outlives transactions (SPI_keepplan), and PostgreSQL
/// checks it at each run: a table dropped, altered or analyzed since makes it be
/// parsed or planned again; one that no longer exists makes the run fail.
unsafe fn kept_plan(sql: &CStr, types: &[pg_sys::Oid], planning: Planning) -> pg_sys::SPIPlanPtr {
    let found = KEPT.with(|kept| {
        kept.borrow()
            .get(sql.to_bytes())
            .and_then(|plans| plans.iter().find(|(t, _)| t == types).map(|(_, p)| *p))
    });
    if let Some(plan) = found {
        return plan as pg_sys::SPIPlanPtr;
    }
    let options = match planning {
        Planning::Custom => pg_sys::CURSOR_OPT_CUSTOM_PLAN,
        Planning::Generic | Planning::GenericIndexed => pg_sys::CURSOR_OPT_GENERIC_PLAN,
    };
    let mut types = types.to_vec();
    let plan = pg_sys::SPI_prepare_cursor(
        sql.as_ptr(),
        types.len() as i32,
        types.as_mut_ptr(),
        options as i32,
    );
    if plan.is_null() {
        error!(
            "pg_new_user_hook: SPI error {} preparing: {}",
            std::ptr::addr_of!(pg_sys::SPI_result).read(),
            sql.to_string_lossy()
        );
    }
    pg_sys::SPI_keepplan(plan);
    KEPT.with(|kept| {
        kept.borrow_mut()
            .entry(sql.to_bytes().into())
            .or_default()
            .push((types, plan as usize))
    });
    plan
}

/// Runs a kept statement inside SPI_connect; returns SPI's code. Not read-only: each
/// statement sees what the transaction wrote before it (a new snapshot); a query that
/// writes nothing still assigns no transaction id.
unsafe fn run_kept(sql: &CStr, args: &[DatumWithOid], planning: Planning, limit: i64) -> i32 {
    let SpiArgs {
        types,
        mut values,
        nulls,
    } = SpiArgs::of(args);
    let plan = kept_plan(sql, &types, planning);
    // Plans are made (again) when the statement runs: the settings are in force then.
    // Local to the transaction, so that an error cannot leave them set. JIT off too:
    // up to PostgreSQL 17 a scan that cannot avoid being sequential (a table without
    // an index) adds 10^10 to the plan's cost, which would compile it at every run.
    let saved = (planning == Planning::GenericIndexed).then(|| {
        [(c"enable_seqscan", c"off"), (c"jit", c"off")].map(|(name, value)| {
            let was =
                CStr::from_ptr(pg_sys::GetConfigOption(name.as_ptr(), false, false)).to_owned();
            set_local(name, value);
            (name, was)
        })
    });
    let rc = pg_sys::SPI_execute_plan(plan, values.as_mut_ptr(), nulls.as_ptr(), false, limit as _);
    for (name, was) in saved.into_iter().flatten() {
        set_local(name, &was);
    }
    if rc < 0 {
        error!(
            "pg_new_user_hook: SPI error {rc} in: {}",
            sql.to_string_lossy()
        );
    }
    rc
}

/// Sets a planner setting for the rest of the (sub)transaction, as SET LOCAL does.
unsafe fn set_local(name: &CStr, value: &CStr) {
    pg_sys::set_config_option(
        name.as_ptr(),
        value.as_ptr(),
        pg_sys::GucContext::PGC_USERSET,
        pg_sys::GucSource::PGC_S_SESSION,
        pg_sys::GucAction::GUC_ACTION_LOCAL,
        true,
        PgLogLevel::ERROR as i32,
        false,
    );
}

/// One row of a kept query's result, read by column number (from 1).
pub(crate) struct KeptRow {
    tuple: pg_sys::HeapTuple,
    desc: pg_sys::TupleDesc,
}

impl KeptRow {
    /// The column's value; None when NULL. A column of another type than `T` (a
    /// table altered by hand) is an error, never a misread datum.
    pub(crate) fn get<T: FromDatum + IntoDatum>(&self, column: i32) -> Option<T> {
        unsafe {
            let found = pg_sys::SPI_gettypeid(self.desc, column);
            if !T::is_compatible_with(found) {
                let name = |oid| {
                    CStr::from_ptr(pg_sys::format_type_be(oid))
                        .to_string_lossy()
                        .into_owned()
                };
                error!(
                    "pg_new_user_hook: column {column} of the worker's query is of type {}, not {}: \
                     a table of schema new_user_hook was altered; recreate the extension to repair it",
                    name(found),
                    name(T::type_oid())
                );
            }
            let mut null = false;
            let datum = pg_sys::SPI_getbinval(self.tuple, self.desc, column, &mut null);
            T::from_datum(datum, null)
        }
    }
}

/// Runs a kept query and maps up to `limit` rows (0: all) while they are in SPI's
/// memory.
pub(crate) fn select_kept<R>(
    sql: &CStr,
    args: &[DatumWithOid],
    planning: Planning,
    limit: i64,
    mut each: impl FnMut(&KeptRow) -> R,
) -> Vec<R> {
    unsafe {
        if pg_sys::SPI_connect() != pg_sys::SPI_OK_CONNECT as i32 {
            error!("pg_new_user_hook: SPI_connect failed");
        }
        run_kept(sql, args, planning, limit);
        let table = pg_sys::SPI_tuptable;
        let mut rows = Vec::new();
        if !table.is_null() {
            for i in 0..pg_sys::SPI_processed as usize {
                let row = KeptRow {
                    tuple: *(*table).vals.add(i),
                    desc: (*table).tupdesc,
                };
                rows.push(each(&row));
            }
        }
        pg_sys::SPI_finish();
        rows
    }
}
