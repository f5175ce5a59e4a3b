//! pg_new_user_hook benchmark. Starts its own PostgreSQL 15 cluster (fsync on) with
//! the extension preloaded and the real Supabase Auth schema, and a receiver in this
//! process (the test suite's, answering 204 at once), then prints:
//! signup overhead (pgbench), drain rate (with the WAL and row writes per event),
//! commit → receipt latency, the worker's CPU at a steady trickle, worker memory,
//! throughput against a slow backend, and what a backend that is down receives
//! with the circuit breaker off and on (BENCH_OUTAGE_ONLY=1: that part alone;
//! BENCH_LONG_OUTAGE=600: also a 10-minute outage with 200,000 events waiting;
//! BENCH_QUICK=1: the drain, the latency and the trickle only).

#[path = "../../tests/common/mod.rs"]
#[allow(dead_code)]
mod common;

use common::{wait_for, Cluster, Receiver, Reply};
use std::collections::HashMap;
use std::process::Command;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const LONG: Duration = Duration::from_secs(600);
/// Longer than the worker waits between handing its statistics over (1 s).
const STATISTICS_FLUSH: Duration = Duration::from_millis(1500);

/// A backend answering 204 after `delay` (a slow backend when not zero).
fn backend(delay: Duration) -> Receiver {
    Receiver::start(move |_, _| {
        std::thread::sleep(delay);
        Reply::Status(204)
    })
}

/// What a backend outage did: requests the backend got while down, and after it
/// came back, when the first request and the last delivery came.
struct Outage {
    requests_while_down: usize,
    first_request_after: Duration,
    drained_after: Duration,
}

/// `events` users wait while the backend answers `code` for `down`, then it answers
/// 204 again; the circuit breaker is on (the default, 5 failures) or off.
fn outage(
    cluster: &Cluster,
    backend: &(Receiver, Arc<AtomicU16>),
    code: u16,
    events: usize,
    down: Duration,
    breaker: bool,
) -> Outage {
    let (receiver, status) = backend;
    pause(cluster);
    cluster.configure(&[("breaker_failures", if breaker { "5" } else { "0" })]);
    for _ in 0..events / 10_000 {
        bulk_users(cluster, 10_000);
    }
    bulk_users(cluster, events % 10_000);
    assert_eq!(
        pending(cluster),
        events as i64,
        "the users' events are queued"
    );
    status.store(code, Ordering::SeqCst);
    let before = receiver.count();
    cluster.configure(&[("url", &receiver.url)]);
    std::thread::sleep(down);
    let requests_while_down = receiver.count() - before;
    let back = Instant::now();
    status.store(204, Ordering::SeqCst);
    let drained_after = wait_for("the backlog to drain", LONG * 6, || {
        (pending(cluster) == 0).then(|| back.elapsed())
    });
    let first = receiver.inspect(|all| all.iter().map(|r| r.at).find(|at| *at >= back));
    Outage {
        requests_while_down,
        first_request_after: first.map(|at| at - back).unwrap_or(drained_after),
        drained_after,
    }
}

/// First receipt of each user id, read from the receiver's requests as they come
/// (each request is parsed once, however often this is polled).
#[derive(Default)]
struct Receipts {
    seen: usize,
    first: HashMap<String, Instant>,
}

impl Receipts {
    fn update(&mut self, receiver: &Receiver) -> &HashMap<String, Instant> {
        let seen = self.seen;
        let (new, total): (Vec<(String, Instant)>, usize) = receiver.inspect(|all| {
            let new = all[seen..]
                .iter()
                .filter_map(|r| {
                    let json: serde_json::Value = serde_json::from_str(&r.body).ok()?;
                    Some((json["id"].as_str()?.to_string(), r.at))
                })
                .collect();
            (new, all.len())
        });
        self.seen = total;
        for (id, at) in new {
            self.first.entry(id).or_insert(at);
        }
        &self.first
    }
}

