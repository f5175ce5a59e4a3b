//! The worker's place in the log, in memory. Pure: no I/O.
//!
//! The log is read in windows: the events of the transactions that committed between
//! the end of the previous window and a snapshot taken when the window is opened,
//! read in chunks in commit order. An event read is sent from memory; it is resolved
//! when delivered (a done row lists it), or when it goes into the outbox as an
//! exception (a retry, a dead letter, or held behind an earlier event of its user
//! that is in the outbox). The stored position moves past a window once every event
//! of it and of the windows before it is resolved, in the transaction that records
//! the last of them. So a crash sends again only the events that were unresolved:
//! those in flight, and those read and not sent yet.
//!
//! A user's events go out one at a time, in commit order: an event read while an
//! earlier one of its user is unresolved waits (parked) behind it; when the earlier
//! one goes into the outbox to be retried, the later ones follow it there.

use crate::model::event::Event;
use std::collections::{HashMap, VecDeque};

/// An event read from the log.
#[derive(Clone, Debug)]
pub struct LogEvent {
    pub event: Event,
    pub user_id: String,
    /// Its place in commit order (the capture's WAL position).
    pub seq: i64,
    /// The log segment it is in (0: log_0, 1: log_1): done rows go beside it.
    pub segment: u8,
    /// The window it was read in.
    pub window: i64,
}

/// How an event read from the log was resolved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resolution {
    /// Delivered: the user's next event may go.
    Delivered,
    /// Given up on (a dead letter): the user's next event may go, as in the outbox.
    Failed,
    /// To be retried from the outbox: the user's later events follow it there.
    Retried,
}

/// Where to store the position: every event visible in `snapshot` is resolved, and
/// `number` is the window the next read after a restart counts as.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Position {
    pub snapshot: String,
    pub number: i64,
    /// The number the stored position has now: stored only if it still has it (else
    /// the position was changed by someone else, and what is in memory is stale).
    pub was: i64,
}

/// The window being read in chunks: its end, and where the last chunk ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reading {
    pub number: i64,
    /// Where the window starts (None: at the start of the log).
    pub start: Option<String>,
    /// Its end (None: a window to open, ending where the read is made).
    pub end: Option<String>,
    pub after: Option<(i64, String)>,
    /// Read right after the position was loaded: events the done rows of the open
    /// windows list are delivered already, and skipped.
    pub resuming: bool,
}

struct Open {
    number: i64,
    end: String,
    /// All its chunks are read.
    read: bool,
    unresolved: usize,
}

/// The windows read and not resolved, and the events in memory.
#[derive(Default)]
pub struct Windows {
    loaded: bool,
    /// Where the next window starts (None: from the start of the log).
    start: Option<String>,
    /// The stored position's window number, and the next window's.
    stored: i64,
    next: i64,
    open: VecDeque<Open>,
    /// The window being read, if its last chunk is not read yet.
    reading: Option<Reading>,
    resuming: bool,
    /// Unresolved events by id, and per user in commit order.
    events: HashMap<String, LogEvent>,
    users: HashMap<String, VecDeque<String>>,
    /// Events to send: each the first unresolved event of its user, not in flight.
    ready: VecDeque<String>,
    in_flight: usize,
    to_store: Option<Position>,
}

impl Windows {
    pub fn new() -> Windows {
        Windows::default()
    }

    /// Whether the stored position is known (else it is to be loaded first).
    pub fn loaded(&self) -> bool {
        self.loaded
    }

    /// Starts over from the stored position: at start, and when the stored position
    /// turned out to differ from what is in memory. Everything in memory is dropped:
    /// unresolved events are read again (those in flight are sent again).
    pub fn load(&mut self, snapshot: Option<String>, number: i64) {
        *self = Windows {
            loaded: true,
            start: snapshot,
            stored: number,
            next: number,
            resuming: true,
            ..Windows::default()
        };
    }

    /// Forgets everything: the position is to be loaded again.
    pub fn reset(&mut self) {
        *self = Windows::default();
    }

