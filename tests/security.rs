//! Supabase fit and security, end to end on the real Supabase roles and Auth schema:
//! privileges, hijack attempts, the credential allow-list, payload formats,
//! Standard Webhooks signatures (checked by an independent verifier), Vault
//! secrets, TLS, and secrets kept out of logs.

mod common;

use common::{wait_for, Cluster, KillOnDrop, Received, Receiver};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const WITHIN: Duration = Duration::from_secs(30);
const API_KEY: &str = "key-Zq81-never-logged";
const SIGNING: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const SIGNING_OLD: &str = "whsec_c2Vjb25kLXNlY3JldC1mb3Itcm90YXRpb24tdGVzdHM=";

const SUPABASE_ROLES: &[&str] = &[
    "anon",
    "authenticated",
    "service_role",
    "authenticator",
    "postgres",
];

fn expect_denied(client: &mut postgres::Client, role: &str, sql: &str) {
    match client.batch_execute(sql) {
        Ok(()) => panic!("{role} could run: {sql}"),
        Err(e) => {
            let message = e
                .as_db_error()
                .map(|d| d.message().to_string())
                .unwrap_or_else(|| e.to_string());
            assert!(
                message.contains("permission denied") || message.contains("must be superuser"),
                "{role}: {sql}: unexpected error {message}"
            );
        }
    }
}

#[test]
fn supabase_roles_cannot_read_events_secrets_or_control_the_hook() {
    let cluster = Cluster::with_hook(&[]);
    cluster.configure(&[("api_key", API_KEY), ("signing_secret", SIGNING)]);
    cluster.signup("private@example.com");
    let mut client = cluster.connect("supabase_admin");
    for role in SUPABASE_ROLES {
        client
            .batch_execute(&format!("RESET ROLE; SET ROLE {role}"))
            .unwrap();
        for sql in [
            "SELECT * FROM new_user_hook.outbox",
            "SELECT * FROM new_user_hook.log_0",
            "SELECT * FROM new_user_hook.log_1",
            "SELECT * FROM new_user_hook.unread",
            "UPDATE new_user_hook.positions SET snapshot = NULL",
            "SELECT * FROM new_user_hook.deliveries",
            "SELECT * FROM new_user_hook.status",
            "SELECT new_user_hook.redeliver_failed()",
            "SELECT new_user_hook.redeliver('00000000-0000-0000-0000-000000000000')",
            "SELECT new_user_hook.install()",
            "SELECT new_user_hook.uninstall()",
            "SHOW pg_new_user_hook.api_key",
            "SHOW pg_new_user_hook.signing_secret",
            "SELECT current_setting('pg_new_user_hook.api_key')",
        ] {
            expect_denied(&mut client, role, sql);
        }
        let leaked: i64 = client
            .query_one(
                "SELECT count(*) FROM pg_settings WHERE setting IN ($1, $2)",
                &[&API_KEY, &SIGNING],
            )
            .unwrap()
            .get(0);
        assert_eq!(leaked, 0, "{role} sees a secret in pg_settings");
    }
}

#[test]
fn an_operator_can_grant_read_only_monitoring_to_postgres() {
    let cluster = Cluster::with_hook(&[]);
    let id = cluster.signup("watched@example.com");
    cluster
        .connect("supabase_admin")
        .batch_execute(
            "GRANT USAGE ON SCHEMA new_user_hook TO postgres;
         GRANT SELECT ON new_user_hook.status, new_user_hook.deliveries TO postgres;",
        )
        .unwrap();
    let mut postgres = cluster.connect("postgres");
    let pending: i64 = postgres
        .query_one("SELECT pending FROM new_user_hook.status", &[])
        .unwrap()
        .get(0);
    assert_eq!(pending, 1);
    let n: i64 = postgres
        .query_one(
            "SELECT count(*) FROM new_user_hook.deliveries WHERE user_id = $1::text::uuid",
            &[&id],
        )
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
    for table in ["outbox", "log_0", "log_1", "done_0", "done_1", "unread"] {
        expect_denied(
            &mut postgres,
            "postgres",
            &format!("SELECT * FROM new_user_hook.{table}"),
        );
    }
    expect_denied(
        &mut postgres,
        "postgres",
        "SELECT new_user_hook.redeliver_failed()",
    );
}

