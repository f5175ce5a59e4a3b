//! Upgrades: an installed 0.1.0 (the first release, its install script kept in
//! sql/releases/) is updated in place with ALTER EXTENSION ... UPDATE while events
//! are queued; nothing is lost, and the result matches a fresh install.

mod common;

use common::{Cluster, Receiver};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const WITHIN: Duration = Duration::from_secs(30);

/// Puts an old release's install script next to the installed extension.
fn install_release_script(version: &str) {
    let name = format!("pg_new_user_hook--{version}.sql");
    let source = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("sql/releases")
        .join(&name);
    let out = Command::new("pg_config")
        .arg("--sharedir")
        .output()
        .unwrap();
    let target = Path::new(String::from_utf8(out.stdout).unwrap().trim())
        .join("extension")
        .join(&name);
    if std::fs::copy(&source, &target).is_err() {
        // Not root: the extension directory belongs to root.
        let ok = Command::new("sudo")
            .arg("cp")
            .arg(&source)
            .arg(&target)
            .status()
            .unwrap()
            .success();
        assert!(
            ok,
            "could not copy {} to {}",
            source.display(),
            target.display()
        );
    }
}

/// Every definition in schema new_user_hook, as text: tables' columns, indexes,
/// views, functions and privileges.
const SCHEMA_FINGERPRINT: &str = "
    SELECT string_agg(def, E'\\n' ORDER BY def) FROM (
        SELECT pg_get_functiondef(p.oid) || coalesce(p.proacl::text, '') AS def
          FROM pg_proc p WHERE p.pronamespace = 'new_user_hook'::regnamespace
        UNION ALL
        SELECT pg_get_indexdef(i.indexrelid)
          FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
         WHERE c.relnamespace = 'new_user_hook'::regnamespace
        UNION ALL
        SELECT c.relname || ' ' || c.relkind::text || ' ' || coalesce(pg_get_viewdef(c.oid), '') || coalesce(c.relacl::text, '')
          FROM pg_class c WHERE c.relnamespace = 'new_user_hook'::regnamespace AND c.relkind IN ('r', 'v')
        UNION ALL
        SELECT format('%s.%s %s %s', c.relname, a.attname, format_type(a.atttypid, a.atttypmod), pg_get_expr(d.adbin, d.adrelid))
          FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
          LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
         WHERE c.relnamespace = 'new_user_hook'::regnamespace AND c.relkind = 'r' AND a.attnum > 0 AND NOT a.attisdropped
    ) s";

#[test]
fn an_installed_0_1_0_upgrades_in_place_without_losing_queued_events() {
    install_release_script("0.1.0");
    let cluster = Cluster::new(&[]);
    let mut admin = cluster.connect("supabase_admin");
    admin
        .batch_execute(
            "CREATE EXTENSION pg_new_user_hook VERSION '0.1.0'; SELECT new_user_hook.install();",
        )
        .unwrap();
    // Events queued under 0.1.0 (no URL yet).
    let ids: Vec<String> = (0..5)
        .map(|i| cluster.signup(&format!("before-upgrade-{i}@example.com")))
        .collect();

    admin
        .batch_execute("ALTER EXTENSION pg_new_user_hook UPDATE TO '0.2.0'")
        .unwrap();
    let version: String = admin
        .query_one(
            "SELECT extversion FROM pg_extension WHERE extname = 'pg_new_user_hook'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(version, "0.2.0");
    let pending: i64 = admin
        .query_one("SELECT pending FROM new_user_hook.status", &[])
        .unwrap()
        .get(0);
    assert_eq!(pending, 5, "the queued events survived the update");

    // The upgraded schema is the one a fresh 0.2.0 install creates.
    admin.batch_execute("CREATE DATABASE fresh").unwrap();
    let upgraded: String = admin.query_one(SCHEMA_FINGERPRINT, &[]).unwrap().get(0);
    let mut fresh = postgres::Config::new()
        .host("127.0.0.1")
        .port(cluster.port)
        .user("supabase_admin")
        .dbname("fresh")
        .connect(postgres::NoTls)
        .unwrap();
    fresh
        .batch_execute("CREATE EXTENSION pg_new_user_hook")
        .unwrap();
    let installed: String = fresh.query_one(SCHEMA_FINGERPRINT, &[]).unwrap().get(0);
    assert_eq!(
        upgraded, installed,
        "ALTER EXTENSION UPDATE and a fresh install differ"
    );

    // And the events queued before the update are delivered, each once.
    let receiver = Receiver::ok();
    cluster.configure(&[("url", &receiver.url)]);
    for id in &ids {
        cluster.wait_for_event(id, "status = 'delivered'", WITHIN);
    }
    let mut received: Vec<String> = receiver
        .requests()
        .iter()
        .map(|r| r.json()["id"].as_str().unwrap().to_string())
        .collect();
    received.sort();
    let mut expected = ids.clone();
    expected.sort();
    assert_eq!(received, expected);
}
