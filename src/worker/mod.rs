//! The delivery worker. Its loop, like pg_cron's, is a table of contents:
//! plan the round → run it in one transaction → apply what came back → wait.
//!
//! The sending happens on the pool's threads (`delivery`), the SQL in `store`, a
//! round in `round`, the wait in `timers`, and what the settings and secrets make
//! of the target in `target`.

mod round;
mod target;
mod timers;
mod wait_set;

use round::run_round;
use timers::Timers;
use wait_set::WaitSet;

use crate::catalog::{self, Capture};
use crate::delivery::{Outcome, Pool};
use crate::model::backoff::random_jitter;
use crate::model::breaker::{Allowance, Breaker, Transition};
use crate::model::classify::{self, Decision};
use crate::model::event::Event;
use crate::model::problem::{Change, Failures, Step};
use crate::model::window::{Reading, Resolution, Windows};
use crate::settings::{self, Settings};
use crate::shared;
use crate::spi::{self, transaction};
use crate::store::{self, Batch, Chunk, LogRecord, Record, Rotation};
use pgrx::bgworkers::{
    BackgroundWorker, BackgroundWorkerBuilder, BgWorkerStartTime, SignalWakeFlags,
};
use pgrx::prelude::*;
use std::collections::HashSet;
use std::time::{Duration, Instant, SystemTime};
use target::Config;

/// Fallback poll: catches events committed without a wake-up (e.g. prepared transactions).
const POLL: Duration = Duration::from_secs(5);
/// How often delivered events past the retention are purged, when the last purge
/// found no more than one batch.
const PURGE_EVERY: Duration = Duration::from_secs(600);
/// Delivered events deleted per purge transaction; full batches follow each other
/// between rounds until the expired events are gone.
const PURGE_BATCH: i64 = 10_000;
/// Outcomes are recorded in batches of this many, or once the oldest has waited
/// RECORD_DELAY: at a trickle, one write a few events instead of one an event (the
/// reads in between write nothing). A crash meanwhile sends them again, as it does
/// events in flight. A batch that changes the outbox waits RECORD_OUTBOX_DELAY at
/// most: a user's next event there is due only once the one before is recorded. And
/// it is recorded before the next read, which must find a retry (and the events held
/// behind it) there to hold the user's later events behind them.
const RECORD_BATCH: usize = 64;
const RECORD_DELAY: Duration = Duration::from_millis(100);
const RECORD_OUTBOX_DELAY: Duration = Duration::from_millis(5);
/// Events read from the log and not resolved that the worker keeps in memory at
/// most: beyond, the next chunk waits (a chunk is store::CHUNK events).
const READ_AHEAD: usize = 10_000;
/// How often the reads look for events restored without their transaction id
/// (pg_restore --disable-triggers), which no window would show until stamped again.
const RESTAMP_EVERY: Duration = Duration::from_secs(5);
/// How long SIGTERM waits for requests in progress before abandoning them.
const SHUTDOWN_GRACE: Duration = Duration::from_millis(500);
/// Delay before the postmaster restarts a worker that died.
const RESTART_AFTER: Duration = Duration::from_secs(5);
/// Pause after a round that failed (a lock timeout, the extension being dropped, a
/// full disk) before the next try: what was decided is kept and recorded then.
const RETRY_FAILED_ROUND: Duration = Duration::from_secs(1);
/// How often, at most, the queue is counted for the metrics while events come and
/// go (an idle worker counts once per fallback poll); less often when counting a large backlog
/// takes long, so that it stays under 1/GAUGES_SHARE of the worker's time.
const GAUGES_EVERY: Duration = Duration::from_secs(1);
const GAUGES_SHARE: u32 = 20;
/// The outbox's statistics are refreshed (ANALYZE) once this many events came into it
/// since the last refresh, at most every ANALYZE_EVERY: statistics taken while few
/// events were pending make the planner read the whole backlog for each claim (a
/// bitmap scan and a sort: 190 ms a claim with 100,000 waiting, instead of 7 ms). A
/// smaller backlog costs a claim less than the ANALYZE would.
const ANALYZE_AFTER: i64 = 10_000;
const ANALYZE_EVERY: Duration = Duration::from_secs(10);
/// The capture table is vacuumed once this many events were taken from it: a
/// queue's dead rows, left to autovacuum (a minute or more), would make every take
/// scan them (13 ms with 100,000 just taken). VACUUM_DELAY later: the rows a take
/// just deleted stay visible to transactions older than it, which VACUUM respects.
const VACUUM_CAPTURED_AFTER: i64 = 10_000;
const VACUUM_DELAY: Duration = Duration::from_secs(1);
/// The log's rotation goes a step further this long after the first events read
/// since it last rested, then after each step: signups pointed to the empty segment,
/// the other found resolved and older than the retention, then emptied once no older
/// snapshot remains. The log holds one to two retentions' events (with retention 0,
/// what arrives in a few times this).
const ROTATE_AFTER: Duration = Duration::from_secs(5);
/// How long a rotation waiting for a segment to pass the retention sleeps at most.
const RETENTION_LOOK: Duration = Duration::from_secs(3600);
/// Tries in a row that found the segment to empty held (1, 2, 4 … 64 s apart:
/// about 4 minutes) that make a problem of it.
const MAINTENANCE_BUSY_PROBLEM: u32 = 8;