/// The grant for resending (docs/security.md) events is all an operator needs: the functions
/// run as their owner (as pg_cron's do), and give nothing else away.
#[test]
fn an_operator_granted_execute_can_resend_events() {
    let failing = Receiver::start(|_, _| common::Reply::Status(400));
    let cluster = Cluster::hooked_to(&failing.url, &[]);
    let id = cluster.signup("resend@example.com");
    cluster.wait_for_event(&id, "status = 'failed'", WITHIN);
    cluster
        .connect("supabase_admin")
        .batch_execute(
            "GRANT USAGE ON SCHEMA new_user_hook TO postgres;
             GRANT SELECT ON new_user_hook.status, new_user_hook.deliveries TO postgres;
             GRANT EXECUTE ON FUNCTION new_user_hook.redeliver(uuid), new_user_hook.redeliver_failed() TO postgres;",
        )
        .unwrap();
    let receiver = Receiver::ok();
    cluster.configure(&[("url", &receiver.url)]);
    let mut postgres = cluster.connect("postgres");
    let requeued: i64 = postgres
        .query_one("SELECT new_user_hook.redeliver_failed()", &[])
        .unwrap()
        .get(0);
    assert_eq!(requeued, 1);
    cluster.wait_for_event(&id, "status = 'delivered'", WITHIN);
    let event: String = postgres
        .query_one(
            "SELECT id::text FROM new_user_hook.deliveries WHERE user_id = $1::text::uuid",
            &[&id],
        )
        .unwrap()
        .get(0);
    let again: bool = postgres
        .query_one("SELECT new_user_hook.redeliver($1::text::uuid)", &[&event])
        .unwrap()
        .get(0);
    assert!(again);
    wait_for("the event delivered a second time", WITHIN, || {
        (receiver.count() >= 2).then_some(())
    });
    // Still nothing beyond what was granted.
    for table in [
        "outbox",
        "log_0",
        "log_1",
        "done_0",
        "done_1",
        "unread",
        "positions",
        "counters",
    ] {
        expect_denied(
            &mut postgres,
            "postgres",
            &format!("SELECT * FROM new_user_hook.{table}"),
        );
    }
}

/// The worker runs as the bootstrap superuser: a function another role creates on its
/// search_path — an exact-type match beats pg_catalog's polymorphic `to_json` and
/// `unnest`, which the worker's SQL calls — must never run as it.
#[test]
fn the_worker_runs_nothing_another_role_put_on_its_search_path() {
    let receiver = Receiver::ok();
    let cluster = Cluster::hooked_to(&receiver.url, &[]);
    // postgres owns the database on Supabase: it can create in public, and set the
    // database's search_path.
    cluster
        .connect("postgres")
        .batch_execute(
            "CREATE TABLE public.hijacked (as_role text);
             GRANT INSERT ON public.hijacked TO PUBLIC;
             CREATE FUNCTION public.to_json(t timestamptz) RETURNS json LANGUAGE plpgsql AS $$
             BEGIN INSERT INTO public.hijacked VALUES (current_user); RETURN pg_catalog.to_json(t); END $$;
             CREATE FUNCTION public.unnest(a text[]) RETURNS SETOF text LANGUAGE plpgsql AS $$
             BEGIN INSERT INTO public.hijacked VALUES (current_user); RETURN QUERY SELECT pg_catalog.unnest(a); END $$;
             ALTER DATABASE postgres SET search_path = public, pg_catalog;",
        )
        .unwrap();
    // The worker's session takes the database's settings when it starts.
    cluster
        .connect("supabase_admin")
        .batch_execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE backend_type = 'pg_new_user_hook'",
        )
        .unwrap();
    let ids: Vec<String> = (0..3)
        .map(|i| cluster.signup(&format!("hijack-{i}@example.com")))
        .collect();
    for id in &ids {
        cluster.wait_for_event(id, "status = 'delivered'", WITHIN);
    }
    let ran: i64 = cluster
        .one_row("SELECT count(*) FROM public.hijacked")
        .get(0);
    assert_eq!(ran, 0, "a function on the search path ran in the worker");
    let superuser: bool = cluster
        .one_row("SELECT rolsuper FROM pg_roles WHERE rolname = 'postgres'")
        .get(0);
    assert!(!superuser);
}

