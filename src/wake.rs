//! Wake on commit: a signup's transaction sets the worker's latch when it commits,
//! so delivery starts at once instead of on a poll tick. Aborted transactions
//! never wake it.

use pgrx::prelude::*;
use pgrx::{pg_shmem_init, PgAtomic};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

/// PGPROC number of the running worker, or -1. Lives in shared memory.
static WORKER_PROCNO: PgAtomic<AtomicI32> =
    unsafe { PgAtomic::new(c"pg_new_user_hook_worker_procno") };

/// Set in the postmaster when loaded through shared_preload_libraries; inherited by every backend.
static PRELOADED: AtomicBool = AtomicBool::new(false);

/// Whether this backend's transaction queued an event (backends are single-threaded).
static WAKE_AT_COMMIT: AtomicBool = AtomicBool::new(false);
static CALLBACK_REGISTERED: AtomicBool = AtomicBool::new(false);

/// Called from `_PG_init` while shared_preload_libraries is processed.
pub fn init_shared_memory() {
    pg_shmem_init!(WORKER_PROCNO = AtomicI32::new(-1));
    PRELOADED.store(true, Ordering::Relaxed);
}

pub fn preloaded() -> bool {
    PRELOADED.load(Ordering::Relaxed)
}

/// The worker announces itself (Some) at start and withdraws (None) on exit.
pub fn register_worker(procno: Option<i32>) {
    WORKER_PROCNO
        .get()
        .store(procno.unwrap_or(-1), Ordering::SeqCst);
}

/// Asks for the worker to be woken when the current transaction commits.
/// The trigger calls it for every captured row; it costs a flag store.
#[pg_extern(volatile, parallel_unsafe)]
fn wake_on_commit() {
    if !preloaded() {
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
            if WAKE_AT_COMMIT.swap(false, Ordering::Relaxed) {
                wake_worker();
            }
        }
        // A prepared transaction commits later, maybe elsewhere: the worker's poll finds it.
        XACT_EVENT_ABORT | XACT_EVENT_PARALLEL_ABORT | XACT_EVENT_PREPARE => {
            WAKE_AT_COMMIT.store(false, Ordering::Relaxed);
        }
        _ => {}
    }
}

/// Sets the worker's latch. A stale number (worker just died) at worst wakes
/// another process spuriously, which latches tolerate by design.
pub fn wake_worker() {
    let procno = WORKER_PROCNO.get().load(Ordering::SeqCst);
    if procno < 0 {
        return;
    }
    unsafe {
        let procs = (*pg_sys::ProcGlobal).allProcs;
        pg_sys::SetLatch(&raw mut (*procs.add(procno as usize)).procLatch);
    }
}
