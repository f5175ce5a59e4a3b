//! Delivery that nothing stops in silence: what a production database does to the
//! worker (a publication, a reload mid-outage, a typo in a setting, a read-only
//! database, a lock) either leaves delivery working or is named, with what to do,
//! in `new_user_hook.status.problem`, the `problem` metric and the log. And what the
//! worker costs while it has nothing to do: no transaction id, no WAL.

mod common;

use common::*;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const WITHIN: Duration = Duration::from_secs(30);

fn pending(cluster: &Cluster) -> i64 {
    cluster
        .one_row("SELECT pending FROM new_user_hook.status")
        .get(0)
}

fn problem(cluster: &Cluster) -> Option<String> {
    cluster
        .one_row("SELECT problem FROM new_user_hook.status")
        .get(0)
}

fn problem_metric(cluster: &Cluster) -> i32 {
    cluster
        .one_row("SELECT problem FROM new_user_hook.metrics")
        .get(0)
}

fn backend_state(cluster: &Cluster) -> String {
    cluster
        .one_row("SELECT backend_state FROM new_user_hook.status")
        .get(0)
}

/// Waits until the status names a problem containing `words`; returns it.
fn wait_for_problem(cluster: &Cluster, words: &str) -> String {
    wait_for(&format!("a problem saying {words:?}"), WITHIN, || {
        problem(cluster).filter(|p| p.contains(words))
    })
}

#[test]
fn a_probe_answered_after_a_reload_mid_outage_does_not_wedge_the_breaker() {
    // 0: the backend is down (503); 1: it holds the next request (the probe); 2: up.
    let mode = Arc::new(AtomicU8::new(0));
    let gate = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (m, g) = (Arc::clone(&mode), Arc::clone(&gate));
    let receiver = Receiver::start(move |_, _| match m.load(Ordering::SeqCst) {
        0 => Reply::Status(503),
        1 => {
            while !g.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(5));
            }
            Reply::Status(200)
        }
        _ => Reply::Status(200),
    });
    let cluster = Cluster::hooked_to(
        &receiver.url,
        &[
            ("breaker_failures", "1"),
            ("probe_interval_ms", "1s"),
            // A probe is an event due by its own schedule.
            ("retry_base_ms", "1s"),
            ("timeout_ms", "10s"),
        ],
    );
    let users = cluster.bulk_signups("wedge", 5, 5);
    wait_for("the circuit to open", WITHIN, || {
        (backend_state(&cluster) == "open").then_some(())
    });
    mode.store(1, Ordering::SeqCst);
    let before = receiver.count();
    wait_for("the probe to be held", WITHIN, || {
        (receiver.count() > before && backend_state(&cluster) == "half-open").then_some(())
    });
    // A reload that rebuilds the channel while the probe is out (a Vault key
    // rotation does the same without a reload), then the backend is back.
    cluster.configure(&[("timeout_ms", "9s")]);
    std::thread::sleep(Duration::from_millis(500));
    mode.store(2, Ordering::SeqCst);
    gate.store(true, Ordering::SeqCst);
    for id in &users {
        cluster.wait_for_event(id, "status = 'delivered'", WITHIN);
    }
    wait_for("the circuit to close", WITHIN, || {
        (backend_state(&cluster) == "closed").then_some(())
    });
    assert_eq!(problem(&cluster), None);
}

#[test]
fn publications_of_every_kind_stall_nothing() {
    let receiver = Receiver::ok();
    let cluster = Cluster::hooked_to(&receiver.url, &[]);
    cluster
        .connect("supabase_admin")
        .batch_execute(
            "CREATE PUBLICATION everything FOR ALL TABLES;
             CREATE PUBLICATION hook_schema FOR TABLES IN SCHEMA new_user_hook;",
        )
        .unwrap();
    let ids: Vec<String> = (0..3)
        .map(|i| cluster.signup(&format!("published-{i}@example.com")))
        .collect();
    for id in &ids {
        cluster.wait_for_event(id, "status = 'delivered'", WITHIN);
    }
    assert_eq!(pending(&cluster), 0);
    assert_eq!(problem(&cluster), None);
}

