//! Wake on commit: a signup's transaction sets the worker's latch when it commits,
//! so delivery starts at once instead of on a poll tick. Aborted transactions
//! never wake it.

use crate::shared;
use pgrx::prelude::*;
use std::sync::atomic::{AtomicBool, Ordering};

/// Whether this backend's transaction queued an event (backends are single-threaded),
/// and whether it changed the outbox.
static WAKE_AT_COMMIT: AtomicBool = AtomicBool::new(false);
static OUTBOX_CHANGED: AtomicBool = AtomicBool::new(false);
static CALLBACK_REGISTERED: AtomicBool = AtomicBool::new(false);

/// Asks for the worker to be woken when the current transaction commits: called by
/// the SQL functions that change the outbox (redeliver(), backfill()).
#[pg_extern(volatile, parallel_unsafe)]
pub fn wake_on_commit() {
    if shared::preloaded() {
        OUTBOX_CHANGED.store(true, Ordering::Relaxed);
        wake_on_commit_for_log();
    }
}

/// The same for events written to the log: the capture calls it for every
/// transaction that wrote one; it costs a flag store.
pub fn wake_on_commit_for_log() {
    if !shared::preloaded() {
        return;
    }
    if !CALLBACK_REGISTERED.swap(true, Ordering::Relaxed) {
        unsafe { pg_sys::RegisterXactCallback(Some(on_xact_event), std::ptr::null_mut()) };
    }
    WAKE_AT_COMMIT.store(true, Ordering::Relaxed);
}

#[pg_guard]
unsafe extern "C-unwind" fn on_xact_event(
    event: pg_sys::XactEvent::Type,
    _arg: *mut std::ffi::c_void,
) {
    use pg_sys::XactEvent::*;
    match event {
        XACT_EVENT_COMMIT | XACT_EVENT_PARALLEL_COMMIT => {
            if OUTBOX_CHANGED.swap(false, Ordering::Relaxed) {
                shared::note_outbox_change();
            }
            if WAKE_AT_COMMIT.swap(false, Ordering::Relaxed) {
                wake_worker();
            }
        }
        // A prepared transaction commits later, maybe elsewhere: the worker's poll finds it.
        XACT_EVENT_ABORT | XACT_EVENT_PARALLEL_ABORT | XACT_EVENT_PREPARE => {
            WAKE_AT_COMMIT.store(false, Ordering::Relaxed);
            OUTBOX_CHANGED.store(false, Ordering::Relaxed);
        }
        _ => {}
    }
}

/// Sets the worker's latch. A stale number (worker just died) at worst wakes
/// another process spuriously, which latches tolerate by design.
fn wake_worker() {
    let Some(procno) = shared::worker_procno() else {
        return;
    };
    unsafe {
        let procs = (*pg_sys::ProcGlobal).allProcs;
        pg_sys::SetLatch(&raw mut (*procs.add(procno as usize)).procLatch);
    }
}
