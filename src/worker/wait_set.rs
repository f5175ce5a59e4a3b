//! What the worker sleeps on, kept for its life: its latch, the sending threads'
//! wake-up pipe and the postmaster's death. WaitLatchOrSocket builds and closes an
//! epoll set at every call: five system calls beside the wait, about eight an event
//! at a steady trickle of signups.

use pgrx::pg_sys;
use std::time::Duration;

pub(super) struct WaitSet(*mut pg_sys::WaitEventSet);

impl WaitSet {
    /// `fd`: readable when the sending threads have outcomes; it lives as long as
    /// the worker does.
    pub fn new(fd: i32) -> WaitSet {
        // SAFETY: on the worker's main thread; the set is allocated in
        // TopMemoryContext (tied to no resource owner), so it lives with the process.
        unsafe {
            #[cfg(any(feature = "pg15", feature = "pg16"))]
            let set = pg_sys::CreateWaitEventSet(pg_sys::TopMemoryContext, 3);
            #[cfg(not(any(feature = "pg15", feature = "pg16")))]
            let set = pg_sys::CreateWaitEventSet(std::ptr::null_mut(), 3);
            let none = std::ptr::null_mut();
            pg_sys::AddWaitEventToSet(
                set,
                pg_sys::WL_LATCH_SET,
                pg_sys::PGINVALID_SOCKET,
                pg_sys::MyLatch,
                none,
            );
            pg_sys::AddWaitEventToSet(
                set,
                pg_sys::WL_SOCKET_READABLE,
                fd,
                std::ptr::null_mut(),
                none,
            );
            pg_sys::AddWaitEventToSet(
                set,
                pg_sys::WL_EXIT_ON_PM_DEATH,
                pg_sys::PGINVALID_SOCKET,
                std::ptr::null_mut(),
                none,
            );
            WaitSet(set)
        }
    }

    /// Sleeps until the latch is set, the pipe is readable or `timeout` has passed,
    /// then resets the latch if it was set; returns whether it was. A commit may set
    /// the latch after the wait returned for another reason: it is read before it is
    /// cleared, and never cleared unread, or that wake-up is lost.
    pub fn wait(&mut self, timeout: Duration) -> bool {
        let mut occurred = [pg_sys::WaitEvent::default(); 3];
        // SAFETY: the set was built on this thread and is never freed.
        unsafe {
            let n = pg_sys::WaitEventSetWait(
                self.0,
                timeout.as_millis().min(i32::MAX as u128) as _,
                occurred.as_mut_ptr(),
                occurred.len() as i32,
                pg_sys::PG_WAIT_EXTENSION,
            );
            let by_latch = occurred[..n.max(0) as usize]
                .iter()
                .any(|e| e.events & pg_sys::WL_LATCH_SET != 0);
            let latch_was_set = by_latch || (*pg_sys::MyLatch).is_set != 0;
            // Reset only a latch seen set: one set after the look stays set, and ends
            // the next wait at once.
            if latch_was_set {
                pg_sys::ResetLatch(pg_sys::MyLatch);
            }
            latch_was_set
        }
    }
}
