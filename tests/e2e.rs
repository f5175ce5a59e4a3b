//! End to end: real committed signups (GoTrue's statements, as supabase_auth_admin,
//! on the real Supabase Auth schema) delivered by the preloaded worker to an HTTP
//! receiver on 127.0.0.1.

mod common;

use common::{cpu_time, wait_for, Cluster, Receiver, Reply};
use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const WITHIN: Duration = Duration::from_secs(30);

fn hooked(receiver: &Receiver, extra: &[(&str, &str)]) -> Cluster {
    let cluster = Cluster::with_hook(&[]);
    let mut settings = vec![("url", receiver.url.as_str()), ("api_key", "test-key-123")];
    settings.extend_from_slice(extra);
    cluster.configure(&settings);
    cluster
}

#[test]
fn a_signup_is_delivered_at_commit_with_exact_body_and_headers() {
    let receiver = Receiver::ok();
    let cluster = hooked(&receiver, &[]);
    // Warm-up: the worker has picked up the new URL once this is delivered.
    let warm = cluster.signup("warmup@example.com");
    cluster.wait_for_event(&warm, "status = 'delivered'", WITHIN);

    let committed = Instant::now();
    let id = cluster.signup("alice@example.com");
    let requests = receiver.wait_for_requests(2, WITHIN);
    let latency = requests[1].at.saturating_duration_since(committed);
    // The fallback poll is 5 s: arriving well before proves the commit woke the worker.
    assert!(
        latency < Duration::from_secs(2),
        "delivered {latency:?} after commit"
    );
    eprintln!("commit → receipt: {latency:?}");

    let r = &requests[1];
    assert_eq!(r.method, "POST");
    assert_eq!(r.path, "/users");
    assert_eq!(
        r.json(),
        serde_json::json!({"id": id, "email": "alice@example.com"})
    );
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.header("x-api-key"), Some("test-key-123"));
    assert_eq!(
        r.header("user-agent"),
        Some(concat!("pg_new_user_hook/", env!("CARGO_PKG_VERSION")))
    );
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let ts: i64 = r.header("webhook-timestamp").unwrap().parse().unwrap();
    assert!((now - ts).abs() < 60, "webhook-timestamp {ts} vs now {now}");

    cluster.wait_for_event(&id, "status = 'delivered'", WITHIN);
    let row = cluster.one_row(&format!(
        "SELECT id::text, attempts, last_status_code, last_error, delivered_at IS NOT NULL, next_attempt_at
           FROM new_user_hook.deliveries WHERE user_id = '{id}'"
    ));
    assert_eq!(
        r.header("webhook-id"),
        Some(row.get::<_, String>(0).as_str())
    );
    assert_eq!(row.get::<_, i32>(1), 1);
    assert_eq!(row.get::<_, Option<i32>>(2), Some(200));
    assert_eq!(row.get::<_, Option<String>>(3), None);
    assert!(row.get::<_, bool>(4));
    assert_eq!(row.get::<_, Option<SystemTime>>(5), None);
}

#[test]
fn a_rolled_back_signup_sends_nothing() {
    let receiver = Receiver::ok();
    let cluster = hooked(&receiver, &[]);
    let mut gotrue = cluster.connect("supabase_auth_admin");
    let rolled_back = common::signup_sql("ghost@example.com").replace("COMMIT;", "ROLLBACK;");
    gotrue.batch_execute(&rolled_back).unwrap();
    // A committed signup after it: once it arrives, the rolled-back one would have too.
    let id = cluster.signup("real@example.com");
    cluster.wait_for_event(&id, "status = 'delivered'", WITHIN);
    let requests = receiver.requests();
    assert_eq!(requests.len(), 1, "{requests:?}");
    assert_eq!(requests[0].json()["email"], "real@example.com");
    let events: i64 = cluster
        .one_row("SELECT count(*) FROM new_user_hook.deliveries")
        .get(0);
    assert_eq!(events, 1);
}

