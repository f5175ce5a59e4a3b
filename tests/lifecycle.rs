//! The user's lifecycle (`pg_new_user_hook.events`): updates and deletions made the
//! way Supabase Auth makes them reach the backend as REST calls or envelopes, one
//! event per user and transaction, a user's events in commit order — and with the
//! default setting, nothing but creations.

mod common;

use common::*;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::time::Duration;

const WITHIN: Duration = Duration::from_secs(30);
const ALL: (&str, &str) = ("events", "created,updated,deleted");

/// The requests for one user, in arrival order: (method, path, body).
fn calls_for(receiver: &Receiver, user_id: &str) -> Vec<(String, String, String)> {
    receiver
        .accepted()
        .into_iter()
        .filter(|r| r.path.contains(user_id) || r.body.contains(user_id))
        .map(|r| (r.method, r.path, r.body))
        .collect()
}

/// The JSON bodies the backend accepted for one user (the envelope formats).
fn bodies_for(receiver: &Receiver, user_id: &str) -> Vec<Value> {
    receiver
        .accepted()
        .iter()
        .filter(|r| r.body.contains(user_id))
        .map(|r| r.json())
        .collect()
}

fn event_count(cluster: &Cluster, user_id: &str) -> i64 {
    cluster
        .connect("supabase_admin")
        .query_one(
            "SELECT count(*) FROM new_user_hook.deliveries WHERE user_id = $1::text::uuid",
            &[&user_id],
        )
        .unwrap()
        .get(0)
}

fn wait_delivered(cluster: &Cluster, user_id: &str, n: i64) {
    let mut admin = cluster.connect("supabase_admin");
    wait_for(
        &format!("{n} delivered events of {user_id}"),
        WITHIN,
        || {
            let done: i64 = admin
            .query_one(
                "SELECT count(*) FROM new_user_hook.deliveries WHERE user_id = $1::text::uuid AND status = 'delivered'",
                &[&user_id],
            )
            .unwrap()
            .get(0);
            (done >= n).then_some(())
        },
    );
}

#[test]
fn with_the_default_events_only_creations_are_delivered() {
    let receiver = Receiver::ok();
    let cluster = Cluster::hooked_to(&receiver.url, &[]);
    let id = cluster.signup("default@example.com");
    cluster.confirm_email(&id);
    cluster.change_email(&id, "changed@example.com");
    cluster.soft_delete(&id);
    cluster.delete_user(&id);
    wait_delivered(&cluster, &id, 1);
    assert_eq!(event_count(&cluster, &id), 1, "only the creation is queued");
    let calls = calls_for(&receiver, &id);
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert_eq!(calls[0].0, "POST");
}

