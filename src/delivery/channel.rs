//! An HTTP channel for one target: ureq's agent with keep-alive connections shared by
//! every thread, TLS roots (the system's or a CA file), a resolver that keeps a
//! name's addresses for a few seconds, and error wording that says what to do.

use super::Attempt;
use crate::model::classify::excerpt;
use crate::model::event::Event;
use crate::model::redact;
use crate::model::request::{self, Target};
use crate::settings::names;
use std::io::ErrorKind;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// An HTTP agent for one configuration: keep-alive connections are shared by all threads.
pub struct Channel {
    pub target: Target,
    agent: ureq::Agent,
    timeout: Duration,
}

impl Channel {
    /// `ca_file`: extra CA certificates (PEM) to trust for https, besides the bundled roots.
    pub fn new(
        target: Target,
        timeout: Duration,
        concurrency: usize,
        ca_file: &str,
    ) -> Result<Channel, String> {
        let mut config = ureq::Agent::config_builder()
            .timeout_global(Some(timeout))
            .max_redirects(0)
            .http_status_as_error(false)
            .user_agent(request::USER_AGENT)
            .max_idle_connections(concurrency.max(1) * 2)
            .max_idle_connections_per_host(concurrency.max(1) * 2);
        if !ca_file.is_empty() {
            let roots = trusted_roots(ca_file)?;
            config = config.tls_config(ureq::tls::TlsConfig::builder().root_certs(roots).build());
        }
        Ok(Channel {
            target,
            agent: ureq::Agent::with_parts(
                config.build(),
                ureq::unversioned::transport::DefaultConnector::default(),
                RecentLookup::<ureq::unversioned::resolver::DefaultResolver>::default(),
            ),
            timeout,
        })
    }

    /// One request; never panics, never blocks longer than the timeout.
    pub fn send(&self, event: &Event) -> Attempt {
        let request = match request::build(&self.target, event) {
            Ok(request) => request,
            Err(why) => return Attempt::Unsendable(why),
        };
        let timestamp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let headers = request::headers(&self.target, &event.id, timestamp, request.body.as_deref());
        // ureq types requests with and without a body apart: the headers go on either.
        fn with<B>(
            req: ureq::RequestBuilder<B>,
            headers: Vec<(String, String)>,
        ) -> ureq::RequestBuilder<B> {
            headers
                .into_iter()
                .fold(req, |req, (name, value)| req.header(name, value))
        }
        let sent = match &request.body {
            Some(body) => {
                let req = match request.method {
                    "PATCH" => self.agent.patch(&request.url),
                    _ => self.agent.post(&request.url),
                };
                with(req, headers).send(body.as_bytes())
            }
            None => with(self.agent.delete(&request.url), headers).call(),
        };
        match sent {
            Ok(mut response) => {
                let status = response.status();
                let header = |name: &str| {
                    response
                        .headers()
                        .get(name)
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_string)
                };
                let retry_after = header("retry-after");
                let location = header("location");
                // Reading the body to the end lets the connection be reused.
                let text = response
                    .body_mut()
                    .with_config()
                    .limit(64 * 1024)
                    .read_to_string()
                    .unwrap_or_default();
                Attempt::Response {
                    status: status.as_u16(),
                    reason: status.canonical_reason().unwrap_or("").to_string(),
                    retry_after,
                    location,
                    body_excerpt: if status.is_success() {
                        String::new()
                    } else {
                        excerpt(text.trim(), 300)
                    },
                }
            }
            Err(e @ ureq::Error::Timeout(_)) => Attempt::Timeout(self.describe(e)),
            Err(e) => Attempt::Transport(self.describe(e)),
        }
    }

    fn describe(&self, error: ureq::Error) -> String {
        let url = redact::redact_userinfo(&self.target.url);
        let text = error.to_string();
        if let Some(advice) = tls_advice(&text) {
            return format!("TLS error talking to {url}: {advice} ({text})");
        }
        match error {
            ureq::Error::Timeout(_) => format!(
                "no answer from {url} within {} ms ({})",
                self.timeout.as_millis(),
                names::TIMEOUT_MS
            ),
            ureq::Error::HostNotFound => format!("host not found: {url}"),
            ureq::Error::ConnectionFailed => format!("could not connect to {url}"),
            ureq::Error::Io(e) if e.kind() == ErrorKind::ConnectionRefused => {
                format!("connection refused by {url}: is the backend running?")
            }
            ureq::Error::Io(e) => format!("network error talking to {url}: {e}"),
            _ => format!("request to {url} failed: {text}"),
        }
    }
}

