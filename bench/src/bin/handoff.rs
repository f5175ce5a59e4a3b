//! What the hand-offs between the worker's main thread and its sending threads cost,
//! without HTTP or PostgreSQL: the mechanism of src/delivery/pool.rs — jobs on one mpsc
//! channel whose receiver the threads share behind a mutex, outcomes on another, and one
//! byte on a socket pair when the main thread has not been woken since it last read them
//! (it waits in poll(), as the worker waits in WaitLatchOrSocket) — with threads that
//! answer at once. Prints the CPU of all threads and of the main thread per job, one job
//! at a time (a trickle: each job a full round trip) and in a burst (the drain's window).
//!   cargo run --release --manifest-path bench/Cargo.toml --bin handoff
//! HANDOFF_THREADS (default 32, the default concurrency), HANDOFF_JOBS (default 200,000).

use std::io::{Read, Write};
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
}
