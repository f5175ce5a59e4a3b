//! State shared between the worker and every backend, in shared memory: who the
//! worker is (to wake it) and the delivery problem it currently sees (for the
//! status view). Exists only when the library is preloaded.

use pgrx::prelude::*;
use pgrx::{pg_shmem_init, PGRXSharedMemory, PgAtomic, PgLwLock};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

/// PGPROC number of the running worker, or -1.
static WORKER_PROCNO: PgAtomic<AtomicI32> =
    unsafe { PgAtomic::new(c"pg_new_user_hook_worker_procno") };

/// How often a worker started since the server did (0: never, e.g. when no
/// background worker slot was free).
static WORKER_STARTS: PgAtomic<AtomicI32> =
    unsafe { PgAtomic::new(c"pg_new_user_hook_worker_starts") };

/// Events the worker has claimed and not yet recorded.
static IN_FLIGHT: PgAtomic<AtomicI32> = unsafe { PgAtomic::new(c"pg_new_user_hook_in_flight") };

const PROBLEM_CAPACITY: usize = 1024;

#[derive(Clone, Copy)]
pub struct ProblemText {
    len: usize,
    bytes: [u8; PROBLEM_CAPACITY],
}

impl Default for ProblemText {
    fn default() -> Self {
        ProblemText {
            len: 0,
            bytes: [0; PROBLEM_CAPACITY],
        }
    }
}

// SAFETY: plain bytes, no pointers.
unsafe impl PGRXSharedMemory for ProblemText {}

impl ProblemText {
    /// Keeps as much of `text` as fits, cut at a character boundary.
    fn set(&mut self, text: &str) {
        let mut cut = text.len().min(PROBLEM_CAPACITY);
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        self.bytes[..cut].copy_from_slice(&text.as_bytes()[..cut]);
        self.len = cut;
    }

    fn get(&self) -> Option<String> {
        (self.len > 0).then(|| String::from_utf8_lossy(&self.bytes[..self.len]).into_owned())
    }
}

/// Why the worker could not connect to its database at its last start: the error's
/// SQLSTATE (0: none) and message, kept across its restart.
#[derive(Clone, Copy, Default)]
pub struct ConnectFailure {
    code: i32,
    /// Failed attempts in a row.
    attempts: u32,
    message: ProblemText,
}

// SAFETY: plain numbers and bytes, no pointers.
unsafe impl PGRXSharedMemory for ConnectFailure {}

static CONNECT_FAILURE: PgLwLock<ConnectFailure> =
    unsafe { PgLwLock::new(c"pg_new_user_hook_connect_failure") };

/// Set in the worker process while it connects to its database.
static CONNECTING: AtomicBool = AtomicBool::new(false);

/// The problem the worker last reported (empty: none).
static WORKER_PROBLEM: PgLwLock<ProblemText> =
    unsafe { PgLwLock::new(c"pg_new_user_hook_worker_problem") };

/// What the worker last counted in the queue (`store::queue_gauges`), for the
/// metrics view: a scrape reads this instead of counting the outbox.
#[derive(Clone, Copy, Default)]
pub struct QueueGauges {
    /// False until a worker has counted since it started (and after it stopped).
    pub published: bool,
    pub pending: i64,
    pub failed: i64,
    /// Seconds since the epoch; NaN when nothing is pending.
    pub oldest_pending: f64,
    pub captured: i64,
}

// SAFETY: plain numbers, no pointers.
unsafe impl PGRXSharedMemory for QueueGauges {}

static QUEUE_GAUGES: PgLwLock<QueueGauges> =
    unsafe { PgLwLock::new(c"pg_new_user_hook_queue_gauges") };

/// The circuit breaker's state (`breaker::State::gauge`).
static BACKEND_STATE: PgAtomic<AtomicI32> =
    unsafe { PgAtomic::new(c"pg_new_user_hook_backend_state") };

/// The log segment signups append to (0: log_0, 1: log_1), switched by the worker
/// when it empties the other one. A hint: both segments are always read, and one is
/// emptied only when nobody holds it and all of it has been read, so a signup that
/// read the hint just before a switch and writes into the other segment loses
/// nothing. Starts at 0 with the server.
static WRITE_SEGMENT: PgAtomic<AtomicI32> =
    unsafe { PgAtomic::new(c"pg_new_user_hook_write_segment") };

/// Counts the commits that changed the outbox from SQL (redeliver(), backfill()),
/// so the worker looks for due events there only then: a signup's commit adds to
/// the log, not to the outbox.
static OUTBOX_CHANGES: PgAtomic<AtomicI32> =
    unsafe { PgAtomic::new(c"pg_new_user_hook_outbox_changes") };

/// Set in the postmaster when loaded through shared_preload_libraries; inherited by every backend.
static PRELOADED: AtomicBool = AtomicBool::new(false);