/// How long a looked-up address of the backend is used for new connections.
pub(super) const LOOKUP_KEPT: Duration = Duration::from_secs(5);

/// ureq looks the backend's host up before every request, a pooled connection or
/// not, and with a timeout set it does so on a thread started for the lookup: a
/// thread per delivered event. This keeps the last lookup for LOOKUP_KEPT, so a
/// name is looked up (with ureq's timeout) at most that often; a change of the
/// name's address reaches new connections within that time. Failures are not kept.
#[derive(Debug, Default)]
pub(super) struct RecentLookup<R = ureq::unversioned::resolver::DefaultResolver> {
    pub(super) inner: R,
    pub(super) last: Mutex<Option<Lookup>>,
}

#[derive(Debug)]
pub(super) struct Lookup {
    scheme: String,
    authority: String,
    pub(super) at: std::time::Instant,
    addrs: ureq::unversioned::resolver::ResolvedSocketAddrs,
}

impl<R: ureq::unversioned::resolver::Resolver> ureq::unversioned::resolver::Resolver
    for RecentLookup<R>
{
    fn resolve(
        &self,
        uri: &ureq::http::Uri,
        config: &ureq::config::Config,
        timeout: ureq::unversioned::transport::NextTimeout,
    ) -> Result<ureq::unversioned::resolver::ResolvedSocketAddrs, ureq::Error> {
        let (scheme, authority) = (uri.scheme_str(), uri.authority().map(|a| a.as_str()));
        if let (Some(scheme), Some(authority)) = (scheme, authority) {
            let last = self.last.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(l) = last.as_ref().filter(|l| {
                l.scheme == scheme && l.authority == authority && l.at.elapsed() < LOOKUP_KEPT
            }) {
                return Ok(l.addrs.clone());
            }
        }
        let addrs = self.inner.resolve(uri, config, timeout)?;
        if let (Some(scheme), Some(authority)) = (scheme, authority) {
            *self.last.lock().unwrap_or_else(|e| e.into_inner()) = Some(Lookup {
                scheme: scheme.to_string(),
                authority: authority.to_string(),
                at: std::time::Instant::now(),
                addrs: addrs.clone(),
            });
        }
        Ok(addrs)
    }
}

/// Plain words for the certificate errors people actually hit.
fn tls_advice(error: &str) -> Option<&'static str> {
    if error.contains("UnknownIssuer") {
        Some("the server's certificate is not signed by a trusted CA; if it comes from your own CA, set pg_new_user_hook.ca_file to that CA's PEM file")
    } else if error.contains("NotValidForName") {
        Some("the server's certificate is not valid for this host name; use the name the certificate was issued for in pg_new_user_hook.url")
    } else if error.contains("Expired") {
        Some("the server's certificate has expired")
    } else if error.contains("invalid peer certificate")
        || error.contains("rustls")
        || error.contains("Tls")
    {
        Some("the TLS handshake failed")
    } else {
        None
    }
}

/// The certificates in `ca_file` plus the Mozilla roots bundled in the library (the
/// ones trusted without `ca_file`): adding your own CA never drops the public ones,
/// whatever the distribution keeps, or does not keep, in /etc/ssl.
pub(super) fn trusted_roots(ca_file: &str) -> Result<ureq::tls::RootCerts, String> {
    let pem = std::fs::read(ca_file)
        .map_err(|e| format!("{} = '{ca_file}' cannot be read: {e}", names::CA_FILE))?;
    let mut certs = Vec::new();
    for item in ureq::tls::parse_pem(&pem) {
        match item {
            Ok(ureq::tls::PemItem::Certificate(cert)) => certs.push(cert.to_owned()),
            Ok(_) => {}
            Err(e) => {
                return Err(format!(
                    "{} = '{ca_file}' is not valid PEM: {e}",
                    names::CA_FILE
                ))
            }
        }
    }
    if certs.is_empty() {
        return Err(format!(
            "{} = '{ca_file}' contains no certificate (expected PEM, -----BEGIN CERTIFICATE-----)",
            names::CA_FILE
        ));
    }
    certs.extend(
        webpki_root_certs::TLS_SERVER_ROOT_CERTS
            .iter()
            .map(|der| ureq::tls::Certificate::from_der(der.as_ref()).to_owned()),
    );
    Ok(ureq::tls::RootCerts::new_with_certs(&certs))
}
