//! The delivery worker. Its loop, like pg_cron's, is a table of contents:
//! plan the round → run it in one transaction → apply what came back → wait.
//!
//! The sending happens on the pool's threads (`delivery`), the SQL in `outbox`,
//! and what the settings and secrets make of the target in `config`.

mod target;

use crate::catalog;
use crate::delivery::{Outcome, Pool};
use crate::model::backoff::random_jitter;
use crate::model::breaker::{Allowance, Breaker, Transition};
use crate::model::classify::{self, Decision};
use crate::model::event::Event;
use crate::model::problem::{Change, Failures, Step};
use crate::settings::{self, Settings};
use crate::shared;
use crate::spi::{self, transaction};
use crate::store::{self, Record};
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
/// Outcomes are recorded in batches of this many, or after RECORD_DELAY.
const RECORD_BATCH: usize = 64;
const RECORD_DELAY: Duration = Duration::from_millis(5);
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

/// When the worker has something to do without being woken.
struct Timers {
    /// The earliest pending event not in flight is due.
    due: Option<Instant>,
    /// Expired delivered events are to be purged.
    purge: Instant,
    /// Statistics that could not be flushed yet are to be flushed.
    statistics: Option<Instant>,
    /// A failed round is to be tried again.
    retry_round: Option<Instant>,
    /// The queue is to be counted for the metrics (None: nothing changed).
    gauges: Option<Instant>,
    /// The capture table is to be vacuumed (VACUUM_CAPTURED_AFTER events were taken).
    vacuum: Option<Instant>,
    /// A failed take is to be tried again.
    retry_take: Option<Instant>,
}

impl Timers {
    fn new() -> Timers {
        Timers {
            due: None,
            purge: Instant::now(),
            statistics: None,
            retry_round: None,
            // Published at start, so the metrics never show another life's counts.
            gauges: Some(Instant::now()),
            vacuum: None,
            retry_take: None,
        }
    }

    fn reached(at: Option<Instant>, now: Instant) -> bool {
        at.is_some_and(|at| at <= now)
    }

    /// How long the worker may sleep. A timer only counts when its work can be
    /// done: with delivery paused by configuration or the in-flight window full, an
    /// overdue event, and without the extension, an overdue purge, would turn the
    /// wait into a spin (finished requests wake the worker through the pool). The
    /// fallback poll bounds every sleep.
    fn sleep(
        &self,
        now: Instant,
        can_claim: bool,
        can_purge: bool,
        secrets_refresh: Option<Instant>,
        next_probe: Option<Instant>,
    ) -> Duration {
        let due = self.due.filter(|_| can_claim);
        let purge = Some(self.purge).filter(|_| can_purge);
        [
            due,
            purge,
            self.statistics,
            self.retry_round,
            secrets_refresh,
            next_probe,
            self.gauges.filter(|_| can_purge),
            self.vacuum.filter(|_| can_purge),
            self.retry_take.filter(|_| can_claim),
        ]
        .into_iter()
        .flatten()
        .map(|at| at.saturating_duration_since(now))
        .fold(POLL, Duration::min)
    }
}

/// What one round does in its transaction.
struct Round {
    /// Outcomes to record.
    record: Vec<Record>,
    /// How many due events to claim.
    claim: usize,
    /// The claim is a probe of a backend that is down: one due event.
    probe: bool,
    /// Make the events waiting out a backoff due now (the backend is back).
    release_backoff: bool,
    /// Events not to claim: in flight, or decided and not yet recorded.
    busy: Vec<String>,
    /// Whether to look whether the extension (still) exists first.
    check_installed: bool,
    /// Take the capture table's events into the outbox before claiming.
    take: bool,
    /// Refresh the outbox's statistics if this many events, plus those taken now,
    /// reach ANALYZE_AFTER (None: not now).
    analyze_after: Option<i64>,
}

/// What a round found.
struct RoundResult {
    installed: bool,
    /// How many the round tried to claim.
    wanted: usize,
    claimed: Vec<Event>,
    /// Until the next pending event not claimed is due (None: nothing pending).
    next_due: Option<Duration>,
    /// Events taken from the capture table, or why the take failed (the round went
    /// on without it); None when the round did not take. And whether the outbox was
    /// analyzed.
    taken: Option<Result<i64, String>>,
    analyzed: bool,
}