pub fn register() {
    BackgroundWorkerBuilder::new("pg_new_user_hook delivery worker")
        .set_type("pg_new_user_hook")
        .set_library("pg_new_user_hook")
        .set_function("pg_new_user_hook_worker_main")
        .enable_spi_access()
        .set_start_time(BgWorkerStartTime::RecoveryFinished)
        .set_restart_time(Some(RESTART_AFTER))
        .load();
}

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn pg_new_user_hook_worker_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    let database = settings::database();
    if let Some((code, message, attempts)) = shared::connect_failure() {
        wait_after_connect_failure(&database, code, &message, attempts);
    }
    // A FATAL error while connecting ends this process; the log hook keeps it for
    // the next start (above).
    shared::connecting(true);
    BackgroundWorker::connect_worker_to_spi(Some(&database), None);
    shared::connecting(false);
    shared::set_worker_problem(None);
    shared::announce_worker(true);
    log!("pg_new_user_hook: delivery worker started for database \"{database}\"");

    let mut worker = Worker::new();
    worker.run();

    shared::announce_worker(false);
    shared::set_worker_problem(None);
    log!("pg_new_user_hook: delivery worker stopped");
    // Exit code 1 makes the postmaster start the worker again if only the worker
    // was terminated (pg_terminate_backend); during shutdown it is not restarted.
    unsafe { pg_sys::proc_exit(1) };
}

/// How long the worker waits before connecting again after its database refused it
/// (it does not exist yet, say, or does not allow connections): doubling from the
/// first to the longest, so a database created later is found, and a typo costs a
/// line in the log every few minutes, not every few seconds.
const CONNECT_RETRY_FIRST: Duration = Duration::from_secs(25);
const CONNECT_RETRY_LONGEST: Duration = Duration::from_secs(300);

