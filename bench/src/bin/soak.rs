//! pg_new_user_hook soak: an hour of mixed load on one cluster (fsync on, the real
//! Supabase Auth schema), printing each minute what the worker costs and what the
//! queue holds, so that a slow leak or a growing table shows as a slope.
//!
//! The load: steady signups, email changes and deletions of those users
//! (`events = created,updated,deleted`), a burst of 5,000 users committed at once
//! three times, a backend answering 503 for a twelfth of the run, the worker killed
//! (SIGKILL) and the server restarted (fast shutdown). Retention is a sixth of the run,
//! so delivered events are purged several times before it ends.
//!
//! Each minute: the worker's CPU (all its threads) and private memory, the
//! extension's tables and indexes, their dead tuples, the cluster's WAL (signups
//! included) per event delivered in that minute, and the events pending. The worker's
//! SIGKILL is a crash to PostgreSQL: every backend restarts and the cumulative
//! statistics (dead tuples) start over. A CSV of the same goes to
//! SOAK_CSV (default target/soak.csv); bench/soak-plot.py draws it.
//!
//! SOAK_MINUTES (default 60) scales everything; SOAK_RATE (default 40) is the
//! signups per second.

#[path = "../../../tests/common/mod.rs"]
#[allow(dead_code)]
mod common;

