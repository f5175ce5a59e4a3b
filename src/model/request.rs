//! Turns an outbox event into the HTTP request sent to the backend. Pure: no I/O.

use crate::model::event::{Event, Kind};
use crate::model::names;
use crate::model::redact::redact_userinfo;
use crate::model::sign::{self, Keys};
use serde_json::{Map, Value};

pub const USER_AGENT: &str = concat!("pg_new_user_hook/", env!("CARGO_PKG_VERSION"));

/// What the body looks like (`pg_new_user_hook.payload_format`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// `{"id", "email"}`
    Minimal,
    /// The columns named in `pg_new_user_hook.fields`.
    Fields,
    /// Supabase Database Webhooks: `{"type": "INSERT", "table", "schema", "record", "old_record": null}`.
    Supabase,
    /// Standard Webhooks: `{"type": "user.created", "timestamp", "data"}`.
    Standard,
}

/// The columns of auth.users that may ever leave the database. The trigger stores
/// only these (`raw_app_meta_data` reduced to `provider` and `providers`;
/// `capture::record::record_of`).
pub const ALLOWED_FIELDS: &[&str] = &[
    "id",
    "email",
    "phone",
    "aud",
    "role",
    "created_at",
    "updated_at",
    "confirmed_at",
    "email_confirmed_at",
    "phone_confirmed_at",
    "last_sign_in_at",
    "is_anonymous",
    "is_sso_user",
    "raw_user_meta_data",
    "raw_app_meta_data",
];

/// Fields that change on their own (every sign-in, every write): a change of these
/// alone is no update to tell the backend about.
pub const BOOKKEEPING_FIELDS: &[&str] = &["updated_at", "last_sign_in_at"];

/// The fields whose committed change makes an `updated` event: what the payload
/// sends (`minimal`: the email; otherwise the chosen allow-listed fields), less
/// bookkeeping. The id never changes.
pub fn watched_fields(format: Format, fields: &[String]) -> Vec<String> {
    match format {
        Format::Minimal => vec!["email".to_string()],
        Format::Fields | Format::Supabase | Format::Standard => fields
            .iter()
            .filter(|f| f.as_str() != "id" && !BOOKKEEPING_FIELDS.contains(&f.as_str()))
            .cloned()
            .collect(),
    }
}

/// Whether two records (JSON objects as the trigger writes them) differ in any of `fields`.
pub fn differ_in(old: &str, new: &str, fields: &[String]) -> bool {
    let parse = |s: &str| serde_json::from_str::<Map<String, Value>>(s).unwrap_or_default();
    let (old, new) = (parse(old), parse(new));
    fields
        .iter()
        .any(|f| old.get(f).unwrap_or(&Value::Null) != new.get(f).unwrap_or(&Value::Null))
}

/// Parses `pg_new_user_hook.fields`: comma-separated names from [`ALLOWED_FIELDS`];
/// empty means all of them. Credentials are refused by name, with the reason.
pub fn parse_fields(list: &str) -> Result<Vec<String>, String> {
    let mut fields = Vec::new();
    for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        let lower = name.to_ascii_lowercase();
        if lower == "encrypted_password" || lower.contains("token") || lower.contains("secret") {
            return Err(format!(
                "{}: \"{name}\" is a credential and is never sent; allowed: {}",
                names::FIELDS,
                ALLOWED_FIELDS.join(", ")
            ));
        }
        if !ALLOWED_FIELDS.contains(&lower.as_str()) {
            return Err(format!(
                "{}: \"{name}\" is not a field that can be sent; allowed: {}",
                names::FIELDS,
                ALLOWED_FIELDS.join(", ")
            ));
        }
        if !fields.contains(&lower) {
            fields.push(lower);
        }
    }
    if fields.is_empty() {
        fields = ALLOWED_FIELDS.iter().map(|f| f.to_string()).collect();
    }
    Ok(fields)
}

/// The delivery settings as the sending threads need them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub url: String,
    /// (header name, value) carrying the API key, when one is configured.
    pub api_key: Option<(String, String)>,
    pub format: Format,
    pub fields: Vec<String>,
    pub signing: Keys,
}

/// Settings as read, before checking.
pub struct Config<'a> {
    pub url: &'a str,
    pub api_key: &'a str,
    pub api_key_header: &'a str,
    pub format: Format,
    pub fields: &'a str,
    pub signing_secret: &'a str,
}