#[test]
fn a_rest_backend_gets_post_patch_and_delete_of_the_user_and_sign_ins_send_nothing() {
    let receiver = Receiver::ok();
    let cluster = Cluster::hooked_to(&receiver.url, &[ALL]);
    // The receiver's URL is http://127.0.0.1:PORT/PATH.
    let after_scheme = &receiver.url["http://".len()..];
    let path = &after_scheme[after_scheme.find('/').unwrap()..];
    let id = cluster.signup("rest@example.com");
    wait_delivered(&cluster, &id, 1);
    cluster.sign_in(&id);
    cluster.sign_in(&id);
    // minimal sends id and email: a confirmation changes neither.
    cluster.confirm_email(&id);
    cluster.change_email(&id, "rest-new@example.com");
    wait_delivered(&cluster, &id, 2);
    cluster.delete_user(&id);
    wait_delivered(&cluster, &id, 3);
    let calls = calls_for(&receiver, &id);
    assert_eq!(
        calls,
        vec![
            (
                "POST".into(),
                path.to_string(),
                json!({"id": id, "email": "rest@example.com"}).to_string()
            ),
            (
                "PATCH".into(),
                format!("{path}/{id}"),
                json!({"id": id, "email": "rest-new@example.com"}).to_string()
            ),
            ("DELETE".into(), format!("{path}/{id}"), String::new()),
        ]
    );
    let types: Vec<String> = cluster
        .connect("supabase_admin")
        .query(
            "SELECT event_type FROM new_user_hook.deliveries WHERE user_id = $1::text::uuid ORDER BY created_at",
            &[&id],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(types, ["created", "updated", "deleted"]);
    // Every request of the user carried its own event's id, and a signature base.
    let ids: Vec<String> = receiver
        .accepted()
        .iter()
        .filter(|r| r.path.contains(&id) || r.body.contains(&id))
        .map(|r| r.header("webhook-id").unwrap().to_string())
        .collect();
    assert_eq!(ids.len(), 3);
    assert!(ids[0] != ids[1] && ids[1] != ids[2], "{ids:?}");
}

#[test]
fn one_transaction_makes_one_event_for_a_user_with_the_committed_state() {
    let receiver = Receiver::ok();
    let cluster = Cluster::hooked_to(&receiver.url, &[ALL]);
    let mut gotrue = cluster.connect("supabase_auth_admin");

    // Several updates in one transaction: one event, the committed state.
    let id = cluster.signup("many@example.com");
    wait_delivered(&cluster, &id, 1);
    gotrue
        .batch_execute(&format!(
            "BEGIN;
             UPDATE users SET email = 'many-1@example.com' WHERE id = '{id}';
             UPDATE users SET last_sign_in_at = now() WHERE id = '{id}';
             UPDATE users SET email = 'many-2@example.com' WHERE id = '{id}';
             COMMIT;"
        ))
        .unwrap();
    // Changed and changed back: nothing to tell.
    gotrue
        .batch_execute(&format!(
            "BEGIN;
             UPDATE users SET email = 'elsewhere@example.com' WHERE id = '{id}';
             UPDATE users SET email = 'many-2@example.com' WHERE id = '{id}';
             COMMIT;"
        ))
        .unwrap();
    wait_delivered(&cluster, &id, 2);

    // Created and updated in one transaction: only created, with the update in it.
    gotrue
        .batch_execute(&format!(
            "BEGIN; {}; UPDATE users SET email = 'both-final@example.com' WHERE email = 'both2@example.com'; COMMIT;",
            insert_users(&[("email", "'both2@example.com'")])
        ))
        .unwrap();
    let both: String = gotrue
        .query_one(
            "SELECT id::text FROM users WHERE email = 'both-final@example.com'",
            &[],
        )
        .unwrap()
        .get(0);
    // Created and deleted in one transaction: nothing at all.
    gotrue
        .batch_execute(&format!(
            "BEGIN; {}; DELETE FROM users WHERE email = 'ghost@example.com'; COMMIT;",
            insert_users(&[("email", "'ghost@example.com'")])
        ))
        .unwrap();
    // Updated and deleted in one transaction: only deleted.
    let doomed = cluster.signup("doomed@example.com");
    wait_delivered(&cluster, &doomed, 1);
    gotrue
        .batch_execute(&format!(
            "BEGIN; UPDATE users SET email = 'doomed-2@example.com' WHERE id = '{doomed}';
             DELETE FROM users WHERE id = '{doomed}'; COMMIT;"
        ))
        .unwrap();
    wait_delivered(&cluster, &both, 1);
    wait_delivered(&cluster, &doomed, 2);

    let calls = calls_for(&receiver, &id);
    assert_eq!(calls.len(), 2, "{calls:?}");
    assert_eq!(calls[1].0, "PATCH");
    assert_eq!(
        serde_json::from_str::<Value>(&calls[1].2).unwrap()["email"],
        "many-2@example.com"
    );
    let calls = calls_for(&receiver, &both);
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert_eq!(calls[0].0, "POST");
    assert!(calls[0].2.contains("both-final@example.com"), "{calls:?}");
    let calls = calls_for(&receiver, &doomed);
    assert_eq!(
        calls.iter().map(|c| c.0.as_str()).collect::<Vec<_>>(),
        ["POST", "DELETE"]
    );
    let ghosts: i64 = cluster
        .one_row(
            "SELECT count(*) FROM (SELECT record FROM new_user_hook.outbox
                                   UNION ALL SELECT record FROM new_user_hook.log_0
                                   UNION ALL SELECT record FROM new_user_hook.log_1) e
              WHERE record->>'email' LIKE 'ghost%'",
        )
        .get(0);
    assert_eq!(ghosts, 0);
    assert!(
        !receiver
            .requests()
            .iter()
            .any(|r| r.body.contains("ghost@")),
        "a user created and deleted in one transaction was announced"
    );
}

