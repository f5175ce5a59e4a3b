//! What the hand-offs between the worker's main thread and its sending threads cost,
//! without HTTP or PostgreSQL: the mechanism of src/delivery/pool.rs — jobs on one mpsc
//! channel whose receiver the threads share behind a mutex, outcomes on another, and one
//! byte on a socket pair when the main thread has not been woken since it last read them
//! (it waits in poll(), as the worker waits in WaitLatchOrSocket) — with threads that
//! answer at once. Prints the CPU of all threads and of the main thread per job, one job
//! at a time (a trickle: each job a full round trip) and in a burst (the drain's window).
//! Then the request alone: ureq, as the extension configures it, posting an event-sized
//! body to a minimal keep-alive HTTP/1.1 server in this process, back to back and one every
//! 10 ms (a trickle), with the client thread's CPU per request.
//!   cargo run --release --manifest-path bench/Cargo.toml --bin handoff
//! HANDOFF_THREADS (default 32, the default concurrency), HANDOFF_JOBS (default 200,000).

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// About what an event's job carries (its id and the record's text).
struct Job {
    id: String,
    record: String,
}

struct Outcome {
    id: String,
    status: u16,
}

struct Pool {
    jobs: Sender<Option<Job>>,
    outcomes: Receiver<Outcome>,
    wake_read: UnixStream,
    woken: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Pool {
    fn new(threads: usize) -> Pool {
        let (wake_read, wake_write) = UnixStream::pair().unwrap();
        wake_read.set_nonblocking(true).unwrap();
        wake_write.set_nonblocking(true).unwrap();
        let (jobs, job_queue) = mpsc::channel::<Option<Job>>();
        let job_queue = Arc::new(Mutex::new(job_queue));
        let (outcome_sender, outcomes) = mpsc::channel();
        let woken = Arc::new(AtomicBool::new(false));
        let threads = (0..threads)
            .map(|_| {
                let queue = Arc::clone(&job_queue);
                let outcomes = outcome_sender.clone();
                let mut socket = wake_write.try_clone().unwrap();
                let woken = Arc::clone(&woken);
                std::thread::spawn(move || loop {
                    let job = match queue.lock().unwrap().recv() {
                        Ok(Some(job)) => job,
                        _ => return,
                    };
                    // The request would go here.
                    let status = if job.record.is_empty() { 500 } else { 204 };
                    if outcomes.send(Outcome { id: job.id, status }).is_err() {
                        return;
                    }
                    if !woken.swap(true, Ordering::SeqCst) {
                        let _ = socket.write(&[1]);
                    }
                })
            })
            .collect();
        Pool {
            jobs,
            outcomes,
            wake_read,
            woken,
            threads,
        }
    }

    fn submit(&self, job: Job) {
        self.jobs.send(Some(job)).unwrap();
    }

    /// Waits until the socket is readable, then takes every outcome ready (in the
    /// pool's order: the byte, then the flag, then the outcomes).
    fn wait_for_outcomes(&mut self) -> Vec<Outcome> {
        let mut fd = libc::pollfd {
            fd: self.wake_read.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        unsafe { libc::poll(&mut fd, 1, 1000) };
        let mut buf = [0u8; 256];
        while matches!(self.wake_read.read(&mut buf), Ok(n) if n > 0) {}
        self.woken.store(false, Ordering::SeqCst);
        std::sync::atomic::fence(Ordering::SeqCst);
        self.outcomes.try_iter().collect()
    }

    fn stop(self) {
        for _ in &self.threads {
            let _ = self.jobs.send(None);
        }
        for t in self.threads {
            let _ = t.join();
        }
    }
}

/// CPU time of the whole process (every thread) and of the calling thread.
fn cpu() -> (Duration, Duration) {
    // SAFETY: plain clock reads into local structs.
    unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        let process = Duration::from_secs((usage.ru_utime.tv_sec + usage.ru_stime.tv_sec) as u64)
            + Duration::from_micros((usage.ru_utime.tv_usec + usage.ru_stime.tv_usec) as u64);
        let mut ts: libc::timespec = std::mem::zeroed();
        libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts);
        let thread = Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32);
        (process, thread)
    }
}

fn job(i: usize) -> Job {
    Job {
        id: format!("00000000-0000-4000-8000-{i:012}"),
        record: format!("{{\"id\":\"{i}\",\"email\":\"user-{i}@example.com\"}}").repeat(8),
    }
}

