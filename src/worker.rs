//! The delivery worker: claims due events, hands them to the sending threads,
//! records what happened, and sleeps on its latch when there is nothing to do.

use crate::backoff::random_jitter;
use crate::classify::{self, Decision};
use crate::delivery::{Channel, Job, Outcome, Pool};
use crate::guc::{self, SecretSource, Settings};
use crate::{outbox, request, shared};
use pgrx::bgworkers::{
    BackgroundWorker, BackgroundWorkerBuilder, BgWorkerStartTime, SignalWakeFlags,
};
use pgrx::prelude::*;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// Fallback poll: catches events committed without a wake-up (e.g. prepared transactions).
const POLL: Duration = Duration::from_secs(5);
/// How often delivered events past the retention are purged.
const PURGE_EVERY: Duration = Duration::from_secs(600);
/// Outcomes are recorded in batches of this many, or after RECORD_DELAY.
const RECORD_BATCH: usize = 64;
const RECORD_DELAY: Duration = Duration::from_millis(5);
/// How long SIGTERM waits for requests in progress before abandoning them.
const SHUTDOWN_GRACE: Duration = Duration::from_millis(500);
/// Delay before the postmaster restarts a worker that died.
const RESTART_AFTER: Duration = Duration::from_secs(5);

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
    let database = guc::database();
    BackgroundWorker::connect_worker_to_spi(Some(&database), None);
    shared::announce_worker(true);
    log!("pg_new_user_hook: delivery worker started for database \"{database}\"");

    transaction(outbox::configure_session);
    let mut worker = Worker::new();
    worker.run();

    shared::announce_worker(false);
    shared::set_worker_problem(None);
    log!("pg_new_user_hook: delivery worker stopped");
    // Exit code 1 makes the postmaster start the worker again if only the worker
    // was terminated (pg_terminate_backend); during shutdown it is not restarted.
    unsafe { pg_sys::proc_exit(1) };
}

