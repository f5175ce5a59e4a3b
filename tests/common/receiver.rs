//! The application backend, as the tests (and the benchmark) see it: an HTTP server
//! on 127.0.0.1 in the test process that records every request and answers as told.
//!
//! Built on hyper with a connection task each, so any number of requests can be
//! held open at once (a hanging backend), and a held request never keeps another
//! connection waiting.

use super::*;
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use std::convert::Infallible;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

/// One request as the receiver saw it.
#[derive(Clone, Debug)]
pub struct Received {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: String,
    pub at: Instant,
    /// The status the receiver answered with (None: it never answered).
    pub answered: Option<u16>,
    /// When it decided that answer.
    pub answered_at: Option<Instant>,
}

impl Received {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap()
    }
}

/// How the receiver answers request number n (0-based).
pub enum Reply {
    Status(u16),
    StatusWith(u16, &'static str, String),
    /// Accept and never answer (until the receiver is dropped).
    Hang,
}

/// Releases the requests a `Receiver::holding_after` holds.
pub struct Gate(Arc<AtomicBool>);

impl Gate {
    pub fn open(&self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

type Behaviour = dyn Fn(usize, &Received) -> Reply + Send + Sync;

struct Shared {
    requests: Mutex<Vec<Received>>,
    behaviour: Box<Behaviour>,
}

pub struct Receiver {
    pub port: u16,
    pub url: String,
    shared: Arc<Shared>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Receiver {
    /// `behaviour` may block (it runs on a thread of its own per request).
    pub fn start(
        behaviour: impl Fn(usize, &Received) -> Reply + Send + Sync + 'static,
    ) -> Receiver {
        Receiver::start_on(0, behaviour)
    }

    pub fn ok() -> Receiver {
        Receiver::start(|_, _| Reply::Status(200))
    }

    /// A backend answering 204, or the status stored in the returned switch: a
    /// backend going down (503, 429...) and coming back.
    pub fn switchable() -> (Receiver, Arc<std::sync::atomic::AtomicU16>) {
        let status = Arc::new(std::sync::atomic::AtomicU16::new(204));
        let answer = Arc::clone(&status);
        let receiver = Receiver::start(move |_, _| Reply::Status(answer.load(Ordering::SeqCst)));
        (receiver, status)
    }

    /// A backend that answers the first `answered` requests with 200 and holds every
    /// later one until the returned gate is opened, then answers it 200 too (even if
    /// its sender is gone by then, as a backend that did the work would). Puts a crash
    /// in the middle of a backlog with requests in flight, whatever the machine's speed.
    pub fn holding_after(answered: usize) -> (Receiver, Gate) {
        let gate = Gate(Arc::new(AtomicBool::new(false)));
        let open = Arc::clone(&gate.0);
        let receiver = Receiver::start(move |n, _| {
            while n >= answered && !open.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(5));
            }
            Reply::Status(200)
        });
        (receiver, gate)
    }

    pub fn start_on(
        port: u16,
        behaviour: impl Fn(usize, &Received) -> Reply + Send + Sync + 'static,
    ) -> Receiver {
        let shared = Arc::new(Shared {
            requests: Mutex::new(Vec::new()),
            behaviour: Box::new(behaviour),
        });
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .max_blocking_threads(1024)
            .enable_all()
            .build()
            .unwrap();
        let listener = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
        let port = listener.local_addr().unwrap().port();
        listener.set_nonblocking(true).unwrap();
        let listener = {
            let _context = runtime.enter();
            tokio::net::TcpListener::from_std(listener).unwrap()
        };
        let accepting = Arc::clone(&shared);
        runtime.spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let shared = Arc::clone(&accepting);
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |request| {
                        handle(Arc::clone(&shared), request)
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Receiver {
            port,
            url: format!("http://127.0.0.1:{port}/users"),
            shared,
            runtime: Some(runtime),
        }
    }

    pub fn requests(&self) -> Vec<Received> {
        self.shared.requests.lock().unwrap().clone()
    }

    /// The requests answered with a 2xx: the deliveries.
    pub fn accepted(&self) -> Vec<Received> {
        self.requests()
            .into_iter()
            .filter(|r| r.answered.is_some_and(|s| (200..300).contains(&s)))
            .collect()
    }

    pub fn count(&self) -> usize {
        self.shared.requests.lock().unwrap().len()
    }

    /// Waits until at least `n` requests arrived; returns them all.
    pub fn wait_for_requests(&self, n: usize, within: Duration) -> Vec<Received> {
        wait_for(&format!("{n} requests at the receiver"), within, || {
            (self.count() >= n).then(|| self.requests())
        })
    }

    /// Runs `look` on the requests received so far, without copying them.
    pub fn inspect<T>(&self, look: impl FnOnce(&[Received]) -> T) -> T {
        look(&self.shared.requests.lock().unwrap())
    }
}

async fn handle(
    shared: Arc<Shared>,
    request: hyper::Request<Incoming>,
) -> Result<hyper::Response<Full<Bytes>>, Infallible> {
    let method = request.method().to_string();
    let path = request.uri().to_string();
    let headers = request
        .headers()
        .iter()
        .map(|(k, v)| (k.to_string(), String::from_utf8_lossy(v.as_bytes()).into()))
        .collect();
    let body = match request.into_body().collect().await {
        Ok(body) => String::from_utf8_lossy(&body.to_bytes()).into_owned(),
        // The sender went away mid-request (a killed worker): no request was made, as a
        // real backend, which never sees a truncated body, would count it.
        Err(_) => {
            return Ok(hyper::Response::builder()
                .status(400)
                .body(Full::new(Bytes::new()))
                .unwrap())
        }
    };
    let received = Received {
        method,
        path,
        headers,
        body,
        at: Instant::now(),
        answered: None,
        answered_at: None,
    };
    let n = {
        let mut all = shared.requests.lock().unwrap();
        all.push(received.clone());
        all.len() - 1
    };
    // Decided and recorded in a task of its own, which runs to its end even if the
    // sender hangs up meanwhile: a backend that did the work answered, whether or
    // not the answer still reaches anyone.
    let answer = tokio::spawn(async move {
        let deciding = Arc::clone(&shared);
        let reply = tokio::task::spawn_blocking(move || (deciding.behaviour)(n, &received))
            .await
            .unwrap_or(Reply::Hang);
        let (code, header) = match reply {
            Reply::Status(code) => (code, None),
            Reply::StatusWith(code, name, value) => (code, Some((name, value))),
            Reply::Hang => return None,
        };
        {
            let mut all = shared.requests.lock().unwrap();
            all[n].answered = Some(code);
            all[n].answered_at = Some(Instant::now());
        }
        Some((code, header))
    });
    let Ok(Some((code, header))) = answer.await else {
        return std::future::pending().await;
    };
    let body = if code >= 400 {
        "{\"message\":\"rejected by test receiver\"}"
    } else {
        ""
    };
    let mut response = hyper::Response::builder().status(code);
    if let Some((name, value)) = header {
        response = response.header(name, value);
    }
    Ok(response.body(Full::new(Bytes::from(body))).unwrap())
}

impl Drop for Receiver {
    fn drop(&mut self) {
        // Closes every connection, held ones included.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// A port with nothing listening on it (for "backend down" scenarios).
pub fn closed_port() -> u16 {
    free_port()
}
