//! Failover and restore, end to end: a streaming-replication standby promoted after
//! the primary is killed, and `pg_dump -Fc` / `pg_dumpall` restored into a fresh
//! preloaded cluster. What was queued is delivered with its original webhook-id;
//! what was delivered is not sent again.

mod common;

use common::{run, wait_for, Cluster, Receiver, CLUSTER_CONF};
use std::collections::{HashMap, HashSet};
use std::process::Command;
use std::time::{Duration, Instant};

const WITHIN: Duration = Duration::from_secs(60);

/// (event id, user id) of the events in `status`.
fn events(cluster: &Cluster, status: &str) -> HashSet<(String, String)> {
    cluster
        .connect("supabase_admin")
        .query(
            "SELECT id::text, user_id::text FROM new_user_hook.deliveries WHERE status = $1",
            &[&status],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// (webhook-id, user id) of every request received, duplicates included.
fn received(receiver: &Receiver) -> Vec<(String, String)> {
    receiver
        .requests()
        .iter()
        .map(|r| {
            (
                r.header("webhook-id").unwrap().to_string(),
                r.json()["id"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn problem(cluster: &Cluster) -> Option<String> {
    cluster
        .one_row("SELECT problem FROM new_user_hook.status")
        .get(0)
}

#[test]
fn a_standby_promoted_after_the_primary_is_killed_delivers_everything_queued_there() {
    const USERS: usize = 500;
    let receiver = Receiver::ok();
    // The primary has no URL: its events wait. The standby's own configuration
    // points at the backend, as a failover target's would.
    let mut primary = Cluster::with_hook(&[]);
    let standby = primary.standby(&[&format!("pg_new_user_hook.url = '{}'", receiver.url)]);
    wait_for("the standby to say the primary delivers", WITHIN, || {
        problem(&standby).filter(|p| p.contains("standby"))
    });
    assert_eq!(standby.worker_pid(), None, "no worker on a standby");

    primary.bulk_signups("failover", USERS, 50);
    let queued = events(&primary, "pending");
    assert_eq!(queued.len(), USERS);
    wait_for("the standby to replay every event", WITHIN, || {
        (events(&standby, "pending").len() == USERS).then_some(())
    });
    primary.kill9();
    let promoted = Instant::now();
    standby.promote();
    wait_for("a first delivery", WITHIN, || {
        (receiver.count() > 0).then_some(())
    });
    let first = promoted.elapsed();
    receiver.wait_for_requests(USERS, WITHIN);
    let all = promoted.elapsed();
    eprintln!("failover: first delivery {first:?} after promote, all {USERS} after {all:?}");

    let got = received(&receiver);
    let unique: HashSet<(String, String)> = got.iter().cloned().collect();
    assert_eq!(
        unique, queued,
        "every event, with the id it had on the primary"
    );
    assert_eq!(got.len(), USERS, "no duplicates");
    standby.wait_for_event(&got[0].1, "status = 'delivered'", WITHIN);
}

enum Dump {
    /// `pg_dumpall --roles-only`, then `pg_dump -Fc` and `pg_restore`.
    Custom,
    /// `pg_dumpall` into `psql`.
    All,
}

fn restore_into_a_fresh_cluster(dump: Dump) {
    let receiver = Receiver::ok();
    let source = Cluster::hooked_to(&receiver.url, &[]);
    source.bulk_signups("delivered", 20, 20);
    receiver.wait_for_requests(20, WITHIN);
    wait_for("the deliveries to be recorded", WITHIN, || {
        (events(&source, "delivered").len() == 20).then_some(())
    });
    source.configure(&[("url", "")]);
    wait_for("delivery to pause", WITHIN, || {
        problem(&source).filter(|p| p.contains("is not set"))
    });
    source.bulk_signups("pending", 30, 30);
    let pending = events(&source, "pending");
    assert_eq!(pending.len(), 30);

    let mut target = Cluster::init_empty(&source.bindir, CLUSTER_CONF);
    target.start();
    let tool = |name: &str| {
        let mut c = Command::new(source.bindir.join(name));
        c.args(["-h", "127.0.0.1", "-U", "supabase_admin"]);
        c
    };
    let file = source.root.join("dump");
    let restore_sql = |sql_file: &std::path::Path| {
        // Errors for objects initdb already made (the bootstrap role) are expected.
        let mut psql = tool("psql");
        psql.args(["-p", &target.port.to_string(), "-d", "postgres", "-q", "-f"])
            .arg(sql_file);
        run(psql, "psql -f");
    };
    match dump {
        Dump::Custom => {
            let roles = source.root.join("roles.sql");
            let mut c = tool("pg_dumpall");
            c.args(["-p", &source.port.to_string(), "--roles-only", "-f"])
                .arg(&roles);
            run(c, "pg_dumpall --roles-only");
            restore_sql(&roles);
            let mut c = tool("pg_dump");
            c.args([
                "-p",
                &source.port.to_string(),
                "-d",
                "postgres",
                "-Fc",
                "-f",
            ])
            .arg(&file);
            run(c, "pg_dump -Fc");
            let out = tool("pg_restore")
                .args(["-p", &target.port.to_string(), "-d", "postgres"])
                .arg(&file)
                .output()
                .unwrap();
            let errors = String::from_utf8_lossy(&out.stderr);
            // Schema public exists in every new database.
            for line in errors.lines().filter(|l| l.contains("ERROR")) {
                assert!(line.contains("already exists"), "pg_restore: {errors}");
            }
        }
        Dump::All => {
            let mut c = tool("pg_dumpall");
            c.args(["-p", &source.port.to_string(), "-f"]).arg(&file);
            run(c, "pg_dumpall");
            restore_sql(&file);
        }
    }
    drop(source);
    // The restored database has the trigger, the queue and the extension's state.
    // The events not delivered yet are dumped (with the outbox: retries, dead
    // letters); the ones delivered from the log are not, and none is sent again.
    assert_eq!(events(&target, "pending"), pending);
    target.configure(&[("url", &receiver.url)]);
    receiver.wait_for_requests(50, WITHIN);
    let after = target.signup("after-restore@example.com");
    receiver.wait_for_requests(51, WITHIN);

    let got = received(&receiver);
    let mut by_user: HashMap<String, Vec<String>> = HashMap::new();
    for (event, user) in &got {
        by_user.entry(user.clone()).or_default().push(event.clone());
    }
    assert_eq!(by_user.len(), 51, "every user once: {by_user:?}");
    assert!(by_user.values().all(|ids| ids.len() == 1), "nothing resent");
    let resent: HashSet<(String, String)> = got[20..50].iter().cloned().collect();
    assert_eq!(resent, pending, "pending events keep their webhook-ids");
    assert!(by_user.contains_key(&after));
}

#[test]
fn pg_dump_custom_format_restores_the_hook_and_the_queue() {
    restore_into_a_fresh_cluster(Dump::Custom);
}

#[test]
fn pg_dumpall_restores_the_hook_and_the_queue() {
    restore_into_a_fresh_cluster(Dump::All);
}