/// Runs `work` in a transaction of its own, shown in pg_stat_activity while it runs.
fn transaction<R>(
    work: impl FnOnce() -> R + std::panic::UnwindSafe + std::panic::RefUnwindSafe,
) -> R {
    unsafe {
        pg_sys::pgstat_report_activity(
            pg_sys::BackendState::STATE_RUNNING,
            c"pg_new_user_hook: claiming and recording events".as_ptr(),
        )
    };
    let result = BackgroundWorker::transaction(work);
    unsafe { pg_sys::pgstat_report_activity(pg_sys::BackendState::STATE_IDLE, std::ptr::null()) };
    result
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

/// How often secrets stored in Supabase Vault are read again (a rotation needs no reload).
const SECRET_REFRESH: Duration = Duration::from_secs(10);

/// Secret values, resolved from the settings or from Vault.
#[derive(Clone, PartialEq, Eq)]
struct Secrets {
    api_key: String,
    signing_secret: String,
}

struct Worker {
    settings: Settings,
    /// Resolved secrets, or why they cannot be had.
    secrets: Result<Secrets, String>,
    next_secret_refresh: Instant,
    /// Where to send, or why delivery is paused (configuration problem).
    channel: Result<Arc<Channel>, String>,
    pool: Pool,
    /// Ids of the events claimed and not yet recorded (claims live in memory only).
    in_flight: HashSet<String>,
    /// Outcomes waiting to be recorded in one batch, and since when.
    outcomes: Vec<Outcome>,
    outcomes_since: Instant,
    installed: bool,
    /// Something may be due now: woken by a commit, a timer, or a full claim.
    maybe_due: bool,
    next_due: Option<Instant>,
    next_purge: Instant,
    /// When statistics that could not be flushed yet are to be flushed.
    statistics_due: Option<Instant>,
    /// The problem reported last (log and status view), so each is reported once.
    problem: Option<String>,
    backend_failing: bool,
}

impl Worker {
    fn new() -> Worker {
        let settings = Settings::read();
        let pool = Pool::new(settings.concurrency).expect("starting delivery threads");
        let mut worker = Worker {
            settings,
            secrets: Err(String::new()),
            next_secret_refresh: Instant::now(),
            channel: Err(String::new()),
            pool,
            in_flight: HashSet::new(),
            outcomes: Vec::new(),
            outcomes_since: Instant::now(),
            // Known before the first report, which would otherwise warn that the
            // extension is missing at every start.
            installed: transaction(outbox::installed),
            maybe_due: true,
            next_due: None,
            next_purge: Instant::now(),
            statistics_due: None,
            problem: None,
            backend_failing: false,
        };
        worker.configure();
        worker
    }

    fn max_in_flight(&self) -> usize {
        (self.settings.concurrency * 32).clamp(64, 2048)
    }

    /// Applies the current settings: secrets, HTTP agent, thread count.
    fn configure(&mut self) {
        if let Err(e) = self.pool.resize(self.settings.concurrency) {
            warning!("pg_new_user_hook: could not start delivery threads: {e}");
        }
        self.next_secret_refresh = Instant::now();
        self.refresh_secrets(true);
        self.maybe_due = true;
        // A new retention applies now, not at the next periodic purge.
        self.next_purge = Instant::now();
    }

    /// Reads the secrets (from Vault when configured so) and rebuilds the HTTP
    /// channel if they changed, or always when `settings_changed`.
    fn refresh_secrets(&mut self, settings_changed: bool) {
        if Instant::now() < self.next_secret_refresh {
            return;
        }
        self.next_secret_refresh = Instant::now() + SECRET_REFRESH;
        let api_key = self.settings.api_key.clone();
        let signing = self.settings.signing_secret.clone();
        let uses_vault = [&api_key, &signing]
            .iter()
            .any(|s| matches!(s, Ok(SecretSource::Vault(_))));
        let resolve = move || -> Result<Secrets, String> {
            let value = |source: &Result<SecretSource, String>, setting: &str| match source {
                Err(e) => Err(e.clone()),
                Ok(SecretSource::None) => Ok(String::new()),
                Ok(SecretSource::Value(v)) => Ok(v.clone()),
                Ok(SecretSource::Vault(name)) => outbox::vault_secret(name, setting),
            };
            Ok(Secrets {
                api_key: value(&api_key, "pg_new_user_hook.api_key_secret")?,
                signing_secret: value(&signing, "pg_new_user_hook.signing_secret_name")?,
            })
        };
        let secrets = if uses_vault {
            transaction(resolve)
        } else {
            resolve()
        };
        if settings_changed || self.secrets != secrets {
            self.secrets = secrets;
            self.rebuild_channel();
        }
    }

    fn rebuild_channel(&mut self) {
        let s = &self.settings;
        self.channel = self.secrets.clone().and_then(|secrets| {
            let target = s.target(&secrets.api_key, &secrets.signing_secret)?;
            Ok(Arc::new(Channel::new(
                target,
                s.timeout,
                s.concurrency,
                &s.ca_file,
            )?))
        });
        // Requests not yet on the wire go to the new target (or stay pending).
        self.pool.set_channel(self.channel.as_ref().ok().cloned());
        self.report();
    }

    /// Logs and publishes (for new_user_hook.status) what stops delivery, once per change.
    fn report(&mut self) {
        let problem = if !self.installed {
            Some(format!(
                "extension pg_new_user_hook is not installed in database \"{}\" (pg_new_user_hook.database): \
                 run CREATE EXTENSION pg_new_user_hook there, or point pg_new_user_hook.database at the database that has it and restart",
                guc::database()
            ))
        } else {
            self.channel.as_ref().err().cloned()
        };
        if problem == self.problem {
            return;
        }
        match (&problem, &self.channel) {
            (Some(p), _) => warning!("pg_new_user_hook: {p}"),
            (None, Ok(channel)) => {
                log!(
                    "pg_new_user_hook: delivering to {}",
                    request::redact_userinfo(&channel.target.url)
                )
            }
            (None, Err(_)) => {}
        }
        shared::set_worker_problem(problem.as_deref());
        self.problem = problem;
    }

    fn run(&mut self) {
        loop {
            if BackgroundWorker::sigterm_received() {
                self.shutdown();
                return;
            }
            if BackgroundWorker::sighup_received() {
                unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
                let settings = Settings::read();
                if settings != self.settings {
                    self.settings = settings;
                    self.configure();
                }
            }
            self.cycle();
            self.wait();
        }
    }

    /// How many events may be claimed now (0: not worth a round trip yet). Under
    /// load, claims wait until a quarter of the window is free, so each round trip
    /// carries a batch; when nothing is in flight, any due event is claimed at once.
    fn claimable(&self) -> usize {
        if self.channel.is_err() {
            return 0;
        }
        let max = self.max_in_flight();
        let free = max.saturating_sub(self.pool.in_flight());
        if self.pool.in_flight() == 0 || free >= max / 4 {
            free
        } else {
            0
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

    /// One round trip to the database: record finished attempts, claim more.
    fn cycle(&mut self) {
        if self.statistics_due.is_some_and(|due| due <= Instant::now()) {
            self.statistics_due = flush_statistics(true);
        }
        self.refresh_secrets(false);
        let arrived = self.pool.take_outcomes();
        if !arrived.is_empty() {
            if self.outcomes.is_empty() {
                self.outcomes_since = Instant::now();
            }
            self.outcomes.extend(arrived);
        }
        let timer_fired = self.next_due.is_some_and(|due| due <= Instant::now());
        let want = if self.maybe_due || timer_fired {
            self.claimable()
        } else {
            0
        };
        let record = self.record_due();
        if !record && want == 0 && self.installed && Instant::now() < self.next_purge {
            return;
        }
        let outcomes = if record {
            std::mem::take(&mut self.outcomes)
        } else {
            Vec::new()
        };
        let decisions = self.decide(outcomes);
        let purge = Instant::now() >= self.next_purge;
        let retention = self.settings.retention;
        let was_installed = self.installed;
        let in_flight: Vec<String> = self.in_flight.iter().cloned().collect();

        let (installed, claimed, next_due) = transaction(move || {
            if !was_installed && !outbox::installed() {
                return (false, Vec::new(), None);
            }
            outbox::record(&decisions);
            let claimed = if want > 0 {
                outbox::claim(want, &in_flight)
            } else {
                Vec::new()
            };
            if purge {
                outbox::purge_delivered(retention);
            }
            let next_due = if claimed.len() < want || want == 0 {
                let mut busy = in_flight;
                busy.extend(claimed.iter().map(|c| c.id.clone()));
                outbox::next_due(&busy)
            } else {
                Some(Duration::ZERO)
            };
            (true, claimed, next_due)
        });

        self.statistics_due = flush_statistics(false);
        if purge {
            self.next_purge = Instant::now() + PURGE_EVERY;
        }
        if installed != self.installed {
            self.installed = installed;
            self.report();
        }
        if !installed {
            self.maybe_due = false;
            self.next_due = None;
            return;
        }
        if want > 0 {
            self.maybe_due = claimed.len() == want;
        }
        self.next_due = next_due.map(|d| Instant::now() + d);
        for event in claimed {
            self.in_flight.insert(event.id.clone());
            self.pool.submit(Job {
                id: event.id,
                attempt: event.attempt,
                record: event.record,
                source: event.source,
                created_at: event.created_at,
            });
        }
        shared::set_in_flight(self.in_flight.len());
    }

    /// Turns outcomes into decisions (id, attempt, decision). An unsent event needs
    /// none: it is still pending and due.
    fn decide(&mut self, outcomes: Vec<Outcome>) -> Vec<(String, u32, Decision)> {
        let now = SystemTime::now();
        let mut decisions = Vec::with_capacity(outcomes.len());
        let mut first_error = None;
        let mut any_delivered = false;
        for outcome in outcomes {
            self.in_flight.remove(&outcome.id);
            if !outcome.sent {
                continue;
            }
            let decision = classify::decide(
                &outcome.result,
                outcome.attempt,
                &self.settings.retry,
                random_jitter(),
                now,
            );
            match &decision {
                Decision::Delivered { .. } => any_delivered = true,
                Decision::Retry { error, .. } | Decision::Failed { error, .. } => {
                    first_error.get_or_insert_with(|| error.clone());
                }
            }
            decisions.push((outcome.id, outcome.attempt, decision));
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
        shared::set_in_flight(self.in_flight.len());
        decisions
    }

    fn wait(&mut self) {
        let mut timeout = POLL;
        // A due event only matters when one can be claimed: with delivery paused by
        // configuration, or the in-flight window full, an overdue event would turn
        // the wait into a spin. Finished requests wake the worker through the pool.
        if let Some(due) = self.next_due.filter(|_| self.claimable() > 0) {
            timeout = timeout.min(due.saturating_duration_since(Instant::now()));
        }
        if let Some(due) = self.statistics_due {
            timeout = timeout.min(due.saturating_duration_since(Instant::now()));
        }
        if !self.outcomes.is_empty() {
            timeout = timeout.min(RECORD_DELAY.saturating_sub(self.outcomes_since.elapsed()));
        }
        if self.maybe_due && self.claimable() > 0 {
            timeout = Duration::ZERO;
        }
        let events = pg_sys::WL_LATCH_SET
            | pg_sys::WL_SOCKET_READABLE
            | pg_sys::WL_TIMEOUT
            | pg_sys::WL_EXIT_ON_PM_DEATH;
        let rc = unsafe {
            let rc = pg_sys::WaitLatchOrSocket(
                pg_sys::MyLatch,
                events as i32,
                self.pool.wake_fd(),
                timeout.as_millis().min(i64::MAX as u128) as _,
                pg_sys::PG_WAIT_EXTENSION,
            );
            pg_sys::ResetLatch(pg_sys::MyLatch);
            rc
        };
        // Woken by a commit, or the fallback poll ran out: look for due events. The
        // poll catches events whose commit woke nobody (COMMIT PREPARED, a wake-up
        // lost to a race); other timers only serve what they were set for.
        let polled = rc & pg_sys::WL_TIMEOUT as i32 != 0 && timeout == POLL;
        if rc & pg_sys::WL_LATCH_SET as i32 != 0 || polled {
            self.maybe_due = true;
        }
        pg_sys::check_for_interrupts!();
    }

    /// SIGTERM: stop claiming, record what has finished, and abandon requests still
    /// in progress after a short grace — their events stay pending and are sent
    /// again (at least once), and a fast shutdown stays fast whatever `timeout_ms` is.
    fn shutdown(&mut self) {
        let mut outcomes = std::mem::take(&mut self.outcomes);
        outcomes.extend(self.pool.stop(SHUTDOWN_GRACE.min(self.settings.timeout)));
        if !self.installed {
            return;
        }
        let decisions = self.decide(outcomes);
        transaction(move || outbox::record(&decisions));
    }
}