#[test]
fn postgres_can_install_the_hook_once_granted() {
    let receiver = Receiver::ok();
    let cluster = Cluster::new(&[]);
    let mut admin = cluster.connect("supabase_admin");
    admin
        .batch_execute(
            "CREATE EXTENSION pg_new_user_hook;
             GRANT USAGE ON SCHEMA new_user_hook TO postgres;
             GRANT EXECUTE ON FUNCTION new_user_hook.install(text), new_user_hook.capture() TO postgres;",
        )
        .unwrap();
    cluster.configure(&[("url", &receiver.url)]);
    let mut postgres = cluster.connect("postgres");
    let msg: String = postgres
        .query_one("SELECT new_user_hook.install()", &[])
        .unwrap()
        .get(0);
    assert_eq!(msg, "pg_new_user_hook installed on auth.users");
    let id = cluster.signup("via-postgres@example.com");
    cluster.wait_for_event(&id, "status = 'delivered'", WITHIN);
}

#[test]
fn a_hostile_search_path_cannot_hijack_the_trigger() {
    let receiver = Receiver::ok();
    let cluster = Cluster::with_hook(&[]);
    cluster.configure(&[("url", &receiver.url)]);
    let mut gotrue = cluster.connect("supabase_auth_admin");
    // Look-alikes of what the trigger uses, in schemas a signup session might search.
    gotrue
        .batch_execute(
            r#"CREATE SCHEMA evil;
               CREATE FUNCTION evil.jsonb_build_object(VARIADIC text[]) RETURNS jsonb
                   LANGUAGE sql AS $$ SELECT '{"id": "hijacked", "email": "evil@example.com"}'::jsonb $$;
               CREATE FUNCTION evil.format(text, VARIADIC text[]) RETURNS text LANGUAGE sql AS $$ SELECT 'evil.users' $$;
               CREATE FUNCTION evil.gen_random_uuid() RETURNS uuid LANGUAGE sql AS $$ SELECT '00000000-0000-0000-0000-000000000001'::uuid $$;
               CREATE TABLE evil.outbox (user_id uuid, source text, record jsonb);
               CREATE TABLE pg_temp.outbox (user_id uuid, source text, record jsonb);"#,
        )
        .unwrap();
    let sql = common::signup_sql("target@example.com").replace(
        "BEGIN;",
        "SET search_path = evil, pg_temp, public, auth; BEGIN;",
    );
    gotrue.batch_execute(&sql).unwrap();
    let requests = receiver.wait_for_requests(1, WITHIN);
    let id: String = cluster
        .one_row("SELECT id::text FROM auth.users WHERE email = 'target@example.com'")
        .get(0);
    assert_eq!(
        requests[0].json(),
        serde_json::json!({"id": id, "email": "target@example.com"})
    );
    let evil_rows: i64 = gotrue
        .query_one("SELECT count(*) FROM evil.outbox", &[])
        .unwrap()
        .get(0);
    assert_eq!(evil_rows, 0);
}

/// A user whose every credential column is set, as an attacker would love to read.
fn signup_with_every_secret(cluster: &Cluster, email: &str) -> String {
    let mut gotrue = cluster.connect("supabase_auth_admin");
    let tokens = [
        "confirmation_token",
        "recovery_token",
        "email_change_token_new",
        "email_change_token_current",
        "phone_change_token",
        "reauthentication_token",
    ];
    // Token columns have unique indexes: make each value unique to this user.
    let sets: Vec<String> = tokens
        .iter()
        .map(|t| format!("{t} = 'SECRET-{t}-{email}'"))
        .collect();
    let sql = common::signup_sql(email).replace(
        "COMMIT;",
        &format!(
            "UPDATE users SET {}, encrypted_password = 'SECRET-password-hash',
                 raw_app_meta_data = raw_app_meta_data || '{{\"provider_refresh_token\": \"SECRET-app\"}}'
             WHERE email = '{email}';
             COMMIT;",
            sets.join(", ")
        ),
    );
    gotrue.batch_execute(&sql).unwrap();
    gotrue
        .query_one("SELECT id::text FROM users WHERE email = $1", &[&email])
        .unwrap()
        .get(0)
}

