//! Fault injection: each scenario breaks something on purpose and checks that every
//! committed user still reaches the backend (duplicates only with the same
//! webhook-id), that no rolled-back signup is sent, and that no signup failed or
//! slowed. Each scenario appends a row to the summary table that tests/run.sh
//! prints (target/tmp/faults-summary.tsv).

mod common;

use common::{wait_for, Cluster, KillOnDrop, Receiver, Reply};
use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const WITHIN: Duration = Duration::from_secs(60);
/// A signup that takes longer than this was slowed down by the fault.
const SLOW_SIGNUP: Duration = Duration::from_secs(2);

/// What a scenario committed, and the bookkeeping for its summary row.
struct Tally {
    scenario: &'static str,
    started: Instant,
    committed: HashSet<String>,
    failed_signups: usize,
    slowest_signup: Duration,
    next: usize,
}

impl Tally {
    fn new(scenario: &'static str) -> Tally {
        Tally {
            scenario,
            started: Instant::now(),
            committed: HashSet::new(),
            failed_signups: 0,
            slowest_signup: Duration::ZERO,
            next: 0,
        }
    }

    fn email(&mut self) -> String {
        self.next += 1;
        format!(
            "{}-{}@example.com",
            self.scenario.replace(' ', "-"),
            self.next
        )
    }

    fn signup(&mut self, cluster: &Cluster) -> Option<String> {
        let email = self.email();
        self.signup_as(cluster, &email)
    }

    fn signups(&mut self, cluster: &Cluster, n: usize) {
        for _ in 0..n {
            self.signup(cluster);
        }
    }

    fn signup_as(&mut self, cluster: &Cluster, email: &str) -> Option<String> {
        match cluster.try_signup(email) {
            Ok((id, took)) => {
                self.slowest_signup = self.slowest_signup.max(took);
                self.committed.insert(id.clone());
                Some(id)
            }
            Err(e) => {
                eprintln!("{}: signup {email} failed: {e}", self.scenario);
                self.failed_signups += 1;
                None
            }
        }
    }

    /// Users inserted directly by the test (bulk), already committed.
    fn committed_ids(&mut self, ids: impl IntoIterator<Item = String>) {
        self.committed.extend(ids);
    }

    /// Waits until every committed user was received, then checks and records the row.
    /// `received` yields (user id, webhook-id) for every request the backend got.
    fn finish(self, received: impl Fn() -> Vec<(String, String)>) {
        let all = wait_for(
            &format!("{}: every committed user delivered", self.scenario),
            WITHIN,
            || {
                let got = received();
                let users: HashSet<&String> = got.iter().map(|(u, _)| u).collect();
                self.committed
                    .iter()
                    .all(|id| users.contains(id))
                    .then_some(got)
            },
        );
        let drain = self.started.elapsed();
        let mut by_user: HashMap<&str, HashSet<&str>> = HashMap::new();
        for (user, webhook) in &all {
            by_user.entry(user).or_default().insert(webhook);
        }
        let strangers: Vec<&&str> = by_user
            .keys()
            .filter(|u| !self.committed.contains(**u))
            .collect();
        assert!(
            strangers.is_empty(),
            "{}: users never committed were sent: {strangers:?}",
            self.scenario
        );
        for (user, ids) in &by_user {
            assert_eq!(
                ids.len(),
                1,
                "{}: {user} was sent under several webhook-ids {ids:?}",
                self.scenario
            );
        }
        let delivered = self
            .committed
            .iter()
            .filter(|id| by_user.contains_key(id.as_str()))
            .count();
        let lost = self.committed.len() - delivered;
        let duplicates = all.len() - delivered;
        assert_eq!(self.failed_signups, 0, "{}: signups failed", self.scenario);
        assert!(
            self.slowest_signup < SLOW_SIGNUP,
            "{}: a signup took {:?}",
            self.scenario,
            self.slowest_signup
        );
        summary_row(
            self.scenario,
            [
                self.committed.len(),
                delivered,
                duplicates,
                lost,
                self.failed_signups,
            ],
            self.slowest_signup,
            drain,
        );
    }
}

