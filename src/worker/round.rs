//! One round of the worker: planning it (what to claim, whether to record, purge,
//! count), running it in one transaction, and applying what came back — the
//! outcomes decided, the breaker moved, the queue counted.

use super::*;

impl Worker {
    pub(super) fn max_in_flight(&self) -> usize {
        (self.config.settings().concurrency * 32).clamp(64, 2048)
    }

    /// Jobs not yet on the wire are held back while delivery is paused or the
    /// backend is down (a probe excepted).
    pub(super) fn hold(&self) {
        let held = self.config.settings().paused
            || self.breaker.state() != crate::model::breaker::State::Closed;
        self.pool
            .trip_after(self.config.settings().breaker.failures);
        self.pool.hold(held);
    }

    /// The circuit opened or closed: tell the threads, the log and the metrics.
    pub(super) fn backend_transition(&mut self, transition: Transition) {
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
    pub(super) fn claimable(&self) -> (usize, bool) {
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

    pub(super) fn window(&self) -> usize {
        let max = self.max_in_flight();
        let free = max.saturating_sub(self.pool.in_flight());
        if self.pool.in_flight() == 0 || free >= max / 4 {
            free
        } else {
            0
        }
    }

    /// Whether the queue is empty as far as the worker knows: its last claim was not
    /// full, nothing is in flight or read and waiting, and no pending event waits for
    /// a later time (a backoff). Claimed events stay pending in the table until recorded.
    fn queue_drained(&self) -> bool {
        !self.claim_was_full
            && self.in_flight.is_empty()
            && self.windows.is_empty()
            && self.timers.due.is_none()
    }

    /// Whether something waits to be recorded: outcomes, or a move of the position.
    pub(super) fn pending_record(&self) -> bool {
        !self.unrecorded.is_empty() || self.windows.position_to_store().is_some()
    }

    /// Decides the requests the pool has finished (the breaker sees them at once)
    /// and adds them to the batch to record.
    pub(super) fn collect_outcomes(&mut self) {
        let arrived = self.pool.take_outcomes();
        if arrived.is_empty() {
            return;
        }
        let pending = self.pending_record();
        let decisions = self.decide(arrived);
        if !pending {
            self.unrecorded_since = Instant::now();
        }
        self.unrecorded.extend(decisions);
    }

    /// How long the oldest buffered outcome may wait for its batch.
    pub(super) fn record_delay(&self) -> Duration {
        if self.unrecorded.touches_outbox() {
            RECORD_OUTBOX_DELAY
        } else {
            RECORD_DELAY
        }
    }

    /// Whether decided outcomes should be recorded now: a full batch, or the oldest
    /// has waited long enough.
    pub(super) fn record_due(&self) -> bool {
        self.pending_record()
            && (self.unrecorded.outcomes() >= RECORD_BATCH
                || self.unrecorded_since.elapsed() >= self.record_delay())
    }

    /// Hands events read from the log to the sending threads, as many as the window
    /// allows (one, as a probe, while the backend is down).
    pub(super) fn send_ready(&mut self) {
        if self.windows.ready() == 0 {
            return;
        }
        let (n, probe) = self.claimable();
        for mut event in self.windows.take_ready(n) {
            event.probe = probe;
            if probe {
                self.breaker.probe_sent(&event.id);
                shared::set_backend_state(self.breaker.state().gauge());
            }
            self.in_flight.insert(event.id.clone());
            self.pool.submit(event);
        }
        shared::set_in_flight(self.in_flight.len());
    }

    /// Whether the log is to be read in this round: a commit woke the worker, or a
    /// window is being read in chunks (or the position is not loaded yet), there is
    /// room in memory, and events could go out.
    fn read_now(&self, now: Instant) -> bool {
        self.claimable().0 > 0
            && self.windows.len() < READ_AHEAD
            && self.timers.retry_take.is_none_or(|at| at <= now)
            && (self.maybe_captured || self.windows.reading() || !self.windows.loaded())
    }

    /// Whether this round's read looks for events restored without their
    /// transaction id first: at the first read, then every RESTAMP_EVERY.
    fn restamp_now(&mut self) -> bool {
        let due = self
            .restamped_at
            .is_none_or(|at| at.elapsed() >= RESTAMP_EVERY);
        if due {
            self.restamped_at = Some(Instant::now());
        }
        due
    }

    /// What this round does, or None when there is nothing worth a transaction.
    pub(super) fn plan(&mut self) -> Option<Round> {
        let now = Instant::now();
        if self.timers.retry_round.is_some_and(|at| at > now) {
            return None;
        }
        let retry_take = Timers::reached(self.timers.retry_take, now);
        // A 0.7.0 schema's capture table is taken into the outbox, then claimed from.
        let captured = self.capture == Some(Capture::Captured);
        let read = self.read_now(now);
        let take = captured && read && self.maybe_captured;
        let (claim, probe) =
            if self.maybe_due || retry_take || take || Timers::reached(self.timers.due, now) {
                self.claimable()
            } else {
                (0, false)
            };
        let read = read && !captured;
        let check_installed = self.installed != Some(true);
        // Outcomes ride along with a round that writes anyway (a claim), and precede a
        // read when they put events into the outbox; deliveries wait for their batch.
        let runs_anyway = claim > 0 || read || take || check_installed || self.release_backoff;
        let writes_anyway = claim > 0 || take || self.release_backoff;
        self.recording = self.pending_record()
            && (writes_anyway || (read && self.unrecorded.touches_outbox()) || self.record_due());
        if !runs_anyway && !self.recording {
            return None;
        }
        if (read && !self.windows.reading() && self.capture == Some(Capture::Log)) || take {
            // Commits from now on set the latch again: none is missed by the read's snapshot.
            self.maybe_captured = false;
        }
        let mut busy: Vec<String> = self.in_flight.iter().cloned().collect();
        busy.extend(self.unrecorded.outbox.iter().map(|r| r.id.clone()));
        let analyze = self
            .analyzed_at
            .is_none_or(|at| at.elapsed() >= ANALYZE_EVERY)
            .then_some(if self.backlog_in_statistics && self.queue_drained() {
                Analyze::Drained
            } else {
                Analyze::IfTaken(self.taken_since_analyze)
            });
        let record = if self.recording {
            let mut batch = self.unrecorded.clone();
            batch.position = self.windows.position_to_store().cloned();
            batch
        } else {
            Batch::default()
        };
        Some(Round {
            take,
            read: read.then(|| Read {
                load: !self.windows.loaded(),
                reading: self.windows.next_read(),
                restamp: self.restamp_now(),
            }),
            analyze,
            record,
            claim,
            probe,
            release_backoff: self.release_backoff,
            busy,
            check_installed,
        })
    }

    /// Takes in what a round found (or that it failed) and hands claims to the pool.
    pub(super) fn apply(&mut self, result: Result<RoundResult, String>) {
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
        let mut chunk = result.chunk;
        if let Some(position) = &result.stored {
            if result.position_moved {
                self.windows.stored(position);
            } else {
                // The stored position is not where this worker left it (the extension
                // was created again, or the row changed by hand): start over from it.
                // Events in memory are read again; those in flight may be sent twice.
                warning!(
                    "pg_new_user_hook: the position in new_user_hook.positions was changed by someone else: \
                     reading the log again from it"
                );
                self.windows.reset();
                // What this round read continued the stale place: read again from the new one.
                chunk = None;
            }
        }
        let taken = match &result.taken {
            None => 0,
            Some(Ok(taken)) => {
                self.timers.retry_take = None;
                self.step_outcome(Step::Take, Ok(()));
                if self.take_error.take().is_some() {
                    log!("pg_new_user_hook: reading committed events from the log succeeds again");
                }
                *taken
            }
            Some(Err(error)) => {
                // The round recorded and claimed without it; the events stay in the log, unread.
                // A repeated error is logged once (the problem says it meanwhile).
                if self.take_error.as_ref() != Some(error) {
                    warning!("pg_new_user_hook: reading committed events from the log failed, retried every {} s: {error}", RETRY_FAILED_ROUND.as_secs());
                    self.take_error = Some(error.clone());
                }
                self.step_outcome(Step::Take, Err(error));
                self.maybe_captured = true;
                self.timers.retry_take = Some(Instant::now() + RETRY_FAILED_ROUND);
                0
            }
        };
        let mut read = 0;
        let mut held = Vec::new();
        if let Some(chunked) = chunk {
            let pending = self.pending_record();
            if let Some((snapshot, number)) = chunked.loaded {
                self.windows.load(snapshot, number);
            }
            let chunk = chunked.chunk;
            if chunked.restamped > 0 {
                self.maybe_captured = true;
            }
            read = (chunk.events.len() + chunk.held.len()) as i64;
            held = chunk.held;
            self.windows.add_chunk(
                &chunked.reading,
                chunk.end,
                chunk.events,
                chunk.last,
                chunk.full,
            );
            if !pending && self.pending_record() {
                self.unrecorded_since = Instant::now();
            }
        }
        self.timers.retry_round = None;
        if result.capture.is_some() {
            self.capture = result.capture;
        }
        self.timers.statistics = flush_statistics(false);
        self.taken_since_vacuum += taken;
        // A look at the log that found events of the other segment unresolved ended
        // it; the position moving past them (a record, with nothing new read) is what
        // lets the next one empty it.
        let moved = result.position_moved && result.stored.is_some();
        if self.timers.log_upkeep.is_none() && (taken + read > 0 || moved) {
            // The log is rotated ROTATE_AFTER after the first events read, or the
            // position moved, since the last look; a capture table, vacuumed once many
            // were deleted from it.
            let log = self.capture == Some(Capture::Log);
            if log || self.taken_since_vacuum >= VACUUM_CAPTURED_AFTER {
                let delay = if log { ROTATE_AFTER } else { VACUUM_DELAY };
                self.timers.log_upkeep = Some(Instant::now() + delay);
            }
        }
        if result.analyzed {
            self.taken_since_analyze = 0;
            self.analyzed_at = Some(Instant::now());
            // Taken with a backlog waiting (the round's claim found as many due events as
            // it asked for, or claimed nothing): refresh again once it has drained.
            self.backlog_in_statistics =
                result.wanted == 0 || result.claimed.len() >= result.wanted;
        } else {
            self.taken_since_analyze += taken;
        }
        if self.installed != Some(result.installed) {
            self.installed = Some(result.installed);
            self.report();
        }
        // Recorded; or, without the extension, nothing to record into.
        if self.recording || !result.installed {
            self.unrecorded = Batch::default();
        }
        if !held.is_empty() && result.installed {
            // Into the outbox behind their user's pending event, before the next read.
            if !self.pending_record() {
                self.unrecorded_since = Instant::now();
            }
            self.unrecorded
                .log
                .extend(held.into_iter().map(|event| LogRecord {
                    event,
                    decision: None,
                    class: None,
                }));
        }
        self.release_backoff = false;
        self.count_queue_soon();
        if !result.installed {
            self.maybe_due = false;
            self.timers.due = None;
            self.windows.reset();
            return;
        }
        if result.wanted > 0 {
            // A full claim suggests more are due right now.
            self.maybe_due = result.claimed.len() >= result.wanted;
            self.claim_was_full = self.maybe_due;
        }
        if let Some(next_due) = result.next_due {
            self.timers.due = next_due.map(|d| Instant::now() + d);
        }
        for event in result.claimed {
            if event.probe {
                self.breaker.probe_sent(&event.id);
                shared::set_backend_state(self.breaker.state().gauge());
            }
            self.in_flight.insert(event.id.clone());
            self.pool.submit(event);
        }
        self.send_ready();
        shared::set_in_flight(self.in_flight.len());
    }

    /// Deletes one batch of expired delivered events; when the batch was full, the
    /// next follows right after the next round, so a large purge keeps up with the
    /// drain without holding up deliveries.
    pub(super) fn purge(&mut self) {
        let retention = self.config.settings().retention;
        let log = self.capture == Some(Capture::Log);
        match transaction(move || store::purge_delivered(retention, PURGE_BATCH, log)) {
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
    /// pending and due (one read from the log goes out again first).
    pub(super) fn decide(&mut self, outcomes: Vec<Outcome>) -> Batch {
        let now = SystemTime::now();
        let mut decisions = Batch::default();
        let mut first_error = None;
        let mut any_delivered = false;
        for outcome in outcomes {
            self.in_flight.remove(&outcome.id);
            if !outcome.sent {
                self.breaker.probe_lost(&outcome.id, Instant::now());
                self.windows.unsent(&outcome.id);
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
            let resolution = match &decision {
                Decision::Delivered { .. } => {
                    any_delivered = true;
                    Resolution::Delivered
                }
                Decision::Retry { error, .. } => {
                    first_error.get_or_insert_with(|| error.clone());
                    Resolution::Retried
                }
                Decision::Failed { error, .. } => {
                    first_error.get_or_insert_with(|| error.clone());
                    Resolution::Failed
                }
            };
            let class = classify::class(&outcome.result);
            match self.windows.resolve(&outcome.id, resolution) {
                Some((event, held)) => {
                    decisions.log.push(LogRecord {
                        event,
                        decision: Some(decision),
                        class,
                    });
                    decisions
                        .log
                        .extend(held.into_iter().map(|event| LogRecord {
                            event,
                            decision: None,
                            class: None,
                        }));
                }
                None => decisions.outbox.push(Record {
                    class,
                    id: outcome.id,
                    attempt: outcome.attempt,
                    decision,
                }),
            }
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

    /// Takes the log's rotation a step further behind the reads (a 0.7.0 schema:
    /// vacuums its capture table). While the segment to empty is held, again after a
    /// second, then less often, up to a minute; held for minutes, it is a problem
    /// (the log grows meanwhile), named until the rotation goes on.
    pub(super) fn maintain_log(&mut self) {
        let mut since = self.log_read_since.take();
        let retention = self.config.settings().retention;
        let outcome = match self.capture.unwrap_or(Capture::Outbox) {
            Capture::Log => {
                let (outcome, kept) = transaction(move || {
                    let outcome = store::rotate_log(&mut since, retention);
                    (outcome, since)
                })
                .map_or_else(|e| (Err(e), None), |(o, s)| (Ok(o), s));
                self.log_read_since = kept;
                outcome
            }
            Capture::Captured => store::vacuum_captured().map(|done| {
                if done {
                    Rotation::Done
                } else {
                    Rotation::Busy(
                        "could not obtain lock on new_user_hook.captured: autovacuum holds it",
                    )
                }
            }),
            Capture::Outbox => Ok(Rotation::Done),
        };
        if let Ok(Rotation::Busy(why)) = outcome {
            let delay = VACUUM_DELAY * 2u32.pow(self.maintenance_busy.min(6));
            self.maintenance_busy += 1;
            if self.maintenance_busy >= MAINTENANCE_BUSY_PROBLEM {
                self.step_outcome(
                    Step::Rotate,
                    Err(&format!(
                        "{why} ({} tries in a row): it cannot be emptied, and grows",
                        self.maintenance_busy
                    )),
                );
            }
            self.timers.log_upkeep = Some(Instant::now() + delay);
            return;
        }
        self.maintenance_busy = 0;
        self.timers.log_upkeep = match outcome {
            Ok(Rotation::Again) => Some(Instant::now() + ROTATE_AFTER),
            // Looked at again then, or sooner if events are read (a new retention
            // applies at the next look).
            Ok(Rotation::Wait(wait)) => {
                Some(Instant::now() + wait.min(RETENTION_LOOK) + ROTATE_AFTER)
            }
            Ok(_) => None,
            Err(ref e) => {
                warning!(
                    "pg_new_user_hook: {} failed, tried again after the next events: {e}",
                    Step::Rotate.describe()
                );
                None
            }
        };
        self.step_outcome(
            Step::Rotate,
            outcome.as_ref().map(|_| ()).map_err(String::as_str),
        );
        self.taken_since_vacuum = 0;
    }

    /// Counts the queue for the metrics within GAUGES_EVERY of the last count.
    pub(super) fn count_queue_soon(&mut self) {
        let every = GAUGES_EVERY.max(self.count_took * GAUGES_SHARE);
        let at = (self.counted_at + every).max(Instant::now());
        self.timers.gauges.get_or_insert(at);
    }

    pub(super) fn count_queue(&mut self) {
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
}

/// One round's transaction: record outcomes, read the log, claim due events, find
/// the next due.
pub(super) fn run_round(round: Round) -> RoundResult {
    if round.check_installed && !catalog::installed() {
        return RoundResult {
            installed: false,
            wanted: round.claim,
            claimed: Vec::new(),
            next_due: None,
            taken: None,
            chunk: None,
            stored: None,
            position_moved: false,
            analyzed: false,
            capture: None,
        };
    }
    let found = catalog::capture();
    let capture = Some(found);
    let position_moved = store::record(&round.record);
    if round.release_backoff {
        store::release_backoff();
    }
    // In a subtransaction of its own: a read that fails (a lock) must not stop the
    // outcomes from being recorded or the outbox's events from going out.
    let mut chunk = None;
    let taken = match (found, round.read, round.take) {
        (Capture::Log, Some(read), _) => Some(
            spi::subtransaction(move || {
                let restamped = if read.restamp { store::restamp() } else { 0 };
                let loaded = read.load.then(store::load_position);
                let reading = match &loaded {
                    Some((snapshot, number)) => Reading {
                        number: *number,
                        start: snapshot.clone(),
                        end: None,
                        after: None,
                        resuming: true,
                    },
                    None => read.reading,
                };
                let chunk = store::read_chunk(&reading);
                Chunked {
                    loaded,
                    reading,
                    chunk,
                    restamped,
                }
            })
            .map(|chunked| {
                let held = chunked.chunk.held.len() as i64;
                chunk = Some(chunked);
                held
            }),
        ),
        (Capture::Captured, _, true) => Some(spi::subtransaction(move || store::take(found))),
        _ => None,
    };
    let taken_now = taken
        .as_ref()
        .and_then(|t| t.as_ref().ok())
        .copied()
        .unwrap_or(0);
    let analyzed = round
        .analyze
        .filter(|why| match why {
            Analyze::IfTaken(before) => before + taken_now >= ANALYZE_AFTER,
            Analyze::Drained => true,
        })
        .is_some_and(|_| store::analyze_outbox());
    let claimed = if round.claim > 0 {
        store::claim(round.claim, &round.busy, round.probe)
    } else {
        Vec::new()
    };
    // The outbox is looked at again only when this round may have changed what is due
    // there: a claim, outcomes or events put into it, the backoff released.
    let look =
        round.claim > 0 || round.record.touches_outbox() || round.release_backoff || taken_now > 0;
    let next_due = if !look {
        None
    } else if round.claim > 0 && claimed.len() >= round.claim {
        Some(Some(Duration::ZERO))
    } else {
        // The events recorded above are due again by what was recorded (a retry's
        // backoff): only those still on their way are left out.
        let recorded: std::collections::HashSet<&str> =
            round.record.outbox.iter().map(|r| r.id.as_str()).collect();
        let mut busy: Vec<String> = round
            .busy
            .iter()
            .filter(|id| !recorded.contains(id.as_str()))
            .cloned()
            .collect();
        busy.extend(claimed.iter().map(|c| c.id.clone()));
        Some(store::next_due(&busy))
    };
    RoundResult {
        installed: true,
        wanted: round.claim,
        claimed,
        next_due,
        taken,
        chunk,
        stored: round.record.position.clone(),
        position_moved,
        analyzed,
        capture,
    }
}