fn delivered_body(receiver: &Receiver, user_id: &str) -> Received {
    wait_for(&format!("a request for {user_id}"), WITHIN, || {
        receiver
            .requests()
            .into_iter()
            .find(|r| r.body.contains(user_id))
    })
}

#[test]
fn no_credential_ever_leaves_the_database_in_any_format() {
    let receiver = Receiver::ok();
    let cluster = Cluster::with_hook(&[]);
    cluster.configure(&[("url", &receiver.url)]);
    for format in ["minimal", "fields", "supabase", "standard"] {
        cluster.configure(&[("payload_format", format), ("fields", "")]);
        wait_for("the format to apply", WITHIN, || {
            let shown: String = cluster
                .one_row("SHOW pg_new_user_hook.payload_format")
                .get(0);
            (shown == format).then_some(())
        });
        let id = signup_with_every_secret(&cluster, &format!("{format}@example.com"));
        let r = delivered_body(&receiver, &id);
        assert!(!r.body.contains("SECRET"), "{format}: {}", r.body);
        let body = r.json();
        match format {
            "minimal" => assert_eq!(
                body,
                serde_json::json!({"id": id, "email": "minimal@example.com"})
            ),
            "fields" => {
                assert_eq!(
                    body["raw_app_meta_data"],
                    serde_json::json!({"provider": "email", "providers": ["email"]})
                );
                assert_eq!(body["role"], "authenticated");
            }
            "supabase" => {
                assert_eq!(body["type"], "INSERT");
                assert_eq!(body["schema"], "auth");
                assert_eq!(body["table"], "users");
                assert_eq!(body["record"]["id"], id.as_str());
                assert_eq!(body["record"]["email"], "supabase@example.com");
                assert_eq!(body["old_record"], serde_json::Value::Null);
            }
            "standard" => {
                assert_eq!(body["type"], "user.created");
                assert_eq!(body["data"]["id"], id.as_str());
                assert!(body["timestamp"].as_str().unwrap().contains('T'));
            }
            _ => unreachable!(),
        }
    }
    let stored: i64 = cluster
        .one_row(
            "SELECT count(*) FROM (SELECT record, old_record FROM new_user_hook.outbox
                                   UNION ALL SELECT record, old_record FROM new_user_hook.log_0
                                   UNION ALL SELECT record, old_record FROM new_user_hook.log_1) e
              WHERE record::text LIKE '%SECRET%' OR old_record::text LIKE '%SECRET%'",
        )
        .get(0);
    assert_eq!(stored, 0, "a credential was stored in the outbox");

    // Asking for a credential is refused when it is configured, with the reason.
    let err = cluster
        .connect("supabase_admin")
        .batch_execute("ALTER SYSTEM SET pg_new_user_hook.fields = 'id, email, encrypted_password'")
        .unwrap_err();
    let message = err.as_db_error().unwrap().message().to_string();
    assert!(
        message.contains("\"encrypted_password\" is a credential and is never sent"),
        "{message}"
    );
}