/// Appends a scenario's row to the summary table: committed, delivered, duplicates,
/// lost, failed signups; the slowest signup and the time to drain.
fn summary_row(scenario: &str, counts: [usize; 5], slowest: Duration, drain: Duration) {
    let [committed, delivered, duplicates, lost, failed] = counts;
    let row = format!(
        "{scenario}\t{committed}\t{delivered}\t{duplicates}\t{lost}\t{failed}\t{} ms\t{:.1} s\n",
        slowest.as_millis(),
        drain.as_secs_f64()
    );
    let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("faults-summary.tsv");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap();
    f.write_all(row.as_bytes()).unwrap();
    eprint!("{row}");
}

const LIFECYCLE: (&str, &str) = ("events", "created,updated,deleted");

/// The user an accepted request is about, and the kind of change (by its method:
/// the minimal format's REST calls).
fn lifecycle_calls(receiver: &Receiver) -> Vec<(String, String, String)> {
    receiver
        .accepted()
        .iter()
        .map(|r| {
            let user = match r.method.as_str() {
                "POST" => r.json()["id"].as_str().unwrap_or_default().to_string(),
                _ => r.path.rsplit('/').next().unwrap_or_default().to_string(),
            };
            (
                user,
                r.method.clone(),
                r.header("webhook-id").unwrap_or_default().to_string(),
            )
        })
        .collect()
}

/// Signs up `n` users; returns their ids and the slowest signup (none may fail or be slow).
fn timed_signups(cluster: &Cluster, prefix: &str, n: usize) -> (Vec<String>, Duration) {
    let mut slowest = Duration::ZERO;
    let ids = (0..n)
        .map(|i| {
            let (id, took) = cluster
                .try_signup(&format!("{prefix}-{i}@example.com"))
                .expect("a signup failed");
            slowest = slowest.max(took);
            id
        })
        .collect();
    assert!(slowest < SLOW_SIGNUP, "{prefix}: a signup took {slowest:?}");
    (ids, slowest)
}

/// Checks that each user's accepted events came as `expected` (methods), in that
/// order and each under one webhook-id, that profiles kept from them end as
/// `profiles_left`, and records the summary row. Returns nothing: panics on a breach.
fn check_lifecycle(
    scenario: &str,
    receiver: &Receiver,
    users: &[String],
    expected: &[&str],
    slowest_signup: Duration,
    started: Instant,
) {
    let committed = users.len() * expected.len();
    let calls = wait_for(
        &format!("{scenario}: every event delivered"),
        WITHIN,
        || {
            let calls = lifecycle_calls(receiver);
            let events: HashSet<(&str, &str)> = calls
                .iter()
                .map(|(u, m, _)| (u.as_str(), m.as_str()))
                .collect();
            users
                .iter()
                .all(|u| expected.iter().all(|m| events.contains(&(u.as_str(), *m))))
                .then_some(calls)
        },
    );
    let drain = started.elapsed();
    let mut profiles: HashSet<&str> = HashSet::new();
    let mut ids: HashMap<(&str, &str), HashSet<&str>> = HashMap::new();
    for user in users {
        // The first acceptance of each event, in arrival order.
        let mut seen: Vec<&str> = Vec::new();
        for (u, method, webhook) in &calls {
            if u == user {
                ids.entry((u, method)).or_default().insert(webhook);
                if !seen.contains(&method.as_str()) {
                    seen.push(method);
                }
            }
        }
        assert_eq!(
            seen, expected,
            "{scenario}: {user} saw its events out of order"
        );
    }
    for (u, method, _) in &calls {
        match method.as_str() {
            "DELETE" => profiles.remove(u.as_str()),
            _ => profiles.insert(u.as_str()),
        };
    }
    for (event, webhooks) in &ids {
        assert_eq!(
            webhooks.len(),
            1,
            "{scenario}: {event:?} sent under several webhook-ids"
        );
    }
    assert!(
        calls.iter().all(|(u, _, _)| users.contains(u)),
        "{scenario}: an unknown user was announced"
    );
    if expected.last() == Some(&"DELETE") {
        assert!(
            profiles.is_empty(),
            "{scenario}: profiles left: {profiles:?}"
        );
    }
    let delivered = ids.len();
    summary_row(
        scenario,
        [
            committed,
            delivered,
            calls.len() - delivered,
            committed - delivered,
            0,
        ],
        slowest_signup,
        drain,
    );
}

