//! Test harness for end-to-end tests: a real PostgreSQL cluster (the major of
//! `PG_CONFIG`, or of a given bindir) with the extension preloaded and the real
//! Supabase Auth schema (`cluster`), GoTrue's signups (`gotrue`), and an HTTP
//! receiver on 127.0.0.1 in the test process (`receiver`).
#![allow(dead_code, unused_imports)]

mod cluster;
mod gotrue;
mod receiver;

pub use cluster::*;
pub use gotrue::*;
pub use receiver::*;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
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

/// PATH with `bindir` first, so psql and friends are of that installation.
pub fn path_with(bindir: &Path) -> std::ffi::OsString {
    let mut dirs = vec![bindir.to_path_buf()];
    dirs.extend(std::env::split_paths(
        &std::env::var_os("PATH").unwrap_or_default(),
    ));
    std::env::join_paths(dirs).unwrap()
}

/// CPU time (user + system, all threads) a process has used so far.
pub fn cpu_time(pid: i32) -> Duration {
    stat_cpu_time(&format!("/proc/{pid}/stat"))
}

/// The CPU time (user + system) of one thread `tid` of process `pid`.
pub fn thread_cpu_time(pid: i32, tid: i32) -> Duration {
    stat_cpu_time(&format!("/proc/{pid}/task/{tid}/stat"))
}

fn stat_cpu_time(path: &str) -> Duration {
    let stat = std::fs::read_to_string(path).unwrap();
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