    /// The read to do next: the next chunk of the window being read, or a new window.
    pub fn next_read(&self) -> Reading {
        self.reading.clone().unwrap_or(Reading {
            number: self.next,
            start: self.start.clone(),
            end: None,
            after: None,
            resuming: self.resuming,
        })
    }

    /// Where the window to open starts.
    #[cfg(test)]
    pub fn start(&self) -> Option<&str> {
        self.start.as_deref()
    }

    /// Whether a window is being read (its next chunk should be read before new
    /// events are waited for).
    pub fn reading(&self) -> bool {
        self.reading.is_some()
    }

    /// Takes in a chunk read: `events` in commit order, `end` the window's end,
    /// `last` the chunk's last (seq, id) among all it scanned (also those skipped or
    /// put in the outbox), and whether the window has more (`full`). An empty first
    /// chunk opens no window.
    pub fn add_chunk(
        &mut self,
        reading: &Reading,
        end: String,
        events: Vec<LogEvent>,
        last: Option<(i64, String)>,
        full: bool,
    ) {
        debug_assert_eq!(self.next_read().number, reading.number);
        if reading.end.is_none() {
            if last.is_none() {
                return; // nothing committed since the window before
            }
            self.next = reading.number + 1;
            self.resuming = false;
            self.start = Some(end.clone());
            self.open.push_back(Open {
                number: reading.number,
                end: end.clone(),
                read: false,
                unresolved: 0,
            });
        }
        let number = reading.number;
        let window = self
            .open
            .iter_mut()
            .find(|w| w.number == number)
            .expect("the window being read is open");
        window.unresolved += events.len();
        window.read = !full;
        self.reading = full.then(|| Reading {
            number,
            start: reading.start.clone(),
            end: Some(end),
            after: last.or_else(|| reading.after.clone()),
            resuming: reading.resuming,
        });
        for mut event in events {
            event.window = number;
            let id = event.event.id.clone();
            let queue = self.users.entry(event.user_id.clone()).or_default();
            if queue.is_empty() {
                self.ready.push_back(id.clone());
            }
            queue.push_back(id.clone());
            self.events.insert(id, event);
        }
        self.advance();
    }

    /// Up to `n` events to send now, in the order they became ready.
    pub fn take_ready(&mut self, n: usize) -> Vec<Event> {
        let mut taken = Vec::new();
        while taken.len() < n {
            let Some(id) = self.ready.pop_front() else {
                break;
            };
            if let Some(e) = self.events.get(&id) {
                taken.push(e.event.clone());
            }
        }
        self.in_flight += taken.len();
        taken
    }

    pub fn ready(&self) -> usize {
        self.ready.len()
    }

    /// Events in memory: in flight, ready and parked.
    pub fn len(&self) -> usize {
        self.events.len()
    }

    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    /// An event handed out was not sent (its request was abandoned): it goes first.
    pub fn unsent(&mut self, id: &str) {
        if self.events.contains_key(id) {
            self.in_flight = self.in_flight.saturating_sub(1);
            self.ready.push_front(id.to_string());
        }
    }

    /// Resolves an event that was sent. Returns it, and the events of its user that
    /// go into the outbox behind it (resolved too), in commit order.
    pub fn resolve(&mut self, id: &str, how: Resolution) -> Option<(LogEvent, Vec<LogEvent>)> {
        let event = self.events.remove(id)?;
        self.in_flight = self.in_flight.saturating_sub(1);
        self.resolved(event.window);
        let mut held = Vec::new();
        let queue = self.users.get_mut(&event.user_id);
        if let Some(queue) = queue {
            // The user's first event, but for one sent again after a restart.
            if queue.front().is_some_and(|q| q == id) {
                queue.pop_front();
            } else {
                queue.retain(|q| q != id);
            }
            match how {
                Resolution::Retried => {
                    // The later ones are parked (not ready): only the first of a user is.
                    for later in queue.drain(..) {
                        if let Some(e) = self.events.remove(&later) {
                            held.push(e);
                        }
                    }
                }
                Resolution::Delivered | Resolution::Failed => {
                    if let Some(next) = queue.front() {
                        self.ready.push_back(next.clone());
                    }
                }
            }
            if queue.is_empty() {
                self.users.remove(&event.user_id);
            }
        }
        for h in &held {
            self.resolved(h.window);
        }
        self.advance();
        Some((event, held))
    }

