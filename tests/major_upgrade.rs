//! Moving a database from PostgreSQL 15 to 17, the two ways Supabase does it:
//! pg_upgrade (utils/upgrade-pg17.sh) and a pg_dumpall restored into a new cluster.
//! The PostgreSQL 15 cluster has the extension, the hook on auth.users, delivered
//! events and pending ones; on 17 the hook is still attached, the pending events are
//! delivered once each under their original webhook-ids, and the delivered ones are
//! not sent again. Runs in the PostgreSQL 17 suite, with PostgreSQL 15 and the
//! extension's PostgreSQL 15 tarball installed beside it (tests/pg17-root.sh).
#![cfg(feature = "pg17")]

mod common;

use common::{as_pg_user, bindir, run, wait_for, Cluster, Receiver, Reply};
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

const WITHIN: Duration = Duration::from_secs(30);

fn old_bindir() -> PathBuf {
    let dir = PathBuf::from(
        std::env::var("OLD_PG_BINDIR").unwrap_or_else(|_| "/usr/lib/postgresql/15/bin".into()),
    );
    assert!(
        dir.join("postgres").exists(),
        "PostgreSQL 15 is not at {} (tests/pg17-root.sh installs it; or set OLD_PG_BINDIR)",
        dir.display()
    );
    dir
}

/// What the PostgreSQL 15 cluster holds when it is moved.
struct Before {
    delivered: BTreeSet<String>,
    pending: BTreeSet<String>,
}

/// A PostgreSQL 15 cluster with the hook: three users delivered, then three whose
/// delivery is refused (503) and still pending. `failing` stays the URL afterwards,
/// so a worker running during the move would be seen knocking there.
fn prepare_pg15(failing: &Receiver) -> (Cluster, Before) {
    let old = Cluster::new_on(&old_bindir(), &["pg_new_user_hook.retry_base_ms = 100"]);
    let version: String = old.one_row("SHOW server_version_num").get(0);
    assert!(version.starts_with("15"), "old cluster runs {version}");
    let mut admin = old.connect("supabase_admin");
    admin
        .batch_execute("CREATE EXTENSION pg_new_user_hook; SELECT new_user_hook.install();")
        .unwrap();
    let ok = Receiver::ok();
    old.configure(&[("url", &ok.url)]);
    let delivered: BTreeSet<String> = (0..3)
        .map(|i| old.signup(&format!("delivered-on-15-{i}@example.com")))
        .collect();
    for user in &delivered {
        old.wait_for_event(user, "status = 'delivered'", WITHIN);
    }
    old.configure(&[("url", &failing.url)]);
    let pending: BTreeSet<String> = (0..3)
        .map(|i| old.signup(&format!("pending-on-15-{i}@example.com")))
        .collect();
    for user in &pending {
        old.wait_for_event(user, "status = 'pending' AND attempts > 0", WITHIN);
    }
    (old, Before { delivered, pending })
}