/// The previous start of the worker could not connect to its database: say why and
/// what to do, and wait before trying again, instead of failing every few seconds.
fn wait_after_connect_failure(database: &str, code: i32, message: &str, attempts: u32) -> ! {
    let wait = CONNECT_RETRY_FIRST
        .saturating_mul(1 << attempts.saturating_sub(1).min(8))
        .min(CONNECT_RETRY_LONGEST);
    let setting = settings::names::DATABASE;
    let missing = // 3D000: no such database
        PgSqlErrorCode::from(code) == PgSqlErrorCode::ERRCODE_INVALID_CATALOG_NAME;
    let problem = if missing {
        format!(
            "{setting} = '{database}', but there is no such database ({message}): set it to the database \
             where CREATE EXTENSION pg_new_user_hook was run (ALTER SYSTEM SET {setting} = '...') and restart \
             PostgreSQL; the worker looks again in {} s; new users are queued meanwhile",
            wait.as_secs()
        )
    } else {
        format!(
            "the delivery worker cannot connect to database \"{database}\" ({setting}): {message}; \
             it tries again in {} s; new users are queued meanwhile",
            wait.as_secs()
        )
    };
    warning!("pg_new_user_hook: {problem}");
    shared::set_worker_problem(Some(&problem));
    let retry_at = Instant::now() + wait;
    loop {
        if BackgroundWorker::sigterm_received() {
            unsafe { pg_sys::proc_exit(1) };
        }
        let left = retry_at.saturating_duration_since(Instant::now());
        if left.is_zero() {
            // Exit code 1: the postmaster starts the worker again, which connects.
            unsafe { pg_sys::proc_exit(1) };
        }
        let events = pg_sys::WL_LATCH_SET | pg_sys::WL_TIMEOUT | pg_sys::WL_EXIT_ON_PM_DEATH;
        unsafe {
            pg_sys::WaitLatch(
                pg_sys::MyLatch,
                events as i32,
                left.as_millis() as _,
                pg_sys::PG_WAIT_EXTENSION,
            );
            pg_sys::ResetLatch(pg_sys::MyLatch);
        }
    }
}

/// Hands the statistics of the worker's transactions (rows updated and deleted in the
/// outbox) to the cumulative statistics system, so autovacuum sees the outbox churn
/// while the worker runs, not only when it exits. Returns when to flush again, with
/// `force`, if it could not flush everything yet: as a backend does when it goes
/// idle (PostgreSQL flushes at most once a second, and without `force` skips
/// entries it cannot lock at once).
fn flush_statistics(force: bool) -> Option<Instant> {
    let retry_in_ms = unsafe { pg_sys::pgstat_report_stat(force) };
    (retry_in_ms > 0).then(|| Instant::now() + Duration::from_millis(retry_in_ms as u64))
}

/// What one round does in its transaction.
struct Round {
    /// Outcomes to record, and the position to store.
    record: Batch,
    /// How many due events to claim from the outbox.
    claim: usize,
    /// The claim is a probe of a backend that is down: one due event.
    probe: bool,
    /// Make the events waiting out a backoff due now (the backend is back).
    release_backoff: bool,
    /// Events not to claim: in flight, or decided and not yet recorded.
    busy: Vec<String>,
    /// Whether to look whether the extension (still) exists first.
    check_installed: bool,
    /// A 0.7.0 schema: take its capture table's events into the outbox before claiming.
    take: bool,
    /// Read the next chunk of the log.
    read: Option<Read>,
    /// Whether to refresh the outbox's statistics in this round (None: not now).
    analyze: Option<Analyze>,
}

/// A read of the log: the chunk to read, after loading the stored position first
/// (then the chunk is the first of the window after it).
struct Read {
    load: bool,
    reading: Reading,
    /// Stamp events restored without their transaction id first (store::restamp).
    restamp: bool,
}

/// What a read of the log found: the position, if loaded, the chunk read, and the chunk.
struct Chunked {
    loaded: Option<(Option<String>, i64)>,
    reading: Reading,
    chunk: Chunk,
    /// Events stamped again before the read: a later window reads them.
    restamped: i64,
}

/// Why a round may refresh the outbox's statistics.
#[derive(Clone, Copy, Debug)]
enum Analyze {
    /// If this many events, plus those taken now, reach ANALYZE_AFTER.
    IfTaken(i64),
    /// The backlog the last refresh saw has drained.
    Drained,
}

