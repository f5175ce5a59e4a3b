//! The SQL surface as a hostile user meets it: every function of the extension,
//! called by every role that may call it (and those that may not), with NULLs, every
//! relation kind, bad tids, empty and huge values. Each call ends in a result or a
//! clean error, never an internal error (SQLSTATE XX000: an unchecked case or a
//! panic) and never a crash of the server.

mod common;

use common::*;

/// The roles that call: the superuser, an operator granted EXECUTE on everything
/// (docs/security.md), Supabase's API and Auth roles (granted nothing).
const ROLES: &[&str] = &[
    "supabase_admin",
    "postgres",
    "supabase_auth_admin",
    "authenticated",
    "anon",
    "service_role",
];

/// Relations of every kind, by name.
const RELATIONS: &[&str] = &[
    "auth.users",
    "hostile.users",
    "hostile.v",
    "hostile.mv",
    "hostile.p",
    "hostile.p0",
    "hostile.users_email",
    "hostile.c",
    "hostile.s",
    "hostile.u",
    "pg_catalog.pg_class",
    "new_user_hook.outbox",
    "new_user_hook.log_0",
    "new_user_hook.unread",
    "new_user_hook.deliveries",
];

fn text_values() -> Vec<String> {
    let mut values: Vec<String> = vec![
        "NULL".into(),
        "''".into(),
        "'no_such.table'".into(),
        "'a.b.c.d'".into(),
        "'\"; DROP TABLE auth.users; --'".into(),
        "repeat('x', 1000000)".into(),
        // The TOAST table of pg_proc: relkind 't'.
        "(SELECT reltoastrelid::regclass::text FROM pg_class WHERE oid = 'pg_proc'::regclass)"
            .into(),
    ];
    values.extend(RELATIONS.iter().map(|r| format!("'{r}'")));
    values
}

fn regclass_values() -> Vec<String> {
    let mut values: Vec<String> = vec![
        "NULL".into(),
        "0::oid::regclass".into(),
        "4294967295::oid::regclass".into(),
        "'pg_proc'::regclass::oid::regclass".into(),
        "(SELECT reltoastrelid FROM pg_class WHERE oid = 'pg_proc'::regclass)::regclass".into(),
    ];
    values.extend(RELATIONS.iter().map(|r| format!("'{r}'::regclass")));
    values
}

const TIDS: &[&str] = &[
    "NULL",
    "'(0,0)'",
    "'(0,1)'",
    "'(0,65535)'",
    "'(1,1)'",
    "'(4294967294,1)'",
];

const UUIDS: &[&str] = &[
    "NULL",
    "'00000000-0000-0000-0000-000000000000'",
    "gen_random_uuid()",
    "(SELECT id FROM new_user_hook.deliveries LIMIT 1)",
];

const UUID_ARRAYS: &[&str] = &[
    "NULL",
    "'{}'",
    "'{NULL}'",
    "ARRAY(SELECT id FROM auth.users)",
    "ARRAY(SELECT id FROM hostile.users)",
    "ARRAY(SELECT gen_random_uuid() FROM generate_series(1, 20000))",
];

fn values_for(typ: &str) -> Vec<String> {
    match typ {
        "text" => text_values(),
        "regclass" => regclass_values(),
        "tid" => TIDS.iter().map(|s| s.to_string()).collect(),
        "uuid" => UUIDS.iter().map(|s| s.to_string()).collect(),
        "uuid[]" => UUID_ARRAYS.iter().map(|s| s.to_string()).collect(),
        other => panic!("no hostile values for argument type {other}: add them"),
    }
}

/// Every combination of the argument lists.
fn combinations(lists: &[Vec<String>]) -> Vec<Vec<String>> {
    lists.iter().fold(vec![Vec::new()], |acc, list| {
        acc.iter()
            .flat_map(|prefix| {
                list.iter().map(move |v| {
                    let mut next = prefix.clone();
                    next.push(v.clone());
                    next
                })
            })
            .collect()
    })
}