#[test]
fn lifecycle_server_crash_between_an_update_and_its_delivery() {
    // The backend holds every update until the server has crashed and come back.
    let gate = Arc::new(AtomicBool::new(false));
    let open = Arc::clone(&gate);
    let receiver = Receiver::start(move |_, r| {
        while r.method == "PATCH" && !open.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(5));
        }
        Reply::Status(200)
    });
    let mut cluster = hooked(&receiver.url, &[LIFECYCLE]);
    let (users, slowest) = timed_signups(&cluster, "crash-update", 20);
    for (i, user) in users.iter().enumerate() {
        cluster.change_email(user, &format!("crash-update-{i}-new@example.com"));
    }
    wait_for("updates on the wire", WITHIN, || {
        receiver
            .inspect(|all| all.iter().any(|r| r.method == "PATCH"))
            .then_some(())
    });
    cluster.kill9_and_restart();
    let started = Instant::now();
    gate.store(true, Ordering::SeqCst);
    for user in &users {
        cluster.delete_user(user);
    }
    check_lifecycle(
        "lifecycle: kill -9 before update delivered",
        &receiver,
        &users,
        &["POST", "PATCH", "DELETE"],
        slowest,
        started,
    );
}

#[test]
fn lifecycle_backend_down_while_users_are_created_updated_and_deleted() {
    let (receiver, status) = Receiver::switchable();
    status.store(503, Ordering::SeqCst);
    let cluster = hooked(
        &receiver.url,
        &[
            LIFECYCLE,
            ("retry_base_ms", "100"),
            ("probe_interval_ms", "1s"),
        ],
    );
    let (users, slowest) = timed_signups(&cluster, "down", 10);
    for (i, user) in users.iter().enumerate() {
        cluster.change_email(user, &format!("down-{i}-new@example.com"));
    }
    for user in &users {
        cluster.delete_user(user);
    }
    wait_for("the backend to be tried while down", WITHIN, || {
        (receiver.count() >= 3).then_some(())
    });
    assert!(receiver.accepted().is_empty());
    status.store(204, Ordering::SeqCst);
    let started = Instant::now();
    check_lifecycle(
        "lifecycle: backend down, created+updated+deleted",
        &receiver,
        &users,
        &["POST", "PATCH", "DELETE"],
        slowest,
        started,
    );
}

/// (user id, webhook-id) of every request the receiver accepted (2xx).
fn from_receiver(receiver: &Receiver) -> Vec<(String, String)> {
    receiver
        .accepted()
        .iter()
        .map(|r| {
            (
                r.json()["id"].as_str().unwrap_or_default().to_string(),
                r.header("webhook-id").unwrap_or_default().to_string(),
            )
        })
        .collect()
}

fn hooked(url: &str, settings: &[(&str, &str)]) -> Cluster {
    Cluster::hooked_to(url, settings)
}

/// Waits until some event was tried at least twice, its last error matching `like`.
/// Any event, not a given one: once the breaker opens, probes take the events one at
/// a time at growing intervals, so a given event may wait longer than WITHIN.
fn wait_for_a_retry(cluster: &Cluster, like: &str) {
    wait_for(
        &format!("an event tried again after '{like}'"),
        WITHIN,
        || {
            let retried: i64 = cluster
                .one_row(&format!(
                    "SELECT count(*) FROM new_user_hook.deliveries
                  WHERE attempts >= 2 AND last_error LIKE '{like}'"
                ))
                .get(0);
            (retried > 0).then_some(())
        },
    );
}

#[test]
fn server_crash_mid_delivery() {
    const ANSWERED_BEFORE_CRASH: usize = 300;
    // A slow backend: the crash lands mid-backlog with requests in flight. Those are
    // answered 200 after the restart: the worker never saw the answers, so it must
    // send them again.
    let (receiver, gate) = Receiver::holding_after(ANSWERED_BEFORE_CRASH);
    let mut cluster = hooked(&receiver.url, &[]);
    let mut tally = Tally::new("server kill -9 mid-delivery");
    tally.committed_ids(cluster.bulk_signups("crash", 5000, 100));
    receiver.wait_for_requests(ANSWERED_BEFORE_CRASH + 1, WITHIN);
    let crashed_at = Instant::now();
    cluster.kill9_and_restart();
    let pending: i64 = cluster
        .one_row("SELECT count(*) FROM new_user_hook.deliveries WHERE status = 'pending'")
        .get(0);
    assert!(
        pending > 0,
        "the crash came after the backlog was recorded as delivered"
    );
    let in_flight: HashSet<String> = receiver.requests()[ANSWERED_BEFORE_CRASH..]
        .iter()
        .filter(|r| r.at < crashed_at)
        .map(|r| r.json()["id"].as_str().unwrap().to_string())
        .collect();
    assert!(!in_flight.is_empty());
    gate.open();
    tally.signups(&cluster, 5);
    wait_for(
        "every request in flight at the crash to be sent again",
        WITHIN,
        || {
            let accepted = from_receiver(&receiver);
            in_flight
                .iter()
                .all(|user| accepted.iter().filter(|(u, _)| u == user).count() >= 2)
                .then_some(())
        },
    );
    tally.finish(|| from_receiver(&receiver));
}