#[test]
fn the_supabase_format_sends_update_and_delete_as_database_webhooks_and_a_soft_delete_is_a_deletion(
) {
    let receiver = Receiver::ok();
    let cluster = Cluster::hooked_to(
        &receiver.url,
        &[
            ALL,
            ("payload_format", "supabase"),
            ("fields", "id,email,email_confirmed_at,updated_at"),
        ],
    );
    let id = cluster.signup("hooks@example.com");
    wait_delivered(&cluster, &id, 1);
    cluster.sign_in(&id);
    cluster.confirm_email(&id);
    wait_delivered(&cluster, &id, 2);
    cluster.soft_delete(&id);
    wait_delivered(&cluster, &id, 3);
    // A soft-deleted user is gone for the backend: later changes, and the hard
    // delete that may follow, are not announced again.
    admin_update(&cluster, &id);
    cluster.delete_user(&id);
    let bodies = bodies_for(&receiver, &id);
    assert_eq!(bodies.len(), 3, "{bodies:#?}");
    assert_eq!(bodies[0]["type"], "INSERT");
    let update = &bodies[1];
    assert_eq!(update["type"], "UPDATE");
    assert_eq!(update["table"], "users");
    assert_eq!(update["schema"], "auth");
    assert!(
        update["record"]["email_confirmed_at"].is_string(),
        "{update}"
    );
    assert!(
        update["old_record"]["email_confirmed_at"].is_null(),
        "{update}"
    );
    assert_eq!(update["old_record"]["email"], "hooks@example.com");
    let delete = &bodies[2];
    assert_eq!(delete["type"], "DELETE");
    assert_eq!(delete["record"], Value::Null);
    // The user as it was, never the obfuscated values as if they were real.
    assert_eq!(delete["old_record"]["id"], id.as_str());
    assert_eq!(delete["old_record"]["email"], "hooks@example.com");
    // Nothing else is queued for the user after the soft delete.
    wait_for("the last changes to commit", WITHIN, || {
        (cluster
            .one_row(&format!(
                "SELECT count(*) FROM auth.users WHERE id = '{id}'"
            ))
            .get::<_, i64>(0)
            == 0)
            .then_some(())
    });
    assert_eq!(event_count(&cluster, &id), 3);
}

/// An update of fields every format can send, as an admin would make it.
fn admin_update(cluster: &Cluster, id: &str) {
    cluster
        .connect("supabase_auth_admin")
        .batch_execute(&format!(
            "UPDATE users SET raw_user_meta_data = '{{\"after\": true}}', email_confirmed_at = NULL WHERE id = '{id}'"
        ))
        .unwrap();
}

#[test]
fn the_standard_format_names_the_change_in_its_type() {
    let receiver = Receiver::ok();
    let cluster = Cluster::hooked_to(
        &receiver.url,
        &[ALL, ("payload_format", "standard"), ("fields", "id,email")],
    );
    let id = cluster.signup("std@example.com");
    wait_delivered(&cluster, &id, 1);
    cluster.change_email(&id, "std-2@example.com");
    wait_delivered(&cluster, &id, 2);
    cluster.delete_user(&id);
    wait_delivered(&cluster, &id, 3);
    let bodies = bodies_for(&receiver, &id);
    let types: Vec<&str> = bodies.iter().map(|b| b["type"].as_str().unwrap()).collect();
    assert_eq!(types, ["user.created", "user.updated", "user.deleted"]);
    assert_eq!(
        bodies[1]["data"],
        json!({"id": id, "email": "std-2@example.com"})
    );
    assert_eq!(
        bodies[2]["data"],
        json!({"id": id, "email": "std-2@example.com"})
    );
}

#[test]
fn a_later_event_of_a_user_waits_while_the_earlier_one_is_retried() {
    // The creation fails three times; the update, committed meanwhile, must not overtake it.
    let receiver = Receiver::start(|n, r| {
        if r.method == "POST" && n < 3 {
            Reply::Status(503)
        } else {
            Reply::Status(200)
        }
    });
    let cluster = Cluster::hooked_to(&receiver.url, &[ALL, ("retry_base_ms", "300")]);
    let id = cluster.signup("first@example.com");
    receiver.wait_for_requests(1, WITHIN);
    cluster.change_email(&id, "second@example.com");
    wait_delivered(&cluster, &id, 2);
    let all = receiver.requests();
    let methods: Vec<(&str, Option<u16>)> = all
        .iter()
        .map(|r| (r.method.as_str(), r.answered))
        .collect();
    assert_eq!(
        methods,
        [
            ("POST", Some(503)),
            ("POST", Some(503)),
            ("POST", Some(503)),
            ("POST", Some(200)),
            ("PATCH", Some(200))
        ]
    );
    assert!(all[4].at >= all[3].answered_at.unwrap());
}

