//! A PostgreSQL cluster of its own for each test, copied from a template that has
//! the Supabase roles and the 70 GoTrue migrations.

use super::*;
use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};

/// The binaries of the PostgreSQL under test (`PG_CONFIG`, else `pg_config` on the PATH).
pub fn bindir() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let pg_config = std::env::var("PG_CONFIG").unwrap_or_else(|_| "pg_config".into());
        let mut c = Command::new(pg_config);
        c.arg("--bindir");
        PathBuf::from(run(c, "pg_config --bindir").trim())
    })
    .clone()
}

/// Each PostgreSQL installation's template cluster: (bindir, root).
static TEMPLATES: Mutex<Vec<(PathBuf, PathBuf)>> = Mutex::new(Vec::new());

/// The template cluster of one PostgreSQL installation, with the Supabase roles and the
/// 70 GoTrue migrations; every test copies it.
fn template(bindir: &Path) -> PathBuf {
    let mut templates = TEMPLATES.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, root)) = templates.iter().find(|(b, _)| b == bindir) {
        return root.clone();
    }
    let mut cluster = Cluster::init_empty(bindir, CLUSTER_CONF);
    cluster.start();
    let mut load = as_pg_user(Path::new("sh"));
    load.arg(fixtures().join("load.sh"))
        .env("PATH", path_with(bindir))
        .env("PGHOST", &cluster.socket_dir())
        .env("PGPORT", cluster.port.to_string())
        .env("PGDATABASE", "postgres")
        .env("SUPERUSER", "supabase_admin");
    run(load, "loading the Supabase Auth schema (load.sh)");
    cluster.shut_down();
    let root = cluster.root.clone();
    // Lives as long as the test binary: removed when it exits (see remove_templates).
    std::mem::forget(cluster);
    if templates.is_empty() {
        // SAFETY: registers a plain function without arguments; the C library calls it at exit.
        unsafe { libc::atexit(remove_templates) };
    }
    templates.push((bindir.to_path_buf(), root.clone()));
    root
}

/// Removes the template clusters when the test binary exits, so that a run leaves nothing
/// behind in the temporary directory (each is a whole cluster, ≈ 40 MB).
extern "C" fn remove_templates() {
    let templates = TEMPLATES.lock().unwrap_or_else(|e| e.into_inner());
    for (_, root) in templates.iter() {
        let _ = std::fs::remove_dir_all(root);
    }
}

/// What every test cluster runs with: the library preloaded, loopback only.
pub const CLUSTER_CONF: &str = "shared_preload_libraries = 'pg_new_user_hook'\n\
                                pg_new_user_hook.database = 'postgres'\n\
                                listen_addresses = '127.0.0.1'\n\
                                fsync = off\n\
                                max_connections = 100\n";

pub struct Cluster {
    pub root: PathBuf,
    pub port: u16,
    /// The PostgreSQL installation this cluster runs on.
    pub bindir: PathBuf,
    running: bool,
}

impl Cluster {
    /// A fresh copy of the template cluster, started, with `extra` postgresql.conf lines.
    pub fn new(extra: &[&str]) -> Cluster {
        Cluster::new_on(&bindir(), extra)
    }

    /// The same on the PostgreSQL installation in `bindir` (another major, say).
    pub fn new_on(bindir: &Path, extra: &[&str]) -> Cluster {
        let template = template(bindir);
        let root = scratch_dir("cluster");
        let mut cp = as_pg_user(Path::new("cp"));
        cp.arg("-a")
            .arg(template.join("data"))
            .arg(root.join("data"));
        run(cp, "copying the template cluster");
        Cluster::start_at(bindir, root, extra)
    }

    /// A cluster with the hook installed, delivering to `url` with these settings.
    pub fn hooked_to(url: &str, settings: &[(&str, &str)]) -> Cluster {
        let cluster = Cluster::with_hook(&[]);
        let mut all = vec![("url", url)];
        all.extend_from_slice(settings);
        cluster.configure(&all);
        cluster
    }

    /// A cluster with the Supabase schema and the extension created and installed on auth.users.
    pub fn with_hook(extra: &[&str]) -> Cluster {
        let cluster = Cluster::new(extra);
        let mut admin = cluster.connect("supabase_admin");
        admin
            .batch_execute("CREATE EXTENSION pg_new_user_hook; SELECT new_user_hook.install();")
            .unwrap();
        cluster
    }

    /// An empty cluster (initdb only, no Supabase schema) on `bindir`, not started.
    pub fn init_empty(bindir: &Path, conf: &str) -> Cluster {
        let root = scratch_dir("cluster");
        let mut initdb = as_pg_user(&bindir.join("initdb"));
        initdb.arg("-D").arg(root.join("data")).args([
            "-U",
            "supabase_admin",
            "--auth=trust",
            "-E",
            "UTF8",
            "--locale=C",
            "-N",
            // 18's default on every major: pg_upgrade needs the same setting on both sides.
            "--data-checksums",
        ]);
        run(initdb, "initdb");
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(root.join("data/postgresql.conf"))
            .unwrap();
        std::io::Write::write_all(&mut f, conf.as_bytes()).unwrap();
        Cluster {
            root,
            port: free_port(),
            bindir: bindir.to_path_buf(),
            running: false,
        }
    }

    fn start_at(bindir: &Path, root: PathBuf, extra: &[&str]) -> Cluster {
        let port = free_port();
        if !extra.is_empty() {
            let mut f = std::fs::OpenOptions::new()
                .append(true)
                .open(root.join("data/postgresql.auto.conf"))
                .unwrap();
            for line in extra {
                std::io::Write::write_all(&mut f, format!("{line}\n").as_bytes()).unwrap();
            }
        }
        let mut cluster = Cluster {
            root,
            port,
            bindir: bindir.to_path_buf(),
            running: false,
        };
        cluster.start();
        cluster
    }