#[test]
fn worker_killed_with_sigkill() {
    let receiver = Receiver::ok();
    let cluster = hooked(&receiver.url, &[]);
    let mut tally = Tally::new("worker kill -9");
    tally.signup(&cluster);
    let worker = wait_for("the worker", WITHIN, || cluster.worker_pid());
    let ready = "database system is ready to accept connections";
    let restarts = cluster.log().matches(ready).count();
    Command::new("kill")
        .args(["-9", &worker.to_string()])
        .status()
        .unwrap();
    // Postgres answers a crashed child by restarting every backend (connections open
    // at that instant are reset, as for any crashed server process); signups resume
    // as soon as it accepts connections again, before the worker is back.
    wait_for("the server to restart after the crash", WITHIN, || {
        (cluster.log().matches(ready).count() > restarts).then_some(())
    });
    tally.signups(&cluster, 20);
    wait_for("a new worker", WITHIN, || {
        cluster.worker_pid().filter(|p| *p != worker)
    });
    tally.finish(|| from_receiver(&receiver));
}

#[test]
fn worker_hits_an_internal_error() {
    let receiver = Receiver::ok();
    let cluster = hooked(&receiver.url, &[]);
    let mut tally = Tally::new("worker internal error");
    let worker = wait_for("the worker", WITHIN, || cluster.worker_pid());
    // Recording a delivery now fails inside the worker (an ERROR in its transaction).
    cluster
        .connect("supabase_admin")
        .batch_execute("ALTER TABLE new_user_hook.counters ADD CONSTRAINT injected_fault CHECK (delivered < 0) NOT VALID")
        .unwrap();
    tally.signups(&cluster, 10);
    // The round is rolled back and retried with what it had decided: no restart.
    wait_for("the error in the log", WITHIN, || {
        cluster.log().contains("injected_fault").then_some(())
    });
    tally.signups(&cluster, 10);
    cluster
        .connect("supabase_admin")
        .batch_execute("ALTER TABLE new_user_hook.counters DROP CONSTRAINT injected_fault")
        .unwrap();
    tally.finish(|| from_receiver(&receiver));
    wait_for("every event recorded as delivered", WITHIN, || {
        let n: i64 = cluster
            .one_row("SELECT count(*) FROM new_user_hook.deliveries WHERE status <> 'delivered'")
            .get(0);
        (n == 0).then_some(())
    });
    assert_eq!(cluster.worker_pid(), Some(worker), "the worker restarted");
    assert_eq!(
        receiver.accepted().len(),
        20,
        "events delivered before the failed rounds were sent again"
    );
}

/// A backend process that can be killed for real: Python's http.server, logging
/// "<webhook-id> <user id>" per request before answering 200.
struct KillableReceiver {
    port: u16,
    log: PathBuf,
    process: Option<KillOnDrop>,
}

impl KillableReceiver {
    fn new(dir: &std::path::Path) -> KillableReceiver {
        let port = common::free_port();
        let mut r = KillableReceiver {
            port,
            log: dir.join("killable.log"),
            process: None,
        };
        r.start();
        r
    }

    fn start(&mut self) {
        let script = r#"
import http.server, json, sys
port, log = int(sys.argv[1]), sys.argv[2]
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        with open(log, "a") as f:
            f.write(self.headers["webhook-id"] + " " + body["id"] + "\n")
        self.send_response(200); self.send_header("Content-Length", "0"); self.end_headers()
    def log_message(self, *a): pass
http.server.ThreadingHTTPServer.allow_reuse_address = True
http.server.ThreadingHTTPServer(("127.0.0.1", port), H).serve_forever()
"#;
        self.process = Some(KillOnDrop(
            Command::new("python3")
                .args(["-c", script, &self.port.to_string()])
                .arg(&self.log)
                .spawn()
                .unwrap(),
        ));
        common::wait_until_listening("the receiver", self.port);
    }