/// Runs `jobs` jobs with at most `window` in flight; prints the CPU per job.
fn run(what: &str, threads: usize, jobs: usize, window: usize) {
    let mut pool = Pool::new(threads);
    // Let the threads start and park before measuring.
    std::thread::sleep(Duration::from_millis(100));
    let (process_before, main_before) = cpu();
    let started = Instant::now();
    let (mut submitted, mut done, mut wake_ups) = (0, 0, 0);
    while done < jobs {
        while submitted < jobs && submitted - done < window {
            pool.submit(job(submitted));
            submitted += 1;
        }
        let outcomes = pool.wait_for_outcomes();
        wake_ups += 1;
        done += outcomes.len();
        assert!(outcomes.iter().all(|o| o.status == 204 && !o.id.is_empty()));
    }
    let elapsed = started.elapsed();
    let (process_after, main_after) = cpu();
    pool.stop();
    let per_job = |d: Duration| d.as_secs_f64() * 1e6 / jobs as f64;
    println!(
        "  {what:<44} {:>7.2} µs all threads, {:>6.2} µs main thread, {:>9.0} jobs/s, {:>5.1} jobs a wake-up",
        per_job(process_after - process_before),
        per_job(main_after - main_before),
        jobs as f64 / elapsed.as_secs_f64(),
        jobs as f64 / wake_ups as f64,
    );
}

fn main() {
    let threads: usize = std::env::var("HANDOFF_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(32);
    let jobs: usize = std::env::var("HANDOFF_JOBS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200_000);
    println!(
        "hand-offs of the sending pool, {threads} threads answering at once, {jobs} jobs (per job: CPU of all threads / of the main thread)"
    );
    run(
        "one job at a time (a trickle's round trip)",
        threads,
        jobs / 10,
        1,
    );
    run("a window of 64", threads, jobs, 64);
    run(
        "a window of 1,024 (the drain's, concurrency 32)",
        threads,
        jobs,
        1024,
    );
    println!(
        "the request alone: ureq to a keep-alive server in this process (client thread's CPU)"
    );
    requests_alone();
}

/// Answers 204 to every request on each connection, keeping it open.
fn serve(listener: std::net::TcpListener) {
    for stream in listener.incoming().flatten() {
        std::thread::spawn(move || {
            let mut answer = stream.try_clone().unwrap();
            let mut request = BufReader::new(stream);
            let mut line = String::new();
            loop {
                let mut length = 0usize;
                loop {
                    line.clear();
                    if request.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    if line == "\r\n" {
                        break;
                    }
                    if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                        length = v.trim().parse().unwrap_or(0);
                    }
                }
                let mut body = vec![0; length];
                if request.read_exact(&mut body).is_err()
                    || answer
                        .write_all(b"HTTP/1.1 204 No Content\r\n\r\n")
                        .is_err()
                {
                    return;
                }
            }
        });
    }
}

fn thread_cpu() -> Duration {
    // SAFETY: a plain clock read into a local struct.
    unsafe {
        let mut ts: libc::timespec = std::mem::zeroed();
        libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts);
        Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
    }
}

/// ureq as the extension configures it, posting an event-sized body.
fn requests_alone() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/users", listener.local_addr().unwrap());
    std::thread::spawn(move || serve(listener));
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(5)))
        .http_status_as_error(false)
        .build()
        .into();
    let body = job(1).record;
    let send = || {
        let answer = agent
            .post(&url)
            .header("content-type", "application/json")
            .header("x-api-key", "key")
            .send(body.as_bytes())
            .unwrap();
        assert_eq!(answer.status().as_u16(), 204);
    };
    for _ in 0..100 {
        send();
    }
    for (what, n, gap) in [
        ("back to back", 20_000, Duration::ZERO),
        (
            "one every 10 ms (a trickle)",
            500,
            Duration::from_millis(10),
        ),
    ] {
        let before = thread_cpu();
        let started = Instant::now();
        for _ in 0..n {
            send();
            std::thread::sleep(gap);
        }
        println!(
            "  {what:<44} {:>7.1} µs a request, {:>9.0} requests/s",
            (thread_cpu() - before).as_secs_f64() * 1e6 / n as f64,
            n as f64 / started.elapsed().as_secs_f64()
        );
    }
}
