//! Keeps secret settings out of the server log. Postgres itself logs
//! `parameter "…" changed to "<value>"` on every reload, and logged statements
//! (`log_statement`, the STATEMENT line of an error) show `ALTER SYSTEM SET …`
//! verbatim; an emit_log_hook cuts the value from such messages. The same hook
//! notes a FATAL error of the worker while it connects (`shared`), so that its next
//! start can say why instead of failing again.

use crate::model::redact::redact;
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
