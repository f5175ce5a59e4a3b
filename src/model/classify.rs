//! What an attempt's result means for the event: delivered, retried later, or failed.

use crate::model::backoff::{self, Policy};
use std::time::{Duration, SystemTime};

/// What one HTTP attempt produced, as seen by the sending thread.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Attempt {
    /// The backend answered with this status.
    Response {
        status: u16,
        reason: String,
        /// Raw `Retry-After` header, if any.
        retry_after: Option<String>,
        /// `Location` header of a redirect, if any.
        location: Option<String>,
        /// The start of the response body, for `last_error`.
        body_excerpt: String,
    },
    /// No usable answer: connection refused, DNS failure, TLS error...
    Transport(String),
    /// No answer within `timeout_ms`.
    Timeout(String),
    /// The event cannot be turned into a request (it will never work).
    Unsendable(String),
}

/// The outcome recorded in the outbox.
#[derive(Clone, Debug, PartialEq)]
pub enum Decision {
    Delivered {
        status: u16,
    },
    Retry {
        status: Option<u16>,
        error: String,
        delay: Duration,
    },
    Failed {
        status: Option<u16>,
        error: String,
    },
}

/// Longest `Retry-After` honoured; a larger one is treated as this.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(24 * 3600);

pub fn is_retryable_status(status: u16) -> bool {
    matches!(status, 408 | 425 | 429) || (500..600).contains(&status)
}

/// Decides the fate of an event after attempt number `attempt` (1-based).
pub fn decide(
    result: &Attempt,
    attempt: u32,
    policy: &Policy,
    jitter: f64,
    now: SystemTime,
) -> Decision {
    let (status, error, retry_after) = match result {
        Attempt::Response { status, .. } if (200..300).contains(status) => {
            return Decision::Delivered { status: *status };
        }
        Attempt::Response {
            status,
            reason,
            retry_after,
            location,
            body_excerpt,
        } => {
            let mut error = format!("HTTP {status}");
            if !reason.is_empty() {
                error.push(' ');
                error.push_str(reason);
            }
            if (300..400).contains(status) {
                error.push_str(
                    ": redirects are not followed; set pg_new_user_hook.url to the final address",
                );
                if let Some(location) = location {
                    error.push_str(&format!(" (Location: {})", excerpt(location, 200)));
                }
            } else if !body_excerpt.is_empty() {
                error.push_str(": ");
                error.push_str(body_excerpt);
            }
            if !is_retryable_status(*status) {
                return Decision::Failed {
                    status: Some(*status),
                    error,
                };
            }
            let wait = retry_after
                .as_deref()
                .and_then(|v| parse_retry_after(v, now));
            (Some(*status), error, wait)
        }
        Attempt::Transport(error) | Attempt::Timeout(error) => (None, error.clone(), None),
        Attempt::Unsendable(error) => {
            return Decision::Failed {
                status: None,
                error: error.clone(),
            }
        }
    };
    if attempt >= policy.max_attempts {
        return Decision::Failed {
            status,
            error: format!(
                "{error} (gave up after {attempt} attempts: pg_new_user_hook.max_attempts)"
            ),
        };
    }
    let backoff = backoff::delay(policy, attempt, jitter);
    let delay = match retry_after {
        Some(wait) => backoff.max(wait.min(MAX_RETRY_AFTER)),
        None => backoff,
    };
    Decision::Retry {
        status,
        error,
        delay,
    }
}

/// The class an attempt is counted under in the metrics (`attempts_<class>_total`);
/// None for an event that could not be turned into a request.
pub fn class(result: &Attempt) -> Option<&'static str> {
    match result {
        Attempt::Response { status, .. } => Some(match status {
            200..=299 => "2xx",
            300..=399 => "3xx",
            500..=599 => "5xx",
            _ => "4xx",
        }),
        Attempt::Timeout(_) => Some("timeout"),
        Attempt::Transport(_) => Some("network"),
        Attempt::Unsendable(_) => None,
    }
}

/// What an attempt says about the backend, for the circuit breaker: true when it
/// answered in a way a retry would not change (2xx, 3xx, most 4xx), false for a
/// retryable failure, None when the request was never made.
pub fn backend_up(result: &Attempt) -> Option<bool> {
    match result {
        Attempt::Response { status, .. } => Some(!is_retryable_status(*status)),
        Attempt::Timeout(_) | Attempt::Transport(_) => Some(false),
        Attempt::Unsendable(_) => None,
    }
}

/// How long the backend asked to be left alone (`Retry-After`), if it did.
pub fn retry_after(result: &Attempt, now: SystemTime) -> Option<Duration> {
    match result {
        Attempt::Response {
            retry_after: Some(value),
            ..
        } => parse_retry_after(value, now).map(|wait| wait.min(MAX_RETRY_AFTER)),
        _ => None,
    }
}

