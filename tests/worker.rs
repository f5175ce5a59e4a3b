//! The worker as a process that runs for months: what it costs while it waits
//! (CPU of all its threads, from /proc/PID/stat), what it tells the statistics
//! system while it runs, how soon a new URL takes effect, and how fast it stops.

mod common;

use common::{cpu_time, wait_for, Cluster, Receiver, Reply};
use std::time::{Duration, Instant};

const WITHIN: Duration = Duration::from_secs(30);

fn hooked(url: &str, settings: &[(&str, &str)]) -> Cluster {
    Cluster::hooked_to(url, settings)
}

/// The share of one core the worker used over `window`.
fn worker_cpu_share(cluster: &Cluster, window: Duration) -> f64 {
    let pid = cluster.worker_pid().expect("the worker runs");
    let before = cpu_time(pid);
    std::thread::sleep(window);
    let share = (cpu_time(pid) - before).as_secs_f64() / window.as_secs_f64();
    eprintln!(
        "worker CPU over {window:?}: {:.1} % of a core",
        share * 100.0
    );
    share
}

fn pending(cluster: &Cluster) -> i64 {
    cluster
        .one_row("SELECT pending FROM new_user_hook.status")
        .get(0)
}

#[test]
fn a_worker_paused_by_configuration_sleeps_with_a_backlog() {
    // A fresh install: no URL yet, events waiting (overdue, since they are due at once).
    let cluster = Cluster::with_hook(&[]);
    cluster.bulk_signups("paused", 50, 50);
    assert_eq!(pending(&cluster), 50);
    let share = worker_cpu_share(&cluster, Duration::from_secs(3));
    assert!(
        share < 0.05,
        "a paused worker used {:.0} % of a core",
        share * 100.0
    );
}

