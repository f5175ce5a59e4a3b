//! Upgrades: an installed earlier release (its install script kept in sql/releases/)
//! is updated in place with ALTER EXTENSION ... UPDATE while events are queued;
//! nothing is lost, and the result matches a fresh install.

mod common;

use common::{Cluster, Receiver};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const WITHIN: Duration = Duration::from_secs(30);

/// Fails with what to do if an earlier release's install script is not installed
/// (tests/suite.sh installs them from sql/releases/; a test never writes into the
/// system's extension directory itself).
fn require_release_script(version: &str) {
    let out = Command::new("pg_config")
        .arg("--sharedir")
        .output()
        .unwrap();
    let installed = Path::new(String::from_utf8(out.stdout).unwrap().trim())
        .join("extension")
        .join(format!("pg_new_user_hook--{version}.sql"));
    assert!(
        installed.exists(),
        "{} is missing: install the earlier releases' scripts first \
         (sudo install -m 644 sql/releases/*.sql \"$(pg_config --sharedir)/extension/\"), as tests/suite.sh does",
        installed.display()
    );
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
               || ' replica identity ' || c.relreplident::text || ' ' || coalesce(c.reloptions::text, '')
          FROM pg_class c WHERE c.relnamespace = 'new_user_hook'::regnamespace AND c.relkind IN ('r', 'v')
        UNION ALL
        SELECT format('%s.%s %s %s', c.relname, a.attname, format_type(a.atttypid, a.atttypmod), pg_get_expr(d.adbin, d.adrelid))
          FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
          LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
         WHERE c.relnamespace = 'new_user_hook'::regnamespace AND c.relkind = 'r' AND a.attnum > 0 AND NOT a.attisdropped
        UNION ALL
        SELECT pg_get_triggerdef(t.oid)
          FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
         WHERE c.relnamespace = 'new_user_hook'::regnamespace AND NOT t.tgisinternal
        UNION ALL
        SELECT format('comment on %s: %s', c.relname, obj_description(c.oid, 'pg_class'))
          FROM pg_class c WHERE c.relnamespace = 'new_user_hook'::regnamespace AND c.relkind IN ('r', 'v')
        UNION ALL
        -- What pg_dump keeps of the extension's tables.
        SELECT format('dumped %s %s', c.relname, x.condition)
          FROM pg_extension e CROSS JOIN LATERAL unnest(e.extconfig, e.extcondition) AS x(config, condition)
          JOIN pg_class c ON c.oid = x.config
         WHERE e.extname = 'pg_new_user_hook'
    ) s";

const CURRENT: &str = env!("CARGO_PKG_VERSION");

#[test]
fn an_installed_0_1_0_upgrades_in_place_without_losing_queued_events() {
    upgrades_in_place_from("0.1.0");
}

#[test]
fn an_installed_0_2_0_upgrades_in_place_without_losing_queued_events() {
    upgrades_in_place_from("0.2.0");
}

#[test]
fn an_installed_0_3_0_upgrades_in_place_without_losing_queued_events() {
    upgrades_in_place_from("0.3.0");
}

#[test]
fn an_installed_0_4_0_upgrades_in_place_without_losing_queued_events() {
    upgrades_in_place_from("0.4.0");
}

#[test]
fn an_installed_0_5_0_upgrades_in_place_without_losing_queued_events() {
    upgrades_in_place_from("0.5.0");
}

#[test]
fn an_installed_0_6_0_upgrades_in_place_without_losing_queued_events() {
    upgrades_in_place_from("0.6.0");
}

#[test]
fn an_installed_0_7_0_upgrades_in_place_without_losing_queued_events() {
    upgrades_in_place_from("0.7.0");
}

fn upgrades_in_place_from(release: &str) {
    require_release_script(release);
    let cluster = Cluster::new(&[]);
    let mut admin = cluster.connect("supabase_admin");
    admin
        .batch_execute(&format!(
            "CREATE EXTENSION pg_new_user_hook VERSION '{release}'; SELECT new_user_hook.install();"
        ))
        .unwrap();
    // Events queued under the old release (no URL yet).
    let ids: Vec<String> = (0..5)
        .map(|i| cluster.signup(&format!("before-upgrade-{i}@example.com")))
        .collect();

    admin
        .batch_execute(&format!(
            "ALTER EXTENSION pg_new_user_hook UPDATE TO '{CURRENT}'"
        ))
        .unwrap();
    let version: String = admin
        .query_one(
            "SELECT extversion FROM pg_extension WHERE extname = 'pg_new_user_hook'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(version, CURRENT);
    let pending: i64 = admin
        .query_one("SELECT pending FROM new_user_hook.status", &[])
        .unwrap()
        .get(0);
    assert_eq!(pending, 5, "the queued events survived the update");
    // The worker publishes its count of the queue at most once a second.
    common::wait_for(
        "the metrics to count the events queued before the update",
        WITHIN,
        || {
            let captured: i64 = admin
                .query_one("SELECT captured_total FROM new_user_hook.metrics", &[])
                .unwrap()
                .get(0);
            (captured == 5).then_some(())
        },
    );

    // The upgraded schema is the one a fresh install of this version creates.
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

    // A signup after the update is captured the new way; it and the events queued
    // before the update are delivered, each once.
    let mut ids = ids;
    ids.push(cluster.signup("after-upgrade@example.com"));
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
