//! The NestJS example backend (examples/nestjs-receiver), end to end: built from its
//! committed lockfile, started on loopback with an API key and a signing secret,
//! fed by GoTrue signups on the real Supabase Auth schema. Every user must become
//! exactly one profile, also after every event is delivered a second time.

mod common;

use common::{wait_for, Cluster, KillOnDrop};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

const WITHIN: Duration = Duration::from_secs(60);
const API_KEY: &str = "nest-example-key";
const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// Where the example is built and run: a copy of its sources in this build's own
/// directory, so that two suites running side by side (the host's and the Debian 13
/// root's, which share the checkout) never reinstall node_modules under each other.
fn example_dir() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("nestjs-receiver")
}

/// Copies the example's sources (not its node_modules or build) to `example_dir()`.
fn copy_example() {
    fn copy(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).unwrap();
        for entry in std::fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            let name = entry.file_name();
            if name == "node_modules" || name == "dist" {
                continue;
            }
            if entry.file_type().unwrap().is_dir() {
                copy(&entry.path(), &to.join(&name));
            } else {
                std::fs::copy(entry.path(), to.join(&name)).unwrap();
            }
        }
    }
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/nestjs-receiver");
    let _ = std::fs::remove_dir_all(example_dir().join("src"));
    copy(&source, &example_dir());
}

