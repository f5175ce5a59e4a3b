//! Every `pg_new_user_hook.*` setting: definitions, defaults and one snapshot type.
//! All are reloadable (SIGHUP) except `database`, which picks the worker's connection,
//! and `capture`, which a superuser sets in a session (a bulk load).

use crate::model::backoff::Policy;
use crate::model::request::{self, Format};
use pgrx::{pg_guard, pg_sys, GucContext, GucFlags, GucRegistry, GucSetting, PostgresGucEnum};
use std::ffi::{c_char, c_void, CStr, CString};
use std::time::Duration;

pub use crate::model::names::{self, defaults};

#[derive(PostgresGucEnum, Clone, Copy, PartialEq, Eq, Debug)]
pub enum PayloadFormat {
    #[name = c"minimal"]
    Minimal,
    #[name = c"fields"]
    Fields,
    #[name = c"supabase"]
    Supabase,
    #[name = c"standard"]
    Standard,
}

type Text = GucSetting<Option<CString>>;
static URL: Text = Text::new(None);
static API_KEY: Text = Text::new(None);
static API_KEY_SECRET: Text = Text::new(None);
static API_KEY_HEADER: Text = Text::new(Some(c"X-API-Key"));
static SIGNING_SECRET: Text = Text::new(None);
static SIGNING_SECRET_NAME: Text = Text::new(None);
static FIELDS: Text = Text::new(None);
static EVENTS: Text = Text::new(Some(c"created"));
static CA_FILE: Text = Text::new(None);
static DATABASE: Text = Text::new(Some(c"postgres"));
static PAYLOAD_FORMAT: GucSetting<PayloadFormat> =
    GucSetting::<PayloadFormat>::new(PayloadFormat::Minimal);
static TIMEOUT_MS: GucSetting<i32> = GucSetting::<i32>::new(defaults::TIMEOUT_MS);
static CONCURRENCY: GucSetting<i32> = GucSetting::<i32>::new(defaults::CONCURRENCY);
static RETRY_BASE_MS: GucSetting<i32> = GucSetting::<i32>::new(defaults::RETRY_BASE_MS);
static RETRY_MAX_MS: GucSetting<i32> = GucSetting::<i32>::new(defaults::RETRY_MAX_MS);
static MAX_ATTEMPTS: GucSetting<i32> = GucSetting::<i32>::new(defaults::MAX_ATTEMPTS);
static RETENTION_S: GucSetting<i32> = GucSetting::<i32>::new(defaults::RETENTION_S);
static CAPTURE: GucSetting<bool> = GucSetting::<bool>::new(true);
static PAUSED: GucSetting<bool> = GucSetting::<bool>::new(false);
static BREAKER_FAILURES: GucSetting<i32> = GucSetting::<i32>::new(defaults::BREAKER_FAILURES);
static PROBE_INTERVAL_MS: GucSetting<i32> = GucSetting::<i32>::new(defaults::PROBE_INTERVAL_MS);

fn text(name: &'static CStr, short: &'static CStr, setting: &'static Text, flags: GucFlags) {
    GucRegistry::define_string_guc(name, short, c"", setting, GucContext::Sighup, flags);
}

fn checked_text(
    name: &'static CStr,
    short: &'static CStr,
    setting: &'static Text,
    flags: GucFlags,
    check: pg_sys::GucStringCheckHook,
) {
    checked_text_with_assign(name, short, setting, flags, check, None);
}

fn checked_text_with_assign(
    name: &'static CStr,
    short: &'static CStr,
    setting: &'static Text,
    flags: GucFlags,
    check: pg_sys::GucStringCheckHook,
    assign: pg_sys::GucStringAssignHook,
) {
    // SAFETY: the hooks are #[pg_guard]ed.
    unsafe {
        GucRegistry::define_string_guc_with_hooks(
            name,
            short,
            c"",
            setting,
            GucContext::Sighup,
            flags,
            check,
            assign,
            None,
        )
    }
}

fn int(
    name: &'static CStr,
    short: &'static CStr,
    setting: &'static GucSetting<i32>,
    min: i32,
    max: i32,
    flags: GucFlags,
) {
    GucRegistry::define_int_guc(
        name,
        short,
        c"",
        setting,
        min,
        max,
        GucContext::Sighup,
        flags,
    );
}