#[test]
fn a_users_events_stay_in_order_under_concurrency_32_with_retries_and_users_stay_independent() {
    // Every third request fails: retries everywhere, 32 requests in flight.
    let receiver = Receiver::start(|n, _| Reply::Status(if n % 3 == 1 { 503 } else { 204 }));
    let cluster = Cluster::hooked_to(
        &receiver.url,
        &[
            ALL,
            ("retry_base_ms", "50"),
            ("retry_max_ms", "200"),
            ("breaker_failures", "0"),
        ],
    );
    let users = 120;
    let ids: Vec<String> = (0..users)
        .map(|i| cluster.signup(&format!("order-{i}@example.com")))
        .collect();
    for (i, id) in ids.iter().enumerate() {
        cluster.change_email(id, &format!("order-{i}-b@example.com"));
    }
    for id in &ids {
        cluster.delete_user(id);
    }
    for id in &ids {
        wait_delivered(&cluster, id, 3);
    }
    // Per user: the requests of an event start after the previous event was accepted.
    let all = receiver.requests();
    let mut per_user: HashMap<String, Vec<&Received>> = HashMap::new();
    for r in &all {
        let id = ids
            .iter()
            .find(|id| r.path.contains(id.as_str()) || r.body.contains(id.as_str()))
            .expect("a request for a known user");
        per_user.entry(id.clone()).or_default().push(r);
    }
    for (id, requests) in &per_user {
        let order = ["POST", "PATCH", "DELETE"];
        let mut stage = 0;
        let mut accepted_at = None;
        for r in requests {
            let step = order.iter().position(|m| *m == r.method).unwrap();
            assert!(
                step == stage,
                "user {id}: {} sent while at {} ({:?})",
                r.method,
                order[stage],
                requests
                    .iter()
                    .map(|r| (&r.method, r.answered))
                    .collect::<Vec<_>>()
            );
            if let Some(at) = accepted_at {
                assert!(
                    r.at >= at,
                    "user {id}: {} sent before the earlier event was accepted",
                    r.method
                );
            }
            if r.answered.is_some_and(|s| s < 300) {
                stage += 1;
                accepted_at = r.answered_at;
            }
        }
        assert_eq!(stage, 3, "user {id} got all three events");
    }
}

#[test]
fn the_events_setting_refuses_bad_values_and_applies_at_a_reload() {
    let receiver = Receiver::ok();
    let cluster = Cluster::hooked_to(&receiver.url, &[]);
    let mut admin = cluster.connect("supabase_admin");
    let err = admin
        .batch_execute("ALTER SYSTEM SET pg_new_user_hook.events = 'created, signed_in'")
        .unwrap_err();
    let message = err.as_db_error().unwrap().to_string();
    assert!(
        message.contains("\"signed_in\" is not an event type; allowed: created, updated, deleted"),
        "{message}"
    );
    let id = cluster.signup("reload@example.com");
    wait_delivered(&cluster, &id, 1);
    cluster.change_email(&id, "reload-2@example.com");
    cluster.configure(&[("events", "created,updated")]);
    // The setting is read when the changing transaction commits, by new sessions at once.
    wait_for("a new session to see the setting", WITHIN, || {
        let shown: String = cluster
            .connect("supabase_auth_admin")
            .query_one("SHOW pg_new_user_hook.events", &[])
            .unwrap()
            .get(0);
        (shown == "created,updated").then_some(())
    });
    cluster.change_email(&id, "reload-3@example.com");
    wait_delivered(&cluster, &id, 2);
    cluster.delete_user(&id);
    let calls = calls_for(&receiver, &id);
    assert_eq!(calls.len(), 2, "{calls:?}");
    assert!(calls[1].2.contains("reload-3@example.com"), "{calls:?}");
    assert_eq!(
        event_count(&cluster, &id),
        2,
        "deletions are not configured"
    );
}

