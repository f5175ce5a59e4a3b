//! Operations: the metrics as Prometheus gets them (the real postgres_exporter
//! started with examples/monitoring/queries.yml), the pause switch, and the circuit
//! breaker that sends a backend that is down probes instead of the backlog.

mod common;

use common::{free_port, wait_for, wait_until_listening, Cluster, KillOnDrop, Receiver};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

const WITHIN: Duration = Duration::from_secs(60);

fn repository_file(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn program(name: &str, package: &str) -> PathBuf {
    let path = Path::new("/usr/bin").join(name);
    assert!(
        path.exists(),
        "{} is missing: install Debian's {package} package (apt-get install {package}), as .ci/run does",
        path.display()
    );
    path
}

/// postgres_exporter serving only the extension's metrics (examples/monitoring/queries.yml),
/// connected as a member of pg_monitor.
struct Exporter {
    port: u16,
    _process: KillOnDrop,
}

impl Exporter {
    fn start(cluster: &Cluster) -> Exporter {
        cluster
            .connect("supabase_admin")
            .batch_execute(
                "DO $$ BEGIN
                     IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'metrics_reader') THEN
                         CREATE ROLE metrics_reader LOGIN IN ROLE pg_monitor;
                     END IF;
                 END $$",
            )
            .unwrap();
        let port = free_port();
        // Beside the cluster's server.log: kept with it when a test fails, removed with it otherwise.
        let log = std::fs::File::create(cluster.root.join("exporter.log")).unwrap();
        let child = Command::new(program(
            "prometheus-postgres-exporter",
            "prometheus-postgres-exporter",
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .arg(format!(
            "--extend.query-path={}",
            repository_file("examples/monitoring/queries.yml").display()
        ))
        .args(["--disable-default-metrics", "--disable-settings-metrics"])
        .env(
            "DATA_SOURCE_NAME",
            format!(
                "postgresql://metrics_reader@127.0.0.1:{}/postgres?sslmode=disable",
                cluster.port
            ),
        )
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
        let exporter = Exporter {
            port,
            _process: KillOnDrop(child),
        };
        wait_until_listening("postgres_exporter", port);
        exporter
    }

    /// The exporter's `/metrics` page, as Prometheus scrapes it: name → value of
    /// every pg_new_user_hook sample (labels kept in the name).
    fn scrape(&self) -> HashMap<String, f64> {
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        stream
            .write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
            .unwrap();
        let mut page = String::new();
        stream.read_to_string(&mut page).unwrap();
        page.lines()
            .filter(|l| l.starts_with("pg_new_user_hook_"))
            .filter_map(|l| {
                let (name, value) = l.rsplit_once(' ')?;
                Some((without_server_label(name), value.parse().ok()?))
            })
            .collect()
    }

    /// Scrapes until `metric` has `value`; returns that scrape.
    fn wait_for(&self, metric: &str, value: f64) -> HashMap<String, f64> {
        let name = format!("pg_new_user_hook_{metric}");
        wait_for(&format!("{name} = {value}"), WITHIN, || {
            let m = self.scrape();
            (m.get(&name) == Some(&value)).then_some(m)
        })
    }
}

/// `name{server="…",le="1"}` → `name{le="1"}`: the exporter labels every sample
/// with the server it scraped (some versions), which the assertions leave out.
fn without_server_label(name: &str) -> String {
    let Some((metric, labels)) = name.split_once('{') else {
        return name.to_string();
    };
    let kept: Vec<&str> = labels
        .trim_end_matches('}')
        .split(',')
        .filter(|l| !l.is_empty() && !l.starts_with("server="))
        .collect();
    if kept.is_empty() {
        metric.to_string()
    } else {
        format!("{metric}{{{}}}", kept.join(","))
    }
}

fn metric(m: &HashMap<String, f64>, name: &str) -> f64 {
    *m.get(&format!("pg_new_user_hook_{name}"))
        .unwrap_or_else(|| {
            panic!(
                "pg_new_user_hook_{name} is not served; served: {:?}",
                m.keys()
            )
        })
}

#[test]
fn postgres_exporter_serves_correct_metrics_through_deliveries_failures_a_pause_an_outage_and_a_crash(
) {
    let (receiver, status) = Receiver::switchable();
    let mut cluster = Cluster::hooked_to(
        &receiver.url,
        &[
            ("retry_base_ms", "100"),
            ("max_attempts", "3"),
            ("breaker_failures", "3"),
            ("probe_interval_ms", "400"),
            ("concurrency", "4"),
        ],
    );
    let exporter = Exporter::start(&cluster);

    // Deliveries.
    for i in 0..3 {
        cluster.signup(&format!("ops-{i}@example.com"));
    }
    let m = exporter.wait_for("delivered_total", 3.0);
    assert_eq!(metric(&m, "worker_up"), 1.0);
    assert_eq!(metric(&m, "paused"), 0.0);
    assert_eq!(metric(&m, "backend_state"), 0.0);
    assert_eq!(metric(&m, "problem"), 0.0);
    assert_eq!(metric(&m, "attempts_2xx_total"), 3.0);
    assert_eq!(metric(&m, "delivery_latency_seconds_count"), 3.0);
    assert_eq!(
        metric(&m, "delivery_latency_seconds_bucket{le=\"+Inf\"}"),
        3.0
    );
    assert!(
        metric(&m, "delivery_latency_seconds_bucket{le=\"1\"}") == 3.0,
        "{m:?}"
    );
    assert!(metric(&m, "seconds_since_last_delivery") < 60.0);
    let m = exporter.wait_for("captured_total", 3.0);
    assert_eq!(metric(&m, "pending"), 0.0);

    // A backend that refuses an event (400): dead-lettered, and the backend is up.
    status.store(400, Ordering::SeqCst);
    cluster.signup("refused@example.com");
    let m = exporter.wait_for("failed_total", 1.0);
    assert_eq!(metric(&m, "attempts_4xx_total"), 1.0);
    assert_eq!(metric(&m, "backend_state"), 0.0);
    exporter.wait_for("failed", 1.0);
    status.store(204, Ordering::SeqCst);

    // Paused: events queue, none is sent; off resumes at once.
    cluster.configure(&[("paused", "on")]);
    exporter.wait_for("paused", 1.0);
    let answered = receiver.count();
    let held: Vec<String> = (0..2)
        .map(|i| cluster.signup(&format!("paused-{i}@example.com")))
        .collect();
    let m = exporter.wait_for("pending", 2.0);
    assert_eq!(metric(&m, "captured_total"), 6.0);
    assert!(metric(&m, "oldest_pending_age_seconds") > 0.0);
    let (paused, problem): (bool, String) = {
        let row = cluster.one_row("SELECT paused, problem FROM new_user_hook.status");
        (row.get(0), row.get(1))
    };
    assert!(paused);
    assert!(problem.contains("pg_new_user_hook.paused"), "{problem}");
    assert_eq!(receiver.count(), answered, "nothing is sent while paused");
    cluster.configure(&[("paused", "off")]);
    for id in &held {
        cluster.wait_for_event(id, "status = 'delivered'", WITHIN);
    }
    let m = exporter.wait_for("delivered_total", 5.0);
    assert_eq!(metric(&m, "paused"), 0.0);

    // An outage (503) while 40 users sign up: the backend gets probes, not the
    // backlog, and the attempts held back do not count against max_attempts (3).
    status.store(503, Ordering::SeqCst);
    let before = receiver.count();
    let outage: Vec<String> = (0..40)
        .map(|i| cluster.signup(&format!("outage-{i}@example.com")))
        .collect();
    exporter.wait_for("backend_state", 2.0);
    let row = cluster.one_row("SELECT backend_state, problem FROM new_user_hook.status");
    assert_eq!(row.get::<_, String>(0), "open");
    assert!(
        row.get::<_, String>(1).contains("probe"),
        "{:?}",
        row.get::<_, String>(1)
    );
    // Two seconds of outage: with the breaker 400 ms at most between probes.
    let outage_started = Instant::now();
    wait_for("two seconds of outage", WITHIN, || {
        (outage_started.elapsed() >= Duration::from_secs(2)).then_some(())
    });
    let during = receiver.count() - before;
    assert!(
        during < 20,
        "a backend that is down got {during} requests for 40 waiting events (at most 4 in flight, 3 failures, then probes)"
    );
    let back = Instant::now();
    status.store(204, Ordering::SeqCst);
    for id in &outage {
        cluster.wait_for_event(id, "status = 'delivered'", WITHIN);
    }
    let drained = back.elapsed();
    assert!(
        drained < Duration::from_secs(5),
        "the backlog drained {drained:?} after the backend came back (probe interval 400 ms)"
    );
    let m = exporter.wait_for("delivered_total", 45.0);
    assert_eq!(
        metric(&m, "failed_total"),
        1.0,
        "no outage event was dead-lettered"
    );
    assert_eq!(metric(&m, "backend_state"), 0.0);
    // The queue's gauges are counted at most once a second.
    let m = exporter.wait_for("pending", 0.0);
    assert_eq!(metric(&m, "in_flight"), 0.0);
    let requests = receiver.count() as f64;
    let attempts = ["2xx", "3xx", "4xx", "5xx", "timeout", "network"]
        .iter()
        .map(|c| metric(&m, &format!("attempts_{c}_total")))
        .sum::<f64>();
    assert_eq!(
        attempts, requests,
        "every request the backend got is counted once"
    );
    assert!(metric(&m, "retried_total") >= 3.0);

    // A crash: the counters come back as they were (they are written with the outbox).
    let counters: Vec<(String, f64)> = [
        "captured_total",
        "delivered_total",
        "failed_total",
        "retried_total",
        "attempts_2xx_total",
        "attempts_5xx_total",
        "delivery_latency_seconds_count",
    ]
    .iter()
    .map(|n| (n.to_string(), metric(&m, n)))
    .collect();
    // The worker commits without waiting for the WAL flush; a checkpoint flushes it.
    cluster
        .connect("supabase_admin")
        .batch_execute("CHECKPOINT")
        .unwrap();
    cluster.kill9_and_restart();
    let m = exporter.wait_for("worker_up", 1.0);
    for (name, value) in &counters {
        assert_eq!(metric(&m, name), *value, "{name} after a crash");
    }
    let m = exporter.wait_for("failed", 1.0);
    assert_eq!(metric(&m, "pending"), 0.0);
    cluster.signup("after-crash@example.com");
    exporter.wait_for("delivered_total", 46.0);
    exporter.wait_for("captured_total", 47.0);

    // A step of the worker that keeps failing (a transaction holding a lock the
    // reading of the log needs): the problem metric says so until mended.
    let mut admin = cluster.connect("supabase_admin");
    admin
        .batch_execute("BEGIN; LOCK new_user_hook.positions IN SHARE MODE")
        .unwrap();
    cluster.signup("take-refused@example.com");
    exporter.wait_for("problem", 1.0);
    admin.batch_execute("COMMIT").unwrap();
    exporter.wait_for("problem", 0.0);
    exporter.wait_for("delivered_total", 47.0);
    let m = exporter.wait_for("captured_total", 48.0);

    // And a clean restart.
    let counters: Vec<(&str, f64)> = ["captured_total", "delivered_total", "attempts_2xx_total"]
        .into_iter()
        .map(|n| (n, metric(&m, n)))
        .collect();
    cluster.restart();
    let m = exporter.wait_for("worker_up", 1.0);
    for (name, value) in &counters {
        assert_eq!(metric(&m, name), *value, "{name} after a restart");
    }
}

#[test]
fn the_metrics_are_readable_by_pg_monitor_and_reveal_nothing_else() {
    let cluster = Cluster::with_hook(&[]);
    let mut admin = cluster.connect("supabase_admin");
    admin
        .batch_execute("CREATE ROLE watcher LOGIN IN ROLE pg_monitor; CREATE ROLE stranger LOGIN")
        .unwrap();
    cluster.signup("seen@example.com");
    let mut watcher = cluster.connect("watcher");
    let row = watcher
        .query_one(
            "SELECT pending, captured_total FROM new_user_hook.metrics",
            &[],
        )
        .unwrap();
    assert_eq!(row.get::<_, i64>(0), 1);
    assert_eq!(row.get::<_, i64>(1), 1);
    for sql in [
        "SELECT * FROM new_user_hook.outbox",
        "SELECT * FROM new_user_hook.log_0",
        "SELECT * FROM new_user_hook.deliveries",
        "SELECT * FROM new_user_hook.counters",
    ] {
        let e = watcher.query(sql, &[]).unwrap_err();
        let message = e
            .as_db_error()
            .map(|d| d.message().to_string())
            .unwrap_or_default();
        assert!(message.contains("permission denied"), "{sql}: {e:?}");
    }
    let e = cluster
        .connect("stranger")
        .query("SELECT * FROM new_user_hook.metrics", &[])
        .unwrap_err();
    let message = e
        .as_db_error()
        .map(|d| d.message().to_string())
        .unwrap_or_default();
    assert!(message.contains("permission denied"), "{e:?}");
}

#[test]
fn the_status_view_does_not_read_the_delivered_events() {
    // 20,000 delivered events kept for the retention: the status costs the same.
    let receiver = Receiver::ok();
    let cluster = Cluster::hooked_to(&receiver.url, &[]);
    let mut admin = cluster.connect("supabase_admin");
    admin
        .batch_execute(
            "INSERT INTO new_user_hook.outbox (id, user_id, source, record, status, attempts, delivered_at)
             SELECT gen_random_uuid(), gen_random_uuid(), 'auth.users', '{}', 'delivered', 1, now()
               FROM generate_series(1, 20000);
             ANALYZE new_user_hook.outbox;",
        )
        .unwrap();
    // Published by the worker once it counted (it counts pending and failed only).
    cluster.signup("counted@example.com");
    wait_for("the signup to be delivered", WITHIN, || {
        let n: i64 = admin
            .query_one("SELECT delivered FROM new_user_hook.status", &[])
            .unwrap()
            .get(0);
        (n == 1).then_some(())
    });
    let rows_read = |admin: &mut postgres::Client| -> i64 {
        admin
            .batch_execute("SELECT pg_stat_force_next_flush()")
            .unwrap();
        admin
            .query_one(
                "SELECT coalesce(seq_tup_read, 0) + coalesce(idx_tup_fetch, 0)
                   FROM pg_stat_user_tables WHERE relid = 'new_user_hook.outbox'::regclass",
                &[],
            )
            .unwrap()
            .get(0)
    };
    let before = rows_read(&mut admin);
    for _ in 0..10 {
        admin
            .query_one("SELECT * FROM new_user_hook.status", &[])
            .unwrap();
        admin
            .query_one("SELECT * FROM new_user_hook.metrics", &[])
            .unwrap();
    }
    let read = rows_read(&mut admin) - before;
    assert!(
        read < 100,
        "20 reads of status and metrics read {read} rows of the outbox (20,000 delivered kept)"
    );
}

#[test]
fn the_alert_rules_example_is_valid_for_prometheus() {
    let out = Command::new(program("promtool", "prometheus"))
        .args(["check", "rules"])
        .arg(repository_file("examples/monitoring/alerts.yml"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "promtool check rules: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
