//! What of a log message or statement must not reach the log: everything after a
//! secret setting's name (and a URL's credentials).

use crate::model::names::{self, SECRET_SETTINGS};

/// The text with everything after a secret setting's name cut, or None if it names
/// none. A URL is no secret, but one given with credentials (refused when set) is:
/// the statement that tried still shows them.
pub fn redact(text: &str) -> Option<String> {
    let lower = text.to_ascii_lowercase();
    let mut cut = None;
    let secret_names = SECRET_SETTINGS.iter().map(|name| (*name, false));
    for (name, only_with_credentials) in secret_names.chain([(names::URL, true)]) {
        let mut from = 0;
        while let Some(pos) = lower[from..].find(name) {
            let end = from + pos + name.len();
            let next = lower[end..].chars().next();
            let whole_name = !next.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
            let rest = &text[end..];
            if whole_name && (!only_with_credentials || redact_userinfo(rest) != rest) {
                cut = Some(cut.map_or(end, |c: usize| c.min(end)));
                break;
            }
            from = end;
        }
    }
    let mut end = cut?;
    if text[end..].starts_with('"') {
        end += 1;
    }
    // Only the name, no value after it (e.g. a permission error): nothing to hide.
    if text[end..].trim().is_empty() {
        return None;
    }
    Some(format!(
        "{} … (value hidden by pg_new_user_hook)",
        &text[..end]
    ))
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

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn reload_message_loses_the_value() {
        assert_eq!(
            redact(r#"parameter "pg_new_user_hook.api_key" changed to "s3cret""#).unwrap(),
            r#"parameter "pg_new_user_hook.api_key" … (value hidden by pg_new_user_hook)"#
        );
        let hidden =
            redact(r#"parameter "pg_new_user_hook.signing_secret" changed to "whsec_abc""#)
                .unwrap();
        assert!(!hidden.contains("whsec_abc"));
    }

    #[test]
    fn logged_statements_lose_the_value_whatever_the_case() {
        let hidden =
            redact("statement: ALTER SYSTEM SET PG_NEW_USER_HOOK.API_KEY = 's3cret'").unwrap();
        assert!(!hidden.contains("s3cret"), "{hidden}");
    }

    #[test]
    fn settings_that_only_name_a_secret_are_left_alone() {
        for text in [
            r#"parameter "pg_new_user_hook.api_key_header" changed to "X-API-Key""#,
            r#"parameter "pg_new_user_hook.api_key_secret" changed to "backend_key""#,
            r#"parameter "pg_new_user_hook.signing_secret_name" changed to "hook_secret""#,
            "pg_new_user_hook: delivering to http://127.0.0.1/users",
            r#"must be superuser or have privileges of pg_read_all_settings to examine "pg_new_user_hook.api_key""#,
            r#"permission denied to examine "pg_new_user_hook.api_key""#,
        ] {
            assert_eq!(redact(text), None, "{text}");
        }
    }

    #[test]
    fn a_url_is_cut_only_when_it_carries_credentials() {
        let hidden =
            redact("statement: ALTER SYSTEM SET pg_new_user_hook.url = 'http://alice:pw@h/users'")
                .unwrap();
        assert!(!hidden.contains("pw@"), "{hidden}");
        let plain =
            r#"parameter "pg_new_user_hook.url" changed to "https://h.example/users?a=b@c""#;
        assert_eq!(redact(plain), None);
    }

    #[test]
    fn a_secret_named_after_a_harmless_setting_is_still_cut() {
        let text = "SET pg_new_user_hook.api_key_header = 'X'; SET pg_new_user_hook.api_key = 'k'";
        let hidden = redact(text).unwrap();
        assert!(!hidden.contains("'k'"), "{hidden}");
        assert!(hidden.contains("api_key_header"), "{hidden}");
    }
}