/// What a round found.
struct RoundResult {
    installed: bool,
    /// How many the round tried to claim.
    wanted: usize,
    claimed: Vec<Event>,
    /// Until the next pending event in the outbox not claimed is due (None: nothing
    /// pending); None when the round did not look.
    next_due: Option<Option<Duration>>,
    /// Events put into the outbox by the read (held, or a 0.7.0 schema's taken), or
    /// why the read failed (the round went on without it); None when the round did
    /// not read. And whether the outbox was analyzed.
    taken: Option<Result<i64, String>>,
    /// The chunk of the log read.
    chunk: Option<Chunked>,
    /// The position the round stored, and whether it was stored (it was where the
    /// worker left it).
    stored: Option<crate::model::window::Position>,
    position_moved: bool,
    analyzed: bool,
    /// Where the installed schema keeps events until they are read (looked up in the
    /// round's transaction: the catalog is not read outside one).
    capture: Option<Capture>,
}

struct Worker {
    config: Config,
    pool: Pool,
    /// Ids of the events claimed and not yet decided (claims live in memory only).
    in_flight: HashSet<String>,
    /// Outcomes decided (the breaker has seen them) and not recorded yet, and since
    /// when (or since the position moved); a failed round keeps them for the next one.
    unrecorded: Batch,
    unrecorded_since: Instant,
    /// Whether the round under way records `unrecorded`.
    recording: bool,
    /// Whether the extension exists in the worker's database (None: look again).
    installed: Option<bool>,
    /// The worker's place in the log, and the events read from it in memory.
    windows: Windows,
    /// The count of commits that changed the outbox from SQL, as last seen.
    outbox_changes: i32,
    /// Something may be due now: woken by a commit, a timer, or a full claim.
    maybe_due: bool,
    /// Events may have been captured since the last take: woken by a commit (or the
    /// fallback poll), or the take failed.
    maybe_captured: bool,
    /// Events that came into the outbox since its statistics were refreshed, and when.
    taken_since_analyze: i64,
    analyzed_at: Option<Instant>,
    /// The statistics were taken while a backlog waited: they count its events as
    /// pending, and once it has drained, a claim planned with them reads the whole
    /// outbox (a sequential scan of every delivered event kept, for each signup of a
    /// trickle: 5 ms of CPU an event). Refreshed once the queue is empty.
    backlog_in_statistics: bool,
    /// The last claim found as many due events as it asked for: a backlog.
    claim_was_full: bool,
    /// Events taken from the capture table since it was vacuumed.
    taken_since_vacuum: i64,
    /// What the last round found the schema keeps events in.
    capture: Option<Capture>,
    /// Tries of the log's rotation in a row that found a segment held.
    maintenance_busy: u32,
    /// When a commit or the fallback poll last made the worker look for events.
    looked_at: Instant,
    /// When the reads last looked for events restored without their transaction id.
    restamped_at: Option<Instant>,
    /// The log segment found entirely read, waiting for older snapshots to end.
    log_read_since: Option<store::ReadSince>,
    timers: Timers,
    /// The problem reported last (log and status view), so each is reported once.
    problem: Option<String>,
    /// The error of the last failed round, so a repeated one is logged once.
    round_error: Option<String>,
    /// Steps failing in a row: twice makes a problem (status, metric, log).
    failures: Failures,
    /// The error of the last failed take, so a repeated one is logged once.
    take_error: Option<String>,
    backend_failing: bool,
    breaker: Breaker,
    /// When the queue was last counted for the metrics, and how long that took.
    counted_at: Instant,
    count_took: Duration,
    /// The backend came back: release the backlog's backoff in the next round.
    release_backoff: bool,
    wait_set: WaitSet,
}

