//! The circuit breaker: a backend that keeps failing gets one probe at a time, on
//! a growing interval, instead of the whole backlog; its first real answer closes
//! the circuit and the backlog drains at full speed.
//!
//! Pure state: the worker feeds it what each attempt said about the backend and
//! asks it how much may be sent.

use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Policy {
    /// Consecutive failed attempts that open the circuit; 0: never.
    pub failures: u32,
    /// Wait before the first probe; doubles per failed probe...
    pub first_probe: Duration,
    /// ...up to this.
    pub max_probe: Duration,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Delivering normally.
    Closed,
    /// One probe is on its way.
    HalfOpen,
    /// Holding back until the next probe.
    Open,
}

impl State {
    /// As published to the metrics (`backend_state`): 0 closed, 1 half-open, 2 open.
    pub fn gauge(self) -> i32 {
        match self {
            State::Closed => 0,
            State::HalfOpen => 1,
            State::Open => 2,
        }
    }
}

/// What may be sent now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Allowance {
    All,
    /// One event, whenever it is due: it asks whether the backend is back.
    Probe,
    Nothing,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transition {
    Opened,
    Closed,
}

#[derive(Debug)]
pub struct Breaker {
    state: State,
    consecutive: u32,
    interval: Duration,
    next_probe: Option<Instant>,
    probe: Option<String>,
}

impl Breaker {
    pub fn new() -> Breaker {
        Breaker {
            state: State::Closed,
            consecutive: 0,
            interval: Duration::ZERO,
            next_probe: None,
            probe: None,
        }
    }

    pub fn state(&self) -> State {
        self.state
    }

    /// Takes in what one attempt said: `up` is true for any answer that is not
    /// worth a retry (2xx, and also a 400: the backend is there), false for a
    /// retryable failure (5xx, 429, a timeout, a refused connection). A failure's
    /// `Retry-After` (`not_before`) delays the next probe at least that long.
    pub fn observe(
        &mut self,
        policy: &Policy,
        id: &str,
        up: bool,
        not_before: Option<Duration>,
        now: Instant,
    ) -> Option<Transition> {
        if up {
            self.consecutive = 0;
            if self.state == State::Closed {
                return None;
            }
            self.close();
            return Some(Transition::Closed);
        }
        match self.state {
            State::Closed => {
                self.consecutive += 1;
                if policy.failures == 0 || self.consecutive < policy.failures {
                    return None;
                }
                self.interval = policy.first_probe.min(policy.max_probe);
                self.open(now, not_before);
                Some(Transition::Opened)
            }
            State::HalfOpen if self.probe.as_deref() == Some(id) => {
                self.interval = (self.interval * 2).min(policy.max_probe);
                self.open(now, not_before);
                None
            }
            // Requests that were on the wire when the circuit opened.
            _ => None,
        }
    }

    /// Opens a closed circuit: the sending threads counted the failures first.
    pub fn trip(&mut self, policy: &Policy, now: Instant) -> Option<Transition> {
        if self.state != State::Closed || policy.failures == 0 {
            return None;
        }
        self.interval = policy.first_probe.min(policy.max_probe);
        self.open(now, None);
        Some(Transition::Opened)
    }

    /// A probe that never reached the backend (the pool stopped): probe again later.
    pub fn probe_lost(&mut self, id: &str, now: Instant) {
        if self.state == State::HalfOpen && self.probe.as_deref() == Some(id) {
            self.open(now, None);
        }
    }

    /// The probe was answered by a target replaced while it was on its way (a new
    /// key, timeout or URL): the answer says nothing of the current one, which is
    /// probed at once. Without this, the circuit would stay half-open for ever.
    pub fn probe_stale(&mut self, id: &str, now: Instant) {
        if self.state == State::HalfOpen && self.probe.as_deref() == Some(id) {
            self.state = State::Open;
            self.probe = None;
            self.next_probe = Some(now);
        }
    }

    pub fn allowance(&self, now: Instant) -> Allowance {
        match self.state {
            State::Closed => Allowance::All,
            State::Open if self.next_probe.is_some_and(|at| at <= now) => Allowance::Probe,
            State::Open | State::HalfOpen => Allowance::Nothing,
        }
    }

    /// The event claimed as the probe is on its way.
    pub fn probe_sent(&mut self, id: &str) {
        if self.state == State::Open {
            self.state = State::HalfOpen;
            self.probe = Some(id.to_string());
        }
    }

    /// When the next probe may go (None unless open).
    pub fn next_probe(&self) -> Option<Instant> {
        (self.state == State::Open)
            .then_some(self.next_probe)
            .flatten()
    }

    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// The breaker was switched off (`breaker_failures = 0`): deliver normally.
    pub fn reset(&mut self) -> Option<Transition> {
        let was_closed = self.state == State::Closed;
        self.consecutive = 0;
        self.close();
        (!was_closed).then_some(Transition::Closed)
    }

    fn open(&mut self, now: Instant, not_before: Option<Duration>) {
        self.state = State::Open;
        self.probe = None;
        self.next_probe = Some(now + self.interval.max(not_before.unwrap_or_default()));
    }