    /// SIGKILL, as a crashing backend process.
    fn kill(&mut self) {
        self.process = None;
    }

    fn received(&self) -> Vec<(String, String)> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                l.split_once(' ')
                    .map(|(w, u)| (u.to_string(), w.to_string()))
            })
            .collect()
    }
}

#[test]
fn receiver_killed_and_restarted_under_load() {
    let dir =
        std::env::temp_dir().join(format!("pg_new_user_hook-killable-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut receiver = KillableReceiver::new(&dir);
    let url = format!("http://127.0.0.1:{}/users", receiver.port);
    let cluster = hooked(&url, &[("retry_base_ms", "100"), ("retry_max_ms", "500")]);
    let tally = Arc::new(Mutex::new(Tally::new(
        "receiver killed 5+ times under load",
    )));
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let (tally, stop, port) = (Arc::clone(&tally), Arc::clone(&stop), cluster.port);
        std::thread::spawn(move || {
            let cluster = common::ClusterHandle { port };
            while !stop.load(Ordering::SeqCst) {
                let email = tally.lock().unwrap().email();
                let result = cluster.try_signup(&email);
                let mut t = tally.lock().unwrap();
                match result {
                    Ok((id, took)) => {
                        t.slowest_signup = t.slowest_signup.max(took);
                        t.committed.insert(id);
                    }
                    Err(e) => {
                        eprintln!("signup failed: {e}");
                        t.failed_signups += 1;
                    }
                }
                drop(t);
                std::thread::sleep(Duration::from_millis(40));
            }
        })
    };
    // Five kills at least, and more on a slow machine until enough signups met them.
    for cycle in 0..30 {
        if cycle >= 5 && tally.lock().unwrap().committed.len() > 50 {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
        receiver.kill();
        std::thread::sleep(Duration::from_millis(500));
        receiver.start();
    }
    stop.store(true, Ordering::SeqCst);
    load.join().unwrap();
    let tally = Arc::try_unwrap(tally).ok().unwrap().into_inner().unwrap();
    assert!(
        tally.committed.len() > 50,
        "the load was too light: {}",
        tally.committed.len()
    );
    tally.finish(|| receiver.received());
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn receiver_hangs() {
    let hanging = Receiver::start(|_, _| Reply::Hang);
    let mut cluster = hooked(
        &hanging.url,
        &[
            ("timeout_ms", "500"),
            ("retry_base_ms", "100"),
            ("retry_max_ms", "300"),
        ],
    );
    let mut tally = Tally::new("receiver hangs");
    let worker = wait_for("the worker", WITHIN, || cluster.worker_pid());
    tally.signups(&cluster, 10);
    wait_for_a_retry(&cluster, "no answer from % within 500 ms%");
    // The worker stays responsive: same process, status answers at once.
    let started = Instant::now();
    let pending: i64 = cluster
        .one_row("SELECT pending FROM new_user_hook.status")
        .get(0);
    let took = started.elapsed();
    assert!(pending > 0, "status.pending {pending}");
    assert!(took < Duration::from_secs(1), "status took {took:?}");
    assert_eq!(cluster.worker_pid(), Some(worker));
    // A fast shutdown does not wait for the hung backend longer than the timeout.
    let started = Instant::now();
    cluster.stop();
    assert!(
        started.elapsed() < Duration::from_millis(500 + 2000),
        "stop took {:?}",
        started.elapsed()
    );
    cluster.start();
    let good = Receiver::ok();
    cluster.configure(&[("url", &good.url)]);
    tally.finish(|| from_receiver(&good));
}

#[test]
fn receiver_trickles_bytes() {
    // Accepts and sends a valid response one byte every 300 ms: never finishes within the timeout.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/users", listener.local_addr().unwrap());
    let trickled = Arc::new(AtomicUsize::new(0));
    {
        let trickled = Arc::clone(&trickled);
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let trickled = Arc::clone(&trickled);
                std::thread::spawn(move || {
                    let mut stream = stream;
                    for b in b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n" {
                        std::thread::sleep(Duration::from_millis(300));
                        if stream.write_all(&[*b]).is_err() {
                            return;
                        }
                    }
                    trickled.fetch_add(1, Ordering::SeqCst);
                });
            }
        });
    }
    let cluster = hooked(
        &url,
        &[
            ("timeout_ms", "1000"),
            ("retry_base_ms", "100"),
            ("retry_max_ms", "300"),
        ],
    );
    let mut tally = Tally::new("receiver trickles bytes");
    tally.signups(&cluster, 5);
    wait_for_a_retry(&cluster, "%within 1000 ms%");
    let good = Receiver::ok();
    cluster.configure(&[("url", &good.url)]);
    tally.finish(|| from_receiver(&good));
}

