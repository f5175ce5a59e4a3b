//! Users created the way Supabase Auth (GoTrue) creates them.

use super::*;
use std::path::PathBuf;
use std::sync::OnceLock;

pub fn fixtures() -> PathBuf {
    let dir = std::env::var("SUPABASE_AUTH_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures/supabase-auth")
        });
    assert!(
        dir.join("load.sh").exists(),
        "the Supabase Auth fixtures are not at {} (set SUPABASE_AUTH_FIXTURES)",
        dir.display()
    );
    dir
}

impl Cluster {
    /// Runs GoTrue's signup statements (example-signup.sql) as supabase_auth_admin
    /// and returns the new user's id.
    pub fn signup(&self, email: &str) -> String {
        let mut gotrue = self.connect("supabase_auth_admin");
        gotrue.batch_execute(&signup_sql(email)).unwrap();
        let row = gotrue
            .query_one("SELECT id::text FROM users WHERE email = $1", &[&email])
            .unwrap();
        row.get(0)
    }

    /// A GoTrue signup that reports failure instead of panicking, and its duration.
    pub fn try_signup(&self, email: &str) -> Result<(String, Duration), String> {
        try_signup_on(self.port, email)
    }

    /// Inserts `n` users the way GoTrue does, `per_tx` per transaction; returns their ids.
    pub fn bulk_signups(&self, prefix: &str, n: usize, per_tx: usize) -> Vec<String> {
        let mut gotrue = self.connect("supabase_auth_admin");
        let sql = insert_users(&[
            (
                "email",
                "$1 || '-' || $2::int8 || '-' || g || '@example.com'",
            ),
            (
                "raw_app_meta_data",
                r#"'{"provider":"email","providers":["email"]}'"#,
            ),
            ("raw_user_meta_data", "'{}'"),
        ]) + " FROM generate_series(1, $3::int8) g RETURNING id::text";
        let mut ids = Vec::with_capacity(n);
        for chunk in 0..n.div_ceil(per_tx) {
            let count = per_tx.min(n - chunk * per_tx) as i64;
            let rows = gotrue
                .query(&sql, &[&prefix, &(chunk as i64), &count])
                .unwrap();
            ids.extend(rows.iter().map(|r| r.get::<_, String>(0)));
        }
        ids
    }
}

/// The `INSERT INTO users … SELECT …` of one GoTrue user: the columns GoTrue always
/// sets (instance_id, a new id, aud, role, timestamps, is_anonymous) plus `columns`,
/// given as (name, SQL expression); a name among the fixed ones replaces its value.
/// Append `FROM …` for many rows and `RETURNING …` as needed.
pub fn insert_users(columns: &[(&str, &str)]) -> String {
    let mut all: Vec<(&str, &str)> = vec![
        ("instance_id", "'00000000-0000-0000-0000-000000000000'"),
        ("id", "gen_random_uuid()"),
        ("aud", "'authenticated'"),
        ("role", "'authenticated'"),
        ("created_at", "now()"),
        ("updated_at", "now()"),
        ("is_anonymous", "false"),
    ];
    for &(name, value) in columns {
        match all.iter_mut().find(|(n, _)| *n == name) {
            Some(fixed) => fixed.1 = value,
            None => all.push((name, value)),
        }
    }
    let names: Vec<&str> = all.iter().map(|(n, _)| *n).collect();
    let values: Vec<&str> = all.iter().map(|(_, v)| *v).collect();
    format!(
        "INSERT INTO users ({}) SELECT {}",
        names.join(", "),
        values.join(", ")
    )
}

/// Just enough of a cluster to sign up from another thread.
pub struct ClusterHandle {
    pub port: u16,
}

impl ClusterHandle {
    pub fn try_signup(&self, email: &str) -> Result<(String, Duration), String> {
        try_signup_on(self.port, email)
    }
}

fn try_signup_on(port: u16, email: &str) -> Result<(String, Duration), String> {
    let describe = |e: postgres::Error| {
        e.as_db_error()
            .map(|d| d.message().to_string())
            .unwrap_or_else(|| e.to_string())
    };
    let mut gotrue = postgres::Config::new()
        .host("127.0.0.1")
        .port(port)
        .user("supabase_auth_admin")
        .dbname("postgres")
        .connect(postgres::NoTls)
        .map_err(describe)?;
    // GoTrue signs up over pooled connections: the signup is the transaction, not the connect.
    let started = Instant::now();
    gotrue.batch_execute(&signup_sql(email)).map_err(describe)?;
    let took = started.elapsed();
    let row = gotrue
        .query_one("SELECT id::text FROM users WHERE email = $1", &[&email])
        .map_err(describe)?;
    Ok((row.get(0), took))
}

