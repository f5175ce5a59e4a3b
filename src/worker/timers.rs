//! When the worker next has something to do without being woken: the poll, the
//! purge, the queue's count, a retry; and the wait for the earliest of them.

use super::*;

/// When the worker has something to do without being woken.
pub(super) struct Timers {
    /// The earliest pending event not in flight is due.
    pub(super) due: Option<Instant>,
    /// Expired delivered events are to be purged.
    pub(super) purge: Instant,
    /// Statistics that could not be flushed yet are to be flushed.
    pub(super) statistics: Option<Instant>,
    /// A failed round is to be tried again.
    pub(super) retry_round: Option<Instant>,
    /// The queue is to be counted for the metrics (None: nothing changed).
    pub(super) gauges: Option<Instant>,
    /// The log's rotation is to go a step further (a 0.7.0 schema: its capture table
    /// is to be vacuumed, VACUUM_CAPTURED_AFTER events having been taken).
    pub(super) log_upkeep: Option<Instant>,
    /// A failed take is to be tried again.
    pub(super) retry_take: Option<Instant>,
}

impl Timers {
    pub(super) fn new() -> Timers {
        Timers {
            due: None,
            purge: Instant::now(),
            statistics: None,
            retry_round: None,
            // Published at start, so the metrics never show another life's counts.
            gauges: Some(Instant::now()),
            log_upkeep: None,
            retry_take: None,
        }
    }

    pub(super) fn reached(at: Option<Instant>, now: Instant) -> bool {
        at.is_some_and(|at| at <= now)
    }

    /// How long the worker may sleep. A timer only counts when its work can be
    /// done: with delivery paused by configuration or the in-flight window full, an
    /// overdue event, and without the extension, an overdue purge, would turn the
    /// wait into a spin (finished requests wake the worker through the pool). The
    /// fallback poll bounds every sleep.
    pub(super) fn sleep(
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
            self.log_upkeep.filter(|_| can_purge),
            self.retry_take.filter(|_| can_claim),
        ]
        .into_iter()
        .flatten()
        .map(|at| at.saturating_duration_since(now))
        .fold(POLL, Duration::min)
    }
}