impl Worker {
    fn new() -> Worker {
        if let Err(e) = transaction(store::configure_session) {
            // Without its search_path, the worker must not run any SQL: exit, and be
            // started again in a few seconds.
            warning!("pg_new_user_hook: configuring the worker's session failed, restarting: {e}");
            unsafe { pg_sys::proc_exit(1) };
        }
        let settings = Settings::read();
        let pool = Pool::new(settings.concurrency).expect("starting delivery threads");
        let wait_set = WaitSet::new(pool.wake_fd());
        let mut worker = Worker {
            config: Config::new(settings),
            pool,
            in_flight: HashSet::new(),
            unrecorded: Batch::default(),
            unrecorded_since: Instant::now(),
            recording: false,
            // Known before the first report, which would otherwise warn that the
            // extension is missing at every start.
            installed: transaction(catalog::installed).ok(),
            windows: Windows::new(),
            outbox_changes: shared::outbox_changes(),
            maybe_due: true,
            maybe_captured: true,
            taken_since_analyze: 0,
            analyzed_at: None,
            backlog_in_statistics: false,
            claim_was_full: false,
            taken_since_vacuum: 0,
            capture: None,
            maintenance_busy: 0,
            looked_at: Instant::now(),
            restamped_at: None,
            log_read_since: None,
            timers: Timers::new(),
            problem: None,
            round_error: None,
            failures: Failures::default(),
            take_error: None,
            backend_failing: false,
            breaker: Breaker::new(),
            counted_at: Instant::now(),
            count_took: Duration::ZERO,
            release_backoff: false,
            wait_set,
        };
        worker.hold();
        shared::set_backend_state(worker.breaker.state().gauge());
        worker.apply_config(true);
        worker
    }

    fn run(&mut self) {
        loop {
            if BackgroundWorker::sigterm_received() {
                self.shutdown();
                return;
            }
            if BackgroundWorker::sighup_received() {
                self.reload();
            }
            if let Some(changed) = self.config.refresh_secrets(false) {
                self.apply_config(changed);
            }
            if Timers::reached(self.timers.statistics, Instant::now()) {
                self.timers.statistics = flush_statistics(true);
            }
            self.collect_outcomes();
            self.send_ready();
            if let Some(round) = self.plan() {
                let result = transaction(move || run_round(round));
                self.apply(result);
            }
            if Timers::reached(self.timers.log_upkeep, Instant::now())
                && self.installed == Some(true)
            {
                self.maintain_log();
            }
            if Instant::now() >= self.timers.purge && self.installed == Some(true) {
                self.purge();
            }
            if Timers::reached(self.timers.gauges, Instant::now()) && self.installed == Some(true) {
                self.count_queue();
            }
            self.wait();
        }
    }

    /// SIGHUP: read the settings again; a change applies to every request not yet on the wire.
    fn reload(&mut self) {
        unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
        let settings = Settings::read();
        if settings != *self.config.settings() {
            if let Err(e) = self.pool.resize(settings.concurrency) {
                warning!("pg_new_user_hook: could not start delivery threads: {e}");
            }
            if settings.paused != self.config.settings().paused {
                if settings.paused {
                    log!("pg_new_user_hook: delivery paused ({} = on): events are queued, none is sent", settings::names::PAUSED);
                } else {
                    log!("pg_new_user_hook: delivery resumed");
                }
            }
            if settings.breaker.failures == 0 && self.breaker.reset().is_some() {
                self.backend_transition(Transition::Closed);
            } else if settings.url != self.config.settings().url && self.breaker.reset().is_some() {
                // The failures were the previous backend's: try the new one at once.
                log!(
                    "pg_new_user_hook: {} changed: delivery to the new backend starts now",
                    settings::names::URL
                );
                self.release_backoff = true;
                self.maybe_due = true;
                shared::set_backend_state(self.breaker.state().gauge());
            }
            self.config.reload(settings);
            self.hold();
            self.apply_config(true);
            // A new retention applies now, not at the next periodic purge or look at
            // the log's rotation.
            self.timers.purge = Instant::now();
            if self.timers.log_upkeep.is_some() {
                self.timers.log_upkeep = Some(Instant::now());
            }
        }
    }

    /// Hands the current target to the sending threads and reports what changed.
    fn apply_config(&mut self, changed: bool) {
        if changed {
            self.pool.set_channel(self.config.channel().ok());
            self.maybe_due = true;
        }
        self.report();
    }