#[test]
fn every_function_with_hostile_arguments_as_every_role_ends_cleanly() {
    let cluster = Cluster::with_hook(&[]);
    let mut admin = cluster.connect("supabase_admin");
    admin
        .batch_execute(
            "CREATE SCHEMA hostile;
             CREATE TABLE hostile.users (id uuid PRIMARY KEY, email text);
             INSERT INTO hostile.users SELECT gen_random_uuid(), 'u' || g || '@example.com' FROM generate_series(1, 3) g;
             CREATE VIEW hostile.v AS SELECT * FROM hostile.users;
             CREATE MATERIALIZED VIEW hostile.mv AS SELECT * FROM hostile.users;
             CREATE TABLE hostile.p (id uuid PRIMARY KEY, email text) PARTITION BY HASH (id);
             CREATE TABLE hostile.p0 PARTITION OF hostile.p FOR VALUES WITH (MODULUS 1, REMAINDER 0);
             INSERT INTO hostile.p SELECT gen_random_uuid(), 'p' || g || '@example.com' FROM generate_series(1, 3) g;
             CREATE INDEX users_email ON hostile.users (email);
             CREATE TYPE hostile.c AS (id uuid, email text);
             CREATE SEQUENCE hostile.s;
             CREATE UNLOGGED TABLE hostile.u (id uuid, email text);
             INSERT INTO hostile.u VALUES (gen_random_uuid(), 'unlogged@example.com');
             -- An operator as docs/security.md has it, and then some: EXECUTE on everything.
             GRANT USAGE ON SCHEMA new_user_hook, hostile TO postgres;
             GRANT SELECT ON ALL TABLES IN SCHEMA hostile TO postgres;
             GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA new_user_hook TO postgres;",
        )
        .unwrap();
    cluster.signup("surface@example.com");
    let started: String = admin
        .query_one("SELECT pg_postmaster_start_time()::text", &[])
        .unwrap()
        .get(0);

    let functions: Vec<(String, Vec<String>)> = admin
        .query(
            "SELECT p.proname::text,
                    ARRAY(SELECT format_type(t, NULL) FROM unnest(p.proargtypes::oid[]) t)
               FROM pg_proc p
              WHERE p.pronamespace = 'new_user_hook'::regnamespace
              ORDER BY 1",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert!(functions.len() >= 15, "{functions:?}");

    let mut internal = Vec::new();
    let mut calls = 0;
    for (name, types) in &functions {
        let lists: Vec<Vec<String>> = types.iter().map(|t| values_for(t)).collect();
        for args in combinations(&lists) {
            let call = format!("new_user_hook.{name}({})", args.join(", "));
            for role in ROLES {
                calls += 1;
                admin
                    .batch_execute(&format!("BEGIN; SET LOCAL ROLE {role}"))
                    .unwrap();
                if let Err(e) = admin.simple_query(&format!("SELECT {call}")) {
                    let Some(db) = e.as_db_error() else {
                        panic!(
                            "{role}: SELECT {call} lost the connection: {e}\n{}",
                            cluster.log()
                        );
                    };
                    if db.code().code().starts_with("XX") {
                        internal.push(format!("{role}: {call}: {}", db.message()));
                    }
                }
                admin.batch_execute("ROLLBACK").unwrap();
            }
        }
    }
    eprintln!("{calls} calls of {} functions", functions.len());
    assert!(
        internal.is_empty(),
        "internal errors:\n{}",
        internal.join("\n")
    );
    let now: String = admin
        .query_one("SELECT pg_postmaster_start_time()::text", &[])
        .unwrap()
        .get(0);
    assert_eq!(now, started, "the server restarted");
    let log = cluster.log();
    assert!(!log.contains("terminated by signal"), "{log}");
}

#[test]
fn the_trigger_function_called_directly_says_what_it_is() {
    let cluster = Cluster::with_hook(&[]);
    let error = cluster
        .connect("supabase_admin")
        .batch_execute("SELECT new_user_hook.capture()")
        .unwrap_err();
    let message = error.as_db_error().unwrap().message().to_string();
    assert_eq!(
        message,
        "new_user_hook.capture() is a trigger function: it cannot be called directly"
    );
}

#[test]
fn relations_that_are_not_plain_tables_are_refused_with_a_reason() {
    let cluster = Cluster::with_hook(&[]);
    let mut admin = cluster.connect("supabase_admin");
    admin
        .batch_execute(
            "CREATE TABLE public.p (id uuid PRIMARY KEY, email text) PARTITION BY HASH (id);
             CREATE TABLE public.p0 PARTITION OF public.p FOR VALUES WITH (MODULUS 1, REMAINDER 0);
             INSERT INTO public.p VALUES (gen_random_uuid(), 'p@example.com');
             CREATE VIEW public.v AS SELECT * FROM public.p;",
        )
        .unwrap();
    let message = |sql: &str| {
        cluster
            .connect("supabase_admin")
            .batch_execute(sql)
            .unwrap_err()
            .as_db_error()
            .unwrap()
            .message()
            .to_string()
    };
    assert_eq!(
        message("SELECT new_user_hook.install('public.p')"),
        "public.p is a partitioned table: pg_new_user_hook attaches to a plain table"
    );
    assert_eq!(
        message("SELECT new_user_hook.install('public.v')"),
        "\"public.v\" is not a table"
    );
    assert!(
        message("SELECT new_user_hook.snapshot('public.p', '(0,1)')").contains("is not a table")
    );
    assert!(
        message("SELECT new_user_hook.snapshot('public.v', '(0,1)')").contains("is not a table")
    );
    assert!(
        message("SELECT new_user_hook.backfill(ARRAY(SELECT id FROM public.p), 'public.p')")
            .contains("is not a table")
    );
    // A partition is a table: its rows can be read.
    let record: Option<String> = admin
        .query_one(
            "SELECT new_user_hook.snapshot('public.p0', ctid)::text FROM public.p0",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(record.unwrap().contains("p@example.com"));
    // A tid past the table's end names no row.
    let none: Option<String> = admin
        .query_one(
            "SELECT new_user_hook.snapshot('public.p0', '(1000,1)')::text",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(none, None);
}

/// PostgreSQL 18: a column an event needs made a virtual generated column after
/// install() (which refuses one) is logged once by the backend that signs users up,
/// and shown by the status view and the problem metric until fixed.
#[cfg(feature = "pg18")]
#[test]
fn an_email_made_virtual_after_install_is_logged_and_shown_on_pg18() {
    let cluster = Cluster::with_hook(&[]);
    let receiver = Receiver::ok();
    cluster.configure(&[("url", &receiver.url)]);
    let problem = || -> Option<String> {
        cluster
            .one_row("SELECT problem FROM new_user_hook.status")
            .get(0)
    };
    let mut admin = cluster.connect("supabase_admin");
    admin
        .batch_execute(
            "CREATE TABLE public.people (id uuid PRIMARY KEY, address text, email text);
             SELECT new_user_hook.install('public.people');",
        )
        .unwrap();
    assert_eq!(problem(), None);
    admin
        .batch_execute(
            "ALTER TABLE public.people DROP COLUMN email CASCADE;
             ALTER TABLE public.people ADD COLUMN email text GENERATED ALWAYS AS (lower(address)) VIRTUAL;
             INSERT INTO public.people VALUES (gen_random_uuid(), 'One@Example.com');
             INSERT INTO public.people VALUES (gen_random_uuid(), 'Two@Example.com');",
        )
        .unwrap();
    let problem = problem().expect("a problem in the status view");
    assert!(
        problem.starts_with("column email of people is a virtual generated column"),
        "{problem}"
    );
    let metric: i32 = cluster
        .one_row("SELECT problem FROM new_user_hook.metrics")
        .get(0);
    assert_eq!(metric, 1);
    let warning = "column \"email\" of table \"people\" is a virtual generated column";
    assert_eq!(
        cluster.log().matches(warning).count(),
        1,
        "logged once: {}",
        cluster.log()
    );
}
