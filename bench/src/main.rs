//! pg_new_user_hook benchmark. Starts its own PostgreSQL 15 cluster (fsync on) with
//! the extension preloaded and the real Supabase Auth schema, and a receiver in this
//! process (the test suite's, answering 204 at once), then prints:
//! signup overhead (pgbench), drain rate, commit → receipt latency, worker memory,
//! and throughput against a slow backend.

#[path = "../../tests/common/mod.rs"]
#[allow(dead_code)]
mod common;

use common::{wait_for, Cluster, Receiver, Reply};
use std::collections::HashMap;
use std::process::Command;
use std::time::{Duration, Instant};

const LONG: Duration = Duration::from_secs(600);

/// A backend answering 204 after `delay` (a slow backend when not zero).
fn backend(delay: Duration) -> Receiver {
    Receiver::start(move |_, _| {
        std::thread::sleep(delay);
        Reply::Status(204)
    })
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
        ("raw_app_meta_data", r#"'{"provider":"email","providers":["email"]}'"#),
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

/// pgbench TPS of GoTrue's signup transaction, as supabase_auth_admin.
fn pgbench(cluster: &Cluster, clients: u32, seconds: u64) -> f64 {
    let script = cluster.root.join("signup.pgbench");
    std::fs::write(&script, signup_script()).unwrap();
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
        .one_row("SELECT count(*) FROM new_user_hook.outbox WHERE status = 'delivered'")
        .get(0)
}

fn failed(cluster: &Cluster) -> i64 {
    cluster
        .one_row("SELECT count(*) FROM new_user_hook.outbox WHERE status = 'failed'")
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
                    tx.execute("UPDATE users SET role = 'authenticated' WHERE id = $1::text::uuid", &[&id]).unwrap();
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

    eprintln!("starting a cluster (fsync on) with the Supabase Auth schema...");
    let cluster = Cluster::new(&[
        "fsync = on",
        "shared_buffers = '256MB'",
        "max_connections = 200",
    ]);
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

    // 1. Signup overhead: the three set-ups alternate, three rounds, median of each,
    // so drift (table growth, checkpoints) does not favour one of them.
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
    let rounds = if std::env::var_os("BENCH_SKIP_OVERHEAD").is_some() {
        0
    } else {
        3
    };
    let setups = [
        ("none", "SELECT new_user_hook.uninstall(); DROP TRIGGER IF EXISTS bare ON auth.users;"),
        ("bare", "SELECT new_user_hook.uninstall(); CREATE TRIGGER bare AFTER INSERT ON auth.users FOR EACH ROW EXECUTE FUNCTION public.bare_capture();"),
        ("hook", "DROP TRIGGER IF EXISTS bare ON auth.users; SELECT new_user_hook.install();"),
    ];
    let mut tps: HashMap<(&str, u32), Vec<f64>> = HashMap::new();
    for round in 0..rounds {
        // Each round starts with a different set-up, so none always runs first.
        for i in 0..setups.len() {
            let (name, sql) = setups[(round + i) % setups.len()];
            admin.batch_execute(sql).unwrap();
            for clients in [1, 8] {
                admin.batch_execute("CHECKPOINT").unwrap();
                tps.entry((name, clients))
                    .or_default()
                    .push(pgbench(&cluster, clients, seconds));
            }
        }
    }
    // The remaining measurements run with the hook installed.
    admin
        .batch_execute("DROP TRIGGER IF EXISTS bare ON auth.users; SELECT new_user_hook.install()")
        .unwrap();
    let median = |name: &str, clients: u32| {
        let Some(v) = tps.get(&(name, clients)) else {
            return f64::NAN;
        };
        let mut v = v.clone();
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v[v.len() / 2]
    };
    let (base1, base8) = (median("none", 1), median("none", 8));
    let (bare1, bare8) = (median("bare", 1), median("bare", 8));
    let (hook1, hook8) = (median("hook", 1), median("hook", 8));
    wait_for("the pgbench signups delivered", LONG, || {
        let pending: i64 = cluster
            .one_row("SELECT pending FROM new_user_hook.status")
            .get(0);
        (pending == 0).then_some(())
    });
    println!("Signup overhead (GoTrue signup transaction, pgbench TPS, median of 3; ratio to no trigger)");
    row(
        "no trigger, 1 client / 8 clients",
        format!("{base1:.0} / {base8:.0}"),
        "",
    );
    row(
        "bare one-row trigger (floor), 1 / 8",
        format!("{:.2} / {:.2}", bare1 / base1, bare8 / base8),
        "",
    );
    row(
        "pg_new_user_hook, delivering concurrently, 1 / 8",
        format!("{:.2} / {:.2}", hook1 / base1, hook8 / base8),
        "target ≥ 0.90 (1 client)",
    );

    // 2. Drain rate.
    eprintln!("drain rate: 20,000 users committed at once...");
    pause(&cluster);
    let before = delivered(&cluster);
    let ids = bulk_users(&cluster, 20_000);
    let started = Instant::now();
    cluster.configure(&[("url", &receiver.url)]);
    wait_for_users(&receiver, &ids);
    let drain = started.elapsed();
    wait_for("20,000 recorded as delivered", LONG, || {
        (delivered(&cluster) - before >= 20_000).then_some(())
    });
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

    // 4. Memory.
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

    // 5. Slow backend.
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
            Some(pgbench(&cluster, 1, 5))
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

    println!();
    println!("settings: timeout_ms 5s, concurrency {concurrency} (unless stated), retry_base_ms 1s; pgbench {seconds} s per run");
}