use common::{wait_for, Cluster, Receiver};
use std::collections::HashSet;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Runs `work` on a connection as `user`, connecting again after an error (the
/// server restarting): the load keeps going through the faults it is meant to meet.
struct Session {
    port: u16,
    user: &'static str,
    client: Option<postgres::Client>,
}

impl Session {
    fn new(cluster: &Cluster, user: &'static str) -> Session {
        Session {
            port: cluster.port,
            user,
            client: None,
        }
    }

    fn run<T>(
        &mut self,
        work: impl Fn(&mut postgres::Client) -> Result<T, postgres::Error>,
    ) -> Option<T> {
        if self.client.as_ref().is_none_or(|c| c.is_closed()) {
            self.client = postgres::Config::new()
                .host("127.0.0.1")
                .port(self.port)
                .user(self.user)
                .dbname("postgres")
                .connect(postgres::NoTls)
                .ok();
            if self.client.is_none() {
                // The server is restarting: callers retry.
                std::thread::sleep(Duration::from_millis(200));
                return None;
            }
        }
        let result = work(self.client.as_mut()?);
        match result {
            Ok(value) => Some(value),
            Err(_) => {
                self.client = None;
                std::thread::sleep(Duration::from_millis(200));
                None
            }
        }
    }
}

struct Sample {
    pending: i64,
    delivered: i64,
    table_bytes: i64,
    dead: i64,
    wal: i64,
}

fn sample(admin: &mut Session) -> Option<Sample> {
    admin.run(|c| {
        let row = c.query_one(
            "SELECT (SELECT pending FROM new_user_hook.status),
                    (SELECT delivered_total FROM new_user_hook.metrics),
                    (SELECT coalesce(sum(pg_total_relation_size(relid)), 0)::int8
                       FROM pg_stat_user_tables WHERE schemaname = 'new_user_hook'),
                    (SELECT coalesce(sum(n_dead_tup), 0)::int8
                       FROM pg_stat_user_tables WHERE schemaname = 'new_user_hook'),
                    (pg_current_wal_insert_lsn() - '0/0')::int8",
            &[],
        )?;
        Ok(Sample {
            pending: row.get(0),
            delivered: row.get(1),
            table_bytes: row.get(2),
            dead: row.get(3),
            wal: row.get(4),
        })
    })
}

fn worker_pid(admin: &mut Session) -> Option<i32> {
    admin
        .run(|c| {
            c.query_opt(
                "SELECT pid FROM pg_stat_activity WHERE backend_type = 'pg_new_user_hook'",
                &[],
            )
        })
        .flatten()
        .map(|r| r.get(0))
}

fn rss_anon_kb(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("RssAnon:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn main() {
    let minutes = env_or("SOAK_MINUTES", 60).max(6);
    let rate = env_or("SOAK_RATE", 40).max(1);
    let minute = Duration::from_secs(env_or("SOAK_MINUTE_SECONDS", 60));
    let at = |fraction: f64| minute.mul_f64(minutes as f64 * fraction);
    let csv_path = std::env::var("SOAK_CSV").unwrap_or_else(|_| "target/soak.csv".into());

    eprintln!("starting a cluster (fsync on) with the Supabase Auth schema...");
    let mut cluster = Cluster::new(&[
        "fsync = on",
        "shared_buffers = '256MB'",
        "shared_preload_libraries = 'pg_new_user_hook'",
    ]);
    let (receiver, status) = Receiver::switchable();
    cluster
        .connect("supabase_admin")
        .batch_execute("CREATE EXTENSION pg_new_user_hook; SELECT new_user_hook.install();")
        .unwrap();
    let retention_s = (at(1.0 / 6.0).as_secs()).max(60);
    cluster.configure(&[
        ("url", &receiver.url),
        ("events", "created,updated,deleted"),
        ("retention", &format!("{retention_s}s")),
    ]);
    let version: String = cluster.one_row("SHOW server_version").get(0);
    println!(
        "pg_new_user_hook soak — PostgreSQL {version}, {minutes} minutes of {} s, {rate} signups/s, \
         email changes and deletions, retention {retention_s} s",
        minute.as_secs()
    );
    println!(
        "faults: bursts of 5,000 at {:.0}/{:.0}/{:.0} min, 503 from {:.0} to {:.0} min, worker SIGKILL at {:.0} min \
         (a crash: every backend restarts, statistics start over), server restart at {:.0} min",
        minutes as f64 / 6.0,
        minutes as f64 / 2.0,
        minutes as f64 * 5.0 / 6.0,
        minutes as f64 / 3.0,
        minutes as f64 * 5.0 / 12.0,
        minutes as f64 * 7.0 / 12.0,
        minutes as f64 * 3.0 / 4.0
    );

    let started = Instant::now();
    let end = minute * minutes as u32;
    let stop = Arc::new(AtomicBool::new(false));
    let signed_up: Arc<Mutex<Vec<String>>> = Arc::new(Mutex::new(Vec::new()));

    // Steady signups, one client, paced.
    let signups = {
        let (stop, signed_up) = (Arc::clone(&stop), Arc::clone(&signed_up));
        let mut session = Session::new(&cluster, "supabase_auth_admin");
        let insert = common::insert_users(&[
            ("email", "gen_random_uuid() || '@soak.example.com'"),
            ("raw_app_meta_data", r#"'{"provider":"email"}'"#),
            ("raw_user_meta_data", "'{}'"),
        ]) + " RETURNING id::text";
        std::thread::spawn(move || {
            let interval = Duration::from_secs_f64(1.0 / rate as f64);
            let mut next = Instant::now();
            while !stop.load(Ordering::SeqCst) {
                if let Some(id) =
                    session.run(|c| c.query_one(&insert, &[]).map(|r| r.get::<_, String>(0)))
                {
                    signed_up.lock().unwrap().push(id);
                }
                next += interval;
                match next.checked_duration_since(Instant::now()) {
                    Some(wait) => std::thread::sleep(wait),
                    None => next = Instant::now(),
                }
            }
        })
    };
    // Email changes (a quarter of the signup rate) and deletions (a twentieth) of
    // users signed up earlier.
    let changes = {
        let (stop, signed_up) = (Arc::clone(&stop), Arc::clone(&signed_up));
        let mut session = Session::new(&cluster, "supabase_auth_admin");
        std::thread::spawn(move || {
            let interval = Duration::from_secs_f64(4.0 / rate as f64);
            let mut n: u64 = 0;
            while !stop.load(Ordering::SeqCst) {
                std::thread::sleep(interval);
                n += 1;
                let id = {
                    let ids = signed_up.lock().unwrap();
                    if ids.len() < 100 {
                        continue;
                    }
                    // A pseudo-random earlier user (xorshift of the counter).
                    let mut x = n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
                    x ^= x >> 29;
                    ids[(x as usize) % ids.len()].clone()
                };
                let sql = if n % 5 == 0 {
                    format!("DELETE FROM users WHERE id = '{id}'")
                } else {
                    format!("UPDATE users SET email = gen_random_uuid() || '@changed.example.com', updated_at = now() WHERE id = '{id}'")
                };
                session.run(|c| c.batch_execute(&sql));
            }
        })
    };

    let mut admin = Session::new(&cluster, "supabase_admin");
    if let Some(dir) = std::path::Path::new(&csv_path).parent() {
        std::fs::create_dir_all(dir).unwrap();
    }
    let mut csv = std::fs::File::create(&csv_path).unwrap();
    writeln!(csv, "minute,worker_cpu_percent,worker_rss_mb,table_mb,dead_tuples,wal_bytes_per_event,delivered,pending").unwrap();
    println!();
    println!(
        "{:>6} {:>9} {:>9} {:>10} {:>8} {:>11} {:>10} {:>9}  event",
        "minute", "worker %", "RSS MB", "tables MB", "dead", "WAL B/evt¹", "delivered", "pending"
    );
    let mut previous = sample(&mut admin).unwrap();
    let mut pid = worker_pid(&mut admin);
    let mut cpu_before = pid.map(common::cpu_time).unwrap_or_default();
    let mut done = [false; 7];
    for m in 1..=minutes {
        let minute_end = minute * m as u32;
        let mut what = Vec::new();
        while started.elapsed() < minute_end {
            let now = started.elapsed();
            // (fraction of the run, what happens then)
            let faults: [(f64, &str); 7] = [
                (1.0 / 6.0, "burst"),
                (1.0 / 3.0, "outage starts"),
                (5.0 / 12.0, "outage ends"),
                (0.5, "burst"),
                (7.0 / 12.0, "worker killed"),
                (0.75, "server restarted"),
                (5.0 / 6.0, "burst"),
            ];
            for (i, (fraction, name)) in faults.iter().enumerate() {
                if done[i] || now < at(*fraction) {
                    continue;
                }
                done[i] = true;
                what.push(*name);
                match *name {
                    "burst" => {
                        let sql = common::insert_users(&[
                            ("email", "gen_random_uuid() || '@burst.example.com'"),
                            ("raw_app_meta_data", r#"'{"provider":"email"}'"#),
                            ("raw_user_meta_data", "'{}'"),
                        ]) + " FROM generate_series(1, 5000) RETURNING id::text";
                        let mut session = Session::new(&cluster, "supabase_auth_admin");
                        if let Some(ids) = session.run(|c| c.query(&sql, &[])) {
                            let mut all = signed_up.lock().unwrap();
                            all.extend(ids.iter().map(|r| r.get::<_, String>(0)));
                        }
                    }
                    "outage starts" => status.store(503, Ordering::SeqCst),
                    "outage ends" => status.store(204, Ordering::SeqCst),
                    "worker killed" => {
                        if let Some(p) = worker_pid(&mut admin) {
                            let _ = std::process::Command::new("kill")
                                .args(["-9", &p.to_string()])
                                .status();
                        }
                    }
                    "server restarted" => cluster.restart(),
                    _ => unreachable!(),
                }
            }
            std::thread::sleep(
                Duration::from_millis(200).min(minute_end.saturating_sub(started.elapsed())),
            );
        }
        // Through a restart the connection is lost: retried until the server is back.
        let Some(now) = (0..100).find_map(|_| sample(&mut admin)) else {
            continue;
        };
        // The worker's CPU over the minute; a new worker (killed, restarted) starts a new count.
        let current = worker_pid(&mut admin);
        let cpu = match (pid, current) {
            (Some(a), Some(b)) if a == b => (common::cpu_time(b) - cpu_before).as_secs_f64(),
            _ => f64::NAN,
        };
        if current != pid {
            pid = current;
        }
        cpu_before = pid.map(common::cpu_time).unwrap_or_default();
        let delivered = now.delivered - previous.delivered;
        let wal_per_event = if delivered > 0 {
            (now.wal - previous.wal) as f64 / delivered as f64
        } else {
            f64::NAN
        };
        let rss = pid.map_or(f64::NAN, |p| rss_anon_kb(p) as f64 / 1024.0);
        let cpu_percent = cpu / minute.as_secs_f64() * 100.0;
        println!(
            "{m:>6} {cpu_percent:>9.1} {rss:>9.1} {:>10.1} {:>8} {wal_per_event:>11.0} {delivered:>10} {:>9}  {}",
            now.table_bytes as f64 / 1048576.0,
            now.dead,
            now.pending,
            what.join(", ")
        );
        writeln!(
            csv,
            "{m},{cpu_percent:.2},{rss:.2},{:.2},{},{wal_per_event:.1},{delivered},{}",
            now.table_bytes as f64 / 1048576.0,
            now.dead,
            now.pending
        )
        .unwrap();
        previous = now;
    }
    stop.store(true, Ordering::SeqCst);
    signups.join().unwrap();
    changes.join().unwrap();
    let _ = end;

    // Nothing lost: every user signed up reached the backend.
    eprintln!("draining...");
    wait_for("the queue to drain", Duration::from_secs(600), || {
        sample(&mut admin).filter(|s| s.pending == 0).map(|_| ())
    });
    // Answered 2xx to a POST: delivered (a 503 during the outage is not).
    let received: HashSet<String> = receiver
        .requests()
        .iter()
        .filter(|r| r.method == "POST" && r.answered.is_some_and(|code| (200..300).contains(&code)))
        .filter_map(|r| {
            serde_json::from_str::<serde_json::Value>(&r.body)
                .ok()
                .and_then(|v| v["id"].as_str().map(str::to_string))
        })
        .collect();
    let failed: i64 = admin
        .run(|c| c.query_one("SELECT failed FROM new_user_hook.status", &[]))
        .map_or(-1, |r| r.get(0));
    let signed_up = signed_up.lock().unwrap();
    let lost = signed_up
        .iter()
        .filter(|id| !received.contains(*id))
        .count();
    println!();
    println!("¹ all of the cluster's WAL (signups, changes, checkpoints) per event delivered that minute");
    println!(
        "{} users signed up, {} requests received, {lost} users never announced, {failed} events given up on; CSV: {csv_path}",
        signed_up.len(),
        receiver.count()
    );
    if lost > 0 || failed != 0 {
        std::process::exit(1);
    }
}