/// Defines the settings. `database` picks the worker's connection, so it exists
/// only when the library is preloaded (Postgres refuses postmaster settings later).
pub fn define(preloading: bool) {
    let secret = GucFlags::SUPERUSER_ONLY | GucFlags::NO_SHOW_ALL;
    checked_text(
        names::c::URL,
        c"URL that receives a POST for every new user; empty: events wait.",
        &URL,
        GucFlags::default(),
        Some(check_url),
    );
    text(
        names::c::API_KEY,
        c"API key sent with every request (superusers only).",
        &API_KEY,
        secret,
    );
    text(
        names::c::API_KEY_SECRET,
        c"Name of a Supabase Vault secret holding the API key (instead of api_key).",
        &API_KEY_SECRET,
        GucFlags::default(),
    );
    text(
        names::c::API_KEY_HEADER,
        c"Header carrying the API key.",
        &API_KEY_HEADER,
        GucFlags::default(),
    );
    checked_text(
        names::c::SIGNING_SECRET,
        c"Standard Webhooks secret(s), whsec_<base64>, space-separated during a rotation (superusers only).",
        &SIGNING_SECRET,
        secret,
        Some(check_signing_secret),
    );
    text(
        names::c::SIGNING_SECRET_NAME,
        c"Name of a Supabase Vault secret holding the signing secret (instead of signing_secret).",
        &SIGNING_SECRET_NAME,
        GucFlags::default(),
    );
    GucRegistry::define_enum_guc(
        names::c::PAYLOAD_FORMAT,
        c"Body of each request: minimal, fields, supabase or standard.",
        c"",
        &PAYLOAD_FORMAT,
        GucContext::Sighup,
        GucFlags::default(),
    );
    checked_text(
        names::c::FIELDS,
        c"Columns sent by the fields, supabase and standard formats; empty: all allowed columns.",
        &FIELDS,
        GucFlags::default(),
        Some(check_fields),
    );
    checked_text_with_assign(
        names::c::EVENTS,
        c"Which changes of a user are delivered: comma-separated created, updated, deleted.",
        &EVENTS,
        GucFlags::default(),
        Some(check_events),
        Some(assign_events),
    );
    text(
        names::c::CA_FILE,
        c"PEM file of CA certificates to trust for https:// URLs.",
        &CA_FILE,
        GucFlags::default(),
    );
    int(
        names::c::TIMEOUT_MS,
        c"Time limit for one request, connection included.",
        &TIMEOUT_MS,
        100,
        300_000,
        GucFlags::UNIT_MS,
    );
    int(
        names::c::CONCURRENCY,
        c"Requests in flight at once.",
        &CONCURRENCY,
        1,
        256,
        GucFlags::default(),
    );
    int(
        names::c::RETRY_BASE_MS,
        c"Delay before the first retry; doubles per attempt.",
        &RETRY_BASE_MS,
        10,
        86_400_000,
        GucFlags::UNIT_MS,
    );
    int(
        names::c::RETRY_MAX_MS,
        c"Longest delay between two attempts.",
        &RETRY_MAX_MS,
        10,
        86_400_000,
        GucFlags::UNIT_MS,
    );
    int(
        names::c::MAX_ATTEMPTS,
        c"Attempts before an event is marked failed.",
        &MAX_ATTEMPTS,
        1,
        100_000,
        GucFlags::default(),
    );
    int(
        names::c::RETENTION,
        c"How long delivered events are kept.",
        &RETENTION_S,
        0,
        i32::MAX,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_bool_guc(
        names::c::PAUSED,
        c"Pause delivery: events keep being queued, none is sent until it is off again.",
        c"",
        &PAUSED,
        GucContext::Sighup,
        GucFlags::default(),
    );
    int(
        names::c::BREAKER_FAILURES,
        c"Consecutive failed attempts (5xx, 408, 425, 429, timeouts, network errors) after which the backend is treated as down and only probed; 0: never.",
        &BREAKER_FAILURES,
        0,
        100_000,
        GucFlags::default(),
    );
    int(
        names::c::PROBE_INTERVAL_MS,
        c"Longest wait between two probes of a backend that is down.",
        &PROBE_INTERVAL_MS,
        100,
        3_600_000,
        GucFlags::UNIT_MS,
    );
    // Superuser-only (PGC_SUSET): whoever may load users unannounced is chosen with
    // GRANT SET ON PARAMETER, not by whoever can insert into the table.
    GucRegistry::define_bool_guc(
        names::c::CAPTURE,
        c"Whether the changes of users this session makes are queued for delivery; off in a session loading users that must not be announced.",
        c"",
        &CAPTURE,
        GucContext::Suset,
        GucFlags::default(),
    );
    if preloading {
        GucRegistry::define_string_guc(
            names::c::DATABASE,
            c"Database the delivery worker connects to (where CREATE EXTENSION pg_new_user_hook ran).",
            c"",
            &DATABASE,
            GucContext::Postmaster,
            GucFlags::default(),
        );
    }
}

/// Rejects a bad value with our message (which, unlike Postgres' default one, does not echo the value).
unsafe fn check_with(newval: *mut *mut c_char, check: impl Fn(&str) -> Result<(), String>) -> bool {
    let value = unsafe { (*newval).as_ref() }
        .map(|p| unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned());
    match check(value.as_deref().unwrap_or("")) {
        Ok(()) => true,
        Err(message) => {
            let message = CString::new(message.replace('\0', "")).unwrap_or_default();
            unsafe { pg_sys::GUC_check_errmsg_string = pg_sys::pstrdup(message.as_ptr()) };
            false
        }
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn check_fields(
    newval: *mut *mut c_char,
    _extra: *mut *mut c_void,
    _source: pg_sys::GucSource::Type,
) -> bool {
    unsafe { check_with(newval, |v| request::parse_fields(v).map(drop)) }
}

#[pg_guard]
unsafe extern "C-unwind" fn check_events(
    newval: *mut *mut c_char,
    _extra: *mut *mut c_void,
    _source: pg_sys::GucSource::Type,
) -> bool {
    unsafe { check_with(newval, |v| crate::model::event::parse_kinds(v).map(drop)) }
}

/// `events` as parsed at its last assignment: the trigger reads it at every signup.
static EVENT_KINDS: std::sync::atomic::AtomicU8 =
    std::sync::atomic::AtomicU8::new(crate::model::event::Kinds::DEFAULT.bits());

#[pg_guard]
unsafe extern "C-unwind" fn assign_events(newval: *const c_char, _extra: *mut c_void) {
    let value = unsafe { newval.as_ref() }
        .map(|p| unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned());
    // The check hook has accepted it.
    let kinds = crate::model::event::parse_kinds(value.as_deref().unwrap_or(""))
        .unwrap_or(crate::model::event::Kinds::DEFAULT);
    EVENT_KINDS.store(kinds.bits(), std::sync::atomic::Ordering::Relaxed);
}

#[pg_guard]
unsafe extern "C-unwind" fn check_url(
    newval: *mut *mut c_char,
    _extra: *mut *mut c_void,
    _source: pg_sys::GucSource::Type,
) -> bool {
    unsafe { check_with(newval, request::refuse_credentials_in_url) }
}

#[pg_guard]
unsafe extern "C-unwind" fn check_signing_secret(
    newval: *mut *mut c_char,
    _extra: *mut *mut c_void,
    _source: pg_sys::GucSource::Type,
) -> bool {
    unsafe {
        check_with(newval, |v| {
            crate::model::sign::parse(v, "signing_secret").map(drop)
        })
    }
}

fn string(setting: &Text) -> String {
    setting
        .get()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Where a secret comes from: the setting itself, or a Vault secret's name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SecretSource {
    None,
    Value(String),
    Vault(String),
}

fn secret_source(
    value: &Text,
    value_name: &str,
    vault: &Text,
    vault_name: &str,
) -> Result<SecretSource, String> {
    match (string(value), string(vault).trim().to_string()) {
        (v, n) if !v.is_empty() && !n.is_empty() => {
            Err(format!("set either {value_name} or {vault_name}, not both"))
        }
        (v, _) if !v.is_empty() => Ok(SecretSource::Value(v)),
        (_, n) if !n.is_empty() => Ok(SecretSource::Vault(n)),
        _ => Ok(SecretSource::None),
    }
}

/// The settings as they are now in this process. Only on the main thread.
#[derive(Clone, PartialEq)]
pub struct Settings {
    pub url: String,
    pub api_key: Result<SecretSource, String>,
    pub api_key_header: String,
    pub signing_secret: Result<SecretSource, String>,
    pub format: Format,
    pub fields: String,
    pub ca_file: String,
    pub timeout: Duration,
    pub concurrency: usize,
    pub retry: Policy,
    pub retention: Duration,
    pub paused: bool,
    pub breaker: crate::model::breaker::Policy,
}

// Secrets stay out of debug output.
impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settings")
            .field("url", &crate::model::redact::redact_userinfo(&self.url))
            .finish_non_exhaustive()
    }
}

impl Settings {
    fn format() -> Format {
        match PAYLOAD_FORMAT.get() {
            PayloadFormat::Minimal => Format::Minimal,
            PayloadFormat::Fields => Format::Fields,
            PayloadFormat::Supabase => Format::Supabase,
            PayloadFormat::Standard => Format::Standard,
        }
    }

    pub fn read() -> Settings {
        Settings {
            url: string(&URL),
            api_key: secret_source(
                &API_KEY,
                names::API_KEY,
                &API_KEY_SECRET,
                names::API_KEY_SECRET,
            ),
            api_key_header: string(&API_KEY_HEADER),
            signing_secret: secret_source(
                &SIGNING_SECRET,
                names::SIGNING_SECRET,
                &SIGNING_SECRET_NAME,
                names::SIGNING_SECRET_NAME,
            ),
            format: Settings::format(),
            fields: string(&FIELDS),
            ca_file: string(&CA_FILE).trim().to_string(),
            timeout: Duration::from_millis(TIMEOUT_MS.get() as u64),
            concurrency: CONCURRENCY.get() as usize,
            retry: Policy {
                base: Duration::from_millis(RETRY_BASE_MS.get() as u64),
                max: Duration::from_millis(RETRY_MAX_MS.get() as u64),
                max_attempts: MAX_ATTEMPTS.get() as u32,
            },
            retention: Duration::from_secs(RETENTION_S.get() as u64),
            paused: PAUSED.get(),
            breaker: crate::model::breaker::Policy {
                failures: BREAKER_FAILURES.get() as u32,
                first_probe: Duration::from_millis(RETRY_BASE_MS.get() as u64),
                max_probe: Duration::from_millis(PROBE_INTERVAL_MS.get() as u64),
            },
        }
    }

    /// Where to deliver, or why delivery is paused, given the secrets' values.
    pub fn target(&self, api_key: &str, signing_secret: &str) -> Result<request::Target, String> {
        request::target(&request::Config {
            url: &self.url,
            api_key,
            api_key_header: &self.api_key_header,
            format: self.format,
            fields: &self.fields,
            signing_secret,
        })
    }

    /// The problems visible from the settings alone (no Vault look-up): what a
    /// backend can report without the worker.
    pub fn problem(&self) -> Option<String> {
        let placeholder = |s: &Result<SecretSource, String>| match s {
            Err(e) => Err(e.clone()),
            Ok(SecretSource::Value(v)) => Ok(v.clone()),
            // A Vault secret's value is checked by the worker.
            Ok(_) => Ok(String::new()),
        };
        let api_key = match placeholder(&self.api_key) {
            Ok(v) => v,
            Err(e) => return Some(e),
        };
        let signing = match placeholder(&self.signing_secret) {
            Ok(v) => v,
            Err(e) => return Some(e),
        };
        self.target(&api_key, &signing).err()
    }
}

/// Whether delivery is paused (`paused`), as this process last read the settings.
pub fn paused() -> bool {
    PAUSED.get()
}

/// The kinds of event to capture (`events`), as this process last read the settings.
pub fn events() -> crate::model::event::Kinds {
    crate::model::event::Kinds::from_bits(EVENT_KINDS.load(std::sync::atomic::Ordering::Relaxed))
}

/// The fields whose change makes an update event, for the configured payload.
pub fn update_fields() -> Vec<String> {
    let format = Settings::format();
    let fields = request::parse_fields(&string(&FIELDS)).unwrap_or_default();
    request::watched_fields(format, &fields)
}

/// Whether this session queues the users it inserts (`capture`).
pub fn capturing() -> bool {
    CAPTURE.get()
}

pub fn database() -> String {
    let db = string(&DATABASE);
    if db.is_empty() {
        defaults::DATABASE.to_string()
    } else {
        db
    }
}