fn npm(args: &[&str]) {
    let out = Command::new("npm")
        .args(args)
        .current_dir(example_dir())
        .output()
        .expect("npm (install Node.js and npm)");
    assert!(
        out.status.success(),
        "npm {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

struct Backend {
    _process: KillOnDrop,
    url: String,
}

impl Backend {
    fn start() -> Backend {
        Backend::start_with(&[])
    }

    /// The backend with extra environment variables (e.g. FAIL_FIRST_CREATES).
    fn start_with(env: &[(&str, &str)]) -> Backend {
        // Built once for all the tests of this file, which may run at the same time.
        static BUILT: std::sync::Once = std::sync::Once::new();
        BUILT.call_once(|| {
            copy_example();
            npm(&["ci", "--no-audit", "--no-fund"]);
            npm(&["run", "build"]);
        });
        let port = common::free_port();
        let child = Command::new("node")
            .arg("dist/main.js")
            .current_dir(example_dir())
            .env("PORT", port.to_string())
            .env("API_KEY", API_KEY)
            .env("WEBHOOK_SECRET", SECRET)
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        common::wait_until_listening("the NestJS backend", port);
        Backend {
            _process: KillOnDrop(child),
            url: format!("http://127.0.0.1:{port}"),
        }
    }

    /// (user id, email) of every profile, from GET /profiles.
    fn profiles(&self) -> Vec<(String, Option<String>)> {
        let body = ureq::get(format!("{}/profiles", self.url))
            .header("X-API-Key", API_KEY)
            .call()
            .unwrap()
            .body_mut()
            .read_to_string()
            .unwrap();
        let list: serde_json::Value = serde_json::from_str(&body).unwrap();
        list.as_array()
            .unwrap()
            .iter()
            .map(|p| {
                (
                    p["id"].as_str().unwrap().to_string(),
                    p["email"].as_str().map(str::to_string),
                )
            })
            .collect()
    }
}

/// Waits until every event is recorded as delivered in new_user_hook.deliveries.
fn all_recorded_as_delivered(cluster: &Cluster) {
    wait_for("every event recorded as delivered", WITHIN, || {
        let left: i64 = cluster
            .one_row("SELECT count(*) FROM new_user_hook.deliveries WHERE status <> 'delivered'")
            .get(0);
        (left == 0).then_some(())
    });
}

#[test]
fn every_new_user_becomes_exactly_one_profile_in_the_nestjs_backend() {
    let backend = Backend::start();
    let cluster = Cluster::with_hook(&[]);
    cluster.configure(&[
        ("url", &format!("{}/users", backend.url)),
        ("api_key", API_KEY),
        ("signing_secret", SECRET),
    ]);
    let mut ids = HashSet::new();
    for i in 0..20 {
        ids.insert(cluster.signup(&format!("nest-{i}@example.com")));
    }
    let profiles = wait_for("20 profiles", WITHIN, || {
        let p = backend.profiles();
        (p.len() >= 20).then_some(p)
    });
    assert_eq!(
        profiles
            .iter()
            .map(|(id, _)| id.clone())
            .collect::<HashSet<_>>(),
        ids
    );
    assert!(profiles
        .iter()
        .all(|(_, email)| email.as_deref().is_some_and(|e| e.starts_with("nest-"))));

    // Forced redelivery of every event: the backend recognises them, no second profile.
    // redeliver() takes delivered events: the worker records an outcome a little after
    // the backend got it.
    all_recorded_as_delivered(&cluster);
    let mut admin = cluster.connect("supabase_admin");
    let requeued: i64 = admin
        .query_one(
            "SELECT count(*) FROM new_user_hook.deliveries d WHERE new_user_hook.redeliver(d.id)",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(requeued, 20);
    wait_for("the redeliveries acknowledged", WITHIN, || {
        let n: i64 = admin
            .query_one("SELECT count(*) FROM new_user_hook.deliveries WHERE status = 'delivered' AND attempts = 1", &[])
            .unwrap()
            .get(0);
        (n == 20).then_some(())
    });
    assert_eq!(
        backend.profiles().len(),
        20,
        "a redelivery created a second profile"
    );

    // A wrong API key is refused by the backend's guard; after the fix, the event goes through.
    cluster.configure(&[("api_key", "wrong-key")]);
    wait_for("the wrong key to apply", WITHIN, || {
        let id = cluster.signup(&format!("nest-late-{}@example.com", ids.len()));
        ids.insert(id.clone());
        let mut admin = cluster.connect("supabase_admin");
        wait_for("the attempt", WITHIN, || {
            let row = admin
                .query_opt(
                    "SELECT status, coalesce(last_error, '') FROM new_user_hook.deliveries
                      WHERE user_id = $1::text::uuid AND status <> 'pending'",
                    &[&id],
                )
                .unwrap();
            row.map(|r| (r.get::<_, String>(0), r.get::<_, String>(1)))
        })
        .1
        .contains("HTTP 401 Unauthorized: {\"message\":\"invalid API key\"")
        .then_some(())
    });
    cluster.configure(&[("api_key", API_KEY)]);
    // Once a new signup gets through, the worker uses the right key again.
    let fixed = cluster.signup("nest-after-fix@example.com");
    ids.insert(fixed.clone());
    cluster.wait_for_event(&fixed, "status = 'delivered'", WITHIN);
    let requeued: i64 = admin
        .query_one("SELECT new_user_hook.redeliver_failed()", &[])
        .unwrap()
        .get(0);
    assert!(requeued >= 1);
    wait_for("every user a profile", WITHIN, || {
        let p = backend.profiles();
        (p.iter().map(|(id, _)| id.clone()).collect::<HashSet<_>>() == ids).then_some(())
    });
    assert_eq!(backend.profiles().len(), ids.len());
}

#[test]
fn the_nestjs_backend_keeps_a_profile_in_sync_through_confirmation_email_change_and_deletion() {
    // The first two attempts of the creation fail: the update must not overtake it.
    let backend = Backend::start_with(&[("FAIL_FIRST_CREATES", "2")]);
    let cluster = Cluster::with_hook(&[]);
    cluster.configure(&[
        ("url", &format!("{}/users", backend.url)),
        ("api_key", API_KEY),
        ("signing_secret", SECRET),
        ("events", "created,updated,deleted"),
        ("retry_base_ms", "500"),
    ]);
    let profile_of = |id: &str| {
        backend
            .profiles()
            .into_iter()
            .find(|(p, _)| p == id)
            .map(|(_, email)| email)
    };
    let id = cluster.signup("sync@example.com");
    // Changed while its creation is still being retried.
    cluster.confirm_email(&id);
    cluster.change_email(&id, "sync-new@example.com");
    let email = wait_for("the profile with the new email", WITHIN, || {
        profile_of(&id)
            .flatten()
            .filter(|e| e == "sync-new@example.com")
    });
    assert_eq!(email, "sync-new@example.com");
    // The creation was retried (the backend failed it twice; a connection the backend
    // closed may cost one more attempt), and the update was delivered after it
    // (tests/lifecycle.rs checks, request by request, that it was not even sent before).
    cluster.wait_for_event(
        &id,
        "event_type = 'updated' AND status = 'delivered'",
        WITHIN,
    );
    let row = cluster.one_row(&format!(
        "SELECT c.attempts, u.delivered_at >= c.delivered_at
           FROM new_user_hook.deliveries c, new_user_hook.deliveries u
          WHERE c.user_id = '{id}' AND c.event_type = 'created'
            AND u.user_id = '{id}' AND u.event_type = 'updated'"
    ));
    let (created_attempts, after): (i32, bool) = (row.get(0), row.get(1));
    assert!(
        created_attempts >= 3,
        "the creation was retried ({created_attempts} attempts)"
    );
    assert!(after, "the update was delivered before the creation");
    let second = cluster.signup("sync-other@example.com");
    cluster.delete_user(&id);
    wait_for("the profile to be deleted", WITHIN, || {
        profile_of(&id).is_none().then_some(())
    });
    // The other user's profile is untouched; redelivering everything changes nothing.
    wait_for("the second profile", WITHIN, || profile_of(&second));
    all_recorded_as_delivered(&cluster);
    let requeued: i64 = cluster
        .one_row(
            "SELECT count(*) FROM new_user_hook.deliveries d WHERE new_user_hook.redeliver(d.id)",
        )
        .get(0);
    assert_eq!(requeued, 4);
    wait_for("every redelivery to be acknowledged", WITHIN, || {
        let pending: i64 = cluster
            .one_row("SELECT pending FROM new_user_hook.status")
            .get(0);
        (pending == 0).then_some(())
    });
    let profiles = backend.profiles();
    assert_eq!(profiles.len(), 1, "{profiles:?}");
    assert_eq!(profiles[0].0, second);
}