#[test]
fn a_take_that_keeps_failing_holds_up_nothing_else_and_is_named_with_its_remedy() {
    let receiver = Receiver::ok();
    let cluster = Cluster::hooked_to(&receiver.url, &[]);
    let mut blocker = cluster.connect("supabase_admin");
    // A lock only writers wait for (CREATE INDEX, LOCK ... IN SHARE MODE) stalls
    // nothing: the reads of the log write nothing.
    blocker
        .batch_execute("BEGIN; LOCK new_user_hook.log_1 IN SHARE MODE")
        .unwrap();
    let passes = cluster.signup("beside-a-share-lock@example.com");
    cluster.wait_for_event(&passes, "status = 'delivered'", WITHIN);
    assert_eq!(problem(&cluster), None);
    blocker.batch_execute("COMMIT").unwrap();
    // A transaction that holds a lock the reading of the log needs (on the segment
    // signups do not write to: log_0 is written to first), and stays. Whatever reads
    // the log waits for it meanwhile (deliveries too): the outbox is looked at instead.
    blocker
        .batch_execute("BEGIN; LOCK new_user_hook.log_1 IN ACCESS EXCLUSIVE MODE")
        .unwrap();
    let stuck = cluster.signup("stuck@example.com");
    // status, which counts the log, waits for the lock too: the problem is read from the
    // server's log and from the metrics, which hold what the worker published.
    let logged = wait_for("the problem logged", WITHIN, || {
        let log = cluster.log();
        log.lines()
            .find(|l| l.contains("reading committed events") && l.contains("pg_locks"))
            .map(str::to_string)
    });
    assert!(logged.contains("WARNING"), "{logged}");
    assert_eq!(problem_metric(&cluster), 1);
    assert!(cluster.log().contains("lock timeout"), "{}", cluster.log());
    let mut admin = cluster.connect("supabase_admin");
    // Events already in the outbox still go out meanwhile.
    admin
        .batch_execute(
            "INSERT INTO new_user_hook.outbox (user_id, source, record)
             VALUES ('11111111-2222-3333-4444-555555555555', 'auth.users',
                     '{\"id\": \"11111111-2222-3333-4444-555555555555\", \"email\": \"outboxed@example.com\"}');
             SELECT new_user_hook.wake_on_commit();",
        )
        .unwrap();
    wait_for("the outbox's event delivered meanwhile", WITHIN, || {
        let delivered: i64 = admin
            .query_one(
                "SELECT count(*) FROM new_user_hook.outbox
                  WHERE user_id = '11111111-2222-3333-4444-555555555555' AND status = 'delivered'",
                &[],
            )
            .unwrap()
            .get(0);
        (delivered == 1).then_some(())
    });
    // Mended as the problem says: the event goes, and the problem with it.
    blocker.batch_execute("COMMIT").unwrap();
    cluster.wait_for_event(&stuck, "status = 'delivered'", WITHIN);
    wait_for("the problem to clear", WITHIN, || {
        problem(&cluster).is_none().then_some(())
    });
    assert_eq!(problem_metric(&cluster), 0);
}