/// The PostgreSQL 17 side after the move: the hook is attached, the events came
/// along, and once a URL is set exactly the pending ones are delivered, under
/// their original ids; a new signup is delivered too.
fn check_pg17(new: &Cluster, before: &Before) {
    let version: String = new.one_row("SHOW server_version_num").get(0);
    assert!(version.starts_with("17"), "new cluster runs {version}");
    let mut admin = new.connect("supabase_admin");
    let trigger: i64 = admin
        .query_one(
            "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'auth.users'::regclass AND tgname = 'new_user_hook'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(trigger, 1, "the hook is attached to auth.users on 17");
    let by_status = |status: &str| -> BTreeSet<String> {
        new.connect("supabase_admin")
            .query(
                "SELECT user_id::text FROM new_user_hook.deliveries WHERE status = $1",
                &[&status],
            )
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect()
    };
    assert_eq!(by_status("delivered"), before.delivered);
    assert_eq!(by_status("pending"), before.pending);
    let pending_ids: BTreeSet<String> = admin
        .query(
            "SELECT id::text FROM new_user_hook.deliveries WHERE status = 'pending'",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();

    let receiver = Receiver::ok();
    new.configure(&[("url", &receiver.url)]);
    let requests = receiver.wait_for_requests(pending_ids.len(), WITHIN);
    let sent: BTreeSet<String> = requests
        .iter()
        .map(|r| r.header("webhook-id").unwrap().to_string())
        .collect();
    assert_eq!(
        sent, pending_ids,
        "the pending events, under their original ids"
    );
    wait_for("every event to be delivered on 17", WITHIN, || {
        let row = new.one_row("SELECT pending, in_flight FROM new_user_hook.status");
        (row.get::<_, i64>(0) == 0 && row.get::<_, Option<i32>>(1) == Some(0)).then_some(())
    });
    assert_eq!(
        receiver.count(),
        pending_ids.len(),
        "each pending event once, nothing delivered before"
    );

    let user = new.signup("new-on-17@example.com");
    new.wait_for_event(&user, "status = 'delivered'", WITHIN);
    assert_eq!(receiver.count(), pending_ids.len() + 1);
}

#[test]
fn pg_upgrade_from_15_keeps_the_hook_and_delivers_pending_events_once() {
    let failing = Receiver::start(|_, _| Reply::Status(503));
    let (mut old, before) = prepare_pg15(&failing);
    old.shut_down();
    let knocks_before = failing.count();

    let mut new = Cluster::init_empty(&bindir(), common::CLUSTER_CONF);
    let work = common::scratch_dir("pg_upgrade");
    let mut upgrade = as_pg_user(&bindir().join("pg_upgrade"));
    upgrade
        .current_dir(&work)
        .arg("--old-bindir")
        .arg(old_bindir())
        .arg("--new-bindir")
        .arg(bindir())
        .arg("--old-datadir")
        .arg(old.root.join("data"))
        .arg("--new-datadir")
        .arg(new.root.join("data"))
        .arg("--socketdir")
        .arg(&work)
        .args(["--username", "supabase_admin"])
        .args(["--old-port", &common::free_port().to_string()])
        .args(["--new-port", &common::free_port().to_string()]);
    run(upgrade, "pg_upgrade");
    // pg_upgrade ran both servers with the library preloaded: no worker may have
    // run there (the old one would have retried its pending events within 100 ms).
    assert_eq!(
        failing.count(),
        knocks_before,
        "a delivery worker ran during pg_upgrade"
    );
    drop(old);

    new.start();
    // pg_upgrade does not carry postgresql.auto.conf: delivery waits for a URL.
    check_pg17(&new, &before);
    assert_eq!(failing.count(), knocks_before);
}

#[test]
fn pg_dumpall_of_15_restores_into_17_and_delivers_pending_events_once() {
    let failing = Receiver::start(|_, _| Reply::Status(503));
    let (mut old, before) = prepare_pg15(&failing);
    // A newer major's pg_dumpall reads the older server, as PostgreSQL advises.
    let dump = common::scratch_dir("dumpall").join("all.sql");
    let mut dumpall = Command::new(bindir().join("pg_dumpall"));
    dumpall
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &old.port.to_string(),
            "-U",
            "supabase_admin",
        ])
        .arg("-f")
        .arg(&dump);
    run(dumpall, "pg_dumpall");
    old.shut_down();
    drop(old);
    let knocks_before = failing.count();

    let mut new = Cluster::init_empty(&bindir(), common::CLUSTER_CONF);
    new.start();
    let mut restore = Command::new(bindir().join("psql"));
    restore
        .args(["-X", "-q", "-h", "127.0.0.1", "-p", &new.port.to_string()])
        .args(["-U", "supabase_admin", "-d", "postgres", "-f"])
        .arg(&dump);
    let out = restore.output().unwrap();
    assert!(
        out.status.success(),
        "restore: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The only error a restore into a fresh cluster may show: its own bootstrap role.
    let errors: Vec<&str> = std::str::from_utf8(&out.stderr)
        .unwrap()
        .lines()
        .filter(|l| l.contains("ERROR"))
        .filter(|l| !l.contains("role \"supabase_admin\" already exists"))
        .collect();
    assert!(errors.is_empty(), "restore errors: {errors:#?}");

    check_pg17(&new, &before);
    assert_eq!(failing.count(), knocks_before);
}