/// Runs the Python `standardwebhooks` package (the reference verifier) on a request.
fn verify_with_standardwebhooks(secret: &str, request: &Received) -> Result<(), String> {
    let python = standardwebhooks_python();
    let headers: serde_json::Map<String, serde_json::Value> = request
        .headers
        .iter()
        .map(|(k, v)| (k.to_ascii_lowercase(), serde_json::Value::from(v.clone())))
        .collect();
    let input =
        serde_json::json!({"secret": secret, "body": request.body, "headers": headers}).to_string();
    let script = "import json, sys\n\
                  from standardwebhooks.webhooks import Webhook\n\
                  d = json.load(sys.stdin)\n\
                  Webhook(d['secret']).verify(d['body'], d['headers'])\n\
                  print('verified')\n";
    let mut child = Command::new(python)
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), input.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    if out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "verified" {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// A virtualenv with the `standardwebhooks` package from PyPI, made once.
fn standardwebhooks_python() -> PathBuf {
    static PYTHON: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    PYTHON
        .get_or_init(|| {
            let venv = Path::new(env!("CARGO_TARGET_TMPDIR")).join("standardwebhooks-venv");
            let python = venv.join("bin/python");
            let ready = Command::new(&python)
                .args(["-c", "import standardwebhooks"])
                .output()
                .is_ok_and(|o| o.status.success());
            if !ready {
                let ok = Command::new("python3")
                    .args(["-m", "venv"])
                    .arg(&venv)
                    .status()
                    .unwrap()
                    .success();
                assert!(ok, "python3 -m venv failed (install python3-venv)");
                let ok = Command::new(venv.join("bin/pip"))
                    .args(["install", "-q", "standardwebhooks==1.0.1"])
                    .status()
                    .unwrap()
                    .success();
                assert!(ok, "pip install standardwebhooks failed");
            }
            python
        })
        .clone()
}

#[test]
fn requests_are_signed_as_standard_webhooks_also_during_a_rotation() {
    let receiver = Receiver::ok();
    let cluster = Cluster::with_hook(&[]);
    cluster.configure(&[("url", &receiver.url), ("signing_secret", SIGNING)]);
    let id = cluster.signup("signed@example.com");
    let r = delivered_body(&receiver, &id);
    assert!(r.header("webhook-signature").unwrap().starts_with("v1,"));
    verify_with_standardwebhooks(SIGNING, &r)
        .expect("the reference verifier accepts the signature");
    assert!(
        verify_with_standardwebhooks(SIGNING_OLD, &r).is_err(),
        "a wrong secret must not verify"
    );

    // Rotation: both secrets sign, so receivers on either secret accept.
    cluster.configure(&[("signing_secret", &format!("{SIGNING} {SIGNING_OLD}"))]);
    wait_for("the second secret to apply", WITHIN, || {
        let id = cluster.signup(&format!("rotating-{}@example.com", rand_suffix()));
        let r = delivered_body(&receiver, &id);
        (r.header("webhook-signature").unwrap().split(' ').count() == 2).then_some(r)
    });
    let last = receiver.requests().pop().unwrap();
    verify_with_standardwebhooks(SIGNING, &last).unwrap();
    verify_with_standardwebhooks(SIGNING_OLD, &last).unwrap();

    // A malformed secret is refused at configuration time, without echoing it.
    let err = cluster
        .connect("supabase_admin")
        .batch_execute("ALTER SYSTEM SET pg_new_user_hook.signing_secret = 'hunter2-not-a-whsec'")
        .unwrap_err();
    let message = err.as_db_error().unwrap().message().to_string();
    assert!(message.contains("does not start with whsec_"), "{message}");
    assert!(!message.contains("hunter2"), "{message}");
}

fn rand_suffix() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

const VAULT_SHAPE: &str = "
    CREATE SCHEMA vault;
    CREATE TABLE vault.secrets (id uuid PRIMARY KEY DEFAULT gen_random_uuid(), name text UNIQUE, secret text NOT NULL);
    CREATE VIEW vault.decrypted_secrets AS SELECT id, name, secret AS decrypted_secret FROM vault.secrets;";

#[test]
fn secrets_can_come_from_supabase_vault_and_are_reread_after_a_change() {
    let receiver = Receiver::ok();
    let cluster = Cluster::with_hook(&[]);
    cluster.configure(&[
        ("url", &receiver.url),
        ("api_key_secret", "backend_api_key"),
        ("signing_secret_name", "hook_signing"),
    ]);
    // No Vault yet: a clear problem, events wait.
    let early = cluster.signup("before-vault@example.com");
    wait_for("the missing Vault to be reported", WITHIN, || {
        let problem: Option<String> = cluster
            .one_row("SELECT problem FROM new_user_hook.status")
            .get(0);
        problem.filter(|p| p.contains("no vault.decrypted_secrets") && p.contains("api_key_secret"))
    });
    let mut admin = cluster.connect("supabase_admin");
    admin.batch_execute(VAULT_SHAPE).unwrap();
    admin
        .execute("INSERT INTO vault.secrets (name, secret) VALUES ('backend_api_key', $1), ('hook_signing', $2)", &[&"vault-key-1", &SIGNING])
        .unwrap();
    let r = delivered_body(&receiver, &early);
    assert_eq!(r.header("x-api-key"), Some("vault-key-1"));
    verify_with_standardwebhooks(SIGNING, &r).unwrap();

    // Rotate the key in Vault: later deliveries use it, without a reload.
    admin
        .execute(
            "UPDATE vault.secrets SET secret = 'vault-key-2' WHERE name = 'backend_api_key'",
            &[],
        )
        .unwrap();
    wait_for("the rotated key to be used", WITHIN, || {
        let id = cluster.signup(&format!("after-rotation-{}@example.com", rand_suffix()));
        let r = delivered_body(&receiver, &id);
        (r.header("x-api-key") == Some("vault-key-2")).then_some(())
    });

    // A secret that disappears pauses delivery with a clear reason.
    admin
        .execute(
            "DELETE FROM vault.secrets WHERE name = 'backend_api_key'",
            &[],
        )
        .unwrap();
    wait_for("the missing secret to be reported", WITHIN, || {
        let problem: Option<String> = cluster
            .one_row("SELECT problem FROM new_user_hook.status")
            .get(0);
        problem.filter(|p| p.contains("has no secret of that name"))
    });
    // Setting both a value and a Vault name is ambiguous, and said so.
    cluster.configure(&[("api_key", "direct")]);
    wait_for("the ambiguity to be reported", WITHIN, || {
        let problem: Option<String> = cluster
            .one_row("SELECT problem FROM new_user_hook.status")
            .get(0);
        problem.filter(|p| {
            p.contains("set either pg_new_user_hook.api_key or pg_new_user_hook.api_key_secret")
        })
    });
}

/// A CA and a server certificate for 127.0.0.1, made with the openssl command.
fn make_certificates(dir: &Path) {
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=pg_new_user_hook test CA",
    ]);
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=127.0.0.1",
    ]);
    std::fs::write(dir.join("ext.cnf"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
    ]);
}