/// Waits until every one of `ids` was received (polling memory, not the database,
/// so the wait costs the measurement nothing); returns when each first arrived.
fn wait_for_users(receiver: &Receiver, ids: &[String]) -> HashMap<String, Instant> {
    let mut receipts = Receipts::default();
    let mut last_report = Instant::now();
    wait_for(&format!("{} users received", ids.len()), LONG, || {
        let first = receipts.update(receiver);
        let missing = ids.iter().filter(|id| !first.contains_key(*id)).count();
        if last_report.elapsed() > Duration::from_secs(10) {
            eprintln!(
                "  ... {missing} of {} not received yet ({} received in all)",
                ids.len(),
                first.len()
            );
            last_report = Instant::now();
        }
        (missing == 0).then_some(())
    });
    receipts.first
}

fn bindir() -> String {
    let out = Command::new("pg_config").arg("--bindir").output().unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// GoTrue's signup transaction (insert, role update, identity) as a pgbench script.
fn signup_script() -> String {
    let insert = common::insert_users(&[
        ("role", "''"),
        ("email", "gen_random_uuid() || '@bench.example.com'"),
        ("encrypted_password", "'$2a$10$abcdefghijklmnopqrstuv'"),
        ("confirmation_token", "''"),
        (
            "raw_app_meta_data",
            r#"'{"provider":"email","providers":["email"]}'"#,
        ),
        ("raw_user_meta_data", "'{}'"),
        ("is_sso_user", "false"),
    ]);
    format!(
        "BEGIN;
{insert} RETURNING id AS uid \\gset
UPDATE users SET role = 'authenticated', updated_at = now() WHERE id = ':uid';
INSERT INTO identities (provider_id, user_id, identity_data, provider, last_sign_in_at, created_at, updated_at) VALUES (':uid', ':uid', jsonb_build_object('sub', ':uid'), 'email', now(), now(), now());
COMMIT;
"
    )
}

/// A single-row INSERT into auth.users, as GoTrue's admin API (or an import) makes one.
fn insert_script() -> String {
    common::insert_users(&[
        ("email", "gen_random_uuid() || '@bench.example.com'"),
        (
            "raw_app_meta_data",
            r#"'{"provider":"email","providers":["email"]}'"#,
        ),
        ("raw_user_meta_data", "'{}'"),
    ]) + ";\n"
}

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum Signup {
    /// GoTrue's signup transaction: INSERT user, UPDATE role, INSERT identity.
    GoTrue,
    /// One INSERT into auth.users.
    Insert,
}

/// pgbench TPS of signups, as supabase_auth_admin.
fn pgbench(cluster: &Cluster, signup: Signup, clients: u32, seconds: u64) -> f64 {
    let script = cluster.root.join(format!("{signup:?}.pgbench"));
    let text = match signup {
        Signup::GoTrue => signup_script(),
        Signup::Insert => insert_script(),
    };
    std::fs::write(&script, text).unwrap();
    let out = Command::new(format!("{}/pgbench", bindir()))
        .args([
            "-n",
            "-h",
            "127.0.0.1",
            "-p",
            &cluster.port.to_string(),
            "-U",
            "supabase_auth_admin",
        ])
        .args([
            "-c",
            &clients.to_string(),
            "-j",
            &clients.min(2).to_string(),
            "-T",
            &seconds.to_string(),
        ])
        .arg("-f")
        .arg(&script)
        .arg("postgres")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "pgbench failed: {}{}",
        text,
        String::from_utf8_lossy(&out.stderr)
    );
    let failed = text
        .lines()
        .find(|l| l.starts_with("number of failed transactions"))
        .unwrap_or("");
    assert!(
        failed.is_empty() || failed.contains(": 0 "),
        "pgbench: {failed}"
    );
    text.lines()
        .find_map(|l| {
            l.strip_prefix("tps = ")
                .and_then(|r| r.split_whitespace().next())
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or_else(|| panic!("no tps in pgbench output:\n{text}"))
}

fn bulk_users(cluster: &Cluster, n: usize) -> Vec<String> {
    let sql = common::insert_users(&[
        ("email", "gen_random_uuid() || '@bulk.example.com'"),
        ("raw_app_meta_data", r#"'{"provider":"email"}'"#),
        ("raw_user_meta_data", "'{}'"),
    ]) + " FROM generate_series(1, $1::int8) RETURNING id::text";
    let mut client = cluster.connect("supabase_auth_admin");
    let rows = client.query(&sql, &[&(n as i64)]).unwrap();
    rows.iter().map(|r| r.get(0)).collect()
}

fn delivered(cluster: &Cluster) -> i64 {
    cluster
        .one_row("SELECT delivered FROM new_user_hook.status")
        .get(0)
}

/// Rows updated and deleted in the extension's tables so far, from the cumulative
/// statistics (the worker hands its counts over at most once a second: wait first).
fn extension_row_writes(cluster: &Cluster) -> i64 {
    cluster
        .one_row(
            "SELECT coalesce(sum(n_tup_upd + n_tup_del), 0)::int8
               FROM pg_stat_user_tables WHERE schemaname = 'new_user_hook'",
        )
        .get(0)
}

/// The same, once the worker has handed all of its counts over: an idle worker
/// flushes its statistics within 10 s, so the count is read until it stays put
/// for 3 s (20 s at most).
fn settled_row_writes(cluster: &Cluster) -> i64 {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut last = extension_row_writes(cluster);
    let mut since = Instant::now();
    while since.elapsed() < Duration::from_secs(3) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(500));
        let now = extension_row_writes(cluster);
        if now != last {
            last = now;
            since = Instant::now();
        }
    }
    last
}

/// Where the next WAL record goes, in bytes.
fn wal_position(cluster: &Cluster) -> i64 {
    cluster
        .one_row("SELECT (pg_current_wal_insert_lsn() - '0/0')::int8")
        .get(0)
}

fn pending(cluster: &Cluster) -> i64 {
    cluster
        .one_row("SELECT count(*) FROM new_user_hook.deliveries WHERE status = 'pending'")
        .get(0)
}

fn failed(cluster: &Cluster) -> i64 {
    cluster
        .one_row("SELECT failed FROM new_user_hook.status")
        .get(0)
}

/// Pauses delivery (URL unset) until `resume` is called with a URL.
fn pause(cluster: &Cluster) {
    cluster.configure(&[("url", "")]);
    wait_for("delivery to pause", LONG, || {
        let p: Option<String> = cluster
            .one_row("SELECT problem FROM new_user_hook.status")
            .get(0);
        p.filter(|p| p.contains("not set"))
    });
}

/// The worker's private memory (RssAnon): VmRSS would also count the shared buffers
/// it has touched, which grow with the table, not with the worker.
fn worker_rss_kb(cluster: &Cluster) -> u64 {
    let pid = cluster.worker_pid().expect("worker running");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("RssAnon:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

/// Starts (from zero) or stops counting the worker's statements in pg_stat_statements.
fn track_statements(admin: &mut postgres::Client, on: bool) {
    let set = if on {
        "ALTER SYSTEM SET pg_stat_statements.track = 'all'"
    } else {
        "ALTER SYSTEM RESET pg_stat_statements.track"
    };
    // One statement per call: ALTER SYSTEM refuses to run in a transaction block.
    for sql in [
        "CREATE EXTENSION IF NOT EXISTS pg_stat_statements",
        set,
        "SELECT pg_reload_conf()",
    ] {
        admin.batch_execute(sql).unwrap();
    }
    if on {
        // The reload reaches the worker before its next round: it rereads its settings first.
        std::thread::sleep(Duration::from_millis(200));
        admin
            .batch_execute("SELECT pg_stat_statements_reset()")
            .unwrap();
    }
}

/// Time in each kind of the worker's statements since tracking started (wall time,
/// from pg_stat_statements): (what, milliseconds, calls).
fn statement_times(admin: &mut postgres::Client) -> Vec<(String, f64, i64)> {
    admin
        .query(
            "SELECT CASE WHEN query LIKE 'WITH due AS%' THEN 'claim'
                         WHEN query LIKE 'WITH r AS%' OR query LIKE 'WITH l AS%' THEN 'record'
                         WHEN query LIKE 'WITH e AS%' THEN 'read from the log'
                         WHEN query LIKE 'SELECT (SELECT extract%' THEN 'next due'
                         WHEN query LIKE '%queue_gauges%' THEN 'queue counts'
                         ELSE 'other (analyze, rotation, settings)' END AS what,
                    sum(total_exec_time + total_plan_time)::float8 AS ms, sum(calls)::int8
               FROM pg_stat_statements
              WHERE userid = (SELECT usesysid FROM pg_user WHERE usename = current_user)
                AND query NOT LIKE '%pg_stat_statements%' AND query NOT LIKE '%FROM new_user_hook.status%'
              GROUP BY 1 ORDER BY 2 DESC",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

fn statement_rows(
    statements: &[(String, f64, i64)],
    events: usize,
    row: impl Fn(&str, String, &str),
) {
    for (what, ms, calls) in statements {
        row(
            &format!("    main thread in {what} ({calls} statements)"),
            format!("{:.1} µs", ms * 1000.0 / events as f64),
            "per event, wall time",
        );
    }
}

/// Signs users up one at a time from `threads` connections at `rate` per second in
/// all, for `duration`; returns (user id, commit instant).
fn paced_signups(
    cluster: &Cluster,
    threads: usize,
    rate: f64,
    duration: Duration,
) -> Vec<(String, Instant)> {
    let interval = Duration::from_secs_f64(threads as f64 / rate);
    let insert = common::insert_users(&[
        ("role", "''"),
        ("email", "gen_random_uuid() || '@paced.example.com'"),
        ("raw_app_meta_data", r#"'{"provider":"email"}'"#),
        ("raw_user_meta_data", "'{}'"),
    ]) + " RETURNING id::text";
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let mut client = cluster.connect("supabase_auth_admin");
            let insert = insert.clone();
            std::thread::spawn(move || {
                let mut out = Vec::new();
                let start = Instant::now();
                let mut next = start;
                while start.elapsed() < duration {
                    let mut tx = client.transaction().unwrap();
                    let id: String = tx.query_one(&insert, &[]).unwrap().get(0);
                    tx.execute(
                        "UPDATE users SET role = 'authenticated' WHERE id = $1::text::uuid",
                        &[&id],
                    )
                    .unwrap();
                    tx.commit().unwrap();
                    out.push((id, Instant::now()));
                    next += interval;
                    if let Some(wait) = next.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                }
                out
            })
        })
        .collect();
    handles
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect()
}

/// (p50, p99, max) of commit → receipt, in milliseconds.
fn latencies(receiver: &Receiver, commits: &[(String, Instant)]) -> (f64, f64, f64) {
    let ids: Vec<String> = commits.iter().map(|(id, _)| id.clone()).collect();
    let first = wait_for_users(receiver, &ids);
    let mut ms: Vec<f64> = commits
        .iter()
        .map(|(id, at)| first[id].saturating_duration_since(*at).as_secs_f64() * 1000.0)
        .collect();
    ms.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let pick = |q: f64| ms[((ms.len() - 1) as f64 * q).round() as usize];
    (pick(0.5), pick(0.99), *ms.last().unwrap())
}

/// A backend that is down: the circuit breaker off (breaker_failures = 0) and on.
fn outages(cluster: &Cluster, row: impl Fn(&str, String, &str)) {
    println!("Backend outage (concurrency 32; circuit breaker off / on)");
    cluster
        .connect("supabase_admin")
        .batch_execute("SELECT new_user_hook.install()")
        .unwrap();
    cluster.configure(&[("concurrency", "32")]);
    let switchable = Receiver::switchable();
    let mut outages = vec![(503u16, 2_000usize, Duration::from_secs(30))];
    outages.push((429, 500, Duration::from_secs(30)));
    if let Some(secs) = std::env::var("BENCH_LONG_OUTAGE")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        outages.push((503, 200_000, Duration::from_secs(secs)));
    }
    for (code, events, down) in outages {
        eprintln!("outage: {code} for {down:?} while {events} events wait...");
        let off = outage(cluster, &switchable, code, events, down, false);
        let on = outage(cluster, &switchable, code, events, down, true);
        let what = format!("{code} for {} s, {events} events waiting", down.as_secs());
        row(
            &format!("{what}: requests while down"),
            format!("{} / {}", off.requests_while_down, on.requests_while_down),
            "a handful",
        );
        row(
            &format!("{what}: first request after it is back"),
            format!(
                "{:.1} / {:.1} s",
                off.first_request_after.as_secs_f64(),
                on.first_request_after.as_secs_f64()
            ),
            "≤ probe interval (30 s)",
        );
        row(
            &format!("{what}: all delivered after it is back"),
            format!(
                "{:.1} / {:.1} s",
                off.drained_after.as_secs_f64(),
                on.drained_after.as_secs_f64()
            ),
            "",
        );
    }
}

fn main() {
    let seconds: u64 = std::env::var("BENCH_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let row =
        |what: &str, figure: String, target: &str| println!("  {what:<58} {figure:>22}   {target}");

    // pg_net's Database Webhook runs beside ours when pg_net is installed (not a dependency).
    let sharedir = Command::new("pg_config")
        .arg("--sharedir")
        .output()
        .unwrap();
    let pg_net = std::path::Path::new(String::from_utf8_lossy(&sharedir.stdout).trim())
        .join("extension/pg_net.control")
        .exists();
    eprintln!("starting a cluster (fsync on) with the Supabase Auth schema...");
    // pg_stat_statements splits the worker's time by statement during the drain; it
    // tracks nothing the rest of the time.
    let mut conf = vec![
        "fsync = on",
        "shared_buffers = '256MB'",
        "max_connections = 200",
        "pg_stat_statements.track = 'none'",
    ];
    conf.push(if pg_net {
        "shared_preload_libraries = 'pg_new_user_hook, pg_stat_statements, pg_net'"
    } else {
        "shared_preload_libraries = 'pg_new_user_hook, pg_stat_statements'"
    });
    let cluster = Cluster::new(&conf);
    let version: String = cluster.one_row("SHOW server_version").get(0);
    let receiver = backend(Duration::ZERO);
    let mut admin = cluster.connect("supabase_admin");
    admin
        .batch_execute("CREATE EXTENSION pg_new_user_hook")
        .unwrap();
    let concurrency = std::env::var("BENCH_CONCURRENCY").unwrap_or_else(|_| "32".into());
    cluster.configure(&[("url", &receiver.url), ("concurrency", &concurrency)]);
    println!("pg_new_user_hook benchmark — {cores} cores, PostgreSQL {version}, fsync on, synchronous_commit on");
    println!(
        "receiver: the test suite's in-process server (hyper, 204 at once); defaults unless stated"
    );
    println!();
    if std::env::var("BENCH_OUTAGE_ONLY").is_ok_and(|v| !v.is_empty()) {
        outages(&cluster, row);
        return;
    }

    // 1. Signup overhead: the set-ups alternate, three rounds, median of each, so
    // drift (table growth, checkpoints) does not favour one of them.
    eprintln!("signup overhead: pgbench, {seconds} s per run, 3 rounds...");
    admin
        .batch_execute(
            "CREATE TABLE public.bare_outbox (id bigserial PRIMARY KEY, user_id uuid NOT NULL, created_at timestamptz DEFAULT now());
             CREATE FUNCTION public.bare_capture() RETURNS trigger LANGUAGE plpgsql AS
               $$ BEGIN INSERT INTO public.bare_outbox (user_id) VALUES (NEW.id); RETURN NULL; END $$;
             GRANT INSERT ON public.bare_outbox TO supabase_auth_admin;
             GRANT USAGE ON SEQUENCE public.bare_outbox_id_seq TO supabase_auth_admin;",
        )
        .unwrap();
    if pg_net {
        // pg_net's Database Webhook, as Supabase's dashboard creates it.
        admin
            .batch_execute(&format!(
                "CREATE EXTENSION pg_net;
                 CREATE FUNCTION public.pg_net_capture() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER AS
                   $$ BEGIN PERFORM net.http_post(url := '{}', body := jsonb_build_object('id', NEW.id, 'email', NEW.email)); RETURN NULL; END $$;",
                receiver.url
            ))
            .unwrap();
    }
    let quick = std::env::var("BENCH_QUICK").is_ok_and(|v| !v.is_empty());
    let rounds = if quick || std::env::var_os("BENCH_SKIP_OVERHEAD").is_some() {
        0
    } else {
        3
    };
    let none = "SELECT new_user_hook.uninstall(); DROP TRIGGER IF EXISTS bare ON auth.users; DROP TRIGGER IF EXISTS pg_net ON auth.users;";
    let mut setups = vec![
        ("none", none.to_string()),
        ("bare", format!("{none} CREATE TRIGGER bare AFTER INSERT ON auth.users FOR EACH ROW EXECUTE FUNCTION public.bare_capture();")),
        ("paused", format!("{none} SELECT new_user_hook.install();")),
        ("hook", format!("{none} SELECT new_user_hook.install();")),
    ];
    if pg_net {
        setups.push(("pg_net", format!("{none} CREATE TRIGGER pg_net AFTER INSERT ON auth.users FOR EACH ROW EXECUTE FUNCTION public.pg_net_capture();")));
    }
    let mut tps: HashMap<(&str, Signup, u32), Vec<f64>> = HashMap::new();
    // Delivered during the run and left queued at its end, with delivery running.
    let mut kept_up: HashMap<(Signup, u32), (i64, i64)> = HashMap::new();
    for round in 0..rounds {
        // Each round starts with a different set-up, so none always runs first.
        for i in 0..setups.len() {
            let (name, sql) = &setups[(round + i) % setups.len()];
            admin.batch_execute(sql).unwrap();
            if *name == "paused" {
                pause(&cluster);
            }
            for signup in [Signup::Insert, Signup::GoTrue] {
                for clients in [1, 8] {
                    admin.batch_execute("CHECKPOINT").unwrap();
                    let delivered_before = delivered(&cluster);
                    tps.entry((name, signup, clients))
                        .or_default()
                        .push(pgbench(&cluster, signup, clients, seconds));
                    if *name == "hook" {
                        let left = pending(&cluster);
                        kept_up.insert(
                            (signup, clients),
                            (delivered(&cluster) - delivered_before, left),
                        );
                        // The next run starts from an empty queue.
                        wait_for("the queue to drain", LONG, || {
                            (pending(&cluster) == 0).then_some(())
                        });
                    }
                }
            }
            if *name == "paused" {
                cluster.configure(&[("url", &receiver.url)]);
                wait_for("the paused signups delivered", LONG, || {
                    (pending(&cluster) == 0).then_some(())
                });
            }
        }
    }
    // The remaining measurements run with the hook installed.
    admin.batch_execute(&setups[3].1).unwrap();
    let median = |name: &str, signup: Signup, clients: u32| {
        let Some(v) = tps.get(&(name, signup, clients)) else {
            return f64::NAN;
        };
        let mut v = v.clone();
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v[v.len() / 2]
    };
    let base1 = median("none", Signup::GoTrue, 1);
    println!(
        "Signup overhead (pgbench TPS, median of 3 runs; ratios to no trigger, and to the floor)"
    );
    for (signup, title) in [
        (Signup::Insert, "single INSERT into auth.users"),
        (Signup::GoTrue, "GoTrue's signup transaction"),
    ] {
        println!("  {title}");
        let ratio = |name: &str, clients: u32| {
            let (t, none, floor) = (
                median(name, signup, clients),
                median("none", signup, clients),
                median("bare", signup, clients),
            );
            format!("{:.2} / {:.2}", t / none, t / floor)
        };
        row(
            "no trigger, TPS at 1 / 8 clients",
            format!(
                "{:.0} / {:.0}",
                median("none", signup, 1),
                median("none", signup, 8)
            ),
            "",
        );
        row(
            "bare one-row trigger (floor), ratio 1 / 8 clients",
            format!(
                "{:.2} / {:.2}",
                median("bare", signup, 1) / median("none", signup, 1),
                median("bare", signup, 8) / median("none", signup, 8)
            ),
            "",
        );
        for clients in [1, 8] {
            row(
                &format!("hook, delivery paused, {clients} client(s): vs none / vs floor"),
                ratio("paused", clients),
                "target ≥ 0.95 of the floor",
            );
        }
        for clients in [1, 8] {
            let (during, left) = kept_up.get(&(signup, clients)).copied().unwrap_or((0, 0));
            row(
                &format!("hook, delivering, {clients} client(s): vs none / vs floor"),
                ratio("hook", clients),
                &format!(
                    "{during} delivered during the run, {left} left queued; target ≥ {} of none",
                    if clients == 1 { "0.90" } else { "0.75" }
                ),
            );
        }
        if pg_net {
            for clients in [1, 8] {
                row(
                    &format!("pg_net Database Webhook, {clients} client(s): vs none / vs floor"),
                    ratio("pg_net", clients),
                    "(its queue is sent later, 200/s)",
                );
            }
        }
    }
    if !pg_net {
        println!("  (pg_net is not installed for this PostgreSQL: its row is skipped)");
    }

    // 2. Drain rate.
    eprintln!("drain rate: 20,000 users committed at once...");
    pause(&cluster);
    let before = delivered(&cluster);
    let ids = bulk_users(&cluster, 20_000);
    let worker = cluster.worker_pid().expect("worker running");
    // The signups' own writes reach the statistics before the drain starts.
    std::thread::sleep(STATISTICS_FLUSH);
    track_statements(&mut admin, true);
    let writes_before = extension_row_writes(&cluster);
    let wal_before = wal_position(&cluster);
    let cpu_before = common::cpu_time(worker);
    let main_before = common::thread_cpu_time(worker, worker);
    let started = Instant::now();
    cluster.configure(&[("url", &receiver.url)]);
    wait_for_users(&receiver, &ids);
    let drain = started.elapsed();
    wait_for("20,000 recorded as delivered", LONG, || {
        (delivered(&cluster) - before >= 20_000).then_some(())
    });
    let cpu_per_event = (common::cpu_time(worker) - cpu_before).as_secs_f64() * 1e6 / 20_000.0;
    let main_per_event =
        (common::thread_cpu_time(worker, worker) - main_before).as_secs_f64() * 1e6 / 20_000.0;
    // Everything written meanwhile is the delivery's (nothing else runs), autovacuum included.
    let wal_per_event = (wal_position(&cluster) - wal_before) as f64 / 20_000.0;
    let writes_per_100k = (settled_row_writes(&cluster) - writes_before) * 5;
    let statements = statement_times(&mut admin);
    track_statements(&mut admin, false);
    println!("Drain rate");
    row(
        "20,000 users committed at once: time, events/s",
        format!(
            "{:.2} s, {:.0}/s",
            drain.as_secs_f64(),
            20_000.0 / drain.as_secs_f64()
        ),
        "target ≥ 5,000/s",
    );
    row(
        "failed or lost",
        format!("{} / 0", failed(&cluster)),
        "target 0",
    );
    row(
        "worker CPU per delivered event (all its threads)",
        format!("{cpu_per_event:.0} µs"),
        "target ≤ 25 µs",
    );
    row(
        "  of which its main thread (SQL, loop) / sending threads (HTTP)",
        format!(
            "{main_per_event:.0} / {:.0} µs",
            cpu_per_event - main_per_event
        ),
        "",
    );
    row(
        "WAL written per delivered event (all of it: nothing else runs)",
        format!("{wal_per_event:.0} bytes"),
        "target ≤ 100 bytes",
    );
    row(
        "rows updated + deleted in the extension's tables per 100,000 delivered",
        format!("{writes_per_100k}"),
        "target 0 apart from rotation",
    );
    statement_rows(&statements, 20_000, row);

    // 3. Latency.
    eprintln!("latency: idle and under load...");
    let idle = paced_signups(&cluster, 1, 10.0, Duration::from_secs(seconds.min(10)));
    let (p50, p99, max) = latencies(&receiver, &idle);
    let loaded = paced_signups(&cluster, 4, 1000.0, Duration::from_secs(5));
    let (lp50, lp99, lmax) = latencies(&receiver, &loaded);
    let achieved = loaded.len() as f64 / 5.0;
    println!("Latency, commit → receipt at the backend (ms)");
    row(
        "idle, one signup every 100 ms: p50 / p99 / max",
        format!("{p50:.1} / {p99:.1} / {max:.1}"),
        "target p50 ≤ 5, p99 ≤ 25",
    );
    row(
        &format!("under load, {achieved:.0} signups/s: p50 / p99 / max"),
        format!("{lp50:.1} / {lp99:.1} / {lmax:.1}"),
        "",
    );

    // 4. A steady trickle: what most apps have, and what a round's fixed cost weighs on.
    let trickle = Duration::from_secs(seconds * 3);
    eprintln!(
        "steady trickle: 100 signups/s from one client for {} s...",
        trickle.as_secs()
    );
    wait_for("the queue to drain", LONG, || {
        (pending(&cluster) == 0).then_some(())
    });
    track_statements(&mut admin, true);
    let cpu_before = common::cpu_time(worker);
    let main_before = common::thread_cpu_time(worker, worker);
    let started = Instant::now();
    let commits = paced_signups(&cluster, 1, 100.0, trickle);
    let (_, tp99, _) = latencies(&receiver, &commits);
    let busy = (common::cpu_time(worker) - cpu_before).as_secs_f64();
    let main_busy = (common::thread_cpu_time(worker, worker) - main_before).as_secs_f64();
    let elapsed = started.elapsed().as_secs_f64();
    let statements = statement_times(&mut admin);
    track_statements(&mut admin, false);
    println!("A steady trickle");
    row(
        &format!(
            "worker CPU at {:.0} signups/s from one client: of a core, per event",
            commits.len() as f64 / trickle.as_secs_f64()
        ),
        format!(
            "{:.1} %, {:.0} µs",
            busy / elapsed * 100.0,
            busy * 1e6 / commits.len() as f64
        ),
        "target ≤ 1 % of a core",
    );
    row(
        "  of which its main thread (SQL, loop) / sending threads (HTTP)",
        format!(
            "{:.0} / {:.0} µs",
            main_busy * 1e6 / commits.len() as f64,
            (busy - main_busy) * 1e6 / commits.len() as f64
        ),
        "per event",
    );
    row(
        "  latency at that rate, commit → receipt: p99",
        format!("{tp99:.1} ms"),
        "",
    );
    statement_rows(&statements, commits.len(), row);

    if quick {
        return;
    }

    // 5. Memory.
    eprintln!("memory: draining 100,000 events...");
    let rss_before = worker_rss_kb(&cluster);
    pause(&cluster);
    let before = delivered(&cluster);
    let mut ids = Vec::new();
    for _ in 0..10 {
        ids.extend(bulk_users(&cluster, 10_000));
    }
    cluster.configure(&[("url", &receiver.url)]);
    wait_for_users(&receiver, &ids);
    wait_for("100,000 recorded as delivered", LONG, || {
        (delivered(&cluster) - before >= 100_000).then_some(())
    });
    let rss_after = worker_rss_kb(&cluster);
    println!("Memory");
    row(
        "worker private RSS before / after draining 100,000 events",
        format!(
            "{:.1} / {:.1} MB",
            rss_before as f64 / 1024.0,
            rss_after as f64 / 1024.0
        ),
        "target growth < 20 MB",
    );

    // 6. Slow backend.
    eprintln!("slow backend: 200 ms per answer...");
    let slow = backend(Duration::from_millis(200));
    println!("Slow backend (answers after 200 ms)");
    for concurrency in [1usize, 8, 32] {
        pause(&cluster);
        let n = concurrency * 25;
        let ids = bulk_users(&cluster, n);
        let started = Instant::now();
        cluster.configure(&[
            ("url", &slow.url),
            ("concurrency", &concurrency.to_string()),
        ]);
        let tps = if concurrency == 32 {
            Some(pgbench(&cluster, Signup::GoTrue, 1, 5))
        } else {
            None
        };
        wait_for_users(&slow, &ids);
        let rate = n as f64 / started.elapsed().as_secs_f64();
        row(
            &format!("concurrency {concurrency}: deliveries/s"),
            format!("{rate:.1}"),
            "scales with concurrency",
        );
        if let Some(tps) = tps {
            row(
                "signup TPS (1 client) while delivering to it, ratio",
                format!("{tps:.0} ({:.2})", tps / base1),
                "must not drop",
            );
        }
    }

    // The slow part's last signups may still be queued: the outages start from an empty queue.
    cluster.configure(&[("url", &receiver.url)]);
    wait_for("the slow part's events to drain", LONG, || {
        (pending(&cluster) == 0).then_some(())
    });
    outages(&cluster, row);

    println!();
    println!("settings: timeout_ms 5s, concurrency {concurrency} (unless stated), retry_base_ms 1s; pgbench {seconds} s per run");
}
