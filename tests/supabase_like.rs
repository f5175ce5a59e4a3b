//! A cluster set up as Supabase's is: logical WAL with a publication FOR ALL TABLES
//! whose slot a CDC client consumes, and the preload list of libraries Supabase
//! loads (those this machine has: pg_stat_statements, auto_explain, pgaudit,
//! pg_cron; plpgsql_check created as an extension). Signups, updates and deletions
//! are delivered, and nothing stalls or complains.

mod common;

use common::*;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

const WITHIN: Duration = Duration::from_secs(30);

/// The server's library directory (`pg_config --pkglibdir`).
fn pkglibdir() -> String {
    let pg_config = std::env::var("PG_CONFIG").unwrap_or_else(|_| "pg_config".into());
    let mut c = Command::new(pg_config);
    c.arg("--pkglibdir");
    run(c, "pg_config --pkglibdir").trim().to_string()
}

fn has_library(name: &str) -> bool {
    Path::new(&pkglibdir()).join(format!("{name}.so")).exists()
}

#[test]
fn a_supabase_like_cluster_with_logical_replication_and_its_libraries_delivers_everything() {
    let mut preload = vec!["pg_new_user_hook"];
    for library in ["pg_stat_statements", "auto_explain", "pgaudit", "pg_cron"] {
        if has_library(library) {
            preload.push(library);
        } else {
            eprintln!("{library} is not installed here: left out of the preload list");
        }
    }
    let preload_line = format!("shared_preload_libraries = '{}'", preload.join(", "));
    let cluster = Cluster::with_hook(&[
        "wal_level = logical",
        "max_replication_slots = 4",
        "max_wal_senders = 4",
        &preload_line,
        "auto_explain.log_min_duration = 0",
        "pgaudit.log = 'write, ddl'",
        "cron.database_name = 'postgres'",
    ]);
    let mut admin = cluster.connect("supabase_admin");
    let loaded: String = admin
        .query_one("SHOW shared_preload_libraries", &[])
        .unwrap()
        .get(0);
    assert_eq!(loaded, preload.join(", "));
    admin
        .batch_execute("CREATE PUBLICATION supabase_realtime FOR ALL TABLES")
        .unwrap();
    for extension in ["pg_stat_statements", "pg_cron", "plpgsql_check"] {
        let available: bool = admin
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = $1)",
                &[&extension],
            )
            .unwrap()
            .get(0);
        if available && (extension != "pg_cron" || preload.contains(&"pg_cron")) {
            admin
                .batch_execute(&format!("CREATE EXTENSION {extension}"))
                .unwrap();
        }
    }
    // A CDC client consuming the changes of every table, the extension's included.
    let recvlogical = cluster.bindir.join("pg_recvlogical");
    let connection = [
        "-h".to_string(),
        "127.0.0.1".to_string(),
        "-p".to_string(),
        cluster.port.to_string(),
        "-U".to_string(),
        "supabase_admin".to_string(),
        "-d".to_string(),
        "postgres".to_string(),
        "--slot".to_string(),
        "cdc".to_string(),
    ];
    let mut create = Command::new(&recvlogical);
    create
        .args(&connection)
        .args(["--create-slot", "-P", "test_decoding"]);
    run(create, "pg_recvlogical --create-slot");
    let _consumer = KillOnDrop(
        Command::new(&recvlogical)
            .args(&connection)
            .args(["--start", "-f", "/dev/null", "-s", "1"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );

    let receiver = Receiver::ok();
    cluster.configure(&[
        ("url", &receiver.url),
        ("events", "created,updated,deleted"),
    ]);
    let ids: Vec<String> = (0..10)
        .map(|i| cluster.signup(&format!("supabase-like-{i}@example.com")))
        .collect();
    cluster.change_email(&ids[0], "changed@example.com");
    cluster.delete_user(&ids[1]);
    let bulk = cluster.bulk_signups("supabase-like-bulk", 200, 50);
    wait_for("every event delivered", WITHIN, || {
        let (pending, delivered): (i64, i64) = {
            let row = cluster.one_row("SELECT pending, delivered FROM new_user_hook.status");
            (row.get(0), row.get(1))
        };
        (pending == 0 && delivered == (ids.len() + bulk.len() + 2) as i64).then_some(())
    });
    let problem: Option<String> = cluster
        .one_row("SELECT problem FROM new_user_hook.status")
        .get(0);
    assert_eq!(problem, None);
    // The consumer keeps up: its slot confirms the WAL of the deliveries.
    wait_for("the CDC slot to confirm recent WAL", WITHIN, || {
        let behind: i64 = cluster
            .one_row(
                "SELECT (pg_current_wal_lsn() - confirmed_flush_lsn)::int8 FROM pg_replication_slots WHERE slot_name = 'cdc'",
            )
            .get(0);
        (behind < 1024 * 1024).then_some(())
    });
    let log = cluster.log();
    assert!(!log.contains("does not have a replica identity"), "{log}");
    assert!(
        !log.contains("pg_new_user_hook: a delivery round failed"),
        "{log}"
    );
}
