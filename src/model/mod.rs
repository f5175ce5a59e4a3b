//! Pure Rust, no PostgreSQL: what an event is and what its request looks like, how
//! it is signed, what a response means, when to retry, the circuit breaker, the
//! settings' names, what the log must not show. Unit-tested here; nothing in it
//! imports from outside `model`.

pub mod backoff;
pub mod breaker;
pub mod classify;
pub mod event;
pub mod names;
pub mod problem;
pub mod redact;
pub mod request;
pub mod sign;
pub mod window;