#[test]
fn a_read_only_database_is_named_with_its_remedy() {
    let receiver = Receiver::ok();
    let cluster = Cluster::hooked_to(&receiver.url, &[]);
    let mut admin = cluster.connect("supabase_admin");
    admin
        .batch_execute("ALTER DATABASE postgres SET default_transaction_read_only = on")
        .unwrap();
    // The worker's session takes the database's settings when it starts.
    admin
        .batch_execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE backend_type = 'pg_new_user_hook'",
        )
        .unwrap();
    let mut gotrue = cluster.connect("supabase_auth_admin");
    gotrue
        .batch_execute("SET default_transaction_read_only = off")
        .unwrap();
    gotrue
        .batch_execute(&signup_sql("readonly@example.com"))
        .unwrap();
    // Reading the log writes nothing and succeeds; recording what was sent fails.
    let text = wait_for_problem(&cluster, "read-only");
    assert!(text.contains("default_transaction_read_only"), "{text}");
    assert_eq!(problem_metric(&cluster), 1);
    // Retried every second, logged once, and the event is not sent again meanwhile.
    std::thread::sleep(Duration::from_secs(4));
    let logged = cluster.log().matches("a delivery round failed").count();
    assert_eq!(logged, 1, "{}", cluster.log());
    assert_eq!(receiver.requests().len(), 1);
    admin
        .batch_execute(
            "ALTER DATABASE postgres RESET default_transaction_read_only;
             SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE backend_type = 'pg_new_user_hook'",
        )
        .unwrap();
    wait_for("the signup to be delivered", WITHIN, || {
        (pending(&cluster) == 0).then_some(())
    });
    wait_for("the problem to clear", WITHIN, || {
        problem(&cluster).is_none().then_some(())
    });
}

#[test]
fn a_lock_held_on_the_counters_for_long_is_named_with_its_remedy() {
    let (receiver, gate) = Receiver::holding_after(0);
    let cluster = Cluster::with_hook(&[]);
    let users = cluster.bulk_signups("locked", 5, 5);
    cluster.configure(&[("url", &receiver.url)]);
    receiver.wait_for_requests(users.len(), WITHIN);
    let mut locker = cluster.connect("supabase_admin");
    // Each recording of outcomes adds to the counters' row.
    locker
        .batch_execute("BEGIN; SELECT 1 FROM new_user_hook.counters FOR UPDATE")
        .unwrap();
    gate.open();
    let text = wait_for_problem(&cluster, "lock");
    assert!(text.contains("pg_locks"), "{text}");
    assert_eq!(problem_metric(&cluster), 1);
    locker.batch_execute("COMMIT").unwrap();
    wait_for("every event delivered", WITHIN, || {
        (pending(&cluster) == 0).then_some(())
    });
    wait_for("the problem to clear", WITHIN, || {
        problem(&cluster).is_none().then_some(())
    });
}

#[test]
fn a_database_that_does_not_exist_is_named_without_a_restart_loop() {
    let receiver = Receiver::ok();
    let cluster = Cluster::with_hook(&["pg_new_user_hook.database = 'postgress'"]);
    cluster.configure(&[("url", &receiver.url)]);
    let text = wait_for_problem(&cluster, "pg_new_user_hook.database = 'postgress'");
    assert!(text.contains("restart"), "{text}");
    assert!(!text.contains("max_worker_processes"), "{text}");
    assert_eq!(problem_metric(&cluster), 1);
    // Signups are queued meanwhile.
    cluster.signup("queued@example.com");
    // The worker tried once, then waits: no new attempt every few seconds.
    std::thread::sleep(Duration::from_secs(12));
    let log = cluster.log();
    let attempts = log
        .matches("FATAL:  database \"postgress\" does not exist")
        .count();
    assert_eq!(attempts, 1, "{log}");
    assert_eq!(pending(&cluster), 1);
    assert_eq!(receiver.count(), 0);
}

/// The largest number of requests the receiver was handling at once among those
/// that arrived after `since`.
fn most_at_once(receiver: &Receiver, since: Instant) -> usize {
    receiver.inspect(|all| {
        let spans: Vec<(Instant, Instant)> = all
            .iter()
            .filter(|r| r.at >= since)
            .filter_map(|r| r.answered_at.map(|end| (r.at, end)))
            .collect();
        spans
            .iter()
            .map(|(start, _)| {
                spans
                    .iter()
                    .filter(|(s, e)| s <= start && start < e)
                    .count()
            })
            .max()
            .unwrap_or(0)
    })
}

