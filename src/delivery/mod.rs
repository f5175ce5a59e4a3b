//! Sends events over HTTP on a pool of threads, outside any transaction.
//!
//! Nothing here touches Postgres: the worker's main thread hands in jobs and
//! collects outcomes. Each finished job writes one byte to a socket pair whose
//! read end the main thread waits on together with its latch, so it wakes as
//! soon as a result is ready without polling.

pub use crate::model::classify::Attempt;
use crate::model::classify::{self, excerpt};
use crate::model::event::Event;
use crate::model::redact;
use crate::model::request::{self, Target};
use crate::settings::names;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// What happened to a job. `sent` is false when the pool stopped before sending it;
/// `current`, whether the target it was sent to is still the one requests go to (a
/// new URL makes the old one's answers say nothing about the backend now).
pub struct Outcome {
    pub id: String,
    pub attempt: u32,
    pub sent: bool,
    pub current: bool,
    pub result: Attempt,
}

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
const LOOKUP_KEPT: Duration = Duration::from_secs(5);

/// ureq looks the backend's host up before every request, a pooled connection or
/// not, and with a timeout set it does so on a thread started for the lookup: a
/// thread per delivered event. This keeps the last lookup for LOOKUP_KEPT, so a
/// name is looked up (with ureq's timeout) at most that often; a change of the
/// name's address reaches new connections within that time. Failures are not kept.
#[derive(Debug, Default)]
struct RecentLookup<R = ureq::unversioned::resolver::DefaultResolver> {
    inner: R,
    last: Mutex<Option<Lookup>>,
}