/// An HTTPS receiver on loopback (Python's http.server with ssl), answering 200.
struct TlsReceiver {
    _process: KillOnDrop,
    port: u16,
    log: PathBuf,
}

impl TlsReceiver {
    fn start(dir: &Path) -> TlsReceiver {
        let port = common::free_port();
        let log = dir.join("requests.log");
        let script = r#"
import http.server, ssl, sys
port, cert, key, log = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        with open(log, "ab") as f:
            f.write(body + b"\n")
        self.send_response(200); self.send_header("Content-Length", "0"); self.end_headers()
    def log_message(self, *a): pass
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER); ctx.load_cert_chain(cert, key)
srv = http.server.ThreadingHTTPServer(("127.0.0.1", port), H)
srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
srv.serve_forever()
"#;
        let child = Command::new("python3")
            .args(["-c", script, &port.to_string()])
            .arg(dir.join("server.pem"))
            .arg(dir.join("server.key"))
            .arg(&log)
            .spawn()
            .unwrap();
        common::wait_until_listening("the TLS receiver", port);
        TlsReceiver {
            _process: KillOnDrop(child),
            port,
            log,
        }
    }

    fn bodies(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

#[test]
fn https_verifies_certificates_and_ca_file_adds_a_trusted_ca() {
    let cluster = Cluster::with_hook(&[]);
    let dir = cluster.root.join("tls");
    std::fs::create_dir_all(&dir).unwrap();
    make_certificates(&dir);
    let receiver = TlsReceiver::start(&dir);
    cluster.configure(&[
        ("url", &format!("https://127.0.0.1:{}/users", receiver.port)),
        ("retry_base_ms", "200"),
        ("retry_max_ms", "500"),
    ]);
    let id = cluster.signup("tls@example.com");
    cluster.wait_for_event(
        &id,
        "last_error LIKE '%not signed by a trusted CA%pg_new_user_hook.ca_file%'",
        WITHIN,
    );
    assert!(receiver.bodies().is_empty());

    cluster.configure(&[("ca_file", dir.join("ca.pem").to_str().unwrap())]);
    cluster.wait_for_event(&id, "status = 'delivered'", WITHIN);
    assert!(receiver.bodies().contains(&id));
}

#[test]
fn secrets_never_reach_the_log_last_error_or_pg_stat_activity() {
    let rejecting =
        Receiver::start(|_, _| common::Reply::StatusWith(401, "Content-Type", "text/plain".into()));
    let cluster =
        Cluster::with_hook(&["log_statement = 'all'", "log_min_error_statement = 'error'"]);
    cluster.configure(&[
        ("url", &rejecting.url),
        ("api_key", API_KEY),
        ("signing_secret", SIGNING),
    ]);
    let id = cluster.signup("secretive@example.com");
    cluster.wait_for_event(&id, "status = 'failed'", WITHIN);
    // Error paths: a bad secret (refused), a rotation, a reload, a malformed URL.
    {
        // A session's own last statement shows in its pg_stat_activity row (to itself and
        // superusers only); this one closes, as an operator's psql would.
        let mut admin = cluster.connect("supabase_admin");
        let refused = admin.batch_execute(&format!(
            "ALTER SYSTEM SET pg_new_user_hook.signing_secret = '{API_KEY}'"
        ));
        assert!(refused.is_err());
    }
    cluster.configure(&[
        ("signing_secret", &format!("{SIGNING} {SIGNING_OLD}")),
        ("url", "not a url"),
    ]);
    wait_for("the malformed URL to be reported", WITHIN, || {
        cluster.log().contains("is not a valid URL").then_some(())
    });
    let errors: String = cluster
        .one_row("SELECT coalesce(string_agg(coalesce(last_error, ''), ' '), '') FROM new_user_hook.deliveries")
        .get(0);
    let activity: String = cluster
        .one_row("SELECT string_agg(coalesce(query, ''), ' ') FROM pg_stat_activity WHERE pid <> pg_backend_pid()")
        .get(0);
    let log = cluster.log();
    for secret in [API_KEY, SIGNING, &SIGNING[6..], &SIGNING_OLD[6..]] {
        assert!(
            !log.contains(secret),
            "the server log contains a secret:\n{log}"
        );
        assert!(
            !errors.contains(secret),
            "last_error contains a secret: {errors}"
        );
        assert!(
            !activity.contains(secret),
            "pg_stat_activity contains a secret: {activity}"
        );
    }
    assert!(
        log.contains("value hidden by pg_new_user_hook"),
        "the reload messages were redacted, not dropped"
    );
}

fn server_major(client: &mut postgres::Client) -> i32 {
    let version: String = client
        .query_one("SHOW server_version_num", &[])
        .unwrap()
        .get(0);
    version.parse::<i32>().unwrap() / 10_000
}

fn db_message(e: postgres::Error) -> String {
    e.as_db_error()
        .map(|d| d.message().to_string())
        .unwrap_or_else(|| e.to_string())
}

#[test]
fn a_url_with_credentials_is_refused_and_never_logged() {
    let receiver = Receiver::ok();
    let cluster = Cluster::hooked_to(&receiver.url, &[]);
    let mut admin = cluster.connect("supabase_admin");
    let with_password = "http://alice:pw-Zq81@127.0.0.1:9/users";
    let err = admin
        .batch_execute(&format!(
            "ALTER SYSTEM SET pg_new_user_hook.url = '{with_password}'"
        ))
        .unwrap_err();
    let message = db_message(err);
    assert!(
        message.contains("must not contain credentials")
            && message.contains("pg_new_user_hook.api_key_secret"),
        "{message}"
    );
    // Written into postgresql.conf by hand: refused at the reload, the old URL stays.
    let conf = cluster.root.join("data/postgresql.conf");
    let mut text = std::fs::read_to_string(&conf).unwrap();
    text.push_str(&format!("pg_new_user_hook.url = '{with_password}'\n"));
    std::fs::write(&conf, text).unwrap();
    admin.batch_execute("SELECT pg_reload_conf()").unwrap();
    wait_for("the refusal in the server log", WITHIN, || {
        cluster
            .log()
            .contains("must not contain credentials")
            .then_some(())
    });
    let url: String = admin
        .query_one("SHOW pg_new_user_hook.url", &[])
        .unwrap()
        .get(0);
    assert_eq!(url, receiver.url);
    let id = cluster.signup("after-refused-url@example.com");
    delivered_body(&receiver, &id);
    let log = cluster.log();
    assert!(
        !log.contains("pw-Zq81"),
        "the password reached the log:\n{log}"
    );
}

/// On PostgreSQL 15 a CREATEROLE role may grant itself any non-superuser role, the
/// predefined ones included; from 16 on only roles it holds with ADMIN OPTION. With
/// the key in Vault, as docs/security.md recommends, the settings hold only the secret's name.
#[test]
fn a_createrole_role_granting_itself_pg_read_all_settings_finds_no_key_kept_in_vault() {
    let cluster = Cluster::with_hook(&[]);
    let mut admin = cluster.connect("supabase_admin");
    admin.batch_execute(VAULT_SHAPE).unwrap();
    admin
        .execute(
            "INSERT INTO vault.secrets (name, secret) VALUES ('backend_api_key', $1)",
            &[&API_KEY],
        )
        .unwrap();
    cluster.configure(&[("api_key_secret", "backend_api_key")]);
    let major = server_major(&mut admin);
    for role in ["postgres", "supabase_auth_admin"] {
        let mut client = cluster.connect(role);
        let granted = client.batch_execute(&format!("GRANT pg_read_all_settings TO {role}"));
        match major {
            15 => granted.unwrap_or_else(|e| panic!("{role}: {}", db_message(e))),
            _ => assert!(
                db_message(granted.unwrap_err()).contains("permission denied"),
                "{role} granted itself pg_read_all_settings on PostgreSQL {major}"
            ),
        }
        let mut client = cluster.connect(role);
        if major == 15 {
            // Whether the role inherits or not (supabase_auth_admin does not).
            client
                .batch_execute("SET ROLE pg_read_all_settings")
                .unwrap();
        }
        let settings: String = client
            .query_one(
                "SELECT string_agg(name || '=' || setting, ' ') FROM pg_settings WHERE name LIKE 'pg_new_user_hook.%'",
                &[],
            )
            .unwrap()
            .get(0);
        assert!(
            !settings.contains(API_KEY),
            "{role} read the key: {settings}"
        );
        let named: String = client
            .query_one("SHOW pg_new_user_hook.api_key_secret", &[])
            .unwrap()
            .get(0);
        assert_eq!(named, "backend_api_key");
        expect_denied(&mut client, role, "SELECT * FROM vault.decrypted_secrets");
        if major == 15 {
            // What docs/security.md warns of: a key kept in api_key itself is open to that role.
            cluster.configure(&[("api_key_secret", ""), ("api_key", "in-settings")]);
            wait_for("the key to show to the self-granted role", WITHIN, || {
                let mut client = cluster.connect(role);
                client
                    .batch_execute("SET ROLE pg_read_all_settings")
                    .unwrap();
                let shown: String = client
                    .query_one("SHOW pg_new_user_hook.api_key", &[])
                    .unwrap()
                    .get(0);
                (shown == "in-settings").then_some(())
            });
            cluster.configure(&[("api_key", ""), ("api_key_secret", "backend_api_key")]);
        }
    }
}