    fn resolved(&mut self, number: i64) {
        if let Some(w) = self.open.iter_mut().find(|w| w.number == number) {
            w.unresolved -= 1;
        }
    }

    /// Moves the position to store past the windows read and resolved, oldest first.
    fn advance(&mut self) {
        while self
            .open
            .front()
            .is_some_and(|w| w.read && w.unresolved == 0)
        {
            let w = self.open.pop_front().expect("looked at");
            self.to_store = Some(Position {
                snapshot: w.end,
                number: w.number + 1,
                was: self.stored,
            });
        }
    }

    /// The position to store with the next outcomes recorded, if it moved.
    pub fn position_to_store(&self) -> Option<&Position> {
        self.to_store.as_ref()
    }

    /// The position was stored.
    pub fn stored(&mut self, position: &Position) {
        self.stored = position.number;
        if self.to_store.as_ref() == Some(position) {
            self.to_store = None;
        } else if let Some(newer) = &mut self.to_store {
            newer.was = position.number;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::event::Kind;

    fn event(id: &str, user: &str, seq: i64) -> LogEvent {
        LogEvent {
            event: Event {
                id: id.into(),
                attempt: 1,
                record: "{}".into(),
                source: "auth.users".into(),
                created_at: String::new(),
                kind: Kind::Created,
                old_record: None,
                probe: false,
            },
            user_id: user.into(),
            seq,
            segment: 0,
            window: 0,
        }
    }

    fn ids(events: &[Event]) -> Vec<&str> {
        events.iter().map(|e| e.id.as_str()).collect()
    }

    fn read(w: &mut Windows, end: &str, events: Vec<LogEvent>) {
        let r = w.next_read();
        let last = events.last().map(|e| (e.seq, e.event.id.clone()));
        w.add_chunk(&r, end.into(), events, last, false);
    }

    #[test]
    fn the_position_moves_once_every_event_of_the_window_is_resolved() {
        let mut w = Windows::new();
        w.load(None, 7);
        read(&mut w, "s1", vec![event("a", "u1", 1), event("b", "u2", 2)]);
        assert_eq!(ids(&w.take_ready(10)), ["a", "b"]);
        w.resolve("b", Resolution::Delivered);
        assert_eq!(w.position_to_store(), None, "a is still in flight");
        w.resolve("a", Resolution::Delivered);
        let p = w.position_to_store().cloned().unwrap();
        assert_eq!(
            p,
            Position {
                snapshot: "s1".into(),
                number: 8,
                was: 7
            }
        );
        w.stored(&p);
        assert_eq!(w.position_to_store(), None);
        assert_eq!(w.start(), Some("s1"));
    }

    #[test]
    fn a_later_window_resolved_first_waits_for_the_earlier_one() {
        let mut w = Windows::new();
        w.load(Some("s0".into()), 0);
        read(&mut w, "s1", vec![event("a", "u1", 1)]);
        read(&mut w, "s2", vec![event("b", "u2", 2)]);
        assert_eq!(
            w.start(),
            Some("s2"),
            "the next window starts after the last read"
        );
        w.take_ready(10);
        w.resolve("b", Resolution::Delivered);
        assert_eq!(w.position_to_store(), None);
        w.resolve("a", Resolution::Retried);
        assert_eq!(w.position_to_store().unwrap().snapshot, "s2");
        assert_eq!(w.position_to_store().unwrap().number, 2);
    }

    #[test]
    fn a_users_events_go_one_at_a_time_and_follow_a_retry_into_the_outbox() {
        let mut w = Windows::new();
        w.load(None, 0);
        read(
            &mut w,
            "s1",
            vec![
                event("a1", "u1", 1),
                event("b", "u2", 2),
                event("a2", "u1", 3),
            ],
        );
        read(&mut w, "s2", vec![event("a3", "u1", 4)]);
        assert_eq!(ids(&w.take_ready(10)), ["a1", "b"], "a2 waits for a1");
        w.resolve("b", Resolution::Delivered);
        let (_, held) = w.resolve("a1", Resolution::Retried).unwrap();
        let held: Vec<&str> = held.iter().map(|e| e.event.id.as_str()).collect();
        assert_eq!(held, ["a2", "a3"], "the later events follow, in order");
        assert!(w.is_empty());
        assert_eq!(w.position_to_store().unwrap().snapshot, "s2");
    }

    #[test]
    fn a_delivered_or_dead_lettered_event_lets_its_users_next_go() {
        let mut w = Windows::new();
        w.load(None, 0);
        read(
            &mut w,
            "s1",
            vec![
                event("a1", "u1", 1),
                event("a2", "u1", 2),
                event("a3", "u1", 3),
            ],
        );
        assert_eq!(ids(&w.take_ready(10)), ["a1"]);
        w.resolve("a1", Resolution::Delivered);
        assert_eq!(ids(&w.take_ready(10)), ["a2"]);
        w.resolve("a2", Resolution::Failed);
        assert_eq!(ids(&w.take_ready(10)), ["a3"]);
    }

    #[test]
    fn an_unsent_event_goes_first_again() {
        let mut w = Windows::new();
        w.load(None, 0);
        read(&mut w, "s1", vec![event("a", "u1", 1), event("b", "u2", 2)]);
        assert_eq!(ids(&w.take_ready(1)), ["a"]);
        w.unsent("a");
        assert_eq!(ids(&w.take_ready(2)), ["a", "b"]);
    }

    #[test]
    fn a_window_read_in_chunks_closes_after_its_last_chunk() {
        let mut w = Windows::new();
        w.load(None, 0);
        let r = w.next_read();
        w.add_chunk(
            &r,
            "s1".into(),
            vec![event("a", "u1", 1)],
            Some((1, "a".into())),
            true,
        );
        assert_eq!(
            w.start(),
            Some("s1"),
            "a new window would start at this one's end"
        );
        assert!(w.reading());
        let r2 = w.next_read();
        assert_eq!(r2.end.as_deref(), Some("s1"));
        assert_eq!(r2.start, None, "the next chunk reads the same window");
        assert_eq!(r2.after, Some((1, "a".into())));
        w.take_ready(1);
        w.resolve("a", Resolution::Delivered);
        assert_eq!(w.position_to_store(), None, "not all of it is read");
        // A last chunk whose events all went into the outbox (held) still closes it.
        w.add_chunk(&r2, "s1".into(), vec![], Some((2, "b".into())), false);
        assert!(!w.reading());
        assert_eq!(w.position_to_store().unwrap().snapshot, "s1");
    }

    #[test]
    fn an_empty_read_opens_no_window() {
        let mut w = Windows::new();
        w.load(Some("s0".into()), 3);
        let r = w.next_read();
        assert!(r.resuming);
        w.add_chunk(&r, "s1".into(), vec![], None, false);
        assert_eq!(w.start(), Some("s0"));
        assert!(
            w.next_read().resuming,
            "still the first window since the load"
        );
        assert_eq!(w.position_to_store(), None);
    }

    #[test]
    fn a_position_stored_while_a_newer_one_waits_updates_what_the_newer_expects() {
        let mut w = Windows::new();
        w.load(None, 0);
        read(&mut w, "s1", vec![event("a", "u1", 1)]);
        w.take_ready(1);
        w.resolve("a", Resolution::Delivered);
        let first = w.position_to_store().cloned().unwrap();
        read(&mut w, "s2", vec![event("b", "u1", 2)]);
        w.take_ready(1);
        w.resolve("b", Resolution::Delivered);
        // The first store ran with the older position (a round planned before b).
        w.stored(&first);
        let p = w.position_to_store().unwrap();
        assert_eq!((p.snapshot.as_str(), p.number, p.was), ("s2", 2, 1));
    }
}