/// Checks the delivery settings. The error says what is wrong and how to fix it;
/// it never contains a secret.
pub fn target(config: &Config) -> Result<Target, String> {
    let url = config.url.trim();
    if url.is_empty() {
        return Err(format!(
            "{url} is not set: new users are queued and will be delivered once it is \
             (ALTER SYSTEM SET {url} = 'https://api.example.com/users'; SELECT pg_reload_conf();)",
            url = names::URL
        ));
    }
    validate_url(url).map_err(|why| {
        format!(
            "{} = '{}' is not a valid URL: {why}; new users are queued until it is fixed",
            names::URL,
            redact_userinfo(url)
        )
    })?;
    let api_key = if config.api_key.is_empty() {
        None
    } else {
        let name = config.api_key_header.trim();
        if ureq::http::HeaderName::from_bytes(name.as_bytes()).is_err() {
            return Err(format!(
                "{} = '{}' is not a valid HTTP header name (e.g. X-API-Key)",
                names::API_KEY_HEADER,
                excerpt_ascii(name)
            ));
        }
        if ureq::http::HeaderValue::from_str(config.api_key).is_err() {
            return Err(
                "the API key contains characters not allowed in an HTTP header \
                 (control characters or non-ASCII); set it to the plain key"
                    .to_string(),
            );
        }
        Some((name.to_string(), config.api_key.to_string()))
    };
    let fields = parse_fields(config.fields)?;
    let signing = sign::parse(config.signing_secret, "the signing secret")?;
    Ok(Target {
        url: url.to_string(),
        api_key,
        format: config.format,
        fields,
        signing,
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
        Some(host) if !host.is_empty() => {}
        _ => return Err("it has no host".into()),
    }
    refuse_credentials_in_url(url)
}

/// A URL may not carry `user:password@`: every role can read the setting and the
/// server log prints it on each reload, so the secret would leak.
pub fn refuse_credentials_in_url(url: &str) -> Result<(), String> {
    if redact_userinfo(url) == url {
        return Ok(());
    }
    Err(format!(
        "{} must not contain credentials (user:password@host): every role can read this setting \
         and the server log prints it; send the key in a header instead, from a Vault secret \
         named by {} or from the api_key setting (superusers only), in the header {} names",
        names::URL,
        names::API_KEY_SECRET,
        names::API_KEY_HEADER
    ))
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

/// One HTTP request, ready to send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub method: &'static str,
    pub url: String,
    /// None: a request without a body (a REST `DELETE`).
    pub body: Option<String>,
}

/// The request for an event, in the configured format. `minimal` and `fields` speak
/// REST to a users resource (created: `POST {url}`, updated: `PATCH {url}/{id}`,
/// deleted: `DELETE {url}/{id}` without a body); `supabase` and `standard` POST an
/// envelope that names the change.
pub fn build(target: &Target, event: &Event) -> Result<Request, String> {
    let record = object(&event.record)?;
    let Some(user_id) = record.get("id").and_then(Value::as_str) else {
        return Err("stored event has no user id".into());
    };
    let old_record = match &event.old_record {
        Some(old) => Some(object(old)?),
        None => None,
    };
    let pick = |record: &Map<String, Value>, names: &[String]| -> Value {
        let mut out = Map::new();
        for name in names {
            out.insert(
                name.clone(),
                record.get(name).cloned().unwrap_or(Value::Null),
            );
        }
        Value::Object(out)
    };
    let rest = |fields: &[String]| match event.kind {
        Kind::Created => ("POST", target.url.clone(), Some(pick(&record, fields))),
        Kind::Updated => (
            "PATCH",
            item_url(&target.url, user_id),
            Some(pick(&record, fields)),
        ),
        Kind::Deleted => ("DELETE", item_url(&target.url, user_id), None),
    };
    let (method, url, body) = match target.format {
        Format::Minimal => rest(&["id".to_string(), "email".to_string()]),
        Format::Fields => rest(&target.fields),
        Format::Supabase => {
            let (schema, table) = event
                .source
                .split_once('.')
                .unwrap_or(("auth", event.source.as_str()));
            // As Database Webhooks send them: a deletion has only the old record.
            let (kind, new, old) = match event.kind {
                Kind::Created => ("INSERT", pick(&record, &target.fields), Value::Null),
                Kind::Updated => (
                    "UPDATE",
                    pick(&record, &target.fields),
                    old_record
                        .as_ref()
                        .map_or(Value::Null, |old| pick(old, &target.fields)),
                ),
                Kind::Deleted => ("DELETE", Value::Null, pick(&record, &target.fields)),
            };
            let body = serde_json::json!({
                "type": kind,
                "table": table.trim_matches('"'),
                "schema": schema.trim_matches('"'),
                "record": new,
                "old_record": old,
            });
            ("POST", target.url.clone(), Some(body))
        }
        Format::Standard => {
            let body = serde_json::json!({
                "type": format!("user.{}", event.kind.name()),
                "timestamp": event.created_at,
                "data": pick(&record, &target.fields),
            });
            ("POST", target.url.clone(), Some(body))
        }
    };
    Ok(Request {
        method,
        url,
        body: body.map(|b| b.to_string()),
    })
}

fn object(json: &str) -> Result<Map<String, Value>, String> {
    match serde_json::from_str(json) {
        Ok(Value::Object(record)) => Ok(record),
        Ok(_) => Err("stored event is not a JSON object".into()),
        Err(e) => Err(format!("stored event is not valid JSON: {e}")),
    }
}

/// `{url}/{id}`: the user's resource under the configured collection URL, with its
/// query string (if any) kept at the end.
pub fn item_url(url: &str, id: &str) -> String {
    let split = url
        .find("://")
        .map(|scheme| scheme + 3)
        .and_then(|authority| url[authority..].find(['?', '#']).map(|i| authority + i))
        .unwrap_or(url.len());
    let (path, rest) = url.split_at(split);
    format!("{}/{id}{rest}", path.trim_end_matches('/'))
}

/// All request headers except those ureq sets itself (Content-Length, Host). A
/// request without a body is signed over an empty body.
pub fn headers(
    target: &Target,
    event_id: &str,
    timestamp: u64,
    body: Option<&str>,
) -> Vec<(String, String)> {
    let mut headers = Vec::with_capacity(6);
    if body.is_some() {
        headers.push(("Content-Type".to_string(), "application/json".to_string()));
    }
    let body = body.unwrap_or("");
    headers.extend([
        ("User-Agent".to_string(), USER_AGENT.to_string()),
        ("webhook-id".to_string(), event_id.to_string()),
        ("webhook-timestamp".to_string(), timestamp.to_string()),
    ]);
    if !target.signing.is_empty() {
        headers.push((
            "webhook-signature".to_string(),
            target.signing.signature(event_id, timestamp, body),
        ));
    }
    if let Some((name, value)) = &target.api_key {
        headers.push((name.clone(), value.clone()));
    }
    headers
}

#[cfg(test)]
mod tests {
    use super::*;

    const URL: &str = "http://127.0.0.1:3000/users";
    /// The trigger (sql/outbox.sql) stores exactly the fields this module allows:
    /// the keys of its `jsonb_build_object('name', u.name, ...)` for auth.users.
    const RECORD: &str = r#"{"id":"8d8c5f8e-4b6a-4f55-9d8c-2b4c5d6e7f80","email":"a@example.com","phone":null,
        "role":"authenticated","created_at":"2026-11-28T10:00:00+00:00","raw_user_meta_data":{"name":"A"},
        "raw_app_meta_data":{"provider":"email","providers":["email"]},"is_anonymous":false}"#;

    fn config(url: &str) -> Config<'_> {
        Config {
            url,
            api_key: "",
            api_key_header: "X-API-Key",
            format: Format::Minimal,
            fields: "",
            signing_secret: "",
        }
    }

    fn target_with(format: Format, fields: &str) -> Target {
        target(&Config {
            format,
            fields,
            ..config(URL)
        })
        .unwrap()
    }

    fn event(record: &str) -> Event {
        Event {
            id: "evt-1".into(),
            attempt: 1,
            kind: Kind::Created,
            record: record.into(),
            old_record: None,
            source: "auth.users".into(),
            created_at: "2026-11-28T10:00:00.5+00:00".into(),
            probe: false,
        }
    }

    fn body(target: &Target, event: &Event) -> Result<String, String> {
        build(target, event).map(|r| r.body.unwrap_or_default())
    }

    fn body_json(target: &Target, record: &str) -> Value {
        serde_json::from_str(&body(target, &event(record)).unwrap()).unwrap()
    }

    const OLD: &str =
        r#"{"id":"8d8c5f8e-4b6a-4f55-9d8c-2b4c5d6e7f80","email":"old@example.com","phone":null}"#;

    fn lifecycle(kind: Kind) -> Event {
        Event {
            kind,
            old_record: (kind == Kind::Updated).then(|| OLD.to_string()),
            record: if kind == Kind::Deleted { OLD } else { RECORD }.to_string(),
            ..event(RECORD)
        }
    }

    #[test]
    fn rest_formats_post_a_creation_patch_an_update_and_delete_a_deletion() {
        let id = "8d8c5f8e-4b6a-4f55-9d8c-2b4c5d6e7f80";
        for format in [Format::Minimal, Format::Fields] {
            let t = target_with(format, "id,email");
            let created = build(&t, &lifecycle(Kind::Created)).unwrap();
            assert_eq!((created.method, created.url.as_str()), ("POST", URL));
            let updated = build(&t, &lifecycle(Kind::Updated)).unwrap();
            assert_eq!(updated.method, "PATCH");
            assert_eq!(updated.url, format!("{URL}/{id}"));
            assert_eq!(
                serde_json::from_str::<Value>(updated.body.as_deref().unwrap()).unwrap(),
                serde_json::json!({"id": id, "email": "a@example.com"})
            );
            let deleted = build(&t, &lifecycle(Kind::Deleted)).unwrap();
            assert_eq!(deleted.method, "DELETE");
            assert_eq!(deleted.url, format!("{URL}/{id}"));
            assert_eq!(deleted.body, None);
        }
    }

    #[test]
    fn supabase_format_names_the_change_with_record_and_old_record_as_database_webhooks_do() {
        let t = target_with(Format::Supabase, "id, email");
        let json = |kind| {
            let r = build(&t, &lifecycle(kind)).unwrap();
            assert_eq!((r.method, r.url.as_str()), ("POST", URL));
            serde_json::from_str::<Value>(&r.body.unwrap()).unwrap()
        };
        let new = serde_json::json!({"id": "8d8c5f8e-4b6a-4f55-9d8c-2b4c5d6e7f80", "email": "a@example.com"});
        let old = serde_json::json!({"id": "8d8c5f8e-4b6a-4f55-9d8c-2b4c5d6e7f80", "email": "old@example.com"});
        let updated = json(Kind::Updated);
        assert_eq!(updated["type"], "UPDATE");
        assert_eq!(updated["record"], new);
        assert_eq!(updated["old_record"], old);
        let deleted = json(Kind::Deleted);
        assert_eq!(deleted["type"], "DELETE");
        assert_eq!(deleted["record"], Value::Null);
        assert_eq!(deleted["old_record"], old);
        assert_eq!(deleted["table"], "users");
    }

    #[test]
    fn standard_format_types_are_user_created_updated_deleted() {
        let t = target_with(Format::Standard, "id,email");
        for (kind, name) in [
            (Kind::Created, "user.created"),
            (Kind::Updated, "user.updated"),
            (Kind::Deleted, "user.deleted"),
        ] {
            let r = build(&t, &lifecycle(kind)).unwrap();
            assert_eq!((r.method, r.url.as_str()), ("POST", URL));
            let body: Value = serde_json::from_str(&r.body.unwrap()).unwrap();
            assert_eq!(body["type"], name);
            assert_eq!(body["data"]["id"], "8d8c5f8e-4b6a-4f55-9d8c-2b4c5d6e7f80");
        }
    }

    #[test]
    fn the_users_resource_url_keeps_the_query_string_and_has_one_slash() {
        assert_eq!(item_url("http://h/users", "u1"), "http://h/users/u1");
        assert_eq!(item_url("http://h/users/", "u1"), "http://h/users/u1");
        assert_eq!(
            item_url("http://h/users?v=2#x", "u1"),
            "http://h/users/u1?v=2#x"
        );
        assert_eq!(item_url("https://h:8443", "u1"), "https://h:8443/u1");
    }

    #[test]
    fn an_update_counts_when_a_sent_field_changes_never_for_bookkeeping_alone() {
        let all = parse_fields("").unwrap();
        let watched = watched_fields(Format::Supabase, &all);
        assert!(!watched
            .iter()
            .any(|f| f == "updated_at" || f == "last_sign_in_at" || f == "id"));
        assert!(watched.iter().any(|f| f == "email_confirmed_at"));
        assert_eq!(watched_fields(Format::Minimal, &all), vec!["email"]);
        let chosen = parse_fields("id,email,last_sign_in_at").unwrap();
        assert_eq!(watched_fields(Format::Fields, &chosen), vec!["email"]);

        let before = r#"{"id":"u","email":"a@x","last_sign_in_at":null,"email_confirmed_at":null}"#;
        let signed_in = r#"{"id":"u","email":"a@x","last_sign_in_at":"2026-12-01T00:00:00Z","email_confirmed_at":null}"#;
        let confirmed = r#"{"id":"u","email":"a@x","last_sign_in_at":null,"email_confirmed_at":"2026-12-01T00:00:00Z"}"#;
        assert!(!differ_in(before, signed_in, &watched));
        assert!(differ_in(before, confirmed, &watched));
        assert!(!differ_in(
            before,
            confirmed,
            &watched_fields(Format::Minimal, &all)
        ));
    }

    #[test]
    fn minimal_body_has_id_and_email_only() {
        let body = body_json(&target_with(Format::Minimal, ""), RECORD);
        assert_eq!(
            body,
            serde_json::json!({"id": "8d8c5f8e-4b6a-4f55-9d8c-2b4c5d6e7f80", "email": "a@example.com"})
        );
    }

    #[test]
    fn phone_users_have_null_email() {
        let t = target_with(Format::Minimal, "");
        assert_eq!(
            body_json(&t, r#"{"id":"x","email":null}"#)["email"],
            Value::Null
        );
        assert_eq!(body_json(&t, r#"{"id":"x"}"#)["email"], Value::Null);
    }

    #[test]
    fn unusual_emails_survive_json_escaping() {
        let email = "Zoë \"quoted\" \\ back@例え.jp";
        let record = serde_json::json!({"id": "x", "email": email}).to_string();
        assert_eq!(
            body_json(&target_with(Format::Minimal, ""), &record)["email"],
            email
        );
    }

    #[test]
    fn fields_format_sends_the_named_columns() {
        let t = target_with(
            Format::Fields,
            "id, email, created_at, raw_user_meta_data, is_anonymous, phone",
        );
        assert_eq!(
            body_json(&t, RECORD),
            serde_json::json!({"id": "8d8c5f8e-4b6a-4f55-9d8c-2b4c5d6e7f80", "email": "a@example.com",
                "created_at": "2026-11-28T10:00:00+00:00", "raw_user_meta_data": {"name": "A"},
                "is_anonymous": false, "phone": null})
        );
    }

    #[test]
    fn supabase_format_matches_database_webhooks() {
        let body = body_json(&target_with(Format::Supabase, "id, email"), RECORD);
        assert_eq!(
            body,
            serde_json::json!({"type": "INSERT", "table": "users", "schema": "auth",
                "record": {"id": "8d8c5f8e-4b6a-4f55-9d8c-2b4c5d6e7f80", "email": "a@example.com"},
                "old_record": null})
        );
    }

    #[test]
    fn standard_format_is_a_standard_webhooks_envelope() {
        let body = body_json(&target_with(Format::Standard, "id,email"), RECORD);
        assert_eq!(body["type"], "user.created");
        assert_eq!(body["timestamp"], "2026-11-28T10:00:00.5+00:00");
        assert_eq!(
            body["data"],
            serde_json::json!({"id": "8d8c5f8e-4b6a-4f55-9d8c-2b4c5d6e7f80", "email": "a@example.com"})
        );
    }

    #[test]
    fn empty_fields_means_every_allowed_field() {
        let t = target_with(Format::Supabase, "");
        let record = body_json(&t, RECORD)["record"].clone();
        let keys: Vec<&str> = record
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        let mut allowed = ALLOWED_FIELDS.to_vec();
        allowed.sort();
        assert_eq!(keys, allowed);
    }

    #[test]
    fn credentials_can_never_be_asked_for() {
        for name in [
            "encrypted_password",
            "confirmation_token",
            "recovery_token",
            "email_change_token_new",
            "phone_change_token",
            "reauthentication_token",
            "email_change_token_current",
        ] {
            let err = parse_fields(&format!("id, {name}")).unwrap_err();
            assert!(
                err.contains("is a credential and is never sent"),
                "{name}: {err}"
            );
        }
        let err = parse_fields("id, favourite_colour").unwrap_err();
        assert!(
            err.contains("not a field that can be sent") && err.contains("allowed: id, email"),
            "{err}"
        );
        assert_eq!(
            parse_fields(" Email ,id,email").unwrap(),
            vec!["email", "id"]
        );
    }

    #[test]
    fn only_allowed_fields_leave_even_if_the_record_has_more() {
        let record =
            r#"{"id":"x","email":"e","encrypted_password":"SECRET","recovery_token":"SECRET"}"#;
        for format in [
            Format::Minimal,
            Format::Fields,
            Format::Supabase,
            Format::Standard,
        ] {
            let body = body(&target_with(format, ""), &event(record)).unwrap();
            assert!(!body.contains("SECRET"), "{format:?}: {body}");
        }
    }

    #[test]
    fn broken_records_are_reported() {
        let t = target_with(Format::Minimal, "");
        assert!(body(&t, &event("not json"))
            .unwrap_err()
            .contains("not valid JSON"));
        assert!(body(&t, &event(r#"{"email":"a@b"}"#))
            .unwrap_err()
            .contains("no user id"));
    }

    #[test]
    fn headers_carry_event_id_timestamp_key_and_signature() {
        let t = target(&Config {
            api_key: "s3cret",
            signing_secret: "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            ..config(URL)
        })
        .unwrap();
        let h = headers(
            &t,
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            Some(r#"{"test": 2432232314}"#),
        );
        let get = |n: &str| h.iter().find(|(k, _)| k == n).map(|(_, v)| v.as_str());
        assert_eq!(get("Content-Type"), Some("application/json"));
        assert_eq!(get("User-Agent"), Some(USER_AGENT));
        assert_eq!(get("webhook-id"), Some("msg_p5jXN8AQM9LWM0D4loKWxJek"));
        assert_eq!(get("webhook-timestamp"), Some("1614265330"));
        assert_eq!(
            get("webhook-signature"),
            Some("v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=")
        );
        assert_eq!(get("X-API-Key"), Some("s3cret"));
        assert!(USER_AGENT.starts_with("pg_new_user_hook/"));
    }

    #[test]
    fn no_key_or_signature_headers_unless_configured() {
        let t = target(&config(URL)).unwrap();
        let h = headers(&t, "e", 1, Some("{}"));
        assert!(h
            .iter()
            .all(|(k, _)| k != "X-API-Key" && k != "webhook-signature"));
    }

    #[test]
    fn custom_key_header() {
        let t = target(&Config {
            api_key: "k",
            api_key_header: "Authorization",
            ..config(URL)
        })
        .unwrap();
        assert_eq!(t.api_key, Some(("Authorization".into(), "k".into())));
    }

    #[test]
    fn empty_url_says_events_wait() {
        let err = target(&config("  ")).unwrap_err();
        assert!(err.contains("not set") && err.contains("queued"), "{err}");
    }

    #[test]
    fn malformed_urls_are_explained() {
        for (url, why) in [
            ("localhost:3000/users", "no scheme"),
            ("ftp://example.com/users", "scheme 'ftp'"),
            ("http://", "not a valid URL"),
            ("http://exa mple.com/", "not a valid URL"),
        ] {
            let err = target(&config(url)).unwrap_err();
            assert!(err.contains(why), "{url}: {err}");
            assert!(err.contains("pg_new_user_hook.url"), "{url}: {err}");
        }
    }

    #[test]
    fn errors_never_contain_credentials() {
        let err = target(&config("gopher://user:hunter2@example.com/")).unwrap_err();
        assert!(!err.contains("hunter2"), "{err}");
        let err = target(&Config {
            api_key: "bad\nkey",
            ..config(URL)
        })
        .unwrap_err();
        assert!(!err.contains("bad\nkey"), "{err}");
        let err = target(&Config {
            api_key: "k",
            api_key_header: "X API Key",
            ..config(URL)
        })
        .unwrap_err();
        assert!(err.contains("api_key_header"), "{err}");
        let err = target(&Config {
            signing_secret: "whsec_%%hunter2%%",
            ..config(URL)
        })
        .unwrap_err();
        assert!(
            err.contains("signing secret") && !err.contains("hunter2"),
            "{err}"
        );
    }

    #[test]
    fn a_url_with_credentials_is_refused_without_repeating_them() {
        for url in [
            "http://alice:pw@h.example/users",
            "https://token@h.example/",
        ] {
            let err = refuse_credentials_in_url(url).unwrap_err();
            assert!(err.contains("must not contain credentials"), "{err}");
            assert!(!err.contains("pw") && !err.contains("token@"), "{err}");
            // The log redaction would cut a message naming a secret setting.
            assert_eq!(crate::model::redact::redact(&err), None, "{err}");
            let err = target(&config(url)).unwrap_err();
            assert!(err.contains("must not contain credentials"), "{err}");
            assert!(!err.contains("alice") && !err.contains("token"), "{err}");
        }
        assert!(refuse_credentials_in_url("https://h.example/users?next=a@b").is_ok());
    }
}
