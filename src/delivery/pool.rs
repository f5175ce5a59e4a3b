//! The threads that send: jobs in, outcomes out, and one byte on a socket pair when
//! outcomes arrive while the worker's main thread has not been woken for earlier ones
//! (it waits on the socket beside its latch); a trip that stops sending at once (a
//! shutdown, an open breaker).

use super::channel::Channel;
use super::Attempt;
use crate::model::classify;
use crate::model::event::Event;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// What happened to a job. `sent` is false when the pool stopped before sending it;
/// `current`, whether the target it was sent to is still the one requests go to (a
/// new URL makes the old one's answers say nothing about the backend now).
pub struct Outcome {
    pub id: String,
    pub attempt: u32,
    pub sent: bool,
    pub current: bool,
    pub result: Attempt,
}

enum Message {
    Send(Event),
    /// Look whether there are more threads than wanted, and leave if so.
    Nudge,
}

/// How many sending threads run, and how many should: a thread leaves only between
/// two requests, so after the pool shrinks a busy thread finishes its request, and
/// none starts one while more threads run than `concurrency` allows.
#[derive(Default)]
struct Headcount {
    live: AtomicUsize,
    wanted: AtomicUsize,
}

impl Headcount {
    /// Whether the calling thread is one too many, in which case it is counted out.
    fn leave_if_too_many(&self) -> bool {
        let mut live = self.live.load(Ordering::SeqCst);
        while live > self.wanted.load(Ordering::SeqCst) {
            match self
                .live
                .compare_exchange(live, live - 1, Ordering::SeqCst, Ordering::SeqCst)
            {
                Ok(_) => return true,
                Err(now) => live = now,
            }
        }
        false
    }
}

/// Where requests go now: read by a thread when it starts a request, so a new URL or
/// key applies to every request not yet on the wire (None: delivery is paused).
type CurrentChannel = Arc<Mutex<Option<Arc<Channel>>>>;

/// Threads that send jobs, and the queue of their outcomes.
pub struct Pool {
    jobs: Sender<Message>,
    job_queue: Arc<Mutex<Receiver<Message>>>,
    outcomes: Receiver<Outcome>,
    outcome_sender: Sender<Outcome>,
    channel: CurrentChannel,
    wake_read: UnixStream,
    wake_write: UnixStream,
    /// Set by the thread that writes the wake-up byte, cleared by the main thread
    /// before it reads the outcomes: a burst of outcomes costs one write and one
    /// wake-up, not one per outcome.
    woken: Arc<AtomicBool>,
    stopping: Arc<AtomicBool>,
    /// Set while delivery is paused or the backend is down: jobs not yet on the
    /// wire come back unsent, except a probe.
    holding: Arc<AtomicBool>,
    breaker: Arc<Trip>,
    headcount: Arc<Headcount>,
    threads: Vec<JoinHandle<()>>,
    in_flight: usize,
}

impl Pool {
    pub fn new(threads: usize) -> std::io::Result<Pool> {
        let (wake_read, wake_write) = UnixStream::pair()?;
        wake_read.set_nonblocking(true)?;
        wake_write.set_nonblocking(true)?;
        let (jobs, job_queue) = mpsc::channel();
        let (outcome_sender, outcomes) = mpsc::channel();
        let mut pool = Pool {
            jobs,
            job_queue: Arc::new(Mutex::new(job_queue)),
            outcomes,
            outcome_sender,
            channel: Arc::new(Mutex::new(None)),
            wake_read,
            wake_write,
            woken: Arc::new(AtomicBool::new(false)),
            stopping: Arc::new(AtomicBool::new(false)),
            holding: Arc::new(AtomicBool::new(false)),
            breaker: Arc::new(Trip::default()),
            headcount: Arc::new(Headcount::default()),
            threads: Vec::new(),
            in_flight: 0,
        };
        pool.resize(threads)?;
        Ok(pool)
    }

