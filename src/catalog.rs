//! Catalog look-ups by schema and name (never through search_path): whether the
//! extension and its tables are there, which schema version the library meets, and
//! a users table whose events lost a column they need.

use crate::spi::read_one;
use pgrx::prelude::*;
use std::ffi::CStr;

/// Whether the extension's objects exist in this database.
pub fn installed() -> bool {
    read_one::<bool>(
        "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_extension WHERE extname = 'pg_new_user_hook')",
        &[],
    )
    .unwrap_or(false)
}

thread_local! {
    static LIFECYCLE_COLUMNS: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// The table `new_user_hook.<name>`, looked up in the catalog by schema and name (no
/// search_path); None if it does not exist (yet).
pub fn table_oid(name: &CStr) -> Option<pg_sys::Oid> {
    let relid = unsafe {
        let namespace = pg_sys::get_namespace_oid(c"new_user_hook".as_ptr(), true);
        pg_sys::get_relname_relid(name.as_ptr(), namespace)
    };
    (relid != pg_sys::InvalidOid).then_some(relid)
}

/// Whether the outbox has the lifecycle columns (`kind`, `old_record`, `seq`; 0.6.0).
/// After the library is updated and PostgreSQL restarted, the installed extension
/// keeps its older schema until `ALTER EXTENSION pg_new_user_hook UPDATE`: until then
/// signups are queued and delivered as before, and nothing else is captured. Looked
/// up in the catalog (qualified, no search_path) until it is seen, then remembered.
pub fn lifecycle_columns() -> bool {
    if LIFECYCLE_COLUMNS.get() {
        return true;
    }
    let found = table_oid(c"outbox").is_some_and(|outbox| unsafe {
        pg_sys::get_attnum(outbox, c"seq".as_ptr()) != pg_sys::InvalidAttrNumber as i16
    });
    LIFECYCLE_COLUMNS.set(found);
    found
}

/// Where the installed schema has committed events wait for the worker.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Capture {
    /// The log (`new_user_hook.log_0` and `log_1`; 0.8.0), read between snapshots.
    Log,
    /// The capture table (`new_user_hook.captured`; 0.7.0), taken row by row.
    Captured,
    /// Older: the trigger writes into the outbox itself.
    Outbox,
}

/// Which of these the installed schema has: until ALTER EXTENSION UPDATE, an older
/// schema is written and read as it was. Looked up each time (two catalog cache
/// look-ups): the extension may be dropped and created again at another version.
pub fn capture() -> Capture {
    if table_oid(c"log_0").is_some() {
        Capture::Log
    } else if table_oid(c"captured").is_some() {
        Capture::Captured
    } else {
        Capture::Outbox
    }
}

/// A table the hook is on whose `id`, `email` or `deleted_at` became a virtual
/// generated column after install() (which refuses one): what that costs and what to do.
pub fn unstored_column_problem() -> Option<String> {
    if cfg!(not(feature = "pg18")) {
        return None; // virtual generated columns came with PostgreSQL 18
    }
    read_one(
        "SELECT (SELECT format('column %I of %s is a virtual generated column, whose value a changed row does not hold: %s; \
                        make it a stored generated column (GENERATED ALWAYS AS (...) STORED) or a plain column',
                       a.attname, a.attrelid::pg_catalog.regclass,
                       CASE a.attname WHEN 'id' THEN 'no event is made for its users'
                                      WHEN 'email' THEN 'its events carry a null email'
                                      ELSE 'its soft deletes make no event' END)
           FROM pg_catalog.pg_attribute a
          WHERE a.attname IN ('id', 'email', 'deleted_at') AND a.attnum > 0 AND NOT a.attisdropped
            AND a.attgenerated = 'v'
            AND a.attrelid IN (SELECT t.tgrelid FROM pg_catalog.pg_trigger t
                                WHERE t.tgfoid = 'new_user_hook.capture()'::pg_catalog.regprocedure)
          ORDER BY a.attrelid, a.attnum LIMIT 1)",
        &[],
    )
}
