//! Every `pg_new_user_hook.*` setting: definitions, defaults and one snapshot type.
//! All are reloadable (SIGHUP) except `database`, which picks the worker's connection.

use crate::backoff::Policy;
use pgrx::{GucContext, GucFlags, GucRegistry, GucSetting};
use std::ffi::CString;
use std::time::Duration;

pub mod defaults {
    pub const DATABASE: &str = "postgres";
    pub const TIMEOUT_MS: i32 = 5_000;
    pub const CONCURRENCY: i32 = 8;
    pub const RETRY_BASE_MS: i32 = 1_000;
    pub const RETRY_MAX_MS: i32 = 3_600_000;
    pub const MAX_ATTEMPTS: i32 = 50;
    pub const RETENTION_S: i32 = 7 * 24 * 3600;

    #[cfg(test)]
    pub fn retry_policy() -> super::Policy {
        use std::time::Duration;
        super::Policy {
            base: Duration::from_millis(RETRY_BASE_MS as u64),
            max: Duration::from_millis(RETRY_MAX_MS as u64),
            max_attempts: MAX_ATTEMPTS as u32,
        }
    }
}

static URL: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
static API_KEY: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
static API_KEY_HEADER: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"X-API-Key"));
static DATABASE: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"postgres"));
static TIMEOUT_MS: GucSetting<i32> = GucSetting::<i32>::new(defaults::TIMEOUT_MS);
static CONCURRENCY: GucSetting<i32> = GucSetting::<i32>::new(defaults::CONCURRENCY);
static RETRY_BASE_MS: GucSetting<i32> = GucSetting::<i32>::new(defaults::RETRY_BASE_MS);
static RETRY_MAX_MS: GucSetting<i32> = GucSetting::<i32>::new(defaults::RETRY_MAX_MS);
static MAX_ATTEMPTS: GucSetting<i32> = GucSetting::<i32>::new(defaults::MAX_ATTEMPTS);
static RETENTION_S: GucSetting<i32> = GucSetting::<i32>::new(defaults::RETENTION_S);

/// Defines the settings. `database` picks the worker's connection, so it exists
/// only when the library is preloaded (Postgres refuses postmaster settings later).
pub fn define(preloading: bool) {
    GucRegistry::define_string_guc(
        c"pg_new_user_hook.url",
        c"URL that receives a POST for every new user.",
        c"Empty: events are kept in the outbox until a URL is set.",
        &URL,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"pg_new_user_hook.api_key",
        c"API key sent with every request (in pg_new_user_hook.api_key_header).",
        c"Readable by superusers only. Empty: no key header is sent.",
        &API_KEY,
        GucContext::Sighup,
        GucFlags::SUPERUSER_ONLY | GucFlags::NO_SHOW_ALL,
    );
    GucRegistry::define_string_guc(
        c"pg_new_user_hook.api_key_header",
        c"Name of the header carrying pg_new_user_hook.api_key.",
        c"",
        &API_KEY_HEADER,
        GucContext::Sighup,
        GucFlags::default(),
    );
    if preloading {
        GucRegistry::define_string_guc(
        c"pg_new_user_hook.database",
        c"Database the delivery worker connects to (where CREATE EXTENSION pg_new_user_hook ran).",
        c"",
        &DATABASE,
        GucContext::Postmaster,
        GucFlags::default(),
    );
    }
    GucRegistry::define_int_guc(
        c"pg_new_user_hook.timeout_ms",
        c"Time limit for one delivery request, connection included.",
        c"",
        &TIMEOUT_MS,
        100,
        300_000,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"pg_new_user_hook.concurrency",
        c"Number of delivery requests in flight at once.",
        c"",
        &CONCURRENCY,
        1,
        256,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"pg_new_user_hook.retry_base_ms",
        c"Delay before the first retry; doubles with each attempt.",
        c"",
        &RETRY_BASE_MS,
        10,
        86_400_000,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"pg_new_user_hook.retry_max_ms",
        c"Longest delay between two attempts.",
        c"",
        &RETRY_MAX_MS,
        10,
        86_400_000,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"pg_new_user_hook.max_attempts",
        c"Attempts before an event is marked failed.",
        c"The defaults retry for more than 24 hours.",
        &MAX_ATTEMPTS,
        1,
        100_000,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"pg_new_user_hook.retention",
        c"How long delivered events are kept before they are deleted.",
        c"",
        &RETENTION_S,
        0,
        i32::MAX,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
}

fn string(setting: &GucSetting<Option<CString>>) -> String {
    setting
        .get()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The settings as they are now in this process. Only on the main thread.
#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    pub url: String,
    pub api_key: String,
    pub api_key_header: String,
    pub timeout: Duration,
    pub concurrency: usize,
    pub retry: Policy,
    pub retention: Duration,
}

impl Settings {
    pub fn read() -> Settings {
        Settings {
            url: string(&URL),
            api_key: string(&API_KEY),
            api_key_header: string(&API_KEY_HEADER),
            timeout: Duration::from_millis(TIMEOUT_MS.get() as u64),
            concurrency: CONCURRENCY.get() as usize,
            retry: Policy {
                base: Duration::from_millis(RETRY_BASE_MS.get() as u64),
                max: Duration::from_millis(RETRY_MAX_MS.get() as u64),
                max_attempts: MAX_ATTEMPTS.get() as u32,
            },
            retention: Duration::from_secs(RETENTION_S.get() as u64),
        }
    }

    /// Where to deliver, or why delivery is paused.
    pub fn target(&self) -> Result<crate::request::Target, String> {
        crate::request::target(&self.url, &self.api_key, &self.api_key_header)
    }
}

pub fn database() -> String {
    let db = string(&DATABASE);
    if db.is_empty() {
        defaults::DATABASE.to_string()
    } else {
        db
    }
}