#[test]
fn updates_and_deletions_carry_no_credential_in_any_format() {
    let receiver = Receiver::ok();
    let cluster = Cluster::hooked_to(&receiver.url, &[ALL, ("payload_format", "supabase")]);
    let id = cluster.signup("secretive@example.com");
    // Every credential column set; then an update and a deletion.
    cluster
        .connect("supabase_auth_admin")
        .batch_execute(&format!(
            "UPDATE users SET confirmation_token = 'TOKEN-1', recovery_token = 'TOKEN-2',
                    email_change_token_new = 'TOKEN-3', reauthentication_token = 'TOKEN-4',
                    raw_app_meta_data = raw_app_meta_data || '{{\"secret\": \"TOKEN-5\"}}'
              WHERE id = '{id}'"
        ))
        .unwrap();
    cluster.change_email(&id, "secretive-2@example.com");
    cluster.delete_user(&id);
    wait_delivered(&cluster, &id, 3);
    for format in ["supabase", "standard", "fields"] {
        cluster.configure(&[("payload_format", format)]);
        let requeued: i64 = cluster
            .one_row("SELECT count(*) FROM new_user_hook.deliveries d WHERE new_user_hook.redeliver(d.id)")
            .get(0);
        assert_eq!(requeued, 3);
        wait_delivered(&cluster, &id, 3);
    }
    let requests = receiver.requests();
    assert!(requests.len() >= 12, "{}", requests.len());
    for r in &requests {
        assert!(
            !r.body.contains("TOKEN-") && !r.body.contains("$2a$10$"),
            "a credential left the database: {}",
            r.body
        );
    }
    // The update's old_record and the deletion's record are the allow-listed user.
    let update = requests
        .iter()
        .map(|r| r.json())
        .find(|b| b["type"] == "UPDATE")
        .unwrap();
    assert_eq!(update["old_record"]["email"], "secretive@example.com");
    assert!(
        update["old_record"].get("encrypted_password").is_none(),
        "{update}"
    );
}

/// The event of a transaction is decided at its commit, from the user as committed,
/// whatever fired before: `SET CONSTRAINTS ALL IMMEDIATE` (Django's
/// check_constraints issues it) makes the triggers fire mid-transaction, and a
/// savepoint may roll back what they saw.
#[test]
fn the_event_reflects_the_commit_whatever_the_constraint_mode_and_savepoints() {
    let receiver = Receiver::ok();
    let cluster = Cluster::hooked_to(&receiver.url, &[ALL]);
    let mut gotrue = cluster.connect("supabase_auth_admin");
    let email_of = |calls: &[(String, String, String)], n: usize| {
        serde_json::from_str::<Value>(&calls[n].2).unwrap()["email"].clone()
    };

    // Update, IMMEDIATE, update: the second update is the event.
    let twice = cluster.signup("imm-a@example.com");
    wait_delivered(&cluster, &twice, 1);
    gotrue
        .batch_execute(&format!(
            "BEGIN;
             UPDATE users SET email = 'imm-b@example.com' WHERE id = '{twice}';
             SET CONSTRAINTS ALL IMMEDIATE;
             UPDATE users SET email = 'imm-c@example.com' WHERE id = '{twice}';
             COMMIT;"
        ))
        .unwrap();

    // An update seen by an IMMEDIATE firing, then rolled back to a savepoint; another
    // update after it: that one is the event.
    let rolled = cluster.signup("sp-a@example.com");
    wait_delivered(&cluster, &rolled, 1);
    gotrue
        .batch_execute(&format!(
            "BEGIN;
             SAVEPOINT s;
             UPDATE users SET email = 'sp-b@example.com' WHERE id = '{rolled}';
             SET CONSTRAINTS ALL IMMEDIATE;
             ROLLBACK TO SAVEPOINT s;
             SET CONSTRAINTS ALL DEFERRED;
             UPDATE users SET email = 'sp-c@example.com' WHERE id = '{rolled}';
             COMMIT;"
        ))
        .unwrap();

    // Update, IMMEDIATE, delete: the user is gone, the backend must delete it.
    let gone = cluster.signup("imm-gone@example.com");
    wait_delivered(&cluster, &gone, 1);
    gotrue
        .batch_execute(&format!(
            "BEGIN;
             UPDATE users SET email = 'imm-gone-2@example.com' WHERE id = '{gone}';
             SET CONSTRAINTS ALL IMMEDIATE;
             DELETE FROM users WHERE id = '{gone}';
             COMMIT;"
        ))
        .unwrap();

    // Insert, IMMEDIATE, update: the creation carries the committed email.
    gotrue
        .batch_execute(&format!(
            "BEGIN; {};
             SET CONSTRAINTS ALL IMMEDIATE;
             UPDATE users SET email = 'imm-new-final@example.com' WHERE email = 'imm-new@example.com';
             COMMIT;",
            insert_users(&[("email", "'imm-new@example.com'")])
        ))
        .unwrap();
    let created: String = gotrue
        .query_one(
            "SELECT id::text FROM users WHERE email = 'imm-new-final@example.com'",
            &[],
        )
        .unwrap()
        .get(0);

    // A change made only inside a savepoint that is rolled back is no event at all.
    let untouched = cluster.signup("sp-only@example.com");
    wait_delivered(&cluster, &untouched, 1);
    gotrue
        .batch_execute(&format!(
            "BEGIN;
             SAVEPOINT s;
             UPDATE users SET email = 'sp-only-2@example.com' WHERE id = '{untouched}';
             SET CONSTRAINTS ALL IMMEDIATE;
             ROLLBACK TO SAVEPOINT s;
             COMMIT;"
        ))
        .unwrap();

    wait_delivered(&cluster, &twice, 2);
    wait_delivered(&cluster, &rolled, 2);
    wait_delivered(&cluster, &gone, 2);
    wait_delivered(&cluster, &created, 1);

    let calls = calls_for(&receiver, &twice);
    assert_eq!(calls.len(), 2, "{calls:?}");
    assert_eq!(calls[1].0, "PATCH");
    assert_eq!(email_of(&calls, 1), "imm-c@example.com");

    let calls = calls_for(&receiver, &rolled);
    assert_eq!(calls.len(), 2, "{calls:?}");
    assert_eq!(calls[1].0, "PATCH");
    assert_eq!(email_of(&calls, 1), "sp-c@example.com");

    let calls = calls_for(&receiver, &gone);
    assert_eq!(
        calls.iter().map(|c| c.0.as_str()).collect::<Vec<_>>(),
        ["POST", "DELETE"],
        "{calls:?}"
    );

    let calls = calls_for(&receiver, &created);
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert_eq!(calls[0].0, "POST");
    assert_eq!(email_of(&calls, 0), "imm-new-final@example.com");

    // Every other event was delivered after the rolled-back one's transaction committed.
    assert_eq!(
        event_count(&cluster, &untouched),
        1,
        "a rolled-back change made an event"
    );
    assert!(
        !receiver
            .requests()
            .iter()
            .any(|r| r.body.contains("sp-only-2@")),
        "a change rolled back to a savepoint was announced"
    );
}