    /// The descriptor to wait on: readable when outcomes are ready.
    pub fn wake_fd(&self) -> i32 {
        use std::os::fd::AsRawFd;
        self.wake_read.as_raw_fd()
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Threads running now (some may be about to leave after a shrink).
    #[cfg(test)]
    pub fn threads(&self) -> usize {
        self.threads.iter().filter(|t| !t.is_finished()).count()
    }

    /// Grows or shrinks the number of sending threads; jobs already queued are kept.
    pub fn resize(&mut self, wanted: usize) -> std::io::Result<()> {
        let wanted = wanted.max(1);
        self.threads.retain(|t| !t.is_finished());
        self.headcount.wanted.store(wanted, Ordering::SeqCst);
        let live = self.headcount.live.load(Ordering::SeqCst);
        // Threads waiting for a job look at the count; busy ones do after their request.
        for _ in wanted..live {
            let _ = self.jobs.send(Message::Nudge);
        }
        while self.headcount.live.load(Ordering::SeqCst) < wanted {
            let queue = Arc::clone(&self.job_queue);
            let outcomes = self.outcome_sender.clone();
            let channel = Arc::clone(&self.channel);
            let wake = Wake {
                socket: self.wake_write.try_clone()?,
                woken: Arc::clone(&self.woken),
            };
            let flags = Flags {
                stopping: Arc::clone(&self.stopping),
                holding: Arc::clone(&self.holding),
                breaker: Arc::clone(&self.breaker),
                headcount: Arc::clone(&self.headcount),
                requeue: self.jobs.clone(),
            };
            self.headcount.live.fetch_add(1, Ordering::SeqCst);
            let spawned = with_signals_blocked(|| {
                std::thread::Builder::new()
                    .name("pg_new_user_hook sender".into())
                    .spawn(move || sender_loop(queue, channel, outcomes, wake, flags))
            });
            match spawned {
                Ok(handle) => self.threads.push(handle),
                Err(e) => {
                    self.headcount.live.fetch_sub(1, Ordering::SeqCst);
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// Where requests not yet on the wire go from now on (None: they come back unsent).
    pub fn set_channel(&self, channel: Option<Arc<Channel>>) {
        *self.channel.lock().unwrap_or_else(|e| e.into_inner()) = channel;
    }

    /// Holds back (true) or lets go (false) the jobs not yet on the wire. Letting
    /// go also starts the threads' count of failures over.
    pub fn hold(&self, on: bool) {
        if !on {
            self.breaker.failures.store(0, Ordering::SeqCst);
        }
        self.holding.store(on, Ordering::SeqCst);
    }

    /// After this many retryable failures in a row the threads hold back by
    /// themselves, before the worker has read the outcomes (0: never).
    pub fn trip_after(&self, failures: u32) {
        self.breaker.after.store(failures, Ordering::SeqCst);
    }

    /// Whether the threads hold back because the backend keeps failing.
    pub fn tripped(&self) -> bool {
        self.breaker.tripped()
    }

    pub fn submit(&mut self, event: Event) {
        self.in_flight += 1;
        if let Err(mpsc::SendError(Message::Send(job))) = self.jobs.send(Message::Send(event)) {
            // Cannot happen while the pool owns its queue; report it as unsent rather than lose it.
            let _ = self.outcome_sender.send(Outcome {
                id: job.id,
                attempt: job.attempt,
                sent: false,
                current: true,
                result: Attempt::Transport("delivery thread pool is gone".into()),
            });
        }
    }

    /// Outcomes ready now, without blocking.
    pub fn take_outcomes(&mut self) -> Vec<Outcome> {
        // The byte is read before the flag is cleared, and the flag cleared before the
        // outcomes are read: an outcome sent after the clearing writes a byte that
        // stays to be read (the other order could swallow it, and with it the wake-up).
        let mut buf = [0u8; 256];
        while matches!(self.wake_read.read(&mut buf), Ok(n) if n > 0) {}
        self.woken.store(false, Ordering::SeqCst);
        std::sync::atomic::fence(Ordering::SeqCst);
        let outcomes: Vec<Outcome> = self.outcomes.try_iter().collect();
        self.in_flight -= outcomes.len();
        outcomes
    }

    /// Stops sending: queued jobs come back unsent, requests in progress finish
    /// (each within the timeout). Returns every outstanding outcome.
    pub fn stop(&mut self, wait: Duration) -> Vec<Outcome> {
        self.stopping.store(true, Ordering::SeqCst);
        let deadline = std::time::Instant::now() + wait;
        let mut outcomes = Vec::new();
        while self.in_flight > 0 {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self
                .outcomes
                .recv_timeout(left.max(Duration::from_millis(1)))
            {
                Ok(outcome) => {
                    self.in_flight -= 1;
                    outcomes.push(outcome);
                }
                Err(_) => break,
            }
        }
        outcomes
    }
}

impl Drop for Pool {
    /// The threads hold a sender of the job queue (to put a job back): tell them all to leave.
    fn drop(&mut self) {
        self.headcount.wanted.store(0, Ordering::SeqCst);
        for _ in 0..self.headcount.live.load(Ordering::SeqCst) {
            let _ = self.jobs.send(Message::Nudge);
        }
    }
}

/// Runs `spawn` with every signal blocked in the calling thread, so the threads it
/// starts inherit a full mask: signals meant for the worker (SIGTERM, SIGHUP,
/// SIGUSR1 for latches) must run their handlers on the worker's own thread.
fn with_signals_blocked<R>(spawn: impl FnOnce() -> R) -> R {
    // SAFETY: plain signal-mask calls on this thread, restored before returning.
    unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        let mut previous: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_BLOCK, &all, &mut previous);
        let result = spawn();
        libc::pthread_sigmask(libc::SIG_SETMASK, &previous, std::ptr::null_mut());
        result
    }
}

/// The sending threads' own count of retryable failures in a row: with every
/// thread sending, waiting for the worker to read the outcomes would let each
/// thread send more to a backend that is down.
#[derive(Default)]
struct Trip {
    failures: AtomicU32,
    after: AtomicU32,
}

impl Trip {
    fn tripped(&self) -> bool {
        let after = self.after.load(Ordering::SeqCst);
        after > 0 && self.failures.load(Ordering::SeqCst) >= after
    }

    fn observe(&self, result: &Attempt) {
        match classify::backend_up(result) {
            Some(true) => self.failures.store(0, Ordering::SeqCst),
            Some(false) => {
                self.failures.fetch_add(1, Ordering::SeqCst);
            }
            None => {}
        }
    }
}

/// How a sending thread wakes the worker's main thread.
struct Wake {
    socket: UnixStream,
    woken: Arc<AtomicBool>,
}

impl Wake {
    /// After an outcome was queued: one byte, unless one was written since the main
    /// thread last read the outcomes (it will see this one too).
    fn wake(&mut self) {
        if !self.woken.swap(true, Ordering::SeqCst) {
            // A full socket buffer already means "wake up"; nothing to do then.
            let _ = self.socket.write(&[1]);
        }
    }
}

/// What the worker tells the sending threads without a message.
struct Flags {
    stopping: Arc<AtomicBool>,
    holding: Arc<AtomicBool>,
    breaker: Arc<Trip>,
    headcount: Arc<Headcount>,
    /// Where a thread leaving puts back the job it took.
    requeue: Sender<Message>,
}

fn sender_loop(
    queue: Arc<Mutex<Receiver<Message>>>,
    current: CurrentChannel,
    outcomes: Sender<Outcome>,
    mut wake: Wake,
    flags: Flags,
) {
    loop {
        if flags.headcount.leave_if_too_many() {
            return;
        }
        let message = match queue.lock() {
            Ok(rx) => rx.recv(),
            Err(_) => return,
        };
        let job = match message {
            Ok(Message::Send(job)) => job,
            Ok(Message::Nudge) => continue,
            Err(_) => return,
        };
        if flags.headcount.leave_if_too_many() {
            // Taken before the pool shrank: another thread sends it.
            let _ = flags.requeue.send(Message::Send(job));
            return;
        }
        let channel = current.lock().ok().and_then(|c| c.clone());
        let mut still_current = true;
        let (sent, result) = if flags.stopping.load(Ordering::SeqCst) {
            (
                false,
                Attempt::Transport("not sent: the worker is shutting down".into()),
            )
        } else if !job.probe && (flags.holding.load(Ordering::SeqCst) || flags.breaker.tripped()) {
            (false, Attempt::Transport("not sent: held back".into()))
        } else if let Some(channel) = channel {
            let result =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| channel.send(&job)))
                    .unwrap_or_else(|_| {
                        Attempt::Transport("internal error while sending (panic)".into())
                    });
            still_current = current
                .lock()
                .map(|c| c.as_ref().is_some_and(|now| Arc::ptr_eq(now, &channel)))
                .unwrap_or(false);
            if still_current {
                flags.breaker.observe(&result);
            }
            (true, result)
        } else {
            (
                false,
                Attempt::Transport("not sent: delivery is paused by configuration".into()),
            )
        };
        let outcome = Outcome {
            id: job.id,
            attempt: job.attempt,
            sent,
            current: still_current,
            result,
        };
        if outcomes.send(outcome).is_err() {
            return;
        }
        wake.wake();
    }
}
