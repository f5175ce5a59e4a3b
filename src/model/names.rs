//! The settings' names and defaults, and which hold secrets: constants that the
//! settings' definitions (`settings`), error messages and the log's redaction use.

pub mod defaults {
    pub const DATABASE: &str = "postgres";
    pub const TIMEOUT_MS: i32 = 5_000;
    pub const CONCURRENCY: i32 = 32;
    pub const RETRY_BASE_MS: i32 = 1_000;
    pub const RETRY_MAX_MS: i32 = 3_600_000;
    pub const MAX_ATTEMPTS: i32 = 50;
    pub const RETENTION_S: i32 = 7 * 24 * 3600;
    pub const BREAKER_FAILURES: i32 = 5;
    pub const PROBE_INTERVAL_MS: i32 = 30_000;
}

// The setting names, in one place: `&str` for messages, `&CStr` (module `c`) for definitions.
macro_rules! names {
    ($($id:ident = $name:literal;)*) => {
        $(#[allow(dead_code)] pub const $id: &str = concat!("pg_new_user_hook.", $name);)*
        pub mod c {
            use std::ffi::CStr;
            $(pub const $id: &CStr = match CStr::from_bytes_with_nul(
                concat!("pg_new_user_hook.", $name, "\0").as_bytes(),
            ) {
                Ok(name) => name,
                Err(_) => panic!("a setting name contains NUL"),
            };)*
        }
    };
}
names! {
    URL = "url";
    API_KEY = "api_key";
    API_KEY_SECRET = "api_key_secret";
    API_KEY_HEADER = "api_key_header";
    SIGNING_SECRET = "signing_secret";
    SIGNING_SECRET_NAME = "signing_secret_name";
    PAYLOAD_FORMAT = "payload_format";
    FIELDS = "fields";
    CA_FILE = "ca_file";
    TIMEOUT_MS = "timeout_ms";
    CONCURRENCY = "concurrency";
    RETRY_BASE_MS = "retry_base_ms";
    RETRY_MAX_MS = "retry_max_ms";
    MAX_ATTEMPTS = "max_attempts";
    RETENTION = "retention";
    DATABASE = "database";
    CAPTURE = "capture";
    PAUSED = "paused";
    BREAKER_FAILURES = "breaker_failures";
    PROBE_INTERVAL_MS = "probe_interval_ms";
    EVENTS = "events";
}

/// The settings that hold a secret (or name one); their values are hidden from logs.
pub const SECRET_SETTINGS: &[&str] = &[API_KEY, SIGNING_SECRET];