/// Called from `_PG_init` while shared_preload_libraries is processed.
pub fn init() {
    pg_shmem_init!(WORKER_PROCNO = AtomicI32::new(-1));
    pg_shmem_init!(WORKER_PROBLEM);
    pg_shmem_init!(CONNECT_FAILURE);
    pg_shmem_init!(IN_FLIGHT = AtomicI32::new(0));
    pg_shmem_init!(WORKER_STARTS = AtomicI32::new(0));
    pg_shmem_init!(QUEUE_GAUGES);
    pg_shmem_init!(BACKEND_STATE = AtomicI32::new(0));
    pg_shmem_init!(WRITE_SEGMENT = AtomicI32::new(0));
    pg_shmem_init!(OUTBOX_CHANGES = AtomicI32::new(0));
    PRELOADED.store(true, Ordering::Relaxed);
}

pub fn preloaded() -> bool {
    PRELOADED.load(Ordering::Relaxed)
}

/// The worker announces itself at start (so commits can set its latch) and withdraws on exit.
pub fn announce_worker(running: bool) {
    let procno = if running { my_procno() } else { -1 };
    WORKER_PROCNO.get().store(procno, Ordering::SeqCst);
    if running {
        WORKER_STARTS.get().fetch_add(1, Ordering::SeqCst);
    } else {
        // Without a worker its counts go stale: the metrics view counts for itself.
        QUEUE_GAUGES.exclusive().published = false;
    }
}

/// Whether a worker ever started since the server did.
pub fn worker_ever_started() -> bool {
    WORKER_STARTS.get().load(Ordering::SeqCst) > 0
}

/// This process's slot in `ProcGlobal->allProcs`: `MyProc->pgprocno` until
/// PostgreSQL 16, the global `MyProcNumber` since 17.
#[cfg(any(feature = "pg13", feature = "pg14", feature = "pg15", feature = "pg16"))]
fn my_procno() -> i32 {
    unsafe { (*pg_sys::MyProc).pgprocno }
}

#[cfg(not(any(feature = "pg13", feature = "pg14", feature = "pg15", feature = "pg16")))]
fn my_procno() -> i32 {
    unsafe { pg_sys::MyProcNumber }
}

pub fn worker_procno() -> Option<i32> {
    let n = WORKER_PROCNO.get().load(Ordering::SeqCst);
    (n >= 0).then_some(n)
}

pub fn set_in_flight(n: usize) {
    IN_FLIGHT
        .get()
        .store(n.min(i32::MAX as usize) as i32, Ordering::Relaxed);
}

/// None without the preload (no worker, nothing in flight to count).
pub fn in_flight() -> Option<i32> {
    preloaded().then(|| IN_FLIGHT.get().load(Ordering::Relaxed))
}

pub fn set_worker_problem(problem: Option<&str>) {
    WORKER_PROBLEM.exclusive().set(problem.unwrap_or(""));
}

pub fn worker_problem() -> Option<String> {
    if !preloaded() {
        return None;
    }
    WORKER_PROBLEM.share().get()
}

/// The worker is connecting to its database (true) or has connected (false, which
/// also forgets an earlier failure).
pub fn connecting(on: bool) {
    CONNECTING.store(on, Ordering::Relaxed);
    if !on {
        *CONNECT_FAILURE.exclusive() = ConnectFailure::default();
    }
}

/// Called for every message logged: a FATAL error while the worker connects (its
/// database does not exist, say) is kept for the worker's next start.
pub fn note_fatal_while_connecting(elevel: i32, code: i32, message: &str) {
    if CONNECTING.load(Ordering::Relaxed) && elevel >= pg_sys::FATAL as i32 && preloaded() {
        let mut slot = CONNECT_FAILURE.exclusive();
        slot.code = code;
        slot.attempts += 1;
        slot.message.set(message);
    }
}

/// Why the worker's previous start could not connect (SQLSTATE and message), and how
/// many starts in a row could not, if it could not.
pub fn connect_failure() -> Option<(i32, String, u32)> {
    let slot = CONNECT_FAILURE.share();
    (slot.code != 0).then(|| {
        (
            slot.code,
            slot.message.get().unwrap_or_default(),
            slot.attempts,
        )
    })
}

pub fn publish_queue_gauges(gauges: QueueGauges) {
    *QUEUE_GAUGES.exclusive() = gauges;
}

/// None without the preload.
pub fn queue_gauges() -> Option<QueueGauges> {
    preloaded().then(|| *QUEUE_GAUGES.share())
}

/// The log segment signups append to: 0 or 1 (0 without the preload).
pub fn write_segment() -> usize {
    if preloaded() {
        (WRITE_SEGMENT.get().load(Ordering::Acquire) & 1) as usize
    } else {
        0
    }
}

pub fn set_write_segment(segment: usize) {
    WRITE_SEGMENT
        .get()
        .store((segment & 1) as i32, Ordering::Release);
}

pub fn note_outbox_change() {
    OUTBOX_CHANGES.get().fetch_add(1, Ordering::Release);
}

/// How many commits changed the outbox from SQL (wrapping): compare with an earlier value.
pub fn outbox_changes() -> i32 {
    OUTBOX_CHANGES.get().load(Ordering::Acquire)
}

pub fn set_backend_state(state: i32) {
    BACKEND_STATE.get().store(state, Ordering::Relaxed);
}

pub fn backend_state() -> i32 {
    if preloaded() {
        BACKEND_STATE.get().load(Ordering::Relaxed)
    } else {
        0
    }
}
