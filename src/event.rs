//! One event, from the moment the worker claims it to its outcome.

/// A pending event as claimed from the outbox for one delivery attempt.
#[derive(Clone, Debug)]
pub struct Event {
    /// The outbox id, sent as `webhook-id`: the same on every attempt.
    pub id: String,
    /// This attempt's number (1-based).
    pub attempt: u32,
    /// The allow-listed snapshot the trigger stored (JSON).
    pub record: String,
    /// `schema.table` the user was inserted into.
    pub source: String,
    /// When the signup committed, RFC 3339.
    pub created_at: String,
    /// Sent while the backend is down, to learn whether it is back: not held back.
    pub probe: bool,
}