    pub fn socket_dir(&self) -> PathBuf {
        self.root.clone()
    }

    pub fn log_path(&self) -> PathBuf {
        self.root.join("server.log")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn start_command(&self) -> Command {
        let mut c = as_pg_user(&self.bindir.join("pg_ctl"));
        c.arg("-D")
            .arg(self.root.join("data"))
            .arg("-l")
            .arg(self.log_path())
            .arg("-w")
            .arg("-o")
            .arg(format!(
                "-p {} -k {}",
                self.port,
                self.socket_dir().display()
            ))
            .arg("start");
        c
    }

    pub fn start(&mut self) {
        run(self.start_command(), "pg_ctl start");
        self.running = true;
    }

    fn pg_ctl_stop(&self, mode: &str) {
        let mut c = as_pg_user(&self.bindir.join("pg_ctl"));
        c.arg("-D")
            .arg(self.root.join("data"))
            .args(["-w", "-m", mode, "stop"]);
        run(c, "pg_ctl stop");
    }

    pub fn stop(&self) {
        self.pg_ctl_stop("fast");
    }

    /// A clean shutdown that the cluster remembers (Drop then does not stop it again).
    pub fn shut_down(&mut self) {
        self.pg_ctl_stop("fast");
        self.running = false;
    }

    /// Simulates a crash: no shutdown checkpoint, WAL replay on the next start.
    pub fn crash(&mut self) {
        self.pg_ctl_stop("immediate");
        self.running = false;
    }

    pub fn restart(&mut self) {
        self.pg_ctl_stop("fast");
        self.start();
    }

    pub fn connect(&self, user: &str) -> postgres::Client {
        postgres::Config::new()
            .host("127.0.0.1")
            .port(self.port)
            .user(user)
            .dbname("postgres")
            .connect(postgres::NoTls)
            .unwrap_or_else(|e| panic!("connecting as {user}: {e}"))
    }

    /// Changes settings the way an operator does: ALTER SYSTEM, then a reload.
    pub fn configure(&self, settings: &[(&str, &str)]) {
        let mut admin = self.connect("supabase_admin");
        for (name, value) in settings {
            admin
                .batch_execute(&format!(
                    "ALTER SYSTEM SET pg_new_user_hook.{name} = '{}'",
                    value.replace('\'', "''")
                ))
                .unwrap();
        }
        admin.batch_execute("SELECT pg_reload_conf()").unwrap();
    }

    pub fn worker_pid(&self) -> Option<i32> {
        self.connect("supabase_admin")
            .query_opt(
                "SELECT pid FROM pg_stat_activity WHERE backend_type = 'pg_new_user_hook'",
                &[],
            )
            .unwrap()
            .map(|r| r.get(0))
    }

    /// Polls new_user_hook.deliveries until `sql_condition` holds for the event of `user_id`.
    pub fn wait_for_event(&self, user_id: &str, sql_condition: &str, within: Duration) {
        let mut admin = self.connect("supabase_admin");
        let sql = format!(
            "SELECT count(*) FROM new_user_hook.deliveries WHERE user_id = $1::text::uuid AND ({sql_condition})"
        );
        wait_for(
            &format!("event of {user_id} to satisfy {sql_condition}"),
            within,
            || {
                let n: i64 = admin.query_one(&sql, &[&user_id]).unwrap().get(0);
                (n > 0).then_some(())
            },
        );
    }

    pub fn postmaster_pid(&self) -> i32 {
        let pid = std::fs::read_to_string(self.root.join("data/postmaster.pid")).unwrap();
        pid.lines().next().unwrap().trim().parse().unwrap()
    }

    /// `kill -9` of the postmaster; its children exit when they notice.
    pub fn kill9(&mut self) {
        let pid = self.postmaster_pid();
        Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status()
            .unwrap();
        self.running = false;
    }

    /// `kill -9` of the postmaster, then a start once the old processes are gone:
    /// crash recovery replays the WAL.
    pub fn kill9_and_restart(&mut self) {
        self.kill9();
        wait_for(
            "the crashed server's processes to exit",
            Duration::from_secs(30),
            || {
                self.start_command()
                    .output()
                    .ok()
                    .filter(|o| o.status.success())
            },
        );
        self.running = true;
    }

    /// A streaming-replication standby of this cluster (`pg_basebackup -R`), started,
    /// with `extra` lines added to its own postgresql.auto.conf.
    pub fn standby(&self, extra: &[&str]) -> Cluster {
        let root = scratch_dir("standby");
        let mut backup = as_pg_user(&self.bindir.join("pg_basebackup"));
        backup
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(["-U", "supabase_admin", "-R", "-X", "stream", "-D"])
            .arg(root.join("data"));
        run(backup, "pg_basebackup");
        Cluster::start_at(&self.bindir, root, extra)
    }

    /// Promotes a standby to primary and waits until it is one.
    pub fn promote(&self) {
        let mut c = as_pg_user(&self.bindir.join("pg_ctl"));
        c.arg("-D")
            .arg(self.root.join("data"))
            .args(["-w", "promote"]);
        run(c, "pg_ctl promote");
    }

    pub fn one_row(&self, sql: &str) -> postgres::Row {
        self.connect("supabase_admin").query_one(sql, &[]).unwrap()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.running {
            let mut c = as_pg_user(&self.bindir.join("pg_ctl"));
            c.arg("-D")
                .arg(self.root.join("data"))
                .args(["-w", "-m", "immediate", "stop"]);
            let _ = c.output();
        }
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.root);
        } else {
            eprintln!(
                "cluster kept for inspection: {} (log: server.log)",
                self.root.display()
            );
        }
    }
}
