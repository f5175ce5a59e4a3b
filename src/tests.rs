//! The SQL surface as `#[pg_test]`s: each runs inside a transaction that is rolled
//! back. Delivery itself is covered by the end-to-end tests in tests/.

use pgrx::prelude::*;

#[pg_schema]
mod tests {
    // The SQL surface. These run inside a transaction that is rolled back, so the
    // deferred trigger is fired with SET CONSTRAINTS ALL IMMEDIATE; delivery itself
    // is covered by the end-to-end tests in tests/.
    use pgrx::prelude::*;

    fn users_table() {
        Spi::run("CREATE SCHEMA app; CREATE TABLE app.users (id uuid PRIMARY KEY, email text, secret text)").unwrap();
    }

    /// The first node of an EXPLAIN (FORMAT JSON) plan for which `pick` holds.
    fn find_node<'a>(
        node: &'a serde_json::Value,
        pick: &dyn Fn(&serde_json::Value) -> bool,
    ) -> Option<&'a serde_json::Value> {
        match node {
            serde_json::Value::Array(items) => items.iter().find_map(|n| find_node(n, pick)),
            serde_json::Value::Object(map) => {
                if pick(node) {
                    return Some(node);
                }
                map.values().find_map(|n| find_node(n, pick))
            }
            _ => None,
        }
    }

    fn count(sql: &str) -> i64 {
        Spi::get_one::<i64>(sql).unwrap().unwrap()
    }

    /// A query's one bigint[] value; empty for NULL.
    fn int8s(sql: &str) -> Vec<i64> {
        Spi::get_one::<Vec<i64>>(sql).unwrap().unwrap_or_default()
    }

    /// Events in log segment `segment` written by transactions `xids`, each with its
    /// xid as its seq, and id 00000000-0000-0000-000<segment>-<xid, 12 digits>.
    fn log_events(segment: u8, xids: &[i64]) {
        let xids = xids
            .iter()
            .map(i64::to_string)
            .collect::<Vec<_>>()
            .join(",");
        Spi::run(&format!(
            "INSERT INTO new_user_hook.log_{segment} (id, user_id, source, kind, record, seq, created_at)
             SELECT ('00000000-0000-0000-000{segment}-' || lpad(g::text, 12, '0'))::uuid, gen_random_uuid(),
                    'app.users', 'created', '{{}}', g, now()
               FROM unnest(ARRAY[{xids}]) g;
             UPDATE new_user_hook.log_{segment} SET xid = seq::text::xid8;"
        ))
        .unwrap();
    }

    #[pg_test]
    fn install_captures_the_row_as_committed() {
        users_table();
        let msg = Spi::get_one::<String>("SELECT new_user_hook.install('app.users')")
            .unwrap()
            .unwrap();
        assert_eq!(msg, "pg_new_user_hook installed on app.users");
        Spi::run(
            "INSERT INTO app.users VALUES ('11111111-1111-1111-1111-111111111111', 'first@example.com', 'pw');
             UPDATE app.users SET email = 'final@example.com';
             SET CONSTRAINTS ALL IMMEDIATE;",
        )
        .unwrap();
        crate::capture::write_noted_events();
        let (email, status) = Spi::get_two::<String, String>(
            "SELECT o.record->>'email', d.status FROM new_user_hook.log_0 o JOIN new_user_hook.deliveries d USING (id)",
        )
        .unwrap();
        assert_eq!(email.as_deref(), Some("final@example.com"));
        assert_eq!(status.as_deref(), Some("pending"));
        // Only id and email are taken from a custom table: never other columns.
        let keys = Spi::get_one::<String>("SELECT string_agg(k, ',' ORDER BY k) FROM new_user_hook.log_0, json_object_keys(record) k")
            .unwrap()
            .unwrap();
        assert_eq!(keys, "email,id");
    }

    #[pg_test]
    fn an_auth_users_event_holds_the_allowed_fields_only_as_to_json_writes_them() {
        Spi::run(
            "CREATE SCHEMA auth;
             CREATE TABLE auth.users (id uuid PRIMARY KEY, email varchar(255), phone text, encrypted_password varchar(255),
                 confirmation_token varchar(255), raw_app_meta_data jsonb, raw_user_meta_data jsonb,
                 created_at timestamptz, confirmed_at timestamptz, is_anonymous boolean NOT NULL DEFAULT false);
             SELECT new_user_hook.install();
             INSERT INTO auth.users VALUES ('11111111-1111-1111-1111-111111111111', 'a@example.com', NULL, '$2a$10$hash', 'tok',
                 '{\"provider\": \"email\", \"providers\": [\"email\"], \"secret\": \"s\"}', '{\"name\": \"Zoë \\\"Z\\\"\"}',
                 '2026-11-29 11:28:41.275+00', NULL);
             SET CONSTRAINTS ALL IMMEDIATE;",
        )
        .unwrap();
        crate::capture::write_noted_events();
        let same = Spi::get_one::<bool>(
            "SELECT o.record::jsonb = jsonb_build_object('id', u.id, 'email', u.email, 'phone', u.phone,
                    'raw_app_meta_data', '{\"provider\": \"email\", \"providers\": [\"email\"]}'::jsonb,
                    'raw_user_meta_data', u.raw_user_meta_data, 'created_at', u.created_at,
                    'confirmed_at', u.confirmed_at, 'is_anonymous', u.is_anonymous)
               FROM new_user_hook.log_0 o JOIN auth.users u ON u.id = o.user_id",
        )
        .unwrap();
        assert_eq!(same, Some(true));
        let via_snapshot = Spi::get_one::<bool>(
            "SELECT o.record::text = new_user_hook.snapshot('auth.users', u.ctid)::text
               FROM new_user_hook.log_0 o JOIN auth.users u ON u.id = o.user_id",
        )
        .unwrap();
        assert_eq!(via_snapshot, Some(true));
    }

    #[pg_test(error = "permission denied for table users")]
    fn snapshot_reads_only_tables_the_caller_may_read() {
        users_table();
        Spi::run(
            "INSERT INTO app.users VALUES (gen_random_uuid(), 'a@example.com');
             CREATE ROLE snooper;
             GRANT USAGE ON SCHEMA new_user_hook, app TO snooper;
             GRANT EXECUTE ON FUNCTION new_user_hook.snapshot(regclass, tid) TO snooper;",
        )
        .unwrap();
        Spi::run("SET ROLE snooper; SELECT new_user_hook.snapshot('app.users', '(0,1)')").unwrap();
    }

    #[pg_test]
    fn user_deleted_before_commit_produces_no_event() {
        users_table();
        Spi::run("SELECT new_user_hook.install('app.users')").unwrap();
        Spi::run(
            "INSERT INTO app.users VALUES (gen_random_uuid(), 'gone@example.com');
             DELETE FROM app.users;
             SET CONSTRAINTS ALL IMMEDIATE;",
        )
        .unwrap();
        crate::capture::write_noted_events();
        assert_eq!(count("SELECT count(*) FROM new_user_hook.deliveries"), 0);
    }

    #[pg_test]
    fn install_is_idempotent_and_uninstall_removes_the_trigger() {
        users_table();
        Spi::run("SELECT new_user_hook.install('app.users')").unwrap();
        let again = Spi::get_one::<String>("SELECT new_user_hook.install('app.users')")
            .unwrap()
            .unwrap();
        assert_eq!(again, "pg_new_user_hook is already installed on app.users");
        assert_eq!(
            count("SELECT count(*) FROM pg_trigger WHERE tgrelid = 'app.users'::regclass"),
            3
        );
        let removed = Spi::get_one::<String>("SELECT new_user_hook.uninstall('app.users')")
            .unwrap()
            .unwrap();
        assert_eq!(removed, "pg_new_user_hook removed from app.users");
        assert_eq!(
            count("SELECT count(*) FROM pg_trigger WHERE tgrelid = 'app.users'::regclass"),
            0
        );
        Spi::run("INSERT INTO app.users VALUES (gen_random_uuid(), 'x@example.com'); SET CONSTRAINTS ALL IMMEDIATE").unwrap();
        crate::capture::write_noted_events();
        assert_eq!(count("SELECT count(*) FROM new_user_hook.deliveries"), 0);
        let twice = Spi::get_one::<String>("SELECT new_user_hook.uninstall('app.users')")
            .unwrap()
            .unwrap();
        assert_eq!(twice, "pg_new_user_hook is not installed on app.users");
    }

    #[pg_test(error = "table \"app.nope\" does not exist")]
    fn install_on_a_missing_table_says_so() {
        Spi::run("CREATE SCHEMA app").unwrap();
        Spi::run("SELECT new_user_hook.install('app.nope')").unwrap();
    }

    #[pg_test(error = "table app.people needs a column \"id\" of type uuid (found: integer)")]
    fn install_rejects_a_non_uuid_id() {
        Spi::run("CREATE SCHEMA app; CREATE TABLE app.people (id int, email text)").unwrap();
        Spi::run("SELECT new_user_hook.install('app.people')").unwrap();
    }

    #[pg_test(error = "table app.people needs a column \"email\"")]
    fn install_requires_an_email_column() {
        Spi::run("CREATE SCHEMA app; CREATE TABLE app.people (id uuid)").unwrap();
        Spi::run("SELECT new_user_hook.install('app.people')").unwrap();
    }

    #[cfg(feature = "pg18")]
    #[pg_test(
        error = "table app.people: column \"email\" is a virtual generated column, whose value the hook cannot read from a changed row"
    )]
    fn install_refuses_a_virtual_generated_email_on_pg18() {
        // Virtual is PostgreSQL 18's default for a generated column.
        Spi::run(
            "CREATE SCHEMA app;
             CREATE TABLE app.people (id uuid PRIMARY KEY, address text, email text GENERATED ALWAYS AS (lower(address)))",
        )
        .unwrap();
        Spi::run("SELECT new_user_hook.install('app.people')").unwrap();
    }

    #[cfg(feature = "pg18")]
    #[pg_test]
    fn an_email_made_virtual_after_install_is_a_problem_on_pg18() {
        Spi::run(
            "CREATE SCHEMA app;
             CREATE TABLE app.people (id uuid PRIMARY KEY, address text, email text);
             SELECT new_user_hook.install('app.people');",
        )
        .unwrap();
        assert_eq!(crate::catalog::unstored_column_problem(), None);
        // Dropping the column drops the update trigger with it; the insert trigger stays.
        Spi::run(
            "ALTER TABLE app.people DROP COLUMN email CASCADE;
             ALTER TABLE app.people ADD COLUMN email text GENERATED ALWAYS AS (lower(address)) VIRTUAL;",
        )
        .unwrap();
        let problem = crate::catalog::unstored_column_problem().unwrap();
        assert!(
            problem.starts_with(
                "column email of app.people is a virtual generated column, whose value a changed row does not hold: \
                 its events carry a null email"
            ),
            "{problem}"
        );
    }

    #[cfg(feature = "pg18")]
    #[pg_test]
    fn pg_get_loaded_modules_names_the_library_and_its_version_on_pg18() {
        let (name, version) = Spi::get_two::<String, String>(
            "SELECT module_name, version FROM pg_get_loaded_modules() WHERE file_name LIKE 'pg_new_user_hook%'",
        )
        .unwrap();
        assert_eq!(name.as_deref(), Some("pg_new_user_hook"));
        assert_eq!(version.as_deref(), Some(env!("CARGO_PKG_VERSION")));
    }

    #[pg_test(
        error = "new_user_hook.capture() must run AFTER INSERT, UPDATE or DELETE ... FOR EACH ROW, not BEFORE INSERT ... FOR EACH ROW"
    )]
    fn capture_refuses_the_wrong_trigger_kind() {
        users_table();
        Spi::run(
            "CREATE TRIGGER wrong BEFORE INSERT ON app.users FOR EACH ROW EXECUTE FUNCTION new_user_hook.capture();
             INSERT INTO app.users VALUES (gen_random_uuid(), 'x@example.com');",
        )
        .unwrap();
        crate::capture::write_noted_events();
    }

    #[pg_test]
    fn the_update_trigger_watches_what_events_carry_and_not_sign_ins() {
        Spi::run(
            "CREATE SCHEMA auth;
             CREATE TABLE auth.users (id uuid PRIMARY KEY, email text, phone text, encrypted_password text,
                 last_sign_in_at timestamptz, updated_at timestamptz, email_confirmed_at timestamptz,
                 deleted_at timestamptz);
             SELECT new_user_hook.install();",
        )
        .unwrap();
        let watched = Spi::get_one::<String>(
            "SELECT array_to_string(new_user_hook.watched_columns('auth.users'), ',')",
        )
        .unwrap()
        .unwrap();
        assert_eq!(watched, "email,phone,email_confirmed_at,deleted_at");
        let def = Spi::get_one::<String>(
            "SELECT pg_get_triggerdef(oid) FROM pg_trigger WHERE tgname = 'new_user_hook_updated'",
        )
        .unwrap()
        .unwrap();
        assert!(
            def.contains(
                "AFTER UPDATE OF email, phone, email_confirmed_at, deleted_at ON auth.users"
            ),
            "{def}"
        );
    }

    #[pg_test]
    fn a_read_of_the_log_holds_a_users_events_behind_its_pending_one_in_the_outbox() {
        users_table();
        Spi::run(
            "SELECT new_user_hook.install('app.users');
             INSERT INTO app.users VALUES ('11111111-1111-1111-1111-111111111111', 'a@example.com');
             SET CONSTRAINTS ALL IMMEDIATE;",
        )
        .unwrap();
        crate::capture::write_noted_events();
        // A restored event of another user, pending, from a cluster further ahead in its WAL.
        Spi::run(
            "INSERT INTO new_user_hook.outbox (id, user_id, source, record, kind, seq)
             VALUES (gen_random_uuid(), '22222222-2222-2222-2222-222222222222', 'app.users', '{}', 'created', 9e15);
             INSERT INTO app.users VALUES ('22222222-2222-2222-2222-222222222222', 'b@example.com');
             SET CONSTRAINTS ALL IMMEDIATE;",
        )
        .unwrap();
        crate::capture::write_noted_events();
        // Two later changes of user 2, as the trigger appends them.
        Spi::run(
            "INSERT INTO new_user_hook.log_0 (id, user_id, source, kind, record, old_record, seq, created_at)
             SELECT gen_random_uuid(), '22222222-2222-2222-2222-222222222222', 'app.users', 'updated', '{}', '{}',
                    pg_current_wal_insert_lsn() - '0/0' + g, now()
               FROM generate_series(1, 2) g",
        )
        .unwrap();
        assert_eq!(
            count("SELECT count(*) FROM new_user_hook.deliveries WHERE status = 'pending'"),
            5
        );
        // A test's own transaction never commits: its events are stamped as committed
        // long ago, so that a window sees them.
        Spi::run("UPDATE new_user_hook.log_0 SET xid = '3'").unwrap();
        let first = crate::model::window::Reading {
            number: 0,
            start: None,
            end: None,
            after: None,
            resuming: true,
        };
        let chunk = crate::store::read_chunk(&first);
        let sent: Vec<&str> = chunk.events.iter().map(|e| e.user_id.as_str()).collect();
        assert_eq!(sent, ["11111111-1111-1111-1111-111111111111"]);
        assert_eq!(
            chunk.held.len(),
            3,
            "user 2's events follow its pending one"
        );
        assert!(!chunk.full);
        // The read writes nothing: the next record puts the held events into the outbox.
        assert_eq!(count("SELECT count(*) FROM new_user_hook.outbox WHERE status = 'pending' AND attempts = 0"), 1);
        let held = crate::store::Batch {
            log: chunk
                .held
                .iter()
                .map(|event| crate::store::LogRecord {
                    event: event.clone(),
                    decision: None,
                    class: None,
                })
                .collect(),
            ..Default::default()
        };
        assert!(crate::store::record(&held));
        assert_eq!(count("SELECT count(*) FROM new_user_hook.outbox WHERE status = 'pending' AND attempts = 0"), 4);
        // User 2's events come after its restored event, in the order they were captured.
        let order = Spi::get_one::<String>(
            "SELECT string_agg(kind, ',' ORDER BY seq) FROM new_user_hook.outbox
              WHERE user_id = '22222222-2222-2222-2222-222222222222'",
        )
        .unwrap()
        .unwrap();
        assert_eq!(order, "created,created,updated,updated");
        let (restored, first_change) = Spi::get_two::<i64, i64>(
            "SELECT (SELECT seq FROM new_user_hook.outbox WHERE seq = 9e15),
                    (SELECT min(seq) FROM new_user_hook.outbox WHERE kind = 'updated')",
        )
        .unwrap();
        assert!(
            first_change > restored,
            "{first_change:?} after {restored:?}"
        );
        // Each due at its creation, so the claim takes them in the order they were queued.
        assert_eq!(
            count("SELECT count(*) FROM new_user_hook.outbox WHERE next_attempt_at <> created_at"),
            0
        );
        // Read again (a restart): what the outbox has is skipped, and so is what a done
        // row lists; after the chunk's last event, nothing.
        let again = crate::store::read_chunk(&first);
        assert_eq!((again.events.len(), again.held.len()), (1, 0));
        let id = again.events[0].event.id.clone();
        Spi::run(&format!(
            "INSERT INTO new_user_hook.done_0 (window_number, ids, codes, at) VALUES (0, ARRAY['{id}']::uuid[], ARRAY[200], now())"
        ))
        .unwrap();
        let done = crate::store::read_chunk(&first);
        assert_eq!((done.events.len(), done.held.len()), (0, 0));
        let later = crate::model::window::Reading {
            end: Some(chunk.end.clone()),
            after: chunk.last.clone(),
            ..first
        };
        assert!(crate::store::read_chunk(&later).last.is_none());
    }

    #[pg_test]
    fn a_delivered_outbox_event_is_purged_once_the_position_is_past_its_log_row() {
        // Four events of the log delivered from the outbox a day ago, by transactions 5,
        // 8, 10 and 20.
        log_events(0, &[5, 8, 10, 20]);
        Spi::run(
            "INSERT INTO new_user_hook.outbox (id, user_id, source, record, kind, status, delivered_at, seq)
             SELECT id, user_id, source, record, kind, 'delivered', now() - interval '1 day', seq
               FROM new_user_hook.log_0;",
        )
        .unwrap();
        let purge = || crate::store::purge_delivered(std::time::Duration::from_secs(60), 100, true);
        let kept = || int8s("SELECT array_agg(seq ORDER BY seq) FROM new_user_hook.outbox");
        // No position yet: every event of the log is beyond it.
        assert_eq!(purge(), 0);
        // Behind: 5. Running at the position: 8; at its xmax or after: 10 and 20.
        Spi::run("UPDATE new_user_hook.positions SET snapshot = '7:10:8'").unwrap();
        assert_eq!(purge(), 1);
        assert_eq!(kept(), [8, 10, 20]);
        Spi::run("UPDATE new_user_hook.positions SET snapshot = '7:21:8,10'").unwrap();
        assert_eq!(purge(), 1);
        assert_eq!(kept(), [8, 10]);
        Spi::run("UPDATE new_user_hook.positions SET snapshot = '21:21:'").unwrap();
        assert_eq!(purge(), 2);
        // Without a position row, an event with no row in the log goes at once, and one
        // with a row is kept.
        Spi::run(
            "DELETE FROM new_user_hook.positions;
             INSERT INTO new_user_hook.outbox (id, user_id, source, record, kind, status, delivered_at, seq)
             VALUES (gen_random_uuid(), gen_random_uuid(), 'app.users', '{}', 'created', 'delivered',
                     now() - interval '1 day', 1),
                    ('00000000-0000-0000-0000-000000000020', gen_random_uuid(), 'app.users', '{}', 'created',
                     'delivered', now() - interval '1 day', 20)",
        )
        .unwrap();
        assert_eq!(purge(), 1);
        assert_eq!(kept(), [20]);
    }

    /// `unread` reads the log through index ranges; it must list exactly what the
    /// plain definition does: beyond the position, not in the outbox, not in a done
    /// row of the position's window or later.
    #[pg_test]
    fn unread_lists_what_its_definition_says_whatever_the_position() {
        log_events(0, &[5, 8, 9, 10, 11, 20]);
        log_events(1, &[6, 12, 30]);
        Spi::run(
            "-- An event restored without its transaction id, beyond this cluster's.
             UPDATE new_user_hook.log_1 SET xid = (pg_snapshot_xmax(pg_current_snapshot())::text::int8 + 1000)::text::xid8
              WHERE seq = 30;
             -- Resolved otherwise: 9 is in the outbox, 11 delivered in window 3.
             INSERT INTO new_user_hook.outbox (id, user_id, source, record, kind, seq)
             SELECT id, user_id, source, record, kind, seq FROM new_user_hook.log_0 WHERE seq = 9;
             INSERT INTO new_user_hook.done_0 (window_number, ids, codes, at)
             SELECT 3, ARRAY[id], ARRAY[200], now() FROM new_user_hook.log_0 WHERE seq = 11;",
        )
        .unwrap();
        let unread = || int8s("SELECT array_agg(seq ORDER BY seq) FROM new_user_hook.unread");
        let by_definition = || {
            int8s(
                "SELECT array_agg(l.seq ORDER BY l.seq)
                   FROM (SELECT * FROM new_user_hook.log_0 UNION ALL SELECT * FROM new_user_hook.log_1) AS l,
                        new_user_hook.positions AS p
                  WHERE NOT coalesce(pg_visible_in_snapshot(l.xid, p.snapshot), false)
                    AND NOT EXISTS (SELECT 1 FROM new_user_hook.outbox AS o WHERE o.id = l.id)
                    AND NOT EXISTS (SELECT 1 FROM new_user_hook.done_0 AS d
                                     WHERE d.window_number >= p.window_number AND l.id = ANY (d.ids))",
            )
        };
        // A position ahead of this cluster (a restored one), past the restored event.
        let ahead = "(pg_snapshot_xmax(pg_current_snapshot())::text::int8 + 2000)";
        let ahead = format!("({ahead} || ':' || {ahead} || ':')");
        for (position, window, expected) in [
            ("NULL", 0, vec![5, 6, 8, 10, 12, 20, 30]),
            ("'7:10:8'", 0, vec![8, 10, 12, 20, 30]),
            ("'7:10:8'", 4, vec![8, 10, 11, 12, 20, 30]),
            ("'7:21:8,10'", 0, vec![8, 10, 30]),
            ("'21:21:'", 0, vec![30]),
            (ahead.as_str(), 0, vec![]),
        ] {
            Spi::run(&format!(
                "UPDATE new_user_hook.positions SET snapshot = {position}::pg_snapshot, window_number = {window}"
            ))
            .unwrap();
            assert_eq!(
                by_definition(),
                expected,
                "the definition, at {position} {window}"
            );
            assert_eq!(unread(), expected, "unread, at {position} {window}");
        }
    }

    #[pg_test]
    fn the_claim_probes_each_users_earlier_events_through_the_index() {
        // A backlog of 20,000 users, a few of them with a later event waiting, and
        // statistics taken when the backlog was small (as autovacuum leaves them while
        // a backlog builds up): the planner thinks few events are pending.
        Spi::run(
            "INSERT INTO new_user_hook.outbox (id, user_id, source, record, seq, status)
             SELECT gen_random_uuid(), gen_random_uuid(), 'auth.users', '{}', g, 'delivered' FROM generate_series(1, 20000) g;
             ANALYZE new_user_hook.outbox;
             UPDATE new_user_hook.outbox SET status = 'pending';
             INSERT INTO new_user_hook.outbox (id, user_id, source, record, kind, seq)
             SELECT gen_random_uuid(), user_id, source, record, 'updated', seq + 100000
               FROM new_user_hook.outbox WHERE seq <= 20;",
        )
        .unwrap();
        for sql in [
            crate::store::claim_sql(true)
                .replace("$1", "256")
                .replace("$2", "'{}'"),
            crate::store::next_due_sql(true).replace("$1", "'{}'"),
        ] {
            let plan = Spi::explain(&sql).unwrap().0;
            // Each candidate is checked by a look-up of its user in the index, never by
            // joining the whole backlog.
            assert!(
                find_node(&plan, &|n| n["Join Type"] == "Anti").is_none(),
                "{plan}"
            );
            let probe = find_node(&plan, &|n| n["Index Name"] == "outbox_user")
                .unwrap_or_else(|| panic!("no probe of outbox_user: {plan}"));
            let cond = probe["Index Cond"].as_str().unwrap_or_default();
            assert!(cond.starts_with("((user_id = o"), "{plan}");
            assert!(probe["Scan Direction"] == "Backward", "{plan}");
        }
        // The later events wait for their users' first ones; the others are claimable.
        let claimable = Spi::get_one::<i64>(&format!(
            "SELECT count(*) FROM ({}) c",
            crate::store::claim_sql(true)
                .replace("$1", "30000")
                .replace("$2", "'{}'")
        ))
        .unwrap()
        .unwrap();
        assert_eq!(claimable, 20000);
    }

    #[pg_test]
    fn capture_works_in_a_plain_create_trigger_too() {
        users_table();
        Spi::run(
            "CREATE TRIGGER mine AFTER INSERT ON app.users FOR EACH ROW EXECUTE FUNCTION new_user_hook.capture();
             INSERT INTO app.users VALUES (gen_random_uuid(), 'plain@example.com');",
        )
        .unwrap();
        crate::capture::write_noted_events();
        assert_eq!(count("SELECT count(*) FROM new_user_hook.log_0 WHERE record->>'email' = 'plain@example.com'"), 1);
    }

    #[pg_test]
    fn redeliver_requeues_failed_events() {
        Spi::run(
            "INSERT INTO new_user_hook.outbox (user_id, source, record, status, attempts, last_error)
             VALUES (gen_random_uuid(), 'app.users', '{}', 'failed', 3, 'HTTP 400'),
                    (gen_random_uuid(), 'app.users', '{}', 'failed', 1, 'HTTP 401'),
                    (gen_random_uuid(), 'app.users', '{}', 'delivered', 1, NULL)",
        )
        .unwrap();
        let delivered = Spi::get_one::<pgrx::Uuid>(
            "SELECT id FROM new_user_hook.outbox WHERE status = 'delivered'",
        )
        .unwrap()
        .unwrap();
        let args = [delivered.into()];
        assert_eq!(
            Spi::get_one_with_args::<bool>("SELECT new_user_hook.redeliver($1)", &args).unwrap(),
            Some(true)
        );
        assert_eq!(
            Spi::get_one_with_args::<bool>("SELECT new_user_hook.redeliver($1)", &args).unwrap(),
            Some(false)
        );
        assert_eq!(
            Spi::get_one::<i64>("SELECT new_user_hook.redeliver_failed()").unwrap(),
            Some(2)
        );
        assert_eq!(count("SELECT count(*) FROM new_user_hook.deliveries WHERE status = 'pending' AND attempts = 0"), 3);
        // Queued again, not captured again: as if the worker had counted the three
        // first attempts, the metrics' captured_total stays 3.
        assert_eq!(count("SELECT requeued FROM new_user_hook.counters"), 3);
        Spi::run("UPDATE new_user_hook.counters SET first_attempts = 3").unwrap();
        assert_eq!(
            count("SELECT captured FROM new_user_hook.queue_gauges()"),
            3
        );
    }

    #[pg_test(error = "no event with id 00000000-0000-0000-0000-000000000000")]
    fn redeliver_of_an_unknown_event_says_so() {
        Spi::run("SELECT new_user_hook.redeliver('00000000-0000-0000-0000-000000000000')").unwrap();
    }

    #[pg_test]
    fn status_reports_the_missing_url() {
        let (preloaded, problem) =
            Spi::get_two::<bool, String>("SELECT preloaded, problem FROM new_user_hook.status")
                .unwrap();
        assert_eq!(preloaded, Some(true));
        assert!(problem.unwrap().contains("pg_new_user_hook.url is not set"));
        assert_eq!(count("SELECT count(*) FROM new_user_hook.status"), 1);
    }

    #[pg_test]
    fn settings_have_their_documented_defaults() {
        for (name, value) in [
            ("pg_new_user_hook.api_key_header", "X-API-Key"),
            ("pg_new_user_hook.timeout_ms", "5s"),
            ("pg_new_user_hook.concurrency", "32"),
            ("pg_new_user_hook.retry_base_ms", "1s"),
            ("pg_new_user_hook.retry_max_ms", "1h"),
            ("pg_new_user_hook.max_attempts", "50"),
            ("pg_new_user_hook.retention", "7d"),
            ("pg_new_user_hook.database", "pgrx_tests"),
            ("pg_new_user_hook.url", ""),
            ("pg_new_user_hook.events", "created"),
        ] {
            let shown = Spi::get_one::<String>(&format!("SHOW {name}"))
                .unwrap()
                .unwrap();
            assert_eq!(shown, value, "{name}");
        }
    }

    fn show_api_key_as_a_plain_role() {
        Spi::run("CREATE ROLE hook_reader; SET ROLE hook_reader").unwrap();
        Spi::run("SHOW pg_new_user_hook.api_key").unwrap();
    }

    // PostgreSQL 16 reworded the refusal; the protection (GUC_SUPERUSER_ONLY) is the same.
    #[cfg(feature = "pg15")]
    #[pg_test(
        error = "must be superuser or have privileges of pg_read_all_settings to examine \"pg_new_user_hook.api_key\""
    )]
    fn api_key_is_hidden_from_non_superusers() {
        show_api_key_as_a_plain_role();
    }

    #[cfg(not(feature = "pg15"))]
    #[pg_test(error = "permission denied to examine \"pg_new_user_hook.api_key\"")]
    fn api_key_is_hidden_from_non_superusers() {
        show_api_key_as_a_plain_role();
    }

    #[pg_test(error = "permission denied for view deliveries")]
    fn deliveries_are_not_public() {
        Spi::run("CREATE ROLE hook_reader; GRANT USAGE ON SCHEMA new_user_hook TO hook_reader; SET ROLE hook_reader").unwrap();
        Spi::run("SELECT * FROM new_user_hook.deliveries").unwrap();
    }
}