    /// Logs and publishes (for new_user_hook.status) what stops delivery, once per change.
    fn report(&mut self) {
        let problem = if self.installed == Some(false) {
            Some(format!(
                "extension pg_new_user_hook is not installed in database \"{}\" ({database}): \
                 run CREATE EXTENSION pg_new_user_hook there, or point {database} at the database that has it and restart",
                settings::database(),
                database = settings::names::DATABASE
            ))
        } else {
            self.config.problem().or_else(|| self.failures.problem())
        };
        if problem == self.problem {
            return;
        }
        match &problem {
            Some(p) => warning!("pg_new_user_hook: {p}"),
            None => log!(
                "pg_new_user_hook: delivering to {}",
                self.config.describe_target()
            ),
        }
        shared::set_worker_problem(problem.as_deref());
        self.problem = problem;
    }

    /// Counts a step's success or failure; a step failing repeatedly, or recovering,
    /// changes the problem reported.
    fn step_outcome(&mut self, step: Step, result: Result<(), &str>) {
        let change = match result {
            Ok(()) => self.failures.succeeded(step),
            Err(error) => self.failures.failed(step, error),
        };
        if change != Change::Nothing {
            self.report();
        }
    }

    fn wait(&mut self) {
        let now = Instant::now();
        let can_claim = self.claimable().0 > 0;
        let mut timeout = self.timers.sleep(
            now,
            can_claim,
            self.installed == Some(true),
            self.config.next_secret_refresh(),
            // Once the probe time has come, the next due event is what to wait for.
            self.breaker
                .next_probe()
                .filter(|at| *at > now && self.timers.due.is_some()),
        );
        if self.pending_record() {
            // Not before a failed round's retry: outcomes that cannot be recorded yet
            // must not keep the worker from sleeping.
            let mut record_at = self.unrecorded_since + self.record_delay();
            if let Some(retry) = self.timers.retry_round {
                record_at = record_at.max(retry);
            }
            timeout = timeout.min(record_at.saturating_duration_since(now));
        }
        timeout = timeout.min(POLL.saturating_sub(self.looked_at.elapsed()));
        let more_to_read = self.windows.reading()
            && self.windows.len() < READ_AHEAD
            && self.timers.retry_take.is_none();
        // Not while a failed round waits for its retry: no round would run.
        let round_allowed = self.timers.retry_round.is_none_or(|at| at <= now);
        if (self.maybe_due || more_to_read) && can_claim && round_allowed {
            timeout = Duration::ZERO;
        }
        let latch_was_set = self.wait_set.wait(timeout);
        // Woken by a commit, or the fallback poll ran out: look for due events. The
        // poll catches events whose commit woke nobody (COMMIT PREPARED, a wake-up
        // lost to a race); other timers only serve what they were set for.
        // The poll is due POLL after the last look, whatever other timers (a
        // rotation's steps, a secret's refresh) woke the worker meanwhile.
        let polled = self.looked_at.elapsed() >= POLL;
        if latch_was_set || polled {
            self.looked_at = Instant::now();
            self.maybe_captured = true;
            // A signup's commit adds to the log; the outbox is looked at when SQL
            // changed it (redeliver(), backfill()), and at the poll.
            let changes = shared::outbox_changes();
            if polled || changes != self.outbox_changes {
                self.outbox_changes = changes;
                self.maybe_due = true;
            }
            // New events (or a poll): the metrics' count of the queue is stale.
            self.count_queue_soon();
        }
        pg_sys::check_for_interrupts!();
    }

    /// SIGTERM: stop claiming, record what has finished, and abandon requests still
    /// in progress after a short grace — their events stay pending and are sent
    /// again (at least once), and a fast shutdown stays fast whatever `timeout_ms` is.
    fn shutdown(&mut self) {
        let outcomes = self
            .pool
            .stop(SHUTDOWN_GRACE.min(self.config.settings().timeout));
        if self.installed == Some(false) {
            return;
        }
        let mut record = std::mem::take(&mut self.unrecorded);
        record.extend(self.decide(outcomes));
        record.position = self.windows.position_to_store().cloned();
        if let Err(e) = transaction(move || store::record(&record)) {
            warning!("pg_new_user_hook: recording the last outcomes failed, those events will be sent again: {e}");
        }
    }
}