#[derive(Debug)]
struct Lookup {
    scheme: String,
    authority: String,
    at: std::time::Instant,
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
fn trusted_roots(ca_file: &str) -> Result<ureq::tls::RootCerts, String> {
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

enum Message {
    Send(Event),
    /// Look whether there are more threads than wanted, and leave if so.
    Nudge,
}

/// How many sending threads run, and how many should: a thread leaves only between
/// two requests, so after the pool shrinks a busy thread finishes its request, and
/// none starts one while more threads run than `concurrency` allows.
#[derive(Default)]
struct Headcount {
    live: AtomicUsize,
    wanted: AtomicUsize,
}

impl Headcount {
    /// Whether the calling thread is one too many, in which case it is counted out.
    fn leave_if_too_many(&self) -> bool {
        let mut live = self.live.load(Ordering::SeqCst);
        while live > self.wanted.load(Ordering::SeqCst) {
            match self
                .live
                .compare_exchange(live, live - 1, Ordering::SeqCst, Ordering::SeqCst)
            {
                Ok(_) => return true,
                Err(now) => live = now,
            }
        }
        false
    }
}

/// Where requests go now: read by a thread when it starts a request, so a new URL or
/// key applies to every request not yet on the wire (None: delivery is paused).
type CurrentChannel = Arc<Mutex<Option<Arc<Channel>>>>;

/// Threads that send jobs, and the queue of their outcomes.
pub struct Pool {
    jobs: Sender<Message>,
    job_queue: Arc<Mutex<Receiver<Message>>>,
    outcomes: Receiver<Outcome>,
    outcome_sender: Sender<Outcome>,
    channel: CurrentChannel,
    wake_read: UnixStream,
    wake_write: UnixStream,
    stopping: Arc<AtomicBool>,
    /// Set while delivery is paused or the backend is down: jobs not yet on the
    /// wire come back unsent, except a probe.
    holding: Arc<AtomicBool>,
    breaker: Arc<Trip>,
    headcount: Arc<Headcount>,
    threads: Vec<JoinHandle<()>>,
    in_flight: usize,
}

impl Pool {
    pub fn new(threads: usize) -> std::io::Result<Pool> {
        let (wake_read, wake_write) = UnixStream::pair()?;
        wake_read.set_nonblocking(true)?;
        wake_write.set_nonblocking(true)?;
        let (jobs, job_queue) = mpsc::channel();
        let (outcome_sender, outcomes) = mpsc::channel();
        let mut pool = Pool {
            jobs,
            job_queue: Arc::new(Mutex::new(job_queue)),
            outcomes,
            outcome_sender,
            channel: Arc::new(Mutex::new(None)),
            wake_read,
            wake_write,
            stopping: Arc::new(AtomicBool::new(false)),
            holding: Arc::new(AtomicBool::new(false)),
            breaker: Arc::new(Trip::default()),
            headcount: Arc::new(Headcount::default()),
            threads: Vec::new(),
            in_flight: 0,
        };
        pool.resize(threads)?;
        Ok(pool)
    }

    /// The descriptor to wait on: readable when outcomes are ready.
    pub fn wake_fd(&self) -> i32 {
        use std::os::fd::AsRawFd;
        self.wake_read.as_raw_fd()
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Threads running now (some may be about to leave after a shrink).
    #[cfg(test)]
    pub fn threads(&self) -> usize {
        self.threads.iter().filter(|t| !t.is_finished()).count()
    }

    /// Grows or shrinks the number of sending threads; jobs already queued are kept.
    pub fn resize(&mut self, wanted: usize) -> std::io::Result<()> {
        let wanted = wanted.max(1);
        self.threads.retain(|t| !t.is_finished());
        self.headcount.wanted.store(wanted, Ordering::SeqCst);
        let live = self.headcount.live.load(Ordering::SeqCst);
        // Threads waiting for a job look at the count; busy ones do after their request.
        for _ in wanted..live {
            let _ = self.jobs.send(Message::Nudge);
        }
        while self.headcount.live.load(Ordering::SeqCst) < wanted {
            let queue = Arc::clone(&self.job_queue);
            let outcomes = self.outcome_sender.clone();
            let channel = Arc::clone(&self.channel);
            let wake = self.wake_write.try_clone()?;
            let flags = Flags {
                stopping: Arc::clone(&self.stopping),
                holding: Arc::clone(&self.holding),
                breaker: Arc::clone(&self.breaker),
                headcount: Arc::clone(&self.headcount),
                requeue: self.jobs.clone(),
            };
            self.headcount.live.fetch_add(1, Ordering::SeqCst);
            let spawned = with_signals_blocked(|| {
                std::thread::Builder::new()
                    .name("pg_new_user_hook sender".into())
                    .spawn(move || sender_loop(queue, channel, outcomes, wake, flags))
            });
            match spawned {
                Ok(handle) => self.threads.push(handle),
                Err(e) => {
                    self.headcount.live.fetch_sub(1, Ordering::SeqCst);
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// Where requests not yet on the wire go from now on (None: they come back unsent).
    pub fn set_channel(&self, channel: Option<Arc<Channel>>) {
        *self.channel.lock().unwrap_or_else(|e| e.into_inner()) = channel;
    }

    /// Holds back (true) or lets go (false) the jobs not yet on the wire. Letting
    /// go also starts the threads' count of failures over.
    pub fn hold(&self, on: bool) {
        if !on {
            self.breaker.failures.store(0, Ordering::SeqCst);
        }
        self.holding.store(on, Ordering::SeqCst);
    }

    /// After this many retryable failures in a row the threads hold back by
    /// themselves, before the worker has read the outcomes (0: never).
    pub fn trip_after(&self, failures: u32) {
        self.breaker.after.store(failures, Ordering::SeqCst);
    }

    /// Whether the threads hold back because the backend keeps failing.
    pub fn tripped(&self) -> bool {
        self.breaker.tripped()
    }

    pub fn submit(&mut self, event: Event) {
        self.in_flight += 1;
        if let Err(mpsc::SendError(Message::Send(job))) = self.jobs.send(Message::Send(event)) {
            // Cannot happen while the pool owns its queue; report it as unsent rather than lose it.
            let _ = self.outcome_sender.send(Outcome {
                id: job.id,
                attempt: job.attempt,
                sent: false,
                current: true,
                result: Attempt::Transport("delivery thread pool is gone".into()),
            });
        }
    }

    /// Outcomes ready now, without blocking.
    pub fn take_outcomes(&mut self) -> Vec<Outcome> {
        let mut buf = [0u8; 256];
        while matches!(self.wake_read.read(&mut buf), Ok(n) if n > 0) {}
        let outcomes: Vec<Outcome> = self.outcomes.try_iter().collect();
        self.in_flight -= outcomes.len();
        outcomes
    }

    /// Stops sending: queued jobs come back unsent, requests in progress finish
    /// (each within the timeout). Returns every outstanding outcome.
    pub fn stop(&mut self, wait: Duration) -> Vec<Outcome> {
        self.stopping.store(true, Ordering::SeqCst);
        let deadline = std::time::Instant::now() + wait;
        let mut outcomes = Vec::new();
        while self.in_flight > 0 {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self
                .outcomes
                .recv_timeout(left.max(Duration::from_millis(1)))
            {
                Ok(outcome) => {
                    self.in_flight -= 1;
                    outcomes.push(outcome);
                }
                Err(_) => break,
            }
        }
        outcomes
    }
}

impl Drop for Pool {
    /// The threads hold a sender of the job queue (to put a job back): tell them all to leave.
    fn drop(&mut self) {
        self.headcount.wanted.store(0, Ordering::SeqCst);
        for _ in 0..self.headcount.live.load(Ordering::SeqCst) {
            let _ = self.jobs.send(Message::Nudge);
        }
    }
}

/// Runs `spawn` with every signal blocked in the calling thread, so the threads it
/// starts inherit a full mask: signals meant for the worker (SIGTERM, SIGHUP,
/// SIGUSR1 for latches) must run their handlers on the worker's own thread.
fn with_signals_blocked<R>(spawn: impl FnOnce() -> R) -> R {
    // SAFETY: plain signal-mask calls on this thread, restored before returning.
    unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        let mut previous: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_BLOCK, &all, &mut previous);
        let result = spawn();
        libc::pthread_sigmask(libc::SIG_SETMASK, &previous, std::ptr::null_mut());
        result
    }
}

/// The sending threads' own count of retryable failures in a row: with every
/// thread sending, waiting for the worker to read the outcomes would let each
/// thread send more to a backend that is down.
#[derive(Default)]
struct Trip {
    failures: AtomicU32,
    after: AtomicU32,
}

impl Trip {
    fn tripped(&self) -> bool {
        let after = self.after.load(Ordering::SeqCst);
        after > 0 && self.failures.load(Ordering::SeqCst) >= after
    }

    fn observe(&self, result: &Attempt) {
        match classify::backend_up(result) {
            Some(true) => self.failures.store(0, Ordering::SeqCst),
            Some(false) => {
                self.failures.fetch_add(1, Ordering::SeqCst);
            }
            None => {}
        }
    }
}

/// What the worker tells the sending threads without a message.
struct Flags {
    stopping: Arc<AtomicBool>,
    holding: Arc<AtomicBool>,
    breaker: Arc<Trip>,
    headcount: Arc<Headcount>,
    /// Where a thread leaving puts back the job it took.
    requeue: Sender<Message>,
}

fn sender_loop(
    queue: Arc<Mutex<Receiver<Message>>>,
    current: CurrentChannel,
    outcomes: Sender<Outcome>,
    mut wake: UnixStream,
    flags: Flags,
) {
    loop {
        if flags.headcount.leave_if_too_many() {
            return;
        }
        let message = match queue.lock() {
            Ok(rx) => rx.recv(),
            Err(_) => return,
        };
        let job = match message {
            Ok(Message::Send(job)) => job,
            Ok(Message::Nudge) => continue,
            Err(_) => return,
        };
        if flags.headcount.leave_if_too_many() {
            // Taken before the pool shrank: another thread sends it.
            let _ = flags.requeue.send(Message::Send(job));
            return;
        }
        let channel = current.lock().ok().and_then(|c| c.clone());
        let mut still_current = true;
        let (sent, result) = if flags.stopping.load(Ordering::SeqCst) {
            (
                false,
                Attempt::Transport("not sent: the worker is shutting down".into()),
            )
        } else if !job.probe && (flags.holding.load(Ordering::SeqCst) || flags.breaker.tripped()) {
            (false, Attempt::Transport("not sent: held back".into()))
        } else if let Some(channel) = channel {
            let result =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| channel.send(&job)))
                    .unwrap_or_else(|_| {
                        Attempt::Transport("internal error while sending (panic)".into())
                    });
            still_current = current
                .lock()
                .map(|c| c.as_ref().is_some_and(|now| Arc::ptr_eq(now, &channel)))
                .unwrap_or(false);
            if still_current {
                flags.breaker.observe(&result);
            }
            (true, result)
        } else {
            (
                false,
                Attempt::Transport("not sent: delivery is paused by configuration".into()),
            )
        };
        let outcome = Outcome {
            id: job.id,
            attempt: job.attempt,
            sent,
            current: still_current,
            result,
        };
        if outcomes.send(outcome).is_err() {
            return;
        }
        // A full socket buffer already means "wake up"; nothing to do then.
        let _ = wake.write(&[1]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    /// Counts its lookups; every name resolves to 127.0.0.1 and the URI's port.
    #[derive(Debug, Default)]
    struct Counting(AtomicU32);

    impl ureq::unversioned::resolver::Resolver for Counting {
        fn resolve(
            &self,
            uri: &ureq::http::Uri,
            _: &ureq::config::Config,
            _: ureq::unversioned::transport::NextTimeout,
        ) -> Result<ureq::unversioned::resolver::ResolvedSocketAddrs, ureq::Error> {
            self.0.fetch_add(1, Ordering::SeqCst);
            let mut addrs = self.empty();
            addrs.push(std::net::SocketAddr::from((
                [127, 0, 0, 1],
                uri.port_u16().unwrap_or(80),
            )));
            Ok(addrs)
        }
    }

    #[test]
    fn a_host_is_looked_up_once_for_many_requests_and_again_for_another_host() {
        use ureq::unversioned::resolver::Resolver;
        let lookup = RecentLookup::<Counting>::default();
        let config = ureq::Agent::config_builder().build();
        let timeout = || ureq::unversioned::transport::NextTimeout {
            after: Duration::from_secs(5).into(),
            reason: ureq::Timeout::Global,
            per_read: None,
            per_write: None,
        };
        let a: ureq::http::Uri = "http://backend.internal:3000/users".parse().unwrap();
        let b: ureq::http::Uri = "http://other.internal:3001/users".parse().unwrap();
        for _ in 0..100 {
            let addrs = lookup.resolve(&a, &config, timeout()).unwrap();
            assert_eq!(addrs[0].port(), 3000);
        }
        assert_eq!(lookup.inner.0.load(Ordering::SeqCst), 1);
        assert_eq!(
            lookup.resolve(&b, &config, timeout()).unwrap()[0].port(),
            3001
        );
        assert_eq!(lookup.inner.0.load(Ordering::SeqCst), 2);
        // Kept for LOOKUP_KEPT only.
        lookup.last.lock().unwrap().as_mut().unwrap().at -= LOOKUP_KEPT;
        lookup.resolve(&b, &config, timeout()).unwrap();
        assert_eq!(lookup.inner.0.load(Ordering::SeqCst), 3);
    }

    /// A one-shot HTTP responder on loopback, enough to exercise the client side.
    fn serve(responses: Vec<&'static str>) -> (String, std::thread::JoinHandle<Vec<String>>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/users", listener.local_addr().unwrap());
        let handle = std::thread::spawn(move || {
            let mut requests = Vec::new();
            for response in responses {
                let (mut stream, _) = listener.accept().unwrap();
                stream
                    .set_read_timeout(Some(Duration::from_secs(5)))
                    .unwrap();
                let mut buf = vec![0u8; 65536];
                let mut got = Vec::new();
                loop {
                    let n = stream.read(&mut buf).unwrap();
                    got.extend_from_slice(&buf[..n]);
                    let text = String::from_utf8_lossy(&got).to_string();
                    if let Some(head_end) = text.find("\r\n\r\n") {
                        let len = text[..head_end]
                            .lines()
                            .find_map(|l| {
                                l.to_ascii_lowercase()
                                    .strip_prefix("content-length:")
                                    .map(|v| v.trim().parse::<usize>().unwrap())
                            })
                            .unwrap_or(0);
                        if got.len() >= head_end + 4 + len {
                            requests.push(text);
                            break;
                        }
                    }
                }
                stream.write_all(response.as_bytes()).unwrap();
            }
            requests
        });
        (url, handle)
    }

    fn job() -> Event {
        Event {
            id: "evt-1".into(),
            attempt: 1,
            kind: crate::model::event::Kind::Created,
            record: r#"{"id":"u-1","email":"a@example.com"}"#.into(),
            old_record: None,
            source: "auth.users".into(),
            created_at: "2026-11-28T10:00:00+00:00".into(),
            probe: false,
        }
    }

    fn channel(url: &str, key: &str, timeout: Duration) -> Channel {
        let target = request::target(&request::Config {
            url,
            api_key: key,
            api_key_header: "X-API-Key",
            format: request::Format::Minimal,
            fields: "",
            signing_secret: "",
        })
        .unwrap();
        Channel::new(target, timeout, 1, "").unwrap()
    }

    #[test]
    fn posts_json_with_headers_and_reads_status() {
        let (url, server) = serve(vec![
            "HTTP/1.1 201 Created\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        ]);
        let channel = channel(&url, "k", Duration::from_secs(5));
        let result = channel.send(&job());
        assert!(
            matches!(result, Attempt::Response { status: 201, .. }),
            "{result:?}"
        );
        let raw = server.join().unwrap().remove(0);
        assert!(raw.starts_with("POST /users HTTP/1.1\r\n"), "{raw}");
        let lower = raw.to_ascii_lowercase();
        assert!(lower.contains("\r\nx-api-key: k\r\n"), "{raw}");
        assert!(lower.contains("\r\nwebhook-id: evt-1\r\n"), "{raw}");
        assert!(
            lower.contains("\r\ncontent-type: application/json\r\n"),
            "{raw}"
        );
        assert!(
            raw.ends_with(r#"{"email":"a@example.com","id":"u-1"}"#),
            "{raw}"
        );
    }

    #[test]
    fn an_update_is_a_patch_and_a_deletion_a_delete_without_body_of_the_users_resource() {
        let (url, server) = serve(vec![
            "HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            "HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n",
        ]);
        let channel = channel(&url, "k", Duration::from_secs(5));
        let updated = Event {
            kind: crate::model::event::Kind::Updated,
            record: r#"{"id":"u-1","email":"new@example.com"}"#.into(),
            ..job()
        };
        let deleted = Event {
            kind: crate::model::event::Kind::Deleted,
            ..job()
        };
        assert!(matches!(
            channel.send(&updated),
            Attempt::Response { status: 200, .. }
        ));
        assert!(matches!(
            channel.send(&deleted),
            Attempt::Response { status: 204, .. }
        ));
        let raw = server.join().unwrap();
        assert!(
            raw[0].starts_with("PATCH /users/u-1 HTTP/1.1\r\n"),
            "{}",
            raw[0]
        );
        assert!(
            raw[0].ends_with(r#"{"email":"new@example.com","id":"u-1"}"#),
            "{}",
            raw[0]
        );
        assert!(
            raw[1].starts_with("DELETE /users/u-1 HTTP/1.1\r\n"),
            "{}",
            raw[1]
        );
        let lower = raw[1].to_ascii_lowercase();
        assert!(
            lower.contains("\r\nwebhook-id: evt-1\r\n") && lower.contains("\r\nx-api-key: k\r\n"),
            "{}",
            raw[1]
        );
        assert!(
            !lower.contains("content-type") && raw[1].ends_with("\r\n\r\n"),
            "{}",
            raw[1]
        );
    }

    #[test]
    fn redirects_are_returned_not_followed() {
        let (url, server) = serve(vec![
            "HTTP/1.1 302 Found\r\nLocation: http://127.0.0.1:1/elsewhere\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        ]);
        let channel = channel(&url, "", Duration::from_secs(5));
        match channel.send(&job()) {
            Attempt::Response {
                status: 302,
                location: Some(l),
                ..
            } => assert_eq!(l, "http://127.0.0.1:1/elsewhere"),
            other => panic!("{other:?}"),
        }
        assert_eq!(server.join().unwrap().len(), 1);
    }

    #[test]
    fn refused_connection_is_a_transport_error() {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let url = format!("http://127.0.0.1:{port}/users");
        let channel = channel(&url, "", Duration::from_secs(5));
        match channel.send(&job()) {
            Attempt::Transport(e) => assert!(e.contains("127.0.0.1"), "{e}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn silent_server_times_out() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/users", listener.local_addr().unwrap());
        let channel = channel(&url, "", Duration::from_millis(300));
        let started = std::time::Instant::now();
        match channel.send(&job()) {
            Attempt::Timeout(e) => assert!(e.contains("within 300 ms"), "{e}"),
            other => panic!("{other:?}"),
        }
        assert!(started.elapsed() < Duration::from_secs(3));
        drop(listener);
    }

    #[test]
    fn pool_returns_every_outcome_and_wakes_the_reader() {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let url = format!("http://127.0.0.1:{port}/users");
        let channel = Arc::new(channel(&url, "", Duration::from_secs(2)));
        let mut pool = Pool::new(4).unwrap();
        pool.set_channel(Some(channel));
        for i in 0..20 {
            pool.submit(Event {
                id: format!("e{i}"),
                record: "{}".into(),
                ..job()
            });
        }
        assert_eq!(pool.in_flight(), 20);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let mut got = Vec::new();
        while got.len() < 20 && std::time::Instant::now() < deadline {
            got.extend(pool.take_outcomes());
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(got.len(), 20);
        assert_eq!(pool.in_flight(), 0);
        // Records without an id can never be sent.
        assert!(got
            .iter()
            .all(|o| matches!(o.result, Attempt::Unsendable(_))));
        pool.resize(1).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while pool.threads() > 1 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(pool.threads(), 1);
        assert!(pool.stop(Duration::from_secs(1)).is_empty());
    }

    /// A backend on loopback that takes `delay` over each request (one per connection)
    /// and counts how many it was handling at most at once.
    fn slow_backend(delay: Duration) -> (String, Arc<std::sync::atomic::AtomicUsize>) {
        use std::sync::atomic::AtomicUsize;
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/users", listener.local_addr().unwrap());
        let open = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let seen = Arc::clone(&most);
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                let (open, most) = (Arc::clone(&open), Arc::clone(&most));
                std::thread::spawn(move || {
                    let mut buf = [0u8; 4096];
                    let _ = stream.read(&mut buf);
                    let now = open.fetch_add(1, Ordering::SeqCst) + 1;
                    most.fetch_max(now, Ordering::SeqCst);
                    std::thread::sleep(delay);
                    open.fetch_sub(1, Ordering::SeqCst);
                    let _ = stream.write_all(
                        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                    );
                });
            }
        });
        (url, seen)
    }

    #[test]
    fn a_shrunk_pool_never_sends_more_requests_at_once_than_it_has_threads() {
        let (url, most) = slow_backend(Duration::from_millis(50));
        let mut pool = Pool::new(32).unwrap();
        pool.set_channel(Some(Arc::new(channel(&url, "", Duration::from_secs(5)))));
        pool.resize(4).unwrap();
        // The threads told to leave have left; a reload resizes to the same count again.
        std::thread::sleep(Duration::from_millis(200));
        pool.resize(4).unwrap();
        for i in 0..40 {
            pool.submit(Event {
                id: format!("e{i}"),
                record: r#"{"id":"u-1","email":"a@example.com"}"#.into(),
                ..job()
            });
        }
        let got = outcomes_within(&mut pool, 40, Duration::from_secs(20));
        assert_eq!(got.len(), 40);
        assert!(
            got.iter()
                .all(|o| o.sent && matches!(o.result, Attempt::Response { status: 200, .. })),
            "{:?}",
            got.iter()
                .map(|o| format!("{:?}", o.result))
                .collect::<Vec<_>>()
        );
        let at_once = most.load(Ordering::SeqCst);
        assert!(
            at_once <= 4 && at_once >= 2,
            "{at_once} requests at once with 4 threads"
        );
        assert_eq!(pool.threads(), 4);
    }

    fn outcomes_within(pool: &mut Pool, n: usize, within: Duration) -> Vec<Outcome> {
        let deadline = std::time::Instant::now() + within;
        let mut got = Vec::new();
        while got.len() < n && std::time::Instant::now() < deadline {
            got.extend(pool.take_outcomes());
            std::thread::sleep(Duration::from_millis(5));
        }
        got
    }

    #[test]
    fn queued_requests_go_to_the_target_set_after_they_were_queued() {
        // The old backend takes the first request and never answers.
        let old = TcpListener::bind("127.0.0.1:0").unwrap();
        let old_url = format!("http://{}/users", old.local_addr().unwrap());
        let (new_url, new) = serve(vec![
            "HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
        ]);
        let mut pool = Pool::new(1).unwrap();
        pool.set_channel(Some(Arc::new(channel(
            &old_url,
            "old-key",
            Duration::from_millis(500),
        ))));
        for i in 0..3 {
            pool.submit(Event {
                id: format!("e{i}"),
                ..job()
            });
        }
        let (_on_the_wire, _) = old.accept().unwrap();
        pool.set_channel(Some(Arc::new(channel(
            &new_url,
            "new-key",
            Duration::from_secs(2),
        ))));
        let got = outcomes_within(&mut pool, 3, Duration::from_secs(10));
        assert_eq!(got.len(), 3);
        let answered: Vec<&str> = got
            .iter()
            .filter(|o| matches!(o.result, Attempt::Response { status: 200, .. }))
            .map(|o| o.id.as_str())
            .collect();
        assert_eq!(
            answered,
            ["e1", "e2"],
            "only the request on the wire went to the old target"
        );
        let requests = new.join().unwrap();
        assert!(requests.iter().all(|r| r.contains("new-key")));
    }

    #[test]
    fn without_a_target_queued_requests_come_back_unsent() {
        let mut pool = Pool::new(2).unwrap();
        pool.set_channel(None);
        for i in 0..5 {
            pool.submit(Event {
                id: format!("e{i}"),
                ..job()
            });
        }
        let got = outcomes_within(&mut pool, 5, Duration::from_secs(10));
        assert_eq!(got.len(), 5);
        assert!(got.iter().all(|o| !o.sent), "unsent events stay pending");
    }

    #[test]
    fn while_holding_only_a_probe_is_sent() {
        let (url, server) = serve(vec!["HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n"]);
        let mut pool = Pool::new(2).unwrap();
        pool.set_channel(Some(Arc::new(channel(&url, "", Duration::from_secs(2)))));
        pool.hold(true);
        for i in 0..4 {
            pool.submit(Event {
                id: format!("e{i}"),
                probe: i == 2,
                ..job()
            });
        }
        let got = outcomes_within(&mut pool, 4, Duration::from_secs(10));
        assert_eq!(got.len(), 4);
        let sent: Vec<&str> = got
            .iter()
            .filter(|o| o.sent)
            .map(|o| o.id.as_str())
            .collect();
        assert_eq!(sent, ["e2"]);
        assert_eq!(server.join().unwrap().len(), 1);
    }

    #[test]
    fn the_threads_stop_sending_after_the_failures_that_trip_the_breaker() {
        // `connection: close`: each request comes on a connection of its own, as the
        // one-shot server expects (a reused connection could meet its close first).
        let (url, server) = serve(vec![
            "HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
            "HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
        ]);
        // One thread, so the order is known: two failures, then held back.
        let mut pool = Pool::new(1).unwrap();
        pool.set_channel(Some(Arc::new(channel(&url, "", Duration::from_secs(2)))));
        pool.trip_after(2);
        for i in 0..5 {
            pool.submit(Event {
                id: format!("e{i}"),
                ..job()
            });
        }
        let got = outcomes_within(&mut pool, 5, Duration::from_secs(10));
        let sent: Vec<&str> = got
            .iter()
            .filter(|o| o.sent)
            .map(|o| o.id.as_str())
            .collect();
        assert_eq!(sent, ["e0", "e1"]);
        assert!(pool.tripped());
        assert_eq!(server.join().unwrap().len(), 2);
        pool.hold(false);
        assert!(!pool.tripped(), "letting go starts the count over");
    }

    #[test]
    fn failures_of_a_target_replaced_meanwhile_do_not_count_towards_the_trip() {
        // Accepts connections (the kernel does) and never answers: each request times out.
        let silent = TcpListener::bind("127.0.0.1:0").unwrap();
        let old = format!("http://{}/users", silent.local_addr().unwrap());
        let mut pool = Pool::new(2).unwrap();
        pool.set_channel(Some(Arc::new(channel(
            &old,
            "",
            Duration::from_millis(300),
        ))));
        pool.trip_after(2);
        for i in 0..2 {
            pool.submit(Event {
                id: format!("e{i}"),
                ..job()
            });
        }
        // A new URL while both are on the wire.
        std::thread::sleep(Duration::from_millis(50));
        pool.set_channel(Some(Arc::new(channel(
            "http://127.0.0.1:9/users",
            "",
            Duration::from_millis(300),
        ))));
        let got = outcomes_within(&mut pool, 2, Duration::from_secs(10));
        assert!(got
            .iter()
            .all(|o| o.sent && !o.current && matches!(o.result, Attempt::Timeout(_))));
        assert!(
            !pool.tripped(),
            "the old backend's failures tripped the new one"
        );
    }

    #[test]
    fn a_ca_file_adds_to_the_bundled_roots_instead_of_replacing_them() {
        use base64::Engine;
        let dir =
            std::env::temp_dir().join(format!("pg_new_user_hook-ca-add-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // Any certificate does as "your own CA": one of the bundled ones, as PEM.
        let der = webpki_root_certs::TLS_SERVER_ROOT_CERTS[0].as_ref();
        let pem = format!(
            "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
            base64::engine::general_purpose::STANDARD.encode(der)
        );
        let file = dir.join("own-ca.pem");
        std::fs::write(&file, pem).unwrap();
        let roots = trusted_roots(file.to_str().unwrap()).unwrap();
        std::fs::remove_dir_all(dir).unwrap();
        let ureq::tls::RootCerts::Specific(certs) = roots else {
            panic!("expected a specific set of roots");
        };
        assert_eq!(
            certs.len(),
            1 + webpki_root_certs::TLS_SERVER_ROOT_CERTS.len(),
            "the CA file's certificate and every bundled root"
        );
    }

    #[test]
    fn ca_file_problems_are_explained() {
        let dir = std::env::temp_dir().join(format!("pg_new_user_hook-ca-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "not a certificate").unwrap();
        let err = trusted_roots(empty.to_str().unwrap()).err().unwrap();
        assert!(err.contains("contains no certificate"), "{err}");
        let err = trusted_roots("/nonexistent/ca.pem").err().unwrap();
        assert!(err.contains("cannot be read"), "{err}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
