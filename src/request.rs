//! Turns an outbox event into the HTTP request sent to the backend. Pure: no I/O.

use serde_json::{Map, Value};

pub const USER_AGENT: &str = concat!("pg_new_user_hook/", env!("CARGO_PKG_VERSION"));

/// Where and how to send, checked once per configuration change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub url: String,
    /// (header name, value) carrying the API key, when one is configured.
    pub api_key: Option<(String, String)>,
}

/// Checks the delivery settings. The error says what is wrong and how to fix it;
/// it never contains the API key.
pub fn target(url: &str, api_key: &str, api_key_header: &str) -> Result<Target, String> {
    let url = url.trim();
    if url.is_empty() {
        return Err("pg_new_user_hook.url is not set: new users are queued and will be delivered once it is \
             (ALTER SYSTEM SET pg_new_user_hook.url = 'https://api.example.com/users'; SELECT pg_reload_conf();)"
            .to_string());
    }
    validate_url(url).map_err(|why| {
        format!("pg_new_user_hook.url = '{}' is not a valid URL: {why}; new users are queued until it is fixed", redact_userinfo(url))
    })?;
    let api_key = if api_key.is_empty() {
        None
    } else {
        let name = api_key_header.trim();
        if ureq::http::HeaderName::from_bytes(name.as_bytes()).is_err() {
            return Err(format!(
                "pg_new_user_hook.api_key_header = '{}' is not a valid HTTP header name (e.g. X-API-Key)",
                excerpt_ascii(name)
            ));
        }
        if ureq::http::HeaderValue::from_str(api_key).is_err() {
            return Err(
                "pg_new_user_hook.api_key contains characters not allowed in an HTTP header \
                 (control characters or non-ASCII); set it to the plain key"
                    .to_string(),
            );
        }
        Some((name.to_string(), api_key.to_string()))
    };
    Ok(Target {
        url: url.to_string(),
        api_key,
    })
}

fn validate_url(url: &str) -> Result<(), String> {
    if !url.contains("://") {
        return Err("it has no scheme, write it as http://host/path or https://host/path".into());
    }
    let uri: ureq::http::Uri = url.parse().map_err(|e| format!("{e}"))?;
    match uri.scheme_str() {
        Some("http") | Some("https") => {}
        Some(other) => {
            return Err(format!(
                "scheme '{other}' is not supported, use http:// or https://"
            ))
        }
        None => {
            return Err(
                "it has no scheme, write it as http://host/path or https://host/path".into(),
            )
        }
    }
    match uri.host() {
        Some(host) if !host.is_empty() => Ok(()),
        _ => Err("it has no host".into()),
    }
}

/// The URL with any `user:password@` removed, for messages.
pub fn redact_userinfo(url: &str) -> String {
    if let Some(scheme_end) = url.find("://") {
        let rest = &url[scheme_end + 3..];
        let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        if let Some(at) = rest[..authority_end].rfind('@') {
            return format!("{}://***@{}", &url[..scheme_end], &rest[at + 1..]);
        }
    }
    url.to_string()
}

fn excerpt_ascii(s: &str) -> String {
    s.chars()
        .take(64)
        .map(|c| {
            if c.is_ascii_graphic() || c == ' ' {
                c
            } else {
                '?'
            }
        })
        .collect()
}

/// The JSON body for an event, from the snapshot the trigger stored:
/// `{"id": "<uuid>", "email": "<email>" | null}`.
pub fn body(record: &str) -> Result<String, String> {
    let record: Value =
        serde_json::from_str(record).map_err(|e| format!("stored event is not valid JSON: {e}"))?;
    let id = record.get("id").cloned().unwrap_or(Value::Null);
    if !id.is_string() {
        return Err("stored event has no user id".into());
    }
    let mut out = Map::new();
    out.insert("id".into(), id);
    out.insert(
        "email".into(),
        record.get("email").cloned().unwrap_or(Value::Null),
    );
    Ok(Value::Object(out).to_string())
}