/// example-signup.sql with its email replaced, so every test user is distinct.
pub fn signup_sql(email: &str) -> String {
    static SQL: OnceLock<String> = OnceLock::new();
    let sql = SQL.get_or_init(|| {
        let full = std::fs::read_to_string(fixtures().join("example-signup.sql")).unwrap();
        // Keep the transaction; the final SELECT only displays the result.
        let end = full
            .find("COMMIT;")
            .expect("example-signup.sql has a COMMIT")
            + "COMMIT;".len();
        full[..end].to_string()
    });
    sql.replace(
        "'alice@example.com'",
        &format!("'{}'", email.replace('\'', "''")),
    )
}

/// What GoTrue does to a user after the signup, as supabase_auth_admin (each in a
/// transaction of its own, as GoTrue runs them).
impl Cluster {
    fn as_gotrue(&self, sql: &str, user_id: &str) {
        let mut gotrue = self.connect("supabase_auth_admin");
        let sql = sql.replace("$id", &format!("'{}'::uuid", user_id.replace('\'', "")));
        gotrue.batch_execute(&sql).unwrap();
    }

    /// A sign-in: GoTrue stamps the user (and writes sessions, not in auth.users).
    pub fn sign_in(&self, user_id: &str) {
        self.as_gotrue(
            "UPDATE users SET last_sign_in_at = now(), updated_at = now() WHERE id = $id",
            user_id,
        );
    }

    /// The user follows the confirmation link.
    pub fn confirm_email(&self, user_id: &str) {
        self.as_gotrue(
            "UPDATE users SET email_confirmed_at = now(), confirmation_token = '', updated_at = now() WHERE id = $id",
            user_id,
        );
    }

    /// An email change, requested and then confirmed (two transactions, as in GoTrue).
    pub fn change_email(&self, user_id: &str, email: &str) {
        let email = email.replace('\'', "''");
        self.as_gotrue(
            &format!(
                "UPDATE users SET email_change = '{email}', email_change_token_new = 'tok', \
                 email_change_sent_at = now(), updated_at = now() WHERE id = $id"
            ),
            user_id,
        );
        self.as_gotrue(
            "BEGIN;
             UPDATE users SET email = email_change, email_change = '', email_change_token_new = '',
                    email_change_confirm_status = 0, updated_at = now() WHERE id = $id;
             UPDATE identities SET identity_data = identity_data || jsonb_build_object('email', (SELECT email FROM users WHERE id = $id))
              WHERE user_id = $id;
             COMMIT;",
            user_id,
        );
    }

    /// GoTrue's soft delete (admin API with should_soft_delete): credentials cleared,
    /// email and phone obfuscated, deleted_at set, metadata emptied, identities gone.
    pub fn soft_delete(&self, user_id: &str) {
        self.as_gotrue(
            "BEGIN;
             UPDATE users SET email = encode(sha256(convert_to(id::text || coalesce(email, ''), 'UTF8')), 'hex'),
                    phone = CASE WHEN phone IS NULL THEN NULL ELSE encode(sha256(convert_to(id::text || phone, 'UTF8')), 'hex') END,
                    email_change = '', phone_change = '', encrypted_password = NULL, confirmation_token = '',
                    recovery_token = '', email_change_token_current = '', email_change_token_new = '',
                    phone_change_token = '', deleted_at = now(), updated_at = now()
              WHERE id = $id;
             UPDATE users SET raw_user_meta_data = '{}', updated_at = now() WHERE id = $id;
             UPDATE users SET raw_app_meta_data = '{}', updated_at = now() WHERE id = $id;
             DELETE FROM identities WHERE user_id = $id;
             COMMIT;",
            user_id,
        );
    }

    /// GoTrue's admin delete (the default, a hard delete).
    pub fn delete_user(&self, user_id: &str) {
        self.as_gotrue("DELETE FROM users WHERE id = $id", user_id);
    }
}