#[test]
fn server_error_storm_with_retry_after() {
    let storm = Arc::new(AtomicBool::new(true));
    let receiver = {
        let storm = Arc::clone(&storm);
        Receiver::start(move |_, _| {
            if storm.load(Ordering::SeqCst) {
                Reply::StatusWith(503, "Retry-After", "2".into())
            } else {
                Reply::Status(200)
            }
        })
    };
    let cluster = hooked(&receiver.url, &[("retry_base_ms", "50")]);
    let mut tally = Tally::new("5xx storm, Retry-After 2");
    tally.signups(&cluster, 20);
    std::thread::sleep(Duration::from_millis(4500)); // the storm lasts a fixed time, then ends
    storm.store(false, Ordering::SeqCst);
    tally.finish(|| from_receiver(&receiver));
    // No event was tried again before the Retry-After time; the events that met the
    // storm were retried, the others were held back by the circuit breaker (which
    // waits out the Retry-After too before it probes).
    let mut last: HashMap<String, (Instant, usize)> = HashMap::new();
    for r in receiver.requests() {
        let id = r.header("webhook-id").unwrap().to_string();
        let (previous, tries) = last.entry(id.clone()).or_insert((r.at, 0));
        if *tries > 0 {
            let gap = r.at.duration_since(*previous);
            assert!(
                gap >= Duration::from_millis(1900),
                "{id} retried after {gap:?}"
            );
        }
        *previous = r.at;
        *tries += 1;
    }
    assert_eq!(last.len(), 20);
    assert!(last.values().any(|(_, tries)| *tries >= 2), "{last:?}");
}

#[test]
fn client_errors_then_redeliver_failed() {
    let broken = Arc::new(AtomicBool::new(true));
    let receiver = {
        let broken = Arc::clone(&broken);
        Receiver::start(move |_, _| {
            if broken.load(Ordering::SeqCst) {
                Reply::StatusWith(422, "Content-Type", "application/json".into())
            } else {
                Reply::Status(201)
            }
        })
    };
    let cluster = hooked(&receiver.url, &[]);
    let mut tally = Tally::new("4xx, then redeliver_failed");
    tally.signups(&cluster, 10);
    wait_for("every event failed at once", WITHIN, || {
        let n: i64 = cluster
            .one_row("SELECT count(*) FROM new_user_hook.deliveries WHERE status = 'failed' AND attempts = 1 AND last_error LIKE 'HTTP 422 Unprocessable Entity: {\"message\":\"rejected by test receiver\"}%'")
            .get(0);
        (n == 10).then_some(())
    });
    broken.store(false, Ordering::SeqCst);
    let requeued: i64 = cluster
        .one_row("SELECT new_user_hook.redeliver_failed()")
        .get(0);
    assert_eq!(requeued, 10);
    tally.finish(|| from_receiver(&receiver));
}

#[test]
fn bad_configuration_at_runtime() {
    let refused = common::closed_port();
    let cluster = Cluster::with_hook(&[]);
    cluster.configure(&[
        ("timeout_ms", "1000"),
        ("retry_base_ms", "100"),
        ("retry_max_ms", "300"),
    ]);
    let mut tally = Tally::new("bad configuration at runtime");
    let worker = wait_for("the worker", WITHIN, || cluster.worker_pid());
    let status_says = |what: &str| {
        wait_for(&format!("status to say {what}"), WITHIN, || {
            let row = cluster.one_row(
                "SELECT coalesce(problem, ''), coalesce(last_error, '') FROM new_user_hook.status",
            );
            let (problem, error): (String, String) = (row.get(0), row.get(1));
            (problem.contains(what) || error.contains(what)).then_some(())
        })
    };
    let cases: [(&str, &str); 5] = [
        ("", "pg_new_user_hook.url is not set"),
        ("not a url", "is not a valid URL"),
        ("ftp://127.0.0.1/users", "scheme 'ftp' is not supported"),
        (
            &format!("http://127.0.0.1:{refused}/users"),
            "connection refused",
        ),
        ("http://no-such-host.invalid/users", "no-such-host.invalid"),
    ];
    for (url, what) in cases {
        cluster.configure(&[("url", url)]);
        tally.signups(&cluster, 3);
        status_says(what);
        assert_eq!(
            cluster.worker_pid(),
            Some(worker),
            "no crash loop for url {url:?}"
        );
    }
    let good = Receiver::ok();
    cluster.configure(&[("url", &good.url)]);
    tally.finish(|| from_receiver(&good));
    assert_eq!(cluster.worker_pid(), Some(worker));
}