#[test]
fn a_lower_concurrency_holds_through_later_reloads() {
    let receiver = Receiver::start(|_, _| {
        std::thread::sleep(Duration::from_millis(150));
        Reply::Status(200)
    });
    let cluster = Cluster::hooked_to(&receiver.url, &[("concurrency", "32")]);
    cluster.configure(&[("concurrency", "4")]);
    std::thread::sleep(Duration::from_secs(1));
    cluster.configure(&[("timeout_ms", "6s")]);
    std::thread::sleep(Duration::from_secs(1));
    let since = Instant::now();
    let users = cluster.bulk_signups("narrow", 60, 60);
    for id in &users {
        cluster.wait_for_event(id, "status = 'delivered'", WITHIN);
    }
    let most = most_at_once(&receiver, since);
    assert!(
        (2..=4).contains(&most),
        "{most} requests at once with concurrency = 4"
    );
}

/// The WAL insert position and the next transaction id, read without assigning one.
fn wal_and_xid(cluster: &Cluster) -> (String, String) {
    let row = cluster.one_row(
        "SELECT pg_current_wal_insert_lsn()::text, pg_snapshot_xmax(pg_current_snapshot())::text",
    );
    (row.get(0), row.get(1))
}

/// Waits until nothing has written WAL for `quiet` (checkpoints and the standby
/// snapshots that follow recent activity are done), then watches `window`.
fn writes_while_idle(
    cluster: &Cluster,
    quiet: Duration,
    window: Duration,
) -> ((String, String), (String, String)) {
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut last = wal_and_xid(cluster);
    let mut since = Instant::now();
    while since.elapsed() < quiet {
        assert!(
            Instant::now() < deadline,
            "the server never went quiet: WAL and transaction ids keep moving ({last:?})"
        );
        std::thread::sleep(Duration::from_millis(500));
        let now = wal_and_xid(cluster);
        if now != last {
            last = now;
            since = Instant::now();
        }
    }
    std::thread::sleep(window);
    (last, wal_and_xid(cluster))
}

#[test]
fn an_idle_or_paused_worker_assigns_no_transaction_id_and_writes_no_wal() {
    let receiver = Receiver::ok();
    // Nothing else writes: no autovacuum.
    let cluster = Cluster::with_hook(&["autovacuum = off"]);
    cluster.configure(&[("url", &receiver.url)]);
    let id = cluster.signup("idle@example.com");
    cluster.wait_for_event(&id, "status = 'delivered'", WITHIN);
    // Idle: the worker polls every 5 s; two polls and more in the window.
    let (before, after) =
        writes_while_idle(&cluster, Duration::from_secs(16), Duration::from_secs(12));
    assert_eq!(
        before, after,
        "an idle worker wrote WAL or took a transaction id"
    );

    cluster.configure(&[("paused", "on")]);
    cluster.signup("paused@example.com");
    let (before, after) =
        writes_while_idle(&cluster, Duration::from_secs(16), Duration::from_secs(12));
    assert_eq!(
        before, after,
        "a paused worker wrote WAL or took a transaction id"
    );
}

#[test]
fn failures_that_repeat_without_the_breaker_and_events_given_up_on_are_named() {
    let (receiver, status) = Receiver::switchable();
    status.store(503, Ordering::SeqCst);
    let cluster = Cluster::hooked_to(
        &receiver.url,
        &[("breaker_failures", "0"), ("retry_base_ms", "200")],
    );
    let id = cluster.signup("failing@example.com");
    let text = wait_for_problem(&cluster, "deliveries are failing");
    assert!(text.contains("503"), "{text}");
    // Refused for good: the event is given up on, and the status says what to do.
    status.store(400, Ordering::SeqCst);
    cluster.wait_for_event(&id, "status = 'failed'", WITHIN);
    let text = wait_for_problem(&cluster, "given up on");
    assert!(text.contains("redeliver_failed()"), "{text}");
    status.store(204, Ordering::SeqCst);
    cluster
        .connect("supabase_admin")
        .batch_execute("SELECT new_user_hook.redeliver_failed()")
        .unwrap();
    cluster.wait_for_event(&id, "status = 'delivered'", WITHIN);
    wait_for("the problem to clear", WITHIN, || {
        problem(&cluster).is_none().then_some(())
    });
}