#[test]
fn the_event_reflects_the_user_as_committed() {
    let receiver = Receiver::ok();
    let cluster = hooked(&receiver, &[]);
    let mut gotrue = cluster.connect("supabase_auth_admin");
    // GoTrue-like: INSERT then UPDATE in the same transaction, plus a phone user.
    let phone_user = common::insert_users(&[
        ("phone", "'15551234567'"),
        ("raw_app_meta_data", r#"'{"provider":"phone"}'"#),
    ]);
    let sql = common::signup_sql("before@example.com").replace(
        "COMMIT;",
        &format!(
            "UPDATE users SET email = 'after@example.com' WHERE email = 'before@example.com';
             {phone_user};
             COMMIT;"
        ),
    );
    gotrue.batch_execute(&sql).unwrap();
    let requests = receiver.wait_for_requests(2, WITHIN);
    let mut emails: Vec<serde_json::Value> =
        requests.iter().map(|r| r.json()["email"].clone()).collect();
    emails.sort_by_key(|e| e.to_string());
    assert_eq!(
        emails,
        vec![
            serde_json::json!("after@example.com"),
            serde_json::Value::Null
        ]
    );
    for r in &requests {
        let keys: Vec<String> = r.json().as_object().unwrap().keys().cloned().collect();
        assert_eq!(keys, vec!["email", "id"]);
    }
}

#[test]
fn server_errors_are_retried_until_delivered() {
    let receiver = Receiver::start(|n, _| {
        if n == 0 {
            Reply::Status(500)
        } else {
            Reply::Status(200)
        }
    });
    let cluster = hooked(&receiver, &[("retry_base_ms", "100")]);
    let id = cluster.signup("retry@example.com");
    cluster.wait_for_event(
        &id,
        "status = 'delivered' AND attempts = 2 AND last_status_code = 200",
        WITHIN,
    );
    let requests = receiver.requests();
    assert_eq!(requests.len(), 2);
    assert_eq!(
        requests[0].header("webhook-id"),
        requests[1].header("webhook-id")
    );
    assert!(requests[1].at.duration_since(requests[0].at) >= Duration::from_millis(80));
}

#[test]
fn retry_after_is_honoured() {
    let receiver = Receiver::start(|n, _| {
        if n == 0 {
            Reply::StatusWith(429, "Retry-After", "2".into())
        } else {
            Reply::Status(200)
        }
    });
    let cluster = hooked(&receiver, &[("retry_base_ms", "50")]);
    let id = cluster.signup("slowdown@example.com");
    cluster.wait_for_event(&id, "status = 'delivered'", WITHIN);
    let requests = receiver.requests();
    assert_eq!(requests.len(), 2);
    let gap = requests[1].at.duration_since(requests[0].at);
    assert!(
        gap >= Duration::from_millis(1900),
        "retried after {gap:?} despite Retry-After: 2"
    );
}

#[test]
fn client_errors_fail_at_once_with_the_reason() {
    let receiver =
        Receiver::start(|_, _| Reply::StatusWith(400, "Content-Type", "application/json".into()));
    let cluster = hooked(&receiver, &[("retry_base_ms", "50")]);
    let id = cluster.signup("rejected@example.com");
    cluster.wait_for_event(&id, "status = 'failed'", WITHIN);
    let row = cluster.one_row(&format!(
        "SELECT attempts, last_status_code, last_error, next_attempt_at IS NULL FROM new_user_hook.deliveries WHERE user_id = '{id}'"
    ));
    assert_eq!(row.get::<_, i32>(0), 1);
    assert_eq!(row.get::<_, Option<i32>>(1), Some(400));
    let error: String = row.get(2);
    assert!(error.starts_with("HTTP 400 Bad Request"), "{error}");
    assert!(error.contains("rejected by test receiver"), "{error}");
    assert!(
        row.get::<_, bool>(3),
        "a failed event is not scheduled again"
    );
    assert_eq!(receiver.count(), 1);
    let status = cluster.one_row("SELECT failed, last_error FROM new_user_hook.status");
    assert_eq!(status.get::<_, i64>(0), 1);
    assert!(status.get::<_, String>(1).contains("HTTP 400"));
}

#[test]
fn a_backend_that_is_down_gets_the_event_when_it_comes_up() {
    let port = common::closed_port();
    let cluster = Cluster::with_hook(&[]);
    cluster.configure(&[
        ("url", &format!("http://127.0.0.1:{port}/users")),
        ("retry_base_ms", "100"),
        ("retry_max_ms", "300"),
    ]);
    let id = cluster.signup("patient@example.com");
    cluster.wait_for_event(
        &id,
        "status = 'pending' AND attempts >= 2 AND last_error LIKE 'connection refused%'",
        WITHIN,
    );
    let receiver = Receiver::start_on(port, |_, _| Reply::Status(204));
    cluster.wait_for_event(
        &id,
        "status = 'delivered' AND last_status_code = 204",
        WITHIN,
    );
    assert_eq!(receiver.count(), 1);
    assert!(
        cluster
            .log()
            .contains("delivery failing: connection refused"),
        "the outage is logged"
    );
}

#[test]
fn a_backend_that_never_answers_times_out_and_is_retried() {
    let receiver = Receiver::start(|n, _| {
        if n < 2 {
            Reply::Hang
        } else {
            Reply::Status(200)
        }
    });
    let cluster = hooked(
        &receiver,
        &[("timeout_ms", "300"), ("retry_base_ms", "100")],
    );
    let id = cluster.signup("hang@example.com");
    cluster.wait_for_event(&id, "last_error LIKE '%within 300 ms%'", WITHIN);
    cluster.wait_for_event(&id, "status = 'delivered' AND attempts = 3", WITHIN);
    let ids: HashSet<String> = receiver
        .requests()
        .iter()
        .map(|r| r.header("webhook-id").unwrap().to_string())
        .collect();
    assert_eq!(ids.len(), 1, "every retry carries the same webhook-id");
}

#[test]
fn redeliver_sends_the_same_event_again() {
    let receiver = Receiver::ok();
    let cluster = hooked(&receiver, &[]);
    let id = cluster.signup("again@example.com");
    cluster.wait_for_event(&id, "status = 'delivered'", WITHIN);
    let mut admin = cluster.connect("supabase_admin");
    let event: String = admin
        .query_one(
            "SELECT id::text FROM new_user_hook.deliveries WHERE user_id = $1::text::uuid",
            &[&id],
        )
        .unwrap()
        .get(0);
    let requeued: bool = admin
        .query_one("SELECT new_user_hook.redeliver($1::text::uuid)", &[&event])
        .unwrap()
        .get(0);
    assert!(requeued);
    let requests = receiver.wait_for_requests(2, WITHIN);
    assert_eq!(requests[0].header("webhook-id"), Some(event.as_str()));
    assert_eq!(requests[1].header("webhook-id"), Some(event.as_str()));
    assert_eq!(requests[0].body, requests[1].body);
}

#[test]
fn an_unset_or_malformed_url_queues_events_until_fixed() {
    let cluster = Cluster::with_hook(&[]);
    let id = cluster.signup("early@example.com");
    let problem: String = cluster
        .one_row("SELECT problem FROM new_user_hook.status")
        .get(0);
    assert!(
        problem.contains("pg_new_user_hook.url is not set"),
        "{problem}"
    );

    cluster.configure(&[("url", "localhost:3000/users")]);
    wait_for("the malformed URL to be reported", WITHIN, || {
        let row = cluster.one_row("SELECT problem, last_error FROM new_user_hook.status");
        let problem: Option<String> = row.get(0);
        let last_error: Option<String> = row.get(1);
        (problem
            .as_deref()
            .is_some_and(|p| p.contains("is not a valid URL"))
            && last_error
                .as_deref()
                .is_some_and(|p| p.contains("is not a valid URL")))
        .then_some(())
    });
    wait_for("the malformed URL in the server log", WITHIN, || {
        cluster
            .log()
            .contains("pg_new_user_hook.url = 'localhost:3000/users' is not a valid URL")
            .then_some(())
    });
    let worker = cluster.worker_pid().expect("worker running");

    let receiver = Receiver::ok();
    cluster.configure(&[("url", &receiver.url)]);
    cluster.wait_for_event(&id, "status = 'delivered' AND attempts = 1", WITHIN);
    assert_eq!(
        cluster.worker_pid(),
        Some(worker),
        "the reload did not restart the worker"
    );
    let problem: Option<String> = cluster
        .one_row("SELECT problem FROM new_user_hook.status")
        .get(0);
    assert_eq!(problem, None);
}

#[test]
fn a_server_crash_in_the_middle_of_a_backlog_loses_nothing() {
    const USERS: usize = 300;
    const ANSWERED_BEFORE_CRASH: usize = 20;
    let (receiver, gate) = Receiver::holding_after(ANSWERED_BEFORE_CRASH);
    let mut cluster = hooked(&receiver, &[("concurrency", "2")]);
    let mut gotrue = cluster.connect("supabase_auth_admin");
    let mut ids = HashSet::new();
    let insert = common::insert_users(&[
        ("email", "$1"),
        ("raw_app_meta_data", r#"'{"provider":"email"}'"#),
    ]) + " RETURNING id::text";
    let mut tx = gotrue.transaction().unwrap();
    for i in 0..USERS {
        let row = tx
            .query_one(&insert, &[&format!("backlog{i}@example.com")])
            .unwrap();
        ids.insert(row.get::<_, String>(0));
    }
    tx.commit().unwrap();
    drop(gotrue);
    receiver.wait_for_requests(ANSWERED_BEFORE_CRASH + 1, WITHIN);
    cluster.crash();
    cluster.start();
    gate.open();
    wait_for(
        "every user delivered after the crash",
        Duration::from_secs(60),
        || {
            let n: i64 = cluster
                .one_row("SELECT count(*) FROM new_user_hook.deliveries WHERE status = 'delivered'")
                .get(0);
            (n as usize == USERS).then_some(())
        },
    );
    let mut by_user: HashMap<String, HashSet<String>> = HashMap::new();
    for r in receiver.requests() {
        by_user
            .entry(r.json()["id"].as_str().unwrap().to_string())
            .or_default()
            .insert(r.header("webhook-id").unwrap().to_string());
    }
    let delivered: HashSet<String> = by_user.keys().cloned().collect();
    assert_eq!(delivered, ids, "every committed user reached the backend");
    assert!(
        by_user.values().all(|w| w.len() == 1),
        "duplicates reuse the same webhook-id"
    );
    eprintln!(
        "crash test: {USERS} users, {} requests ({} duplicates after the crash)",
        receiver.count(),
        receiver.count() - USERS
    );
}

#[test]
fn a_terminated_worker_comes_back_and_delivers() {
    let receiver = Receiver::ok();
    let cluster = hooked(&receiver, &[]);
    let first = wait_for("the worker", WITHIN, || cluster.worker_pid());
    cluster
        .connect("supabase_admin")
        .batch_execute(&format!("SELECT pg_terminate_backend({first})"))
        .unwrap();
    let id = cluster.signup("during-restart@example.com");
    let second = wait_for("a new worker", WITHIN, || {
        cluster.worker_pid().filter(|p| *p != first)
    });
    assert_ne!(first, second);
    cluster.wait_for_event(&id, "status = 'delivered'", WITHIN);
}

#[test]
fn without_preload_create_extension_warns_and_status_says_why() {
    let cluster = Cluster::new(&["shared_preload_libraries = ''"]);
    let mut admin = cluster.connect("supabase_admin");
    let notices = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut admin = {
        let notices = notices.clone();
        let mut config = postgres::Config::new();
        config
            .host("127.0.0.1")
            .port(cluster.port)
            .user("supabase_admin")
            .dbname("postgres");
        config.notice_callback(move |n| {
            notices
                .lock()
                .unwrap()
                .push(format!("{}|{}", n.message(), n.hint().unwrap_or("")))
        });
        drop(admin.batch_execute("SELECT 1"));
        config.connect(postgres::NoTls).unwrap()
    };
    admin
        .batch_execute("CREATE EXTENSION pg_new_user_hook")
        .unwrap();
    let notices = notices.lock().unwrap().clone();
    assert!(
        notices.iter().any(
            |n| n.contains("not loaded through shared_preload_libraries") && n.contains("restart")
        ),
        "{notices:?}"
    );
    let row = admin
        .query_one(
            "SELECT preloaded, worker_pid, problem FROM new_user_hook.status",
            &[],
        )
        .unwrap();
    assert!(!row.get::<_, bool>(0));
    assert_eq!(row.get::<_, Option<i32>>(1), None);
    assert!(row.get::<_, String>(2).contains("shared_preload_libraries"));
    // Signups still work and are kept.
    admin
        .batch_execute("SELECT new_user_hook.install()")
        .unwrap();
    let id = cluster.signup("kept@example.com");
    let n: i64 = admin
        .query_one("SELECT count(*) FROM new_user_hook.deliveries WHERE user_id = $1::text::uuid AND status = 'pending'", &[&id])
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
}

#[test]
fn shutdown_waits_at_most_the_timeout_for_a_hanging_backend() {
    let hanging = Receiver::start(|_, _| Reply::Hang);
    let mut cluster = hooked(&hanging, &[("timeout_ms", "1500")]);
    let id = cluster.signup("shutdown@example.com");
    hanging.wait_for_requests(1, WITHIN);
    let started = Instant::now();
    cluster.stop();
    let took = started.elapsed();
    assert!(
        took < Duration::from_millis(1500 + 2000),
        "pg_ctl stop -m fast took {took:?}"
    );

    // The interrupted attempt was recorded (or handed back): the event is still pending.
    let receiver = Receiver::ok();
    cluster.start();
    cluster.configure(&[("url", &receiver.url)]);
    cluster.wait_for_event(&id, "status = 'delivered'", WITHIN);
}

#[test]
fn delivered_events_are_deleted_after_the_retention() {
    let receiver = Receiver::ok();
    let cluster = hooked(&receiver, &[]);
    let id = cluster.signup("short-lived@example.com");
    cluster.wait_for_event(&id, "status = 'delivered'", WITHIN);
    let failed = Receiver::start(|_, _| Reply::Status(422));
    cluster.configure(&[("url", &failed.url)]);
    let kept = cluster.signup("kept-failed@example.com");
    cluster.wait_for_event(&kept, "status = 'failed'", WITHIN);

    cluster.configure(&[("retention", "0")]);
    wait_for("the delivered event to be purged", WITHIN, || {
        let n: i64 = cluster
            .one_row("SELECT count(*) FROM new_user_hook.deliveries WHERE status = 'delivered'")
            .get(0);
        (n == 0).then_some(())
    });
    let failed_left: i64 = cluster
        .one_row("SELECT count(*) FROM new_user_hook.deliveries WHERE status = 'failed'")
        .get(0);
    assert_eq!(failed_left, 1, "failed events are kept for redelivery");
}

/// The log's rotation looks at a segment ROTATE_AFTER (5 s) after events are read:
/// one that finds them still in flight gives up until the next look. Here nothing is
/// signed up after them, so only their delivery, moving the position, can bring it.
#[test]
fn a_segment_found_in_flight_is_emptied_once_delivered_without_further_signups() {
    let (receiver, gate) = Receiver::holding_after(0);
    let cluster = hooked(&receiver, &[("retention", "0"), ("timeout_ms", "60000")]);
    let id = cluster.signup("slow-backend@example.com");
    receiver.wait_for_requests(1, WITHIN);
    // Well past both looks at the log, 5 s apart (pointing signups to the other
    // segment, then finding this one's event unresolved).
    std::thread::sleep(Duration::from_secs(16));
    gate.open();
    cluster.wait_for_event(&id, "status = 'delivered'", WITHIN);
    wait_for(
        "the delivered event's segment to be emptied",
        WITHIN,
        || {
            let n: i64 = cluster
                .one_row("SELECT count(*) FROM new_user_hook.deliveries")
                .get(0);
            (n == 0).then_some(())
        },
    );
}

#[test]
fn the_worker_sleeps_when_there_is_nothing_to_do() {
    let receiver = Receiver::ok();
    let cluster = hooked(&receiver, &[]);
    let id = cluster.signup("once@example.com");
    cluster.wait_for_event(&id, "status = 'delivered'", WITHIN);
    let worker = cluster.worker_pid().unwrap();
    let before = cpu_time(worker);
    std::thread::sleep(Duration::from_secs(3));
    let used = cpu_time(worker) - before;
    assert!(
        used < Duration::from_millis(150),
        "an idle worker used {used:?} of CPU in 3 s"
    );
}

/// The webhook-id of each received request, by the user id in its body.
fn webhook_ids(receiver: &Receiver) -> std::collections::HashMap<String, Vec<String>> {
    let mut ids: std::collections::HashMap<String, Vec<String>> = Default::default();
    for r in receiver.requests() {
        let user = r.json()["id"].as_str().unwrap().to_string();
        ids.entry(user)
            .or_default()
            .push(r.header("webhook-id").unwrap().to_string());
    }
    ids
}

#[test]
fn a_bulk_load_with_capture_off_is_not_announced_and_backfill_announces_chosen_users_once() {
    let receiver = Receiver::ok();
    let cluster = hooked(&receiver, &[]);
    for role in ["supabase_auth_admin", "postgres"] {
        let err = cluster
            .connect(role)
            .batch_execute("SET pg_new_user_hook.capture = off")
            .unwrap_err();
        let message = err.as_db_error().unwrap().message().to_string();
        assert!(
            message.contains("permission denied to set parameter \"pg_new_user_hook.capture\""),
            "{role}: {message}"
        );
    }
    // A superuser's session loads 100 users unannounced; a signup meanwhile is announced.
    let mut loader = cluster.connect("supabase_admin");
    let bulk = common::insert_users(&[("email", "'bulk-' || g || '@example.com'")])
        + " FROM generate_series(1, 100) g RETURNING id::text";
    loader
        .batch_execute("SET search_path = auth; SET pg_new_user_hook.capture = off")
        .unwrap();
    let loaded: Vec<String> = loader
        .query(&bulk, &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let live = cluster.signup("live-during-load@example.com");
    receiver.wait_for_requests(1, WITHIN);
    let queued: i64 = cluster
        .one_row("SELECT count(*) FROM new_user_hook.deliveries")
        .get(0);
    assert_eq!(queued, 1, "only the live signup is queued");
    // The setting can be delegated, per role.
    loader
        .batch_execute("GRANT SET ON PARAMETER pg_new_user_hook.capture TO postgres")
        .unwrap();
    cluster
        .connect("postgres")
        .batch_execute("SET pg_new_user_hook.capture = off")
        .unwrap();

    // Backfill ten of them (and the live user, who already has an event): ten queued.
    let mut chosen: Vec<String> = loaded[..10].to_vec();
    chosen.push(live.clone());
    let backfill = "SELECT new_user_hook.backfill($1::text[]::uuid[])";
    let mut admin = cluster.connect("supabase_admin");
    let n: i64 = admin.query_one(backfill, &[&chosen]).unwrap().get(0);
    assert_eq!(n, 10);
    receiver.wait_for_requests(11, WITHIN);
    let n: i64 = admin.query_one(backfill, &[&chosen]).unwrap().get(0);
    assert_eq!(n, 0, "a second backfill queues nothing new");
    let first = webhook_ids(&receiver);
    for user in &loaded[..10] {
        assert_eq!(first.get(user).map(Vec::len), Some(1), "{user}");
    }
    assert_eq!(first[&live].len(), 1);
    // Once the retention has purged those events, a repeat sends the same webhook-ids.
    // The purge takes delivered events only: the worker records an outcome a little
    // after the backend got it.
    for user in &loaded[..10] {
        cluster.wait_for_event(user, "status = 'delivered'", WITHIN);
    }
    admin
        .execute(
            "WITH o AS (DELETE FROM new_user_hook.outbox WHERE user_id = ANY($1::text[]::uuid[])),
                  l0 AS (DELETE FROM new_user_hook.log_0 WHERE user_id = ANY($1::text[]::uuid[]))
             DELETE FROM new_user_hook.log_1 WHERE user_id = ANY($1::text[]::uuid[])",
            &[&loaded[..10].to_vec()],
        )
        .unwrap();
    let n: i64 = admin.query_one(backfill, &[&chosen]).unwrap().get(0);
    assert_eq!(n, 10);
    receiver.wait_for_requests(21, WITHIN);
    for (user, ids) in webhook_ids(&receiver) {
        assert!(ids.iter().all(|id| *id == ids[0]), "{user}: {ids:?}");
    }
    assert_eq!(receiver.count(), 21, "no other user was announced");
    // A wrong table name says what to pass.
    let err = admin
        .batch_execute("SELECT new_user_hook.backfill('{}', 'auth.userz')")
        .unwrap_err();
    assert!(err
        .as_db_error()
        .unwrap()
        .message()
        .contains("table \"auth.userz\" does not exist"));
}

/// The worker reads the log between two snapshots: a transaction that took its id
/// early and commits late (while reads go past it), one prepared and committed
/// seconds later, savepoints and SET CONSTRAINTS ALL IMMEDIATE, and rolled-back
/// signups, from eight sessions at once. Every committed signup is delivered once,
/// none rolled back is.
#[test]
fn concurrent_long_short_and_prepared_signups_are_each_read_once() {
    let receiver = Receiver::ok();
    let cluster = Cluster::with_hook(&["max_prepared_transactions = 64"]);
    cluster.configure(&[("url", receiver.url.as_str())]);
    let until = Instant::now() + Duration::from_secs(8);
    let sessions: Vec<_> = (0..8)
        .map(|session| {
            let mut gotrue = cluster.connect("supabase_auth_admin");
            std::thread::spawn(move || {
                let (mut committed, mut rolled_back, mut prepared) = (vec![], vec![], vec![]);
                let mut i = 0;
                while Instant::now() < until {
                    let email = format!("s{session}-{i}@example.com");
                    let signup = common::signup_sql(&email);
                    let (ending, commits) = match (session + i) % 6 {
                        // Its id taken at the INSERT, committed 0.3 s later.
                        0 => ("SELECT pg_sleep(0.3); COMMIT;".to_string(), true),
                        1 => (
                            "SAVEPOINT a; SET CONSTRAINTS ALL IMMEDIATE; RELEASE a; \
                             SAVEPOINT b; SELECT 1; ROLLBACK TO b; COMMIT;"
                                .to_string(),
                            true,
                        ),
                        2 => ("ROLLBACK;".to_string(), false),
                        3 if i % 4 == 3 => {
                            let gid = format!("signup-{session}-{i}");
                            prepared.push(gid.clone());
                            (format!("PREPARE TRANSACTION '{gid}';"), true)
                        }
                        _ => ("COMMIT;".to_string(), true),
                    };
                    gotrue
                        .batch_execute(&signup.replace("COMMIT;", &ending))
                        .unwrap();
                    if commits {
                        committed.push(email);
                    } else {
                        rolled_back.push(email);
                    }
                    i += 1;
                }
                (committed, rolled_back, prepared)
            })
        })
        .collect();
    let (mut committed, mut rolled_back, mut prepared) = (vec![], vec![], vec![]);
    for session in sessions {
        let (c, r, p) = session.join().unwrap();
        committed.extend(c);
        rolled_back.extend(r);
        prepared.extend(p);
    }
    assert!(!prepared.is_empty() && !rolled_back.is_empty());
    // The prepared signups' ids are below everything committed since: the reads
    // went past them while they were prepared.
    std::thread::sleep(Duration::from_secs(2));
    let mut admin = cluster.connect("supabase_admin");
    for gid in &prepared {
        admin
            .batch_execute(&format!("COMMIT PREPARED '{gid}'"))
            .unwrap();
    }
    let emails = |requests: &[common::Received]| -> HashMap<String, usize> {
        let mut seen = HashMap::new();
        for r in requests {
            *seen
                .entry(r.json()["email"].as_str().unwrap().to_string())
                .or_insert(0) += 1;
        }
        seen
    };
    wait_for("every committed signup delivered", WITHIN, || {
        let seen = receiver.inspect(|r| emails(r));
        committed.iter().all(|e| seen.contains_key(e)).then_some(())
    });
    // Anything read twice would come now.
    std::thread::sleep(Duration::from_secs(2));
    let seen = receiver.inspect(|r| emails(r));
    let twice: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "delivered more than once: {twice:?}");
    let ghosts: Vec<_> = rolled_back
        .iter()
        .filter(|e| seen.contains_key(*e))
        .collect();
    assert!(ghosts.is_empty(), "rolled back, yet delivered: {ghosts:?}");
    assert_eq!(seen.len(), committed.len());
    // The signups wrote the log's index entries themselves: amcheck finds every row
    // of the log in its index on xid, and the index sound.
    admin.batch_execute("CREATE EXTENSION amcheck").unwrap();
    let logged: i64 = admin
        .query_one(
            "SELECT (SELECT count(*) FROM new_user_hook.log_0) + (SELECT count(*) FROM new_user_hook.log_1)
               FROM bt_index_check('new_user_hook.log_0_xid', true) AS a, bt_index_check('new_user_hook.log_1_xid', true) AS b",
            &[],
        )
        .unwrap()
        .get(0);
    eprintln!(
        "{} committed ({} prepared), {} rolled back: each delivered once; {logged} events in the log checked by amcheck",
        committed.len(),
        prepared.len(),
        rolled_back.len()
    );
}

/// The log is emptied by TRUNCATE, which is not MVCC-safe: a snapshot taken while an
/// event was unread (a pg_dump's, a repeatable-read report's) must keep seeing it
/// until it ends, so a segment is emptied only once no older snapshot remains.
#[test]
fn an_older_snapshot_keeps_seeing_an_event_the_worker_read_since() {
    let receiver = Receiver::ok();
    let cluster = hooked(&receiver, &[("retention", "0")]);
    let mut blocker = cluster.connect("supabase_admin");
    // The read of the log (which probes the outbox) waits, and fails, while this
    // lock is held; signups do not touch the outbox.
    blocker
        .batch_execute("BEGIN; LOCK new_user_hook.outbox IN ACCESS EXCLUSIVE MODE")
        .unwrap();
    let id = cluster.signup("older-snapshot@example.com");
    // Its snapshot taken now, while the event is unread; it touches the log only
    // later (a pg_dump locks its tables after taking its snapshot).
    let mut report = cluster.connect("supabase_admin");
    report
        .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT count(*) FROM auth.users")
        .unwrap();
    let seen = |report: &mut postgres::Client| -> i64 {
        report
            .query_one(
                "SELECT count(*) FROM new_user_hook.deliveries WHERE user_id = $1::text::uuid",
                &[&id],
            )
            .unwrap()
            .get(0)
    };
    blocker.batch_execute("COMMIT").unwrap();
    cluster.wait_for_event(&id, "status = 'delivered'", WITHIN);
    // Long enough for every step of a rotation (5 s apart).
    std::thread::sleep(Duration::from_secs(25));
    assert_eq!(
        seen(&mut report),
        1,
        "the event vanished from an older snapshot"
    );
    let log_rows: i64 = cluster
        .one_row("SELECT (SELECT count(*) FROM new_user_hook.log_0) + (SELECT count(*) FROM new_user_hook.log_1)")
        .get(0);
    assert_eq!(log_rows, 1, "emptied under an older snapshot");
    report.batch_execute("COMMIT").unwrap();
    // Once it ends, the log is emptied.
    wait_for("the log emptied", Duration::from_secs(60), || {
        let rows: i64 = cluster
            .one_row("SELECT (SELECT count(*) FROM new_user_hook.log_0) + (SELECT count(*) FROM new_user_hook.log_1)")
            .get(0);
        (rows == 0).then_some(())
    });
}

/// A prepared transaction holds a transaction id but no snapshot: it cannot see the
/// log, so the log is emptied while it waits for its COMMIT PREPARED.
#[test]
fn a_prepared_transaction_elsewhere_does_not_keep_the_log_from_emptying() {
    let receiver = Receiver::ok();
    let cluster = Cluster::with_hook(&["max_prepared_transactions = 2"]);
    // Delivered events are kept for no time: the log is emptied once they are.
    cluster.configure(&[("url", receiver.url.as_str()), ("retention", "0")]);
    let mut admin = cluster.connect("supabase_admin");
    admin
        .batch_execute(
            "CREATE TABLE public.elsewhere (x int);
             BEGIN; INSERT INTO public.elsewhere VALUES (1); PREPARE TRANSACTION 'elsewhere';",
        )
        .unwrap();
    let ids: Vec<String> = (0..3)
        .map(|i| cluster.signup(&format!("beside-prepared-{i}@example.com")))
        .collect();
    for id in &ids {
        cluster.wait_for_event(id, "status = 'delivered'", WITHIN);
    }
    wait_for("the log emptied", Duration::from_secs(60), || {
        let rows: i64 = cluster
            .one_row("SELECT (SELECT count(*) FROM new_user_hook.log_0) + (SELECT count(*) FROM new_user_hook.log_1)")
            .get(0);
        (rows == 0).then_some(())
    });
    admin
        .batch_execute("ROLLBACK PREPARED 'elsewhere'")
        .unwrap();
}

/// An event restored with its old cluster's transaction id (`pg_restore
/// --disable-triggers` skips the stamping trigger), which this cluster has not
/// reached: no snapshot would ever show it. The worker stamps it again, and it goes
/// out, once.
#[test]
fn an_event_stamped_beyond_this_clusters_transaction_ids_is_delivered_once() {
    let receiver = Receiver::ok();
    let cluster = hooked(&receiver, &[]);
    let id = "6f1c1a52-6f38-4a3e-9d43-2b8f1f0c2a11";
    let mut admin = cluster.connect("supabase_admin");
    admin
        .batch_execute(&format!(
            "ALTER TABLE new_user_hook.log_1 DISABLE TRIGGER stamp_xid;
             INSERT INTO new_user_hook.log_1 (id, user_id, source, kind, record, seq, created_at, xid)
             VALUES ('{id}', '{id}', 'auth.users', 'created',
                     '{{\"id\": \"{id}\", \"email\": \"restored@example.com\"}}', 1, now(), '4000000000');
             ALTER TABLE new_user_hook.log_1 ENABLE ALWAYS TRIGGER stamp_xid;
             SELECT new_user_hook.wake_on_commit();"
        ))
        .unwrap();
    cluster.wait_for_event(id, "status = 'delivered'", WITHIN);
    let stamped: String = cluster
        .one_row(&format!(
            "SELECT xid::text FROM new_user_hook.log_1 WHERE id = '{id}'"
        ))
        .get(0);
    assert!(
        stamped.parse::<u64>().unwrap() < 4_000_000_000,
        "stamped {stamped}"
    );
    // Later events still go out, and the restored one is not sent again.
    let later = cluster.signup("after-restored@example.com");
    cluster.wait_for_event(&later, "status = 'delivered'", WITHIN);
    std::thread::sleep(Duration::from_secs(6));
    let sent = receiver
        .requests()
        .iter()
        .filter(|r| r.json()["id"] == id)
        .count();
    assert_eq!(sent, 1, "the restored event sent {sent} times");
}