/// A user deleted and inserted again with the same id in one transaction (a
/// "replace" done as DELETE + INSERT) still exists when it commits: an update, not a
/// deletion.
#[test]
fn a_user_deleted_and_inserted_again_in_one_transaction_is_updated() {
    let receiver = Receiver::ok();
    let cluster = Cluster::hooked_to(&receiver.url, &[ALL]);
    let id = cluster.signup("replaced@example.com");
    wait_delivered(&cluster, &id, 1);
    let quoted = format!("'{id}'");
    cluster
        .connect("supabase_auth_admin")
        .batch_execute(&format!(
            "BEGIN;
             DELETE FROM users WHERE id = '{id}';
             {};
             COMMIT;",
            insert_users(&[("id", &quoted), ("email", "'replaced-2@example.com'")])
        ))
        .unwrap();
    wait_delivered(&cluster, &id, 2);
    let calls = calls_for(&receiver, &id);
    assert_eq!(
        calls.iter().map(|c| c.0.as_str()).collect::<Vec<_>>(),
        ["POST", "PATCH"],
        "{calls:?}"
    );
    assert_eq!(
        serde_json::from_str::<Value>(&calls[1].2).unwrap()["email"],
        "replaced-2@example.com"
    );
}

/// An event's time (`created_at`, the `standard` format's `timestamp`) is its
/// transaction's commit, not its start.
#[test]
fn an_events_time_is_its_commit() {
    let cluster = Cluster::with_hook(&[]);
    let mut gotrue = cluster.connect("supabase_auth_admin");
    gotrue
        .batch_execute(&format!(
            "BEGIN; {}; SELECT pg_sleep(2); COMMIT;",
            insert_users(&[("email", "'slow-commit@example.com'")])
        ))
        .unwrap();
    let after_start: f64 = cluster
        .one_row(
            "SELECT extract(epoch FROM d.created_at - u.created_at)::float8
               FROM new_user_hook.deliveries d JOIN auth.users u ON u.id = d.user_id
              WHERE u.email = 'slow-commit@example.com'",
        )
        .get(0);
    assert!(
        after_start >= 2.0,
        "the event's time is {after_start} s after the transaction started, before its commit"
    );
}