    fn close(&mut self) {
        self.state = State::Closed;
        self.probe = None;
        self.next_probe = None;
        self.interval = Duration::ZERO;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: Policy = Policy {
        failures: 3,
        first_probe: Duration::from_secs(1),
        max_probe: Duration::from_secs(30),
    };

    fn opened(now: Instant) -> Breaker {
        let mut b = Breaker::new();
        for id in ["a", "b"] {
            assert_eq!(b.observe(&POLICY, id, false, None, now), None);
        }
        assert_eq!(
            b.observe(&POLICY, "c", false, None, now),
            Some(Transition::Opened)
        );
        b
    }

    #[test]
    fn consecutive_failures_open_the_circuit_and_a_success_in_between_starts_over() {
        let now = Instant::now();
        let mut b = Breaker::new();
        b.observe(&POLICY, "a", false, None, now);
        b.observe(&POLICY, "b", false, None, now);
        b.observe(&POLICY, "c", true, None, now);
        b.observe(&POLICY, "d", false, None, now);
        b.observe(&POLICY, "e", false, None, now);
        assert_eq!(b.state(), State::Closed);
        assert_eq!(b.allowance(now), Allowance::All);
        assert_eq!(
            b.observe(&POLICY, "f", false, None, now),
            Some(Transition::Opened)
        );
        assert_eq!(b.state(), State::Open);
        assert_eq!(b.allowance(now), Allowance::Nothing);
    }

    #[test]
    fn an_open_circuit_sends_one_probe_at_a_time_on_a_doubling_interval_up_to_the_maximum() {
        let start = Instant::now();
        let mut b = opened(start);
        let mut now = start;
        let mut waits = Vec::new();
        for n in 0..8 {
            let at = b.next_probe().unwrap();
            waits.push(at - now);
            assert_eq!(
                b.allowance(at - Duration::from_millis(1)),
                Allowance::Nothing
            );
            assert_eq!(b.allowance(at), Allowance::Probe);
            let id = format!("probe-{n}");
            b.probe_sent(&id);
            assert_eq!(b.state(), State::HalfOpen);
            assert_eq!(
                b.allowance(at + Duration::from_secs(3600)),
                Allowance::Nothing
            );
            // A late failure of another event changes nothing; the probe's does.
            assert_eq!(b.observe(&POLICY, "late", false, None, at), None);
            assert_eq!(b.state(), State::HalfOpen);
            now = at + Duration::from_millis(10);
            assert_eq!(b.observe(&POLICY, &id, false, None, now), None);
            assert_eq!(b.state(), State::Open);
        }
        let secs: Vec<u64> = waits.iter().map(|w| w.as_secs()).collect();
        assert_eq!(secs, [1, 2, 4, 8, 16, 30, 30, 30]);
    }

    #[test]
    fn any_answer_from_the_backend_closes_the_circuit() {
        let now = Instant::now();
        let mut b = opened(now);
        // A request that was on the wire when the circuit opened comes back fine.
        assert_eq!(
            b.observe(&POLICY, "late", true, None, now),
            Some(Transition::Closed)
        );
        assert_eq!(b.allowance(now), Allowance::All);

        let mut b = opened(now);
        let at = b.next_probe().unwrap();
        b.probe_sent("p");
        assert_eq!(b.state(), State::HalfOpen);
        assert_eq!(
            b.observe(&POLICY, "p", true, None, at),
            Some(Transition::Closed)
        );
        assert_eq!(b.state(), State::Closed);
        // Closing starts the count over.
        b.observe(&POLICY, "x", false, None, at);
        b.observe(&POLICY, "y", false, None, at);
        assert_eq!(b.state(), State::Closed);
    }

    #[test]
    fn zero_failures_means_never_open_and_reset_closes() {
        let now = Instant::now();
        let off = Policy {
            failures: 0,
            ..POLICY
        };
        let mut b = Breaker::new();
        for _ in 0..1000 {
            assert_eq!(b.observe(&off, "a", false, None, now), None);
        }
        assert_eq!(b.state(), State::Closed);
        let mut b = opened(now);
        assert_eq!(b.reset(), Some(Transition::Closed));
        assert_eq!(b.reset(), None);
    }

    #[test]
    fn a_trip_opens_a_closed_circuit_only() {
        let now = Instant::now();
        let mut b = Breaker::new();
        assert_eq!(b.trip(&POLICY, now), Some(Transition::Opened));
        assert_eq!(b.next_probe().unwrap() - now, Duration::from_secs(1));
        assert_eq!(b.trip(&POLICY, now), None);
        let off = Policy {
            failures: 0,
            ..POLICY
        };
        assert_eq!(Breaker::new().trip(&off, now), None);
    }

    #[test]
    fn a_retry_after_delays_the_next_probe() {
        let now = Instant::now();
        let mut b = Breaker::new();
        b.observe(&POLICY, "a", false, None, now);
        b.observe(&POLICY, "b", false, None, now);
        let wait = Some(Duration::from_secs(120));
        assert_eq!(
            b.observe(&POLICY, "c", false, wait, now),
            Some(Transition::Opened)
        );
        assert_eq!(b.next_probe().unwrap() - now, Duration::from_secs(120));
    }

    #[test]
    fn a_lost_probe_is_sent_again_after_the_same_interval() {
        let now = Instant::now();
        let mut b = opened(now);
        let at = b.next_probe().unwrap();
        b.probe_sent("p");
        b.probe_lost("p", at);
        assert_eq!(b.state(), State::Open);
        assert_eq!(b.next_probe().unwrap() - at, Duration::from_secs(1));
    }

    #[test]
    fn a_probe_answered_by_a_replaced_target_is_sent_again_at_once() {
        let now = Instant::now();
        let mut b = opened(now);
        let at = b.next_probe().unwrap();
        b.probe_sent("p");
        // Another event's stale answer changes nothing.
        b.probe_stale("q", at);
        assert_eq!(b.state(), State::HalfOpen);
        b.probe_stale("p", at);
        assert_eq!(b.state(), State::Open);
        assert_eq!(b.allowance(at), Allowance::Probe);
        // The next probe's answer decides as usual.
        b.probe_sent("r");
        assert_eq!(
            b.observe(&POLICY, "r", true, None, at),
            Some(Transition::Closed)
        );
    }
}
