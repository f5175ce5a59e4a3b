//! Keeps secret settings out of the server log. Postgres itself logs
//! `parameter "…" changed to "<value>"` on every reload, and logged statements
//! (`log_statement`, the STATEMENT line of an error) show `ALTER SYSTEM SET …`
//! verbatim; an emit_log_hook cuts the value from such messages. The same hook
//! notes a FATAL error of the worker while it connects (`shared`), so that its next
//! start can say why instead of failing again.

use crate::guc::{names, SECRET_SETTINGS};
use crate::request::redact_userinfo;
use pgrx::{pg_guard, pg_sys};
use std::ffi::{CStr, CString};

static mut PREVIOUS_HOOK: pg_sys::emit_log_hook_type = None;

pub fn install() {
    unsafe {
        PREVIOUS_HOOK = pg_sys::emit_log_hook;
        pg_sys::emit_log_hook = Some(hide_secrets);
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn hide_secrets(edata: *mut pg_sys::ErrorData) {
    unsafe {
        if let Some(edata) = edata.as_mut() {
            if edata.elevel >= pg_sys::FATAL as i32 && !edata.message.is_null() {
                let message = CStr::from_ptr(edata.message).to_string_lossy();
                crate::shared::note_fatal_while_connecting(
                    edata.elevel,
                    edata.sqlerrcode,
                    &message,
                );
            }
            for field in [
                &mut edata.message,
                &mut edata.detail,
                &mut edata.detail_log,
                &mut edata.context,
            ] {
                if let Some(text) = field.as_ref().map(|p| CStr::from_ptr(p).to_string_lossy()) {
                    if let Some(hidden) = redact(&text).and_then(|h| CString::new(h).ok()) {
                        *field = pg_sys::pstrdup(hidden.as_ptr());
                    }
                }
            }
            let statement = pg_sys::debug_query_string;
            if !statement.is_null()
                && redact(&CStr::from_ptr(statement).to_string_lossy()).is_some()
            {
                edata.hide_stmt = true;
            }
        }
        if let Some(previous) = PREVIOUS_HOOK {
            previous(edata);
        }
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;

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