#[test]
fn a_worker_paused_by_the_switch_sleeps_while_signups_keep_coming() {
    let receiver = Receiver::ok();
    let cluster = hooked(&receiver.url, &[("paused", "on")]);
    cluster.bulk_signups("paused-switch", 200, 200);
    // Signups go on: each commit wakes the worker, which counts the queue at most
    // once a second for the metrics and sends nothing.
    let signing_up = std::thread::scope(|scope| {
        let signups = scope.spawn(|| {
            for i in 0..30 {
                cluster.signup(&format!("while-paused-{i}@example.com"));
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        let share = worker_cpu_share(&cluster, Duration::from_secs(3));
        signups.join().unwrap();
        share
    });
    assert!(
        signing_up < 0.05,
        "a paused worker used {:.0} % of a core while users signed up",
        signing_up * 100.0
    );
    assert_eq!(receiver.count(), 0, "nothing is sent while paused");
    assert_eq!(pending(&cluster), 230);
}

#[test]
fn a_worker_facing_a_backend_that_is_down_sleeps_between_probes() {
    let down = Receiver::start(|_, _| Reply::Status(503));
    let cluster = hooked(&down.url, &[("probe_interval_ms", "1s")]);
    cluster.bulk_signups("down", 2000, 2000);
    wait_for("the circuit to open", WITHIN, || {
        let state: String = cluster
            .one_row("SELECT backend_state FROM new_user_hook.status")
            .get(0);
        (state != "closed").then_some(())
    });
    let before = down.count();
    let share = worker_cpu_share(&cluster, Duration::from_secs(3));
    let probes = down.count() - before;
    assert!(
        share < 0.05,
        "a worker holding back 2,000 events used {:.0} % of a core",
        share * 100.0
    );
    // Probes at most every second, and what was already on its way when it opened.
    assert!(
        probes <= 6,
        "{probes} requests in 3 s to a backend that is down with 2,000 events waiting"
    );
}

#[test]
fn a_new_url_is_tried_at_once_though_the_previous_backend_opened_the_circuit() {
    let down = Receiver::start(|_, _| Reply::Status(503));
    // The first probe would come 20 s after the circuit opens: the new backend must
    // not wait for it, nor the events for their backoff from the outage.
    let cluster = hooked(
        &down.url,
        &[("retry_base_ms", "20s"), ("probe_interval_ms", "60s")],
    );
    cluster.bulk_signups("moved", 100, 100);
    wait_for("the circuit to open", WITHIN, || {
        let state: String = cluster
            .one_row("SELECT backend_state FROM new_user_hook.status")
            .get(0);
        (state == "open").then_some(())
    });
    let good = Receiver::ok();
    cluster.configure(&[("url", &good.url)]);
    wait_for(
        "every event at the new backend",
        Duration::from_secs(10),
        || (good.accepted().len() >= 100).then_some(()),
    );
    let state: String = cluster
        .one_row("SELECT backend_state FROM new_user_hook.status")
        .get(0);
    assert_eq!(state, "closed");
}

#[test]
fn a_worker_with_a_full_window_sleeps_until_an_answer_comes() {
    let hanging = Receiver::start(|_, _| Reply::Hang);
    let cluster = hooked(&hanging.url, &[("concurrency", "2"), ("timeout_ms", "60s")]);
    cluster.bulk_signups("slow", 1000, 1000);
    hanging.wait_for_requests(2, WITHIN);
    // The whole in-flight window is claimed at once; status shows it at claim time.
    let in_flight: i32 = wait_for("the window to be claimed", WITHIN, || {
        let n: Option<i32> = cluster
            .one_row("SELECT in_flight FROM new_user_hook.status")
            .get(0);
        n.filter(|&n| n >= 64)
    });
    assert_eq!(in_flight, 64, "concurrency 2 claims a window of 64");
    let share = worker_cpu_share(&cluster, Duration::from_secs(3));
    assert!(
        share < 0.10,
        "a worker waiting on a slow backend used {:.0} % of a core",
        share * 100.0
    );
    assert_eq!(hanging.count(), 2, "no more requests than the concurrency");
}

/// A delivered event costs no row of its own: it is listed in a done row (one per
/// batch), and no row of the outbox or the log is inserted, updated or deleted for
/// it. The worker's writes reach the statistics system while it runs, not only when
/// it exits.
#[test]
fn delivered_events_write_no_row_of_their_own_and_the_statistics_see_the_worker_while_it_runs() {
    let receiver = Receiver::ok();
    let cluster = hooked(&receiver.url, &[]);
    let worker = cluster.worker_pid().unwrap();
    cluster.bulk_signups("stats", 3000, 1000);
    wait_for("3,000 deliveries", WITHIN, || {
        (pending(&cluster) == 0).then_some(())
    });
    let (done_rows, listed): (i64, i64) = wait_for(
        "the worker's done rows in pg_stat_user_tables",
        Duration::from_secs(20),
        || {
            let row = cluster.one_row(
                "SELECT coalesce(sum(n_tup_ins), 0)::int8,
                        (SELECT count(*) FROM (SELECT unnest(ids) FROM new_user_hook.done_0
                                               UNION ALL SELECT unnest(ids) FROM new_user_hook.done_1) AS d)
                   FROM pg_stat_user_tables WHERE schemaname = 'new_user_hook' AND relname IN ('done_0', 'done_1')",
            );
            let found: (i64, i64) = (row.get(0), row.get(1));
            (found.0 > 0).then_some(found)
        },
    );
    assert_eq!(listed, 3000, "every delivery listed once");
    assert!(
        done_rows < 3000,
        "batched: {done_rows} done rows for 3,000 events"
    );
    let outbox: i64 = cluster
        .one_row(
            "SELECT (n_tup_ins + n_tup_upd + n_tup_del)::int8 FROM pg_stat_user_tables
              WHERE schemaname = 'new_user_hook' AND relname = 'outbox'",
        )
        .get(0);
    assert_eq!(outbox, 0, "rows of the outbox written for delivered events");
    let log_changed: i64 = cluster
        .one_row(
            "SELECT sum(n_tup_upd + n_tup_del)::int8 FROM pg_stat_user_tables
              WHERE schemaname = 'new_user_hook' AND relname IN ('log_0', 'log_1')",
        )
        .get(0);
    assert_eq!(log_changed, 0, "rows of the log updated or deleted");
    assert_eq!(
        cluster.worker_pid(),
        Some(worker),
        "the worker kept running"
    );
}

#[test]
fn a_burst_leaves_the_log_empty_with_nothing_to_vacuum() {
    let receiver = Receiver::ok();
    // Delivered events kept for no time: the log is emptied once they are delivered.
    let cluster = hooked(&receiver.url, &[("paused", "on"), ("retention", "0")]);
    // An event trigger that refuses all DDL (as a project's guard might): the log's
    // rotation runs none.
    cluster
        .connect("supabase_admin")
        .batch_execute(
            "CREATE FUNCTION public.no_ddl() RETURNS event_trigger LANGUAGE plpgsql
                 AS $$ BEGIN RAISE EXCEPTION 'no DDL here'; END $$;
             CREATE EVENT TRIGGER no_ddl ON ddl_command_start EXECUTE FUNCTION public.no_ddl();",
        )
        .unwrap();
    // Committed while delivery is paused: read and sent from the log when it resumes.
    cluster.bulk_signups("burst", 12_000, 4_000);
    cluster.configure(&[("paused", "off")]);
    wait_for("12,000 deliveries", WITHIN, || {
        (pending(&cluster) == 0).then_some(())
    });
    // The log is read, never written to by the worker: no row updated or deleted,
    // nothing to vacuum. Rotation empties it with its done rows: the segment that held
    // the burst is swapped out, then truncated (no event came since).
    let (sizes, changed, dead): (i64, i64, i64) = wait_for(
        "the log emptied by rotation",
        Duration::from_secs(60),
        || {
            let row = cluster.one_row(
                "SELECT (SELECT count(*) FROM new_user_hook.log_0) + (SELECT count(*) FROM new_user_hook.log_1)
                        + (SELECT count(*) FROM new_user_hook.done_0) + (SELECT count(*) FROM new_user_hook.done_1),
                        sum(n_tup_upd + n_tup_del)::int8, sum(n_dead_tup)::int8
                   FROM pg_stat_user_tables WHERE schemaname = 'new_user_hook'
                    AND relname IN ('log_0', 'log_1', 'done_0', 'done_1', 'outbox')",
            );
            let found: (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
            (found.0 == 0).then_some(found)
        },
    );
    assert_eq!(
        (sizes, changed, dead),
        (0, 0, 0),
        "rows left in the log, or changed or dead in the queue's tables"
    );
    let log = cluster.log();
    assert!(!log.contains("rotating the log"), "{log}");
}

#[test]
fn a_new_url_takes_effect_for_every_request_not_yet_on_the_wire() {
    let hanging = Receiver::start(|_, _| Reply::Hang);
    let cluster = hooked(&hanging.url, &[("timeout_ms", "2s")]);
    let users = cluster.bulk_signups("switch", 1200, 1200);
    hanging.wait_for_requests(32, WITHIN);
    let good = Receiver::ok();
    cluster.configure(&[("url", &good.url)]);
    let switched = Instant::now();
    good.wait_for_requests(1, Duration::from_secs(10));
    let took = switched.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "the new URL was first used {took:?} after the reload"
    );
    wait_for("every event at the new URL", WITHIN, || {
        (pending(&cluster) == 0).then_some(())
    });
    // At most the requests on the wire at the switch (concurrency = 32) went to the old URL.
    assert!(
        hanging.count() <= 64,
        "the old URL got {} requests",
        hanging.count()
    );
    assert!(good.count() >= users.len() - hanging.count());
}

#[test]
fn a_fast_shutdown_is_fast_whatever_the_timeout() {
    // Events queued first, then the URL: the reload starts the whole batch at once.
    let mut cluster = Cluster::with_hook(&[]);
    let users = cluster.bulk_signups("stop", 40, 40);
    let hanging = Receiver::start(|_, _| Reply::Hang);
    cluster.configure(&[("url", &hanging.url), ("timeout_ms", "60s")]);
    hanging.wait_for_requests(32, WITHIN);
    let started = Instant::now();
    cluster.stop();
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "pg_ctl stop -m fast took {took:?}"
    );

    // The abandoned requests' events stayed pending: delivered once the server is back
    // (pointed at a backend that answers; the last setting in the file wins).
    let receiver = Receiver::ok();
    let mut conf = std::fs::OpenOptions::new()
        .append(true)
        .open(cluster.root.join("data/postgresql.auto.conf"))
        .unwrap();
    std::io::Write::write_all(
        &mut conf,
        format!("pg_new_user_hook.url = '{}'\n", receiver.url).as_bytes(),
    )
    .unwrap();
    cluster.start();
    wait_for("the abandoned events to be delivered", WITHIN, || {
        (pending(&cluster) == 0).then_some(())
    });
    let delivered: std::collections::HashSet<String> = receiver
        .requests()
        .iter()
        .map(|r| r.json()["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(delivered, users.into_iter().collect());
}

#[test]
fn a_worker_starting_where_the_extension_is_installed_warns_of_nothing() {
    let receiver = Receiver::ok();
    let mut cluster = hooked(&receiver.url, &[]);
    let logged_before = cluster.log().len();
    cluster.restart();
    let user = cluster.signup("after-restart@example.com");
    cluster.wait_for_event(&user, "status = 'delivered'", WITHIN);
    let log = cluster.log()[logged_before..].to_string();
    assert!(log.contains("delivery worker started"), "{log}");
    assert!(
        !log.contains("WARNING"),
        "a healthy start logged a warning:\n{log}"
    );
}

#[test]
fn an_event_whose_commit_woke_nobody_is_found_by_the_fallback_poll() {
    // COMMIT PREPARED runs no trigger and sets no latch: only the 5 s poll finds it.
    let receiver = Receiver::ok();
    let cluster = Cluster::with_hook(&["max_prepared_transactions = 2"]);
    cluster.configure(&[("url", &receiver.url)]);
    let mut gotrue = cluster.connect("supabase_auth_admin");
    let insert = common::insert_users(&[("email", "'prepared@example.com'")]);
    gotrue
        .batch_execute(&format!("BEGIN; {insert}; PREPARE TRANSACTION 'signup';"))
        .unwrap();
    let committed = Instant::now();
    cluster
        .connect("supabase_admin")
        .batch_execute("COMMIT PREPARED 'signup'")
        .unwrap();
    let request = &receiver.wait_for_requests(1, Duration::from_secs(12))[0];
    assert_eq!(request.json()["email"], "prepared@example.com");
    assert!(committed.elapsed() < Duration::from_secs(12));
}

fn count(cluster: &Cluster, sql: &str) -> i64 {
    cluster.one_row(sql).get(0)
}

fn status_problem(cluster: &Cluster) -> Option<String> {
    cluster
        .one_row("SELECT problem FROM new_user_hook.status")
        .get(0)
}

#[test]
fn thirty_thousand_expired_deliveries_are_purged_within_seconds() {
    let cluster = Cluster::with_hook(&[]);
    // Delivered an hour ago (written directly: the purge is what is measured), and
    // a few pending events, which the purge must leave alone.
    cluster
        .connect("supabase_admin")
        .batch_execute(
            "INSERT INTO new_user_hook.outbox (user_id, source, record, status, attempts, next_attempt_at, delivered_at)
             SELECT gen_random_uuid(), 'auth.users', '{}', 'delivered', 1, NULL, now() - interval '1 hour'
               FROM generate_series(1, 30000)",
        )
        .unwrap();
    cluster.bulk_signups("kept", 10, 10);
    cluster.configure(&[("retention", "1s")]);
    let started = Instant::now();
    wait_for("the expired deliveries to be purged", WITHIN, || {
        (count(
            &cluster,
            "SELECT count(*) FROM new_user_hook.outbox WHERE status = 'delivered'",
        ) == 0)
            .then_some(())
    });
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(10),
        "purging 30,000 took {took:?}"
    );
    assert_eq!(pending(&cluster), 10, "the purge took pending events");
}

#[test]
fn a_lock_on_the_counters_delays_recording_without_a_restart_or_a_resend() {
    let (receiver, gate) = Receiver::holding_after(0);
    let cluster = Cluster::with_hook(&[]);
    // Fewer than `concurrency` (32): every event is on the wire at once.
    let users = cluster.bulk_signups("locked", 20, 20);
    let worker = cluster.worker_pid().expect("the worker runs");
    cluster.configure(&[("url", &receiver.url)]);
    // Every event read and sent, its answer held back.
    receiver.wait_for_requests(users.len(), WITHIN);
    // A row lock on the counters, which each recording adds to: it waits for the
    // lock, times out, and is tried again.
    let mut locker = cluster.connect("supabase_admin");
    locker
        .batch_execute("BEGIN; SELECT 1 FROM new_user_hook.counters FOR UPDATE")
        .unwrap();
    gate.open();
    wait_for("a failed round in the log", WITHIN, || {
        cluster
            .log()
            .contains("a delivery round failed and is retried")
            .then_some(())
    });
    // Between tries, the outcomes it holds do not keep it awake.
    let share = worker_cpu_share(&cluster, Duration::from_secs(3));
    assert!(
        share < 0.10,
        "a worker waiting to record used {:.0} % of a core",
        share * 100.0
    );
    locker.batch_execute("COMMIT").unwrap();
    wait_for("every event recorded as delivered", WITHIN, || {
        (pending(&cluster) == 0).then_some(())
    });
    assert_eq!(cluster.worker_pid(), Some(worker), "the worker restarted");
    assert_eq!(
        receiver.count(),
        users.len(),
        "an event delivered before the failed round was sent again"
    );
    let log = cluster.log();
    assert!(log.contains("lock timeout"), "{log}");
    assert!(!log.contains("exited with exit code"), "{log}");
}

#[test]
fn an_outbox_column_retyped_by_hand_never_crashes_the_server() {
    // The worker keeps its statements prepared: a column whose type changed under it
    // is read as the type the statement gives it, never as the one it had.
    let receiver = Receiver::ok();
    let cluster = hooked(&receiver.url, &[]);
    let first = cluster.signup("before-retype@example.com");
    cluster.wait_for_event(&first, "status = 'delivered'", WITHIN);
    let worker = cluster.worker_pid().expect("the worker runs");
    cluster
        .connect("supabase_admin")
        .batch_execute(
            "ALTER EXTENSION pg_new_user_hook DROP VIEW new_user_hook.deliveries;
             ALTER EXTENSION pg_new_user_hook DROP VIEW new_user_hook.status;
             ALTER EXTENSION pg_new_user_hook DROP VIEW new_user_hook.metrics;
             DROP VIEW new_user_hook.deliveries CASCADE;
             ALTER TABLE new_user_hook.outbox ALTER COLUMN source TYPE int4 USING 7;
             INSERT INTO new_user_hook.outbox (user_id, source, record)
                  SELECT u, 7, json_build_object('id', u, 'email', 'retyped@example.com')
                    FROM gen_random_uuid() AS u;
             SELECT new_user_hook.wake_on_commit();",
        )
        .unwrap();
    receiver.wait_for_requests(2, WITHIN);
    assert_eq!(cluster.worker_pid(), Some(worker), "the worker restarted");
    let log = cluster.log();
    assert!(!log.contains("terminated by signal"), "{log}");
}

#[test]
fn drop_extension_mid_delivery_leaves_the_worker_running() {
    let (receiver, gate) = Receiver::holding_after(0);
    let cluster = hooked(&receiver.url, &[]);
    cluster.bulk_signups("dropped", 20, 20);
    receiver.wait_for_requests(20, WITHIN);
    let worker = cluster.worker_pid().expect("the worker runs");
    let mut admin = cluster.connect("supabase_admin");
    admin
        .batch_execute("DROP EXTENSION pg_new_user_hook CASCADE")
        .unwrap();
    // The answers come after the outbox is gone: nothing to record them in.
    gate.open();
    wait_for("the worker to report the missing extension", WITHIN, || {
        cluster
            .log()
            .contains("extension pg_new_user_hook is not installed")
            .then_some(())
    });
    admin
        .batch_execute("CREATE EXTENSION pg_new_user_hook; SELECT new_user_hook.install();")
        .unwrap();
    let user = cluster.signup("after-recreate@example.com");
    cluster.wait_for_event(&user, "status = 'delivered'", WITHIN);
    assert_eq!(cluster.worker_pid(), Some(worker), "the worker restarted");
    let log = cluster.log();
    assert!(!log.contains("exited with exit code"), "{log}");
}

#[test]
fn the_status_tells_a_worker_without_a_slot_from_a_restarting_one() {
    let receiver = Receiver::ok();
    let cluster = Cluster::with_hook(&["max_worker_processes = 0"]);
    cluster.configure(&[("url", &receiver.url)]);
    let problem = wait_for("the status to name max_worker_processes", WITHIN, || {
        status_problem(&cluster).filter(|p| p.contains("max_worker_processes"))
    });
    assert!(problem.contains("too many background workers"), "{problem}");
}

#[test]
fn the_status_of_a_standby_says_the_primary_delivers() {
    let receiver = Receiver::ok();
    let mut cluster = hooked(&receiver.url, &[]);
    cluster.shut_down();
    std::fs::write(cluster.root.join("data/standby.signal"), "").unwrap();
    cluster.start();
    let problem = status_problem(&cluster).expect("a standby has no worker");
    assert!(problem.contains("standby"), "{problem}");
    assert!(problem.contains("primary"), "{problem}");
}

#[test]
fn install_right_after_a_reload_does_not_warn_about_the_setting_just_made() {
    let receiver = Receiver::ok();
    let cluster = Cluster::new(&[]);
    let mut admin = cluster.connect("supabase_admin");
    admin
        .batch_execute("CREATE EXTENSION pg_new_user_hook")
        .unwrap();
    admin
        .batch_execute(&format!(
            "ALTER SYSTEM SET pg_new_user_hook.url = '{}'",
            receiver.url
        ))
        .unwrap();
    let logged_before = cluster.log().len();
    // As the demo and docs/install.md do it: reload and install in one go.
    admin
        .batch_execute("SELECT pg_reload_conf(); SELECT new_user_hook.install();")
        .unwrap();
    let log = cluster.log()[logged_before..].to_string();
    assert!(
        !log.contains("will be queued but not delivered yet"),
        "install() warned about a setting already made:\n{log}"
    );
}

#[test]
fn a_worker_in_a_database_without_the_extension_sleeps() {
    // Preloaded, but CREATE EXTENSION not run yet (or the extension dropped): the
    // worker reports it and waits to be woken.
    let cluster = Cluster::new(&[]);
    wait_for("the worker to report the missing extension", WITHIN, || {
        cluster
            .log()
            .contains("extension pg_new_user_hook is not installed")
            .then_some(())
    });
    assert!(worker_cpu_share(&cluster, Duration::from_secs(3)) < 0.05);
}

/// Users who are created and then change their email, while their creations hang
/// (in flight) or wait out a long backoff: the updates wait for them, and waiting
/// costs nothing (a blocked event is not "due" for the worker's timers).
#[test]
fn a_worker_whose_users_later_events_wait_for_earlier_ones_sleeps() {
    // A creation hangs (0) or is answered 503.
    for (name, creation) in [("in flight", 0), ("backing off", 503)] {
        let receiver = Receiver::start(move |_, r| match (r.method.as_str(), creation) {
            ("POST", 0) => Reply::Hang,
            ("POST", code) => Reply::Status(code),
            _ => Reply::Status(204),
        });
        let cluster = hooked(
            &receiver.url,
            &[
                ("events", "created,updated"),
                ("timeout_ms", "60s"),
                ("retry_base_ms", "60s"),
                ("breaker_failures", "0"),
            ],
        );
        let users: Vec<String> = (0..100)
            .map(|i| cluster.signup(&format!("blocked-{i}@example.com")))
            .collect();
        receiver.wait_for_requests(32, WITHIN);
        for user in &users {
            cluster.change_email(user, &format!("{user}@example.org"));
        }
        wait_for("the updates queued", WITHIN, || {
            (pending(&cluster) == 200).then_some(())
        });
        let share = worker_cpu_share(&cluster, Duration::from_secs(3));
        assert!(
            share < 0.05,
            "{name}: a worker whose updates wait for their creations used {:.0} % of a core",
            share * 100.0
        );
        assert!(
            receiver.inspect(|all| all.iter().all(|r| r.method == "POST")),
            "{name}: an update overtook its user's creation"
        );
    }
}