#[test]
fn unusual_input() {
    let receiver = Receiver::ok();
    let cluster = hooked(&receiver.url, &[]);
    let mut tally = Tally::new("unusual input");
    let mut emails = HashMap::new();
    for email in [
        "zoë@exämple.com",
        "o'brien@example.com",
        r"back\slash@example.com",
        "quo\"te@example.com",
        "日本@例え.jp",
    ] {
        let id = tally.signup_as(&cluster, email).unwrap();
        emails.insert(id, email.to_string());
    }
    let mut gotrue = cluster.connect("supabase_auth_admin");
    // Phone signup (no email), anonymous user, 1 MB of user metadata.
    for columns in [
        &[
            ("phone", "'15550001111'"),
            ("raw_app_meta_data", r#"'{"provider":"phone"}'"#),
        ][..],
        &[("raw_app_meta_data", "'{}'"), ("is_anonymous", "true")],
        &[
            ("email", "'big@example.com'"),
            ("raw_app_meta_data", "'{}'"),
            (
                "raw_user_meta_data",
                "jsonb_build_object('blob', repeat('x', 1048576))",
            ),
        ],
    ] {
        let started = Instant::now();
        let sql = common::insert_users(columns) + " RETURNING id::text";
        let id: String = gotrue.query_one(&sql, &[]).unwrap().get(0);
        tally.slowest_signup = tally.slowest_signup.max(started.elapsed());
        tally.committed.insert(id);
    }
    // 10,000 users in one transaction.
    let started = Instant::now();
    tally.committed_ids(cluster.bulk_signups("one-tx", 10_000, 10_000));
    eprintln!("10,000 users in one transaction: {:?}", started.elapsed());
    // 32 concurrent signup connections.
    let port = cluster.port;
    let results: Vec<Result<(String, Duration), String>> = (0..32)
        .map(|c| {
            std::thread::spawn(move || {
                let cluster = common::ClusterHandle { port };
                (0..5)
                    .map(|i| cluster.try_signup(&format!("concurrent-{c}-{i}@example.com")))
                    .collect::<Vec<_>>()
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    for result in results {
        match result {
            Ok((id, took)) => {
                tally.slowest_signup = tally.slowest_signup.max(took);
                tally.committed.insert(id);
            }
            Err(e) => {
                eprintln!("concurrent signup failed: {e}");
                tally.failed_signups += 1;
            }
        }
    }
    tally.finish(|| from_receiver(&receiver));
    for r in receiver.requests() {
        let body = r.json();
        if let Some(email) = emails.get(body["id"].as_str().unwrap()) {
            assert_eq!(body["email"].as_str(), Some(email.as_str()));
        }
    }
    let null_emails = receiver
        .requests()
        .iter()
        .filter(|r| r.json()["email"].is_null())
        .count();
    assert!(
        null_emails >= 2,
        "phone and anonymous users arrive with a null email"
    );
}

#[test]
fn user_deleted_before_delivery_is_still_announced() {
    // Documented behaviour: the event is a snapshot of the committed signup, so a
    // user deleted afterwards (but before delivery) is still announced; the
    // backend may find it gone. A user deleted in its own signup transaction is not.
    let cluster = Cluster::with_hook(&[]);
    let mut tally = Tally::new("user deleted before delivery");
    let id = tally.signup(&cluster).unwrap();
    cluster
        .connect("supabase_admin")
        .batch_execute(&format!("DELETE FROM auth.users WHERE id = '{id}'"))
        .unwrap();
    let receiver = Receiver::ok();
    cluster.configure(&[("url", &receiver.url)]);
    tally.finish(|| from_receiver(&receiver));
}
