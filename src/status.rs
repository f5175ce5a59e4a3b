//! The SQL functions behind the status and metrics views (`sql/outbox.sql`): what
//! the worker published in shared memory, whether the settings leave delivery
//! paused, why no worker runs.

use crate::{catalog, settings, shared};
use pgrx::prelude::*;

/// Whether the library was loaded through shared_preload_libraries (required for delivery).
#[pg_extern(stable, parallel_safe)]
fn preloaded() -> bool {
    shared::preloaded()
}

/// How many events the worker is sending right now.
#[pg_extern(stable, parallel_safe)]
fn in_flight() -> Option<i32> {
    shared::in_flight()
}

/// What the worker last published for the metrics view: the queue's gauges (when
/// `published`), whether delivery is paused, and the circuit breaker's state
/// (0 closed, 1 half-open: probing, 2 open: the backend is down).
#[pg_extern(stable, parallel_safe)]
fn worker_state() -> TableIterator<
    'static,
    (
        name!(published, bool),
        name!(paused, bool),
        name!(backend_state, i32),
        name!(pending, i64),
        name!(failed, i64),
        name!(oldest_pending, Option<f64>),
        name!(captured, i64),
    ),
> {
    let gauges = shared::queue_gauges().unwrap_or_default();
    TableIterator::once((
        gauges.published,
        settings::paused(),
        shared::backend_state(),
        gauges.pending,
        gauges.failed,
        (!gauges.oldest_pending.is_nan()).then_some(gauges.oldest_pending),
        gauges.captured,
    ))
}

/// Why delivery is paused by configuration, or NULL when all is usable: what the
/// settings show at once, else what the worker reported (e.g. a missing Vault
/// secret), else a users table whose events lost a column they need. Never reveals
/// a secret.
#[pg_extern(stable, parallel_safe)]
fn config_problem() -> Option<String> {
    if !shared::preloaded() {
        return Some(
            "pg_new_user_hook is not in shared_preload_libraries, so no worker delivers events: \
             add it (ALTER SYSTEM SET shared_preload_libraries = '...,pg_new_user_hook') and restart PostgreSQL; \
             new users are queued meanwhile"
                .to_string(),
        );
    }
    settings::Settings::read()
        .problem()
        .or_else(shared::worker_problem)
        .or_else(catalog::unstored_column_problem)
}

/// The problem the settings show after reading the configuration files, as a
/// reload is about to: right after `ALTER SYSTEM ...; SELECT pg_reload_conf()`,
/// neither this session nor the worker may have received the reload yet, and
/// install() would warn about a problem already fixed. What only the worker can
/// see (a Vault secret) is left to the status view.
#[pg_extern(volatile, parallel_unsafe)]
fn config_problem_after_reload() -> Option<String> {
    if !shared::preloaded() {
        return config_problem();
    }
    unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
    settings::Settings::read().problem()
}

/// Why no delivery worker runs, for the status view when none does.
#[pg_extern(stable, parallel_safe)]
fn missing_worker() -> String {
    if unsafe { pg_sys::RecoveryInProgress() } {
        return "this server is a standby (in recovery): events are delivered by the primary's worker; \
                a worker starts here if this server is promoted"
            .to_string();
    }
    let up_for_ms = unsafe { pg_sys::GetCurrentTimestamp() - pg_sys::PgStartTime } / 1000;
    if shared::preloaded() && !shared::worker_ever_started() && up_for_ms > 10_000 {
        return format!(
            "the delivery worker has not started since PostgreSQL did: when every background worker slot is taken, \
             the server log says \"too many background workers\" at start-up; raise max_worker_processes (now {}) \
             and restart PostgreSQL",
            unsafe { pg_sys::max_worker_processes }
        );
    }
    "the delivery worker is not running (it restarts by itself within seconds; if it does not, see the server log)"
        .to_string()
}