/// `Retry-After` is either delta-seconds or an HTTP-date (RFC 9110 §10.2.3).
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// At most `max` characters of `text`, on a character boundary, control characters flattened.
pub fn excerpt(text: &str, max: usize) -> String {
    let mut out: String = text
        .chars()
        .take(max)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if text.chars().count() > max {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        Policy {
            base: Duration::from_secs(1),
            max: Duration::from_secs(3600),
            max_attempts: 5,
        }
    }

    fn response(status: u16) -> Attempt {
        Attempt::Response {
            status,
            reason: String::new(),
            retry_after: None,
            location: None,
            body_excerpt: String::new(),
        }
    }

    fn decide_now(result: &Attempt, attempt: u32) -> Decision {
        decide(result, attempt, &policy(), 0.0, SystemTime::now())
    }

    #[test]
    fn attempts_are_counted_by_class_and_only_retryable_failures_say_the_backend_is_down() {
        let cases = [
            (response(204), Some("2xx"), Some(true)),
            (response(301), Some("3xx"), Some(true)),
            (response(400), Some("4xx"), Some(true)),
            (response(429), Some("4xx"), Some(false)),
            (response(408), Some("4xx"), Some(false)),
            (response(503), Some("5xx"), Some(false)),
            (Attempt::Timeout("t".into()), Some("timeout"), Some(false)),
            (
                Attempt::Transport("refused".into()),
                Some("network"),
                Some(false),
            ),
            (Attempt::Unsendable("bad".into()), None, None),
        ];
        for (attempt, class_, up) in cases {
            assert_eq!(class(&attempt), class_, "{attempt:?}");
            assert_eq!(backend_up(&attempt), up, "{attempt:?}");
        }
    }

    #[test]
    fn every_2xx_is_delivered() {
        for status in [200, 201, 202, 204, 299] {
            assert_eq!(
                decide_now(&response(status), 1),
                Decision::Delivered { status }
            );
        }
    }

    #[test]
    fn transient_statuses_are_retried() {
        for status in [408, 425, 429, 500, 502, 503, 504, 599] {
            match decide_now(&response(status), 1) {
                Decision::Retry {
                    status: Some(s),
                    delay,
                    ..
                } => {
                    assert_eq!(s, status);
                    assert_eq!(delay, Duration::from_secs(1));
                }
                other => panic!("{status}: {other:?}"),
            }
        }
    }

    #[test]
    fn client_errors_and_redirects_fail_at_once() {
        for status in [301, 302, 307, 400, 401, 403, 404, 409, 410, 413, 422, 100] {
            match decide_now(&response(status), 1) {
                Decision::Failed {
                    status: Some(s), ..
                } => assert_eq!(s, status),
                other => panic!("{status}: {other:?}"),
            }
        }
    }

    #[test]
    fn failure_reason_names_status_and_body() {
        let result = Attempt::Response {
            status: 400,
            reason: "Bad Request".into(),
            retry_after: None,
            location: None,
            body_excerpt: "email must be an email".into(),
        };
        match decide_now(&result, 1) {
            Decision::Failed { error, .. } => {
                assert_eq!(error, "HTTP 400 Bad Request: email must be an email")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn redirect_reason_says_what_to_do() {
        let result = Attempt::Response {
            status: 301,
            reason: "Moved Permanently".into(),
            retry_after: None,
            location: Some("https://api.example.com/users".into()),
            body_excerpt: String::new(),
        };
        match decide_now(&result, 1) {
            Decision::Failed { error, .. } => {
                assert!(error.contains("redirects are not followed"), "{error}");
                assert!(error.contains("https://api.example.com/users"), "{error}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn transport_errors_are_retried_with_backoff() {
        let result = Attempt::Transport("connection refused".into());
        match decide_now(&result, 3) {
            Decision::Retry {
                status: None,
                delay,
                error,
            } => {
                assert_eq!(delay, Duration::from_secs(4));
                assert_eq!(error, "connection refused");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn last_attempt_fails_with_the_reason() {
        match decide_now(&response(503), 5) {
            Decision::Failed {
                status: Some(503),
                error,
            } => {
                assert!(error.contains("gave up after 5 attempts"), "{error}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn unsendable_events_fail_at_once() {
        let result = Attempt::Unsendable("record is not JSON".into());
        assert!(matches!(
            decide_now(&result, 1),
            Decision::Failed { status: None, .. }
        ));
    }

    #[test]
    fn retry_after_seconds_extends_the_delay() {
        let result = Attempt::Response {
            status: 429,
            reason: String::new(),
            retry_after: Some("30".into()),
            location: None,
            body_excerpt: String::new(),
        };
        match decide_now(&result, 1) {
            Decision::Retry { delay, .. } => assert_eq!(delay, Duration::from_secs(30)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn retry_after_never_shortens_backoff() {
        let result = Attempt::Response {
            status: 503,
            reason: String::new(),
            retry_after: Some("0".into()),
            location: None,
            body_excerpt: String::new(),
        };
        match decide_now(&result, 4) {
            Decision::Retry { delay, .. } => assert_eq!(delay, Duration::from_secs(8)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn retry_after_http_date() {
        let now = httpdate::parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT").unwrap();
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:50:37 GMT", now),
            Some(Duration::from_secs(60))
        );
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:40:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon", now), None);
    }

    #[test]
    fn absurd_retry_after_is_capped_at_a_day() {
        let result = Attempt::Response {
            status: 503,
            reason: String::new(),
            retry_after: Some("99999999".into()),
            location: None,
            body_excerpt: String::new(),
        };
        match decide_now(&result, 1) {
            Decision::Retry { delay, .. } => assert_eq!(delay, MAX_RETRY_AFTER),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn excerpt_cuts_on_char_boundaries() {
        assert_eq!(excerpt("héllo\nworld", 5), "héllo…");
        assert_eq!(excerpt("a\tb", 10), "a b");
    }
}
