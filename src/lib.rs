//! pg_new_user_hook: tells an application backend about every new Supabase Auth user.
//!
//! The pipeline, one folder or file per stage, each importing only from those below it:
//!
//! - `model/`: pure Rust — events, requests, signatures, backoff, the circuit breaker,
//!   what a response means, the settings' names;
//! - `settings`: the GUCs; `log_hook`: what the log must not show;
//! - `shared`, `wake`: the server's shared memory and the worker's latch; `spi`,
//!   `catalog`: the SQL plumbing and catalog look-ups;
//! - `capture/`: the trigger, a change → its event at commit; `store/`: the queue's SQL
//!   (take, claim, record, purge, maintenance, Vault); `delivery/`: HTTP from a pool
//!   of threads;
//! - `worker/`: the loop, and the target the settings and secrets make;
//! - `status`: the SQL status functions; this file: `_PG_init` and the SQL entry
//!   (`sql/outbox.sql`).

use pgrx::prelude::*;

mod capture;
mod catalog;
mod delivery;
mod log_hook;
mod model;
mod settings;
mod shared;
mod spi;
mod status;
mod store;
mod wake;
mod worker;

/// The library's version for PostgreSQL 18's `pg_get_loaded_modules()` (pgrx 0.18.1's
/// bare `version` sets the module's name to it instead).
const LIBRARY_VERSION: &std::ffi::CStr = match std::ffi::CStr::from_bytes_with_nul(
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_bytes(),
) {
    Ok(version) => version,
    Err(_) => panic!("a NUL in the crate's version"),
};
::pgrx::pg_module_magic!(name, version = LIBRARY_VERSION);

pgrx::extension_sql_file!("../sql/outbox.sql", name = "outbox", finalize);

#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    let preloading = unsafe { pg_sys::process_shared_preload_libraries_in_progress };
    settings::define(preloading);
    log_hook::install();
    if preloading {
        shared::init();
        // pg_upgrade starts the old and the new server in binary-upgrade mode: a
        // worker there would send events from a cluster that is being copied.
        if !unsafe { pg_sys::IsBinaryUpgrade } {
            worker::register();
        }
    }
}

#[cfg(any(test, feature = "pg_test"))]
mod tests;

/// Used by `cargo pgrx test`.
#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    pub fn postgresql_conf_options() -> Vec<&'static str> {
        vec![
            "shared_preload_libraries = 'pg_new_user_hook'",
            "pg_new_user_hook.database = 'pgrx_tests'",
        ]
    }
}