struct Worker {
    config: Config,
    pool: Pool,
    /// Ids of the events claimed and not yet decided (claims live in memory only).
    in_flight: HashSet<String>,
    /// Outcomes waiting to be decided and recorded in one batch, and since when.
    outcomes: Vec<Outcome>,
    outcomes_since: Instant,
    /// Decided and not recorded yet: a failed round keeps them for the next one.
    unrecorded: Vec<Record>,
    /// Whether the extension exists in the worker's database (None: look again).
    installed: Option<bool>,
    /// Something may be due now: woken by a commit, a timer, or a full claim.
    maybe_due: bool,
    /// Events may have been captured since the last take: woken by a commit (or the
    /// fallback poll), or the take failed.
    maybe_captured: bool,
    /// Events that came into the outbox since its statistics were refreshed, and when.
    taken_since_analyze: i64,
    analyzed_at: Option<Instant>,
    /// Events taken from the capture table since it was vacuumed.
    taken_since_vacuum: i64,
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
        let mut worker = Worker {
            config: Config::new(settings),
            pool,
            in_flight: HashSet::new(),
            outcomes: Vec::new(),
            outcomes_since: Instant::now(),
            unrecorded: Vec::new(),
            // Known before the first report, which would otherwise warn that the
            // extension is missing at every start.
            installed: transaction(catalog::installed).ok(),
            maybe_due: true,
            maybe_captured: true,
            taken_since_analyze: 0,
            analyzed_at: None,
            taken_since_vacuum: 0,
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
            if let Some(round) = self.plan() {
                let result = transaction(move || run_round(round));
                self.apply(result);
            }
            if Timers::reached(self.timers.vacuum, Instant::now()) && self.installed == Some(true) {
                self.vacuum_captured();
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
            // A new retention applies now, not at the next periodic purge.
            self.timers.purge = Instant::now();
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

    fn max_in_flight(&self) -> usize {
        (self.config.settings().concurrency * 32).clamp(64, 2048)
    }

    /// Jobs not yet on the wire are held back while delivery is paused or the
    /// backend is down (a probe excepted).
    fn hold(&self) {
        let held = self.config.settings().paused
            || self.breaker.state() != crate::model::breaker::State::Closed;
        self.pool
            .trip_after(self.config.settings().breaker.failures);
        self.pool.hold(held);
    }

    /// The circuit opened or closed: tell the threads, the log and the metrics.
    fn backend_transition(&mut self, transition: Transition) {
        match transition {
            Transition::Opened => warning!(
                "pg_new_user_hook: the backend failed {} attempts in a row: delivery is held back, \
                 and one event at a time probes it (first in {} ms, then at most every {} ms: {})",
                self.config.settings().breaker.failures,
                self.breaker.interval().as_millis(),
                self.config.settings().breaker.max_probe.as_millis(),
                settings::names::PROBE_INTERVAL_MS
            ),
            Transition::Closed => {
                log!("pg_new_user_hook: the backend answers again: delivering the backlog");
                self.release_backoff = true;
                self.maybe_due = true;
            }
        }
        shared::set_backend_state(self.breaker.state().gauge());
        self.hold();
    }

    /// How many events may be claimed now (0: not worth a round trip yet), and
    /// whether the claim is a probe. Under load, claims wait until a quarter of the
    /// window is free, so each round trip carries a batch; when nothing is in
    /// flight, any due event is claimed at once.
    fn claimable(&self) -> (usize, bool) {
        if self.config.channel().is_err()
            || self.installed == Some(false)
            || self.config.settings().paused
        {
            return (0, false);
        }
        match self.breaker.allowance(Instant::now()) {
            Allowance::All => (self.window(), false),
            Allowance::Probe => (1, true),
            Allowance::Nothing => (0, false),
        }
    }

    fn window(&self) -> usize {
        let max = self.max_in_flight();
        let free = max.saturating_sub(self.pool.in_flight());
        if self.pool.in_flight() == 0 || free >= max / 4 {
            free
        } else {
            0
        }
    }

    /// Moves finished requests from the pool into the batch to record.
    fn collect_outcomes(&mut self) {
        let arrived = self.pool.take_outcomes();
        if !arrived.is_empty() {
            if self.outcomes.is_empty() {
                self.outcomes_since = Instant::now();
            }
            self.outcomes.extend(arrived);
        }
    }

    /// Whether buffered outcomes should be recorded now: a full batch, nothing left
    /// in flight, or the oldest has waited long enough.
    fn record_due(&self) -> bool {
        !self.outcomes.is_empty()
            && (self.outcomes.len() >= RECORD_BATCH
                || self.pool.in_flight() == 0
                || self.outcomes_since.elapsed() >= RECORD_DELAY)
    }

    /// What this round does, or None when there is nothing worth a transaction.
    fn plan(&mut self) -> Option<Round> {
        let now = Instant::now();
        if self.timers.retry_round.is_some_and(|at| at > now) {
            return None;
        }
        let retry_take = Timers::reached(self.timers.retry_take, now);
        let (claim, probe) =
            if self.maybe_due || retry_take || Timers::reached(self.timers.due, now) {
                self.claimable()
            } else {
                (0, false)
            };
        if self.record_due() {
            let outcomes = std::mem::take(&mut self.outcomes);
            let decisions = self.decide(outcomes);
            self.unrecorded.extend(decisions);
        }
        let check_installed = self.installed != Some(true);
        if claim == 0 && self.unrecorded.is_empty() && !check_installed && !self.release_backoff {
            return None;
        }
        let mut busy: Vec<String> = self.in_flight.iter().cloned().collect();
        busy.extend(self.unrecorded.iter().map(|r| r.id.clone()));
        // Commits from now on set the latch again: none is missed by the take's snapshot.
        // After a failed take, the next try waits RETRY_FAILED_ROUND.
        let take = claim > 0
            && self.timers.retry_take.is_none_or(|at| at <= now)
            && std::mem::take(&mut self.maybe_captured);
        let analyze_after = self
            .analyzed_at
            .is_none_or(|at| at.elapsed() >= ANALYZE_EVERY)
            .then_some(self.taken_since_analyze);
        Some(Round {
            take,
            analyze_after,
            record: self.unrecorded.clone(),
            claim,
            probe,
            release_backoff: self.release_backoff,
            busy,
            check_installed,
        })
    }

    /// Takes in what a round found (or that it failed) and hands claims to the pool.
    fn apply(&mut self, result: Result<RoundResult, String>) {
        let result = match result {
            Ok(result) => result,
            Err(error) => {
                self.step_outcome(Step::Round, Err(&error));
                if self.round_error.as_ref() != Some(&error) {
                    warning!(
                        "pg_new_user_hook: a delivery round failed and is retried in {} s, with the outcomes it had to record: {error}",
                        RETRY_FAILED_ROUND.as_secs()
                    );
                    self.round_error = Some(error);
                }
                self.timers.retry_round = Some(Instant::now() + RETRY_FAILED_ROUND);
                // The extension may be gone (DROP EXTENSION): look before the next round.
                self.installed = None;
                self.maybe_captured = true;
                return;
            }
        };
        if self.round_error.take().is_some() {
            log!("pg_new_user_hook: delivery rounds succeed again");
        }
        self.step_outcome(Step::Round, Ok(()));
        let taken = match &result.taken {
            None => 0,
            Some(Ok(taken)) => {
                self.timers.retry_take = None;
                self.step_outcome(Step::Take, Ok(()));
                if self.take_error.take().is_some() {
                    log!("pg_new_user_hook: taking captured events into the outbox succeeds again");
                }
                *taken
            }
            Some(Err(error)) => {
                // The round recorded and claimed without it; the events stay captured.
                // A repeated error is logged once (the problem says it meanwhile).
                if self.take_error.as_ref() != Some(error) {
                    warning!("pg_new_user_hook: taking captured events into the outbox failed, retried every {} s: {error}", RETRY_FAILED_ROUND.as_secs());
                    self.take_error = Some(error.clone());
                }
                self.step_outcome(Step::Take, Err(error));
                self.maybe_captured = true;
                self.timers.retry_take = Some(Instant::now() + RETRY_FAILED_ROUND);
                0
            }
        };
        self.timers.retry_round = None;
        self.timers.statistics = flush_statistics(false);
        self.taken_since_vacuum += taken;
        if self.taken_since_vacuum >= VACUUM_CAPTURED_AFTER && self.timers.vacuum.is_none() {
            self.timers.vacuum = Some(Instant::now() + VACUUM_DELAY);
        }
        if result.analyzed {
            self.taken_since_analyze = 0;
            self.analyzed_at = Some(Instant::now());
        } else {
            self.taken_since_analyze += taken;
        }
        if self.installed != Some(result.installed) {
            self.installed = Some(result.installed);
            self.report();
        }
        // Recorded; or, without the extension, nothing to record into.
        self.unrecorded.clear();
        self.release_backoff = false;
        self.count_queue_soon();
        if !result.installed {
            self.maybe_due = false;
            self.timers.due = None;
            return;
        }
        if result.wanted > 0 {
            // A full claim suggests more are due right now.
            self.maybe_due = result.claimed.len() >= result.wanted;
        }
        self.timers.due = result.next_due.map(|d| Instant::now() + d);
        for event in result.claimed {
            if event.probe {
                self.breaker.probe_sent(&event.id);
                shared::set_backend_state(self.breaker.state().gauge());
            }
            self.in_flight.insert(event.id.clone());
            self.pool.submit(event);
        }
        shared::set_in_flight(self.in_flight.len());
    }

    /// Deletes one batch of expired delivered events; when the batch was full, the
    /// next follows right after the next round, so a large purge keeps up with the
    /// drain without holding up deliveries.
    fn purge(&mut self) {
        let retention = self.config.settings().retention;
        match transaction(move || store::purge_delivered(retention, PURGE_BATCH)) {
            Ok(purged) => {
                self.step_outcome(Step::Purge, Ok(()));
                self.timers.statistics = flush_statistics(false);
                self.timers.purge = if purged >= PURGE_BATCH {
                    Instant::now()
                } else {
                    Instant::now() + PURGE_EVERY
                };
            }
            Err(error) => {
                warning!("pg_new_user_hook: purging delivered events failed, retried in a minute: {error}");
                self.step_outcome(Step::Purge, Err(&error));
                self.timers.purge = Instant::now() + Duration::from_secs(60);
                self.installed = None;
            }
        }
    }

    /// Turns outcomes into decisions to record, and tells the circuit breaker what
    /// each attempt said about the backend. An unsent event needs none: it is still
    /// pending and due.
    fn decide(&mut self, outcomes: Vec<Outcome>) -> Vec<Record> {
        let now = SystemTime::now();
        let mut decisions = Vec::with_capacity(outcomes.len());
        let mut first_error = None;
        let mut any_delivered = false;
        for outcome in outcomes {
            self.in_flight.remove(&outcome.id);
            if !outcome.sent {
                self.breaker.probe_lost(&outcome.id, Instant::now());
                continue;
            }
            if !outcome.current {
                // Sent to a target replaced since: its answer is recorded for the
                // event, but a probe's must not leave the circuit half-open.
                self.breaker.probe_stale(&outcome.id, Instant::now());
            }
            let decision = classify::decide(
                &outcome.result,
                outcome.attempt,
                &self.config.settings().retry,
                random_jitter(),
                now,
            );
            if let Some(up) = classify::backend_up(&outcome.result).filter(|_| outcome.current) {
                let policy = self.config.settings().breaker;
                let not_before = classify::retry_after(&outcome.result, now);
                let observed =
                    self.breaker
                        .observe(&policy, &outcome.id, up, not_before, Instant::now());
                if let Some(t) = observed {
                    self.backend_transition(t);
                }
            }
            match &decision {
                Decision::Delivered { .. } => any_delivered = true,
                Decision::Retry { error, .. } | Decision::Failed { error, .. } => {
                    first_error.get_or_insert_with(|| error.clone());
                }
            }
            decisions.push(Record {
                class: classify::class(&outcome.result),
                id: outcome.id,
                attempt: outcome.attempt,
                decision,
            });
        }
        match first_error {
            Some(error) if !self.backend_failing => {
                warning!(
                    "pg_new_user_hook: delivery failing: {error} (see new_user_hook.deliveries)"
                );
                self.backend_failing = true;
            }
            None if any_delivered && self.backend_failing => {
                log!("pg_new_user_hook: delivery recovered");
                self.backend_failing = false;
            }
            _ => {}
        }
        // The threads may have stopped sending before these outcomes showed it.
        if self.pool.tripped() {
            let policy = self.config.settings().breaker;
            if let Some(t) = self.breaker.trip(&policy, Instant::now()) {
                self.backend_transition(t);
            }
        }
        shared::set_in_flight(self.in_flight.len());
        shared::set_backend_state(self.breaker.state().gauge());
        decisions
    }

    /// Vacuums the capture table behind the takes; while autovacuum is at it, again a
    /// second later. Events taken meanwhile count towards the next one.
    fn vacuum_captured(&mut self) {
        let taken = self.taken_since_vacuum;
        match store::vacuum_captured() {
            Ok(false) => self.timers.vacuum = Some(Instant::now() + VACUUM_DELAY),
            done => {
                if let Err(e) = &done {
                    warning!("pg_new_user_hook: vacuuming new_user_hook.captured failed (autovacuum will): {e}");
                }
                self.step_outcome(
                    Step::Vacuum,
                    done.as_ref().map(|_| ()).map_err(String::as_str),
                );
                self.taken_since_vacuum -= taken;
                self.timers.vacuum = None;
            }
        }
    }

    /// Counts the queue for the metrics within GAUGES_EVERY of the last count.
    fn count_queue_soon(&mut self) {
        let every = GAUGES_EVERY.max(self.count_took * GAUGES_SHARE);
        let at = (self.counted_at + every).max(Instant::now());
        self.timers.gauges.get_or_insert(at);
    }

    fn count_queue(&mut self) {
        self.timers.gauges = None;
        self.counted_at = Instant::now();
        let counted = transaction(store::queue_gauges);
        self.count_took = self.counted_at.elapsed();
        match counted {
            Ok(gauges) => {
                shared::publish_queue_gauges(gauges);
                self.step_outcome(Step::Count, Ok(()));
            }
            Err(error) => {
                self.step_outcome(Step::Count, Err(&error));
                self.installed = None;
            }
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
        if !self.outcomes.is_empty() {
            timeout = timeout.min(RECORD_DELAY.saturating_sub(self.outcomes_since.elapsed()));
        }
        if self.maybe_due && can_claim {
            timeout = Duration::ZERO;
        }
        let events = pg_sys::WL_LATCH_SET
            | pg_sys::WL_SOCKET_READABLE
            | pg_sys::WL_TIMEOUT
            | pg_sys::WL_EXIT_ON_PM_DEATH;
        let (rc, latch_was_set) = unsafe {
            let rc = pg_sys::WaitLatchOrSocket(
                pg_sys::MyLatch,
                events as i32,
                self.pool.wake_fd(),
                timeout.as_millis().min(i64::MAX as u128) as _,
                pg_sys::PG_WAIT_EXTENSION,
            );
            // A commit may set the latch after WaitLatchOrSocket returned for another
            // reason: read it before clearing it, or that wake-up is lost.
            let latch_was_set = (*pg_sys::MyLatch).is_set != 0;
            pg_sys::ResetLatch(pg_sys::MyLatch);
            (rc, latch_was_set)
        };
        // Woken by a commit, or the fallback poll ran out: look for due events. The
        // poll catches events whose commit woke nobody (COMMIT PREPARED, a wake-up
        // lost to a race); other timers only serve what they were set for.
        let polled = rc & pg_sys::WL_TIMEOUT as i32 != 0 && timeout == POLL;
        if latch_was_set || rc & pg_sys::WL_LATCH_SET as i32 != 0 || polled {
            self.maybe_due = true;
            self.maybe_captured = true;
            // New events (or a poll): the metrics' count of the queue is stale.
            self.count_queue_soon();
        }
        pg_sys::check_for_interrupts!();
    }

    /// SIGTERM: stop claiming, record what has finished, and abandon requests still
    /// in progress after a short grace — their events stay pending and are sent
    /// again (at least once), and a fast shutdown stays fast whatever `timeout_ms` is.
    fn shutdown(&mut self) {
        let mut outcomes = std::mem::take(&mut self.outcomes);
        outcomes.extend(
            self.pool
                .stop(SHUTDOWN_GRACE.min(self.config.settings().timeout)),
        );
        if self.installed == Some(false) {
            return;
        }
        let mut record = std::mem::take(&mut self.unrecorded);
        record.extend(self.decide(outcomes));
        if let Err(e) = transaction(move || store::record(&record)) {
            warning!("pg_new_user_hook: recording the last outcomes failed, those events will be sent again: {e}");
        }
    }
}

/// One round's transaction: record outcomes, claim due events, find the next due.
fn run_round(round: Round) -> RoundResult {
    if round.check_installed && !catalog::installed() {
        return RoundResult {
            installed: false,
            wanted: round.claim,
            claimed: Vec::new(),
            next_due: None,
            taken: None,
            analyzed: false,
        };
    }
    store::record(&round.record);
    if round.release_backoff {
        store::release_backoff();
    }
    // In a subtransaction of its own: a take that fails (a publication, a lock) must
    // not stop the outcomes from being recorded or the outbox's events from going out.
    let taken = round
        .take
        .then(|| spi::subtransaction(store::take_captured));
    let analyzed = round.analyze_after.is_some_and(|before| {
        before
            + taken
                .as_ref()
                .and_then(|t| t.as_ref().ok())
                .copied()
                .unwrap_or(0)
            >= ANALYZE_AFTER
    }) && store::analyze_outbox();
    let claimed = if round.claim > 0 {
        store::claim(round.claim, &round.busy, round.probe)
    } else {
        Vec::new()
    };
    let next_due = if claimed.len() < round.claim || round.claim == 0 {
        let mut busy = round.busy;
        busy.extend(claimed.iter().map(|c| c.id.clone()));
        store::next_due(&busy)
    } else {
        Some(Duration::ZERO)
    };
    RoundResult {
        installed: true,
        wanted: round.claim,
        claimed,
        next_due,
        taken,
        analyzed,
    }
}
