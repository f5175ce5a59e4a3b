//! Test harness for end-to-end tests: a real PostgreSQL cluster (the major of
//! `PG_CONFIG`, or of a given bindir) with the
//! extension preloaded and the real Supabase Auth schema, and an HTTP receiver
//! on 127.0.0.1 in the test process.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Polls `check` until it returns Some or the deadline passes.
pub fn wait_for<T>(what: &str, within: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = check() {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {within:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn is_root() -> bool {
    std::env::var("USER").map(|u| u == "root").unwrap_or(false)
        || Command::new("id")
            .arg("-u")
            .output()
            .map(|o| o.stdout.trim_ascii() == b"0")
            .unwrap_or(false)
}

/// Runs a command as the cluster's OS user: `postgres` when we are root (PostgreSQL refuses root).
pub fn as_pg_user(program: &Path) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

pub fn run(mut cmd: Command, what: &str) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    if !out.status.success() {
        panic!(
            "{what} failed ({}):\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

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

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn scratch_dir(name: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "pg_new_user_hook-{}-{}-{name}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    if is_root() {
        run(
            {
                let mut c = Command::new("chown");
                c.arg("postgres:postgres").arg(&dir);
                c
            },
            "chown",
        );
    }
    dir
}

/// A cluster initialised once per test binary (and per PostgreSQL installation)
/// with the Supabase roles and the 70 GoTrue migrations; every test copies it.
fn template(bindir: &Path) -> PathBuf {
    static TEMPLATES: Mutex<Vec<(PathBuf, PathBuf)>> = Mutex::new(Vec::new());
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
    std::mem::forget(cluster);
    templates.push((bindir.to_path_buf(), root.clone()));
    root
}

/// What every test cluster runs with: the library preloaded, loopback only.
pub const CLUSTER_CONF: &str = "shared_preload_libraries = 'pg_new_user_hook'\n\
                                pg_new_user_hook.database = 'postgres'\n\
                                listen_addresses = '127.0.0.1'\n\
                                fsync = off\n\
                                max_connections = 100\n";

/// PATH with `bindir` first, so psql and friends are of that installation.
pub fn path_with(bindir: &Path) -> std::ffi::OsString {
    let mut dirs = vec![bindir.to_path_buf()];
    dirs.extend(std::env::split_paths(
        &std::env::var_os("PATH").unwrap_or_default(),
    ));
    std::env::join_paths(dirs).unwrap()
}

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

    /// `kill -9` of the postmaster (its children exit when they notice), then a start
    /// once the old processes are gone: crash recovery replays the WAL.
    pub fn kill9_and_restart(&mut self) {
        let pid = self.postmaster_pid();
        Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status()
            .unwrap();
        self.running = false;
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

    /// A GoTrue signup that reports failure instead of panicking, and its duration.
    pub fn try_signup(&self, email: &str) -> Result<(String, Duration), String> {
        try_signup_on(self.port, email)
    }

    /// Inserts `n` users the way GoTrue does, `per_tx` per transaction; returns their ids.
    pub fn bulk_signups(&self, prefix: &str, n: usize, per_tx: usize) -> Vec<String> {
        let mut gotrue = self.connect("supabase_auth_admin");
        let mut ids = Vec::with_capacity(n);
        for chunk in 0..n.div_ceil(per_tx) {
            let count = per_tx.min(n - chunk * per_tx) as i64;
            let rows = gotrue
                .query(
                    "INSERT INTO users (instance_id, id, aud, role, email, raw_app_meta_data, raw_user_meta_data, created_at, updated_at, is_anonymous)
                     SELECT '00000000-0000-0000-0000-000000000000', gen_random_uuid(), 'authenticated', 'authenticated',
                            $1 || '-' || $2::int8 || '-' || g || '@example.com', '{\"provider\":\"email\",\"providers\":[\"email\"]}', '{}', now(), now(), false
                       FROM generate_series(1, $3::int8) g
                     RETURNING id::text",
                    &[&prefix, &(chunk as i64), &count],
                )
                .unwrap();
            ids.extend(rows.iter().map(|r| r.get::<_, String>(0)));
        }
        ids
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

/// One request as the receiver saw it.
#[derive(Clone, Debug)]
pub struct Received {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: String,
    pub at: Instant,
    /// The status the receiver answered with (None: it never answered).
    pub answered: Option<u16>,
}

impl Received {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap()
    }
}

fn answer(request: tiny_http::Request, reply: Reply) {
    match reply {
        Reply::Status(code) => {
            let _ = request.respond(tiny_http::Response::empty(code));
        }
        Reply::StatusWith(code, header, value) => {
            let h = tiny_http::Header::from_bytes(header.as_bytes(), value.as_bytes()).unwrap();
            let body = if code >= 400 {
                "{\"message\":\"rejected by test receiver\"}"
            } else {
                ""
            };
            let _ = request.respond(
                tiny_http::Response::from_string(body)
                    .with_status_code(code)
                    .with_header(h),
            );
        }
        Reply::Hang => {
            std::thread::sleep(Duration::from_secs(120));
            drop(request);
        }
    }
}

/// How the receiver answers request number n (0-based).
pub enum Reply {
    Status(u16),
    StatusWith(u16, &'static str, String),
    /// Accept and never answer (until the receiver is dropped).
    Hang,
}

/// Releases the requests a `Receiver::holding_after` holds.
pub struct Gate(Arc<AtomicBool>);

impl Gate {
    pub fn open(&self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

type Behaviour = dyn Fn(usize, &Received) -> Reply + Send + Sync;

pub struct Receiver {
    pub port: u16,
    pub url: String,
    requests: Arc<Mutex<Vec<Received>>>,
    server: Arc<tiny_http::Server>,
}

impl Receiver {
    pub fn start(
        behaviour: impl Fn(usize, &Received) -> Reply + Send + Sync + 'static,
    ) -> Receiver {
        Receiver::start_on(0, behaviour)
    }

    pub fn ok() -> Receiver {
        Receiver::start(|_, _| Reply::Status(200))
    }

    /// A backend that answers the first `answered` requests with 200 and holds every
    /// later one until the returned gate is opened, then answers it 200 too (even if
    /// its sender is gone by then, as a backend that did the work would). Puts a crash
    /// in the middle of a backlog with requests in flight, whatever the machine's speed.
    pub fn holding_after(answered: usize) -> (Receiver, Gate) {
        let gate = Gate(Arc::new(AtomicBool::new(false)));
        let open = Arc::clone(&gate.0);
        let receiver = Receiver::start(move |n, _| {
            while n >= answered && !open.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(5));
            }
            Reply::Status(200)
        });
        (receiver, gate)
    }

    pub fn start_on(
        port: u16,
        behaviour: impl Fn(usize, &Received) -> Reply + Send + Sync + 'static,
    ) -> Receiver {
        let server = Arc::new(tiny_http::Server::http(("127.0.0.1", port)).unwrap());
        let port = server.server_addr().to_ip().unwrap().port();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let behaviour: Arc<Behaviour> = Arc::new(behaviour);
        {
            let server = Arc::clone(&server);
            let requests = Arc::clone(&requests);
            std::thread::spawn(move || {
                for mut request in server.incoming_requests() {
                    let mut body = String::new();
                    let _ = request.as_reader().read_to_string(&mut body);
                    let received = Received {
                        method: request.method().to_string(),
                        path: request.url().to_string(),
                        headers: request
                            .headers()
                            .iter()
                            .map(|h| (h.field.as_str().to_string(), h.value.as_str().to_string()))
                            .collect(),
                        body,
                        at: Instant::now(),
                        answered: None,
                    };
                    let n = {
                        let mut all = requests.lock().unwrap();
                        all.push(received.clone());
                        all.len() - 1
                    };
                    let behaviour = Arc::clone(&behaviour);
                    let requests = Arc::clone(&requests);
                    // Each request gets its own thread: a slow or hanging reply blocks no other.
                    std::thread::spawn(move || {
                        let reply = behaviour(n, &received);
                        if let Reply::Status(code) | Reply::StatusWith(code, _, _) = &reply {
                            requests.lock().unwrap()[n].answered = Some(*code);
                        }
                        answer(request, reply);
                    });
                }
            });
        }
        Receiver {
            port,
            url: format!("http://127.0.0.1:{port}/users"),
            requests,
            server,
        }
    }

    pub fn requests(&self) -> Vec<Received> {
        self.requests.lock().unwrap().clone()
    }

    /// The requests answered with a 2xx: the deliveries.
    pub fn accepted(&self) -> Vec<Received> {
        self.requests()
            .into_iter()
            .filter(|r| r.answered.is_some_and(|s| (200..300).contains(&s)))
            .collect()
    }

    pub fn count(&self) -> usize {
        self.requests.lock().unwrap().len()
    }

    /// Waits until at least `n` requests arrived; returns them all.
    pub fn wait_for_requests(&self, n: usize, within: Duration) -> Vec<Received> {
        wait_for(&format!("{n} requests at the receiver"), within, || {
            let all = self.requests();
            (all.len() >= n).then_some(all)
        })
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.server.unblock();
    }
}

/// A port with nothing listening on it (for "backend down" scenarios).
pub fn closed_port() -> u16 {
    free_port()
}

/// CPU time (user + system, all threads) a process has used so far.
pub fn cpu_time(pid: i32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may contain spaces): utime and stime are 14 and 15.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    Duration::from_millis(ticks * 10) // USER_HZ is 100 on Linux
}

/// A helper process (receiver, backend) that is killed when the test lets go of it.
pub struct KillOnDrop(pub std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits until something accepts TCP connections on 127.0.0.1:`port`.
pub fn wait_until_listening(what: &str, port: u16) {
    wait_for(
        &format!("{what} to listen on port {port}"),
        Duration::from_secs(60),
        || std::net::TcpStream::connect(("127.0.0.1", port)).ok(),
    );
}
