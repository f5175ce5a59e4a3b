//! What the worker delivers to: the settings and the secrets (given directly or
//! kept in Supabase Vault) turned into a checked target and its HTTP channel, or
//! the reason delivery is paused.

use crate::delivery::Channel;
use crate::model::redact;
use crate::settings::{names, SecretSource, Settings};
use crate::{spi, store};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How often secrets stored in Supabase Vault are read again (a rotation needs no reload).
const SECRET_REFRESH: Duration = Duration::from_secs(10);

/// Secret values, resolved from the settings or from Vault.
#[derive(Clone, PartialEq, Eq)]
struct Secrets {
    api_key: String,
    signing_secret: String,
}

pub struct Config {
    settings: Settings,
    /// Resolved secrets, or why they cannot be had.
    secrets: Result<Secrets, String>,
    /// Where to send, or why delivery is paused.
    channel: Result<Arc<Channel>, String>,
    /// When the Vault secrets are read again (None: no secret comes from Vault).
    next_refresh: Option<Instant>,
}

impl Config {
    pub fn new(settings: Settings) -> Config {
        let mut config = Config {
            settings,
            secrets: Err(String::new()),
            channel: Err(String::new()),
            next_refresh: None,
        };
        config.refresh_secrets(true);
        config
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// New settings: the secrets are resolved again and the channel rebuilt.
    pub fn reload(&mut self, settings: Settings) {
        self.settings = settings;
        self.refresh_secrets(true);
    }

    pub fn channel(&self) -> Result<Arc<Channel>, String> {
        self.channel.clone()
    }

    /// Why delivery is paused by configuration, if it is.
    pub fn problem(&self) -> Option<String> {
        self.channel.as_ref().err().cloned()
    }

    /// The target for the log, without credentials.
    pub fn describe_target(&self) -> String {
        redact::redact_userinfo(&self.settings.url)
    }

    pub fn next_secret_refresh(&self) -> Option<Instant> {
        self.next_refresh
    }

    /// Resolves the secrets when `force`d or when the Vault refresh is due, and
    /// rebuilds the channel if anything changed. Returns None when nothing was
    /// looked at, else whether the channel was rebuilt.
    pub fn refresh_secrets(&mut self, force: bool) -> Option<bool> {
        let due = self.next_refresh.is_some_and(|at| at <= Instant::now());
        if !force && !due {
            return None;
        }
        let api_key = self.settings.api_key.clone();
        let signing = self.settings.signing_secret.clone();
        let uses_vault = [&api_key, &signing]
            .iter()
            .any(|s| matches!(s, Ok(SecretSource::Vault(_))));
        self.next_refresh = uses_vault.then(|| Instant::now() + SECRET_REFRESH);
        let resolve = move || -> Result<Secrets, String> {
            let value = |source: &Result<SecretSource, String>, setting: &str| match source {
                Err(e) => Err(e.clone()),
                Ok(SecretSource::None) => Ok(String::new()),
                Ok(SecretSource::Value(v)) => Ok(v.clone()),
                Ok(SecretSource::Vault(name)) => store::vault_secret(name, setting),
            };
            Ok(Secrets {
                api_key: value(&api_key, names::API_KEY_SECRET)?,
                signing_secret: value(&signing, names::SIGNING_SECRET_NAME)?,
            })
        };
        let secrets = if uses_vault {
            spi::transaction(resolve).unwrap_or_else(|e| {
                Err(format!(
                    "reading the secrets from Supabase Vault failed: {e}"
                ))
            })
        } else {
            resolve()
        };
        if !force && self.secrets == secrets {
            return Some(false);
        }
        self.secrets = secrets;
        self.channel = self.build_channel();
        Some(true)
    }

    fn build_channel(&self) -> Result<Arc<Channel>, String> {
        let s = &self.settings;
        let secrets = self.secrets.clone()?;
        let target = s.target(&secrets.api_key, &secrets.signing_secret)?;
        Ok(Arc::new(Channel::new(
            target,
            s.timeout,
            s.concurrency,
            &s.ca_file,
        )?))
    }
}
