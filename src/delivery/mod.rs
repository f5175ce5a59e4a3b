//! Sends events over HTTP on a pool of threads, outside any transaction.
//!
//! Nothing here touches Postgres: the worker's main thread hands in jobs and
//! collects outcomes. Each finished job writes one byte to a socket pair whose
//! read end the main thread waits on together with its latch, so it wakes as
//! soon as a result is ready without polling.

mod channel;
mod pool;

pub use crate::model::classify::Attempt;
pub use channel::Channel;
pub use pool::{Outcome, Pool};

#[cfg(test)]
mod tests {
    use super::channel::{trusted_roots, RecentLookup, LOOKUP_KEPT};
    use super::*;
    use crate::model::event::Event;
    use crate::model::request;
    use std::io::{Read, Write};
    use std::net::TcpListener;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

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

    /// Whether `fd` becomes readable within `within`.
    fn readable(fd: i32, within: Duration) -> bool {
        let mut poll = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        unsafe { libc::poll(&mut poll, 1, within.as_millis() as i32) == 1 }
    }

    #[test]
    fn every_outcome_after_a_take_wakes_the_reader_again() {
        // The threads write the wake-up byte once until the reader takes the outcomes:
        // an outcome that arrives after a take must write it again, or the worker
        // would sleep with an outcome waiting.
        let channel = Arc::new(channel(
            "http://127.0.0.1:9/users",
            "",
            Duration::from_secs(1),
        ));
        let mut pool = Pool::new(2).unwrap();
        pool.set_channel(Some(channel));
        for i in 0..300 {
            pool.submit(Event {
                id: format!("e{i}"),
                record: "{}".into(), // unsendable: an outcome at once, no request
                ..job()
            });
            assert!(
                readable(pool.wake_fd(), Duration::from_secs(5)),
                "no wake-up for outcome {i}"
            );
            let mut got = pool.take_outcomes();
            while got.is_empty() {
                // Woken by the byte of an outcome taken by the previous take.
                assert!(readable(pool.wake_fd(), Duration::from_secs(5)));
                got = pool.take_outcomes();
            }
            assert_eq!(got.len(), 1);
            assert_eq!(pool.in_flight(), 0);
        }
        // Bursts: every outcome arrives, for a few wake-ups, however the threads'
        // writes interleave with the takes.
        for burst in 0..20 {
            for i in 0..300 {
                pool.submit(Event {
                    id: format!("b{burst}-{i}"),
                    record: "{}".into(),
                    ..job()
                });
            }
            let mut got = 0;
            while got < 300 {
                assert!(
                    readable(pool.wake_fd(), Duration::from_secs(5)),
                    "burst {burst}: {got} of 300"
                );
                got += pool.take_outcomes().len();
            }
            assert_eq!(pool.in_flight(), 0);
        }
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
        // `serve` closes each connection after its answer: "connection: close" keeps the
        // client from sending the second request on the first, closed one (a race it lost
        // on a loaded machine).
        let (new_url, new) = serve(vec![
            "HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
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