/// All request headers except those ureq sets itself (Content-Length, Host).
pub fn headers(target: &Target, event_id: &str, timestamp: u64) -> Vec<(String, String)> {
    let mut headers = vec![
        ("Content-Type".to_string(), "application/json".to_string()),
        ("User-Agent".to_string(), USER_AGENT.to_string()),
        ("webhook-id".to_string(), event_id.to_string()),
        ("webhook-timestamp".to_string(), timestamp.to_string()),
    ];
    if let Some((name, value)) = &target.api_key {
        headers.push((name.clone(), value.clone()));
    }
    headers
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_has_id_and_email_only() {
        let record = r#"{"id":"8d8c5f8e-4b6a-4f55-9d8c-2b4c5d6e7f80","email":"a@example.com","phone":null,"role":"authenticated"}"#;
        let body: Value = serde_json::from_str(&body(record).unwrap()).unwrap();
        assert_eq!(
            body,
            serde_json::json!({"id": "8d8c5f8e-4b6a-4f55-9d8c-2b4c5d6e7f80", "email": "a@example.com"})
        );
    }

    #[test]
    fn phone_users_have_null_email() {
        let body: Value =
            serde_json::from_str(&body(r#"{"id":"x","email":null}"#).unwrap()).unwrap();
        assert_eq!(body["email"], Value::Null);
        let body: Value = serde_json::from_str(&body_of(r#"{"id":"x"}"#)).unwrap();
        assert_eq!(body["email"], Value::Null);
    }

    fn body_of(record: &str) -> String {
        body(record).unwrap()
    }

    #[test]
    fn unusual_emails_survive_json_escaping() {
        let email = "Zoë \"quoted\" \\ back@例え.jp";
        let record = serde_json::json!({"id": "x", "email": email}).to_string();
        let body: Value = serde_json::from_str(&body_of(&record)).unwrap();
        assert_eq!(body["email"], email);
    }

    #[test]
    fn broken_records_are_reported() {
        assert!(body("not json").unwrap_err().contains("not valid JSON"));
        assert!(body(r#"{"email":"a@b"}"#)
            .unwrap_err()
            .contains("no user id"));
    }

    #[test]
    fn headers_carry_event_id_timestamp_and_key() {
        let t = target("http://127.0.0.1:3000/users", "s3cret", "X-API-Key").unwrap();
        let h = headers(&t, "evt-1", 1_700_000_000);
        let get = |n: &str| h.iter().find(|(k, _)| k == n).map(|(_, v)| v.as_str());
        assert_eq!(get("Content-Type"), Some("application/json"));
        assert_eq!(get("User-Agent"), Some(USER_AGENT));
        assert_eq!(get("webhook-id"), Some("evt-1"));
        assert_eq!(get("webhook-timestamp"), Some("1700000000"));
        assert_eq!(get("X-API-Key"), Some("s3cret"));
        assert!(USER_AGENT.starts_with("pg_new_user_hook/"));
    }

    #[test]
    fn no_key_header_without_a_key() {
        let t = target("http://127.0.0.1/users", "", "X-API-Key").unwrap();
        assert!(headers(&t, "e", 1).iter().all(|(k, _)| k != "X-API-Key"));
    }

    #[test]
    fn custom_key_header() {
        let t = target("https://api.example.com/users", "k", "Authorization").unwrap();
        assert_eq!(t.api_key, Some(("Authorization".into(), "k".into())));
    }

    #[test]
    fn empty_url_says_events_wait() {
        let err = target("  ", "", "X-API-Key").unwrap_err();
        assert!(err.contains("not set") && err.contains("queued"), "{err}");
    }

    #[test]
    fn malformed_urls_are_explained() {
        for (url, why) in [
            ("localhost:3000/users", "scheme"),
            ("ftp://example.com/users", "scheme 'ftp'"),
            ("http://", "not a valid URL"),
            ("http://exa mple.com/", "not a valid URL"),
        ] {
            let err = target(url, "", "X-API-Key").unwrap_err();
            assert!(err.contains(why), "{url}: {err}");
            assert!(err.contains("pg_new_user_hook.url"), "{url}: {err}");
        }
    }

    #[test]
    fn errors_never_contain_credentials() {
        let err = target("gopher://user:hunter2@example.com/", "s3cret", "X-API-Key").unwrap_err();
        assert!(!err.contains("hunter2") && !err.contains("s3cret"), "{err}");
        let err = target("http://127.0.0.1/", "bad\nkey", "X-API-Key").unwrap_err();
        assert!(!err.contains("bad\nkey"), "{err}");
        let err = target("http://127.0.0.1/", "k", "X API Key").unwrap_err();
        assert!(err.contains("api_key_header"), "{err}");
    }

    #[test]
    fn redact_userinfo_keeps_host_and_path() {
        assert_eq!(
            redact_userinfo("https://u:p@h.example/x@y"),
            "https://***@h.example/x@y"
        );
        assert_eq!(
            redact_userinfo("https://h.example/x@y"),
            "https://h.example/x@y"
        );
    }
}
