//! What the worker says when a step of its work keeps failing: which step, the
//! error, and what to do about it. A step that fails once is retried quietly (a
//! lock held for a moment, a server restarting); one that fails twice in a row is a
//! problem, shown in `new_user_hook.status.problem`, the `problem` metric and the
//! log until it succeeds again. Pure: the worker feeds it outcomes.

/// A part of the worker's work that can fail on its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Recording outcomes and claiming due events (one transaction).
    Round,
    /// Reading committed events into the outbox (a subtransaction of the round).
    Take,
    Purge,
    /// Emptying the log's read segment (or a 0.7.0 schema's VACUUM of its capture table).
    Rotate,
    Count,
}

impl Step {
    pub fn describe(self) -> &'static str {
        match self {
            Step::Round => "recording outcomes and claiming due events",
            Step::Take => "reading committed events from the log",
            Step::Purge => "purging delivered events past the retention",
            Step::Rotate => "rotating the log (new_user_hook.log_0 and log_1)",
            Step::Count => "counting the queue for the metrics",
        }
    }
}

/// Failures in a row that make a problem.
pub const REPEATED: u32 = 2;

/// What to do about an error, from its message.
pub fn remedy(error: &str) -> &'static str {
    let e = error.to_ascii_lowercase();
    if e.contains("replica identity") {
        "a publication includes the extension's tables and one lacks a replica identity: \
         run ALTER EXTENSION pg_new_user_hook UPDATE (0.8.0 reads events from a log it never \
         deletes from), or ALTER TABLE new_user_hook.captured REPLICA IDENTITY FULL"
    } else if e.contains("snapshot is older") {
        "a long transaction keeps a snapshot from before the worker's last read of the log \
         (pg_stat_activity: backend_xmin, xact_start): end it; events are delivered meanwhile, \
         and the log is emptied once it ends"
    } else if e.contains("lock timeout") || e.contains("could not obtain lock") {
        "another transaction holds a lock on the extension's tables: find it in pg_locks \
         joined with pg_stat_activity and end it; events wait meanwhile, none is lost"
    } else if e.contains("permission denied") || e.contains("must be owner") {
        "the worker lacks a privilege on the extension's objects: they must stay owned by \
         the superuser that created the extension, with the privileges it gave them"
    } else if e.contains("read-only transaction") {
        "the worker's transactions are read-only: default_transaction_read_only is on for its \
         database or role (ALTER DATABASE ... RESET default_transaction_read_only, then \
         restart the worker with pg_terminate_backend)"
    } else if e.contains("no space left") || e.contains("could not extend") {
        "the disk is full: free space on the database's volume"
    } else if e.contains("does not exist") {
        "an object of the extension is missing: run ALTER EXTENSION pg_new_user_hook UPDATE, \
         or DROP and CREATE EXTENSION pg_new_user_hook (queued events are dropped with it)"
    } else {
        "see the server log for the full error"
    }
}

/// The failures in a row of each step that is failing.
#[derive(Default)]
pub struct Failures {
    failing: Vec<(Step, u32, String)>,
}

/// What a step's outcome changed.
#[derive(Debug, PartialEq, Eq)]
pub enum Change {
    Nothing,
    /// The step has now failed `REPEATED` times in a row: this is the problem.
    Became(String),
    /// The step succeeds again after being a problem.
    Recovered,
}

impl Failures {
    pub fn failed(&mut self, step: Step, error: &str) -> Change {
        let count = match self.failing.iter_mut().find(|(s, _, _)| *s == step) {
            Some(entry) => {
                entry.1 += 1;
                entry.2 = error.to_string();
                entry.1
            }
            None => {
                self.failing.push((step, 1, error.to_string()));
                1
            }
        };
        if count == REPEATED {
            Change::Became(self.problem().expect("a step fails repeatedly"))
        } else {
            Change::Nothing
        }
    }

    pub fn succeeded(&mut self, step: Step) -> Change {
        let Some(at) = self.failing.iter().position(|(s, _, _)| *s == step) else {
            return Change::Nothing;
        };
        let (_, count, _) = self.failing.remove(at);
        if count >= REPEATED {
            Change::Recovered
        } else {
            Change::Nothing
        }
    }

    /// The first step failing repeatedly, with its last error and what to do.
    pub fn problem(&self) -> Option<String> {
        self.failing
            .iter()
            .find(|(_, count, _)| *count >= REPEATED)
            .map(|(step, _, error)| {
                format!(
                    "{} keeps failing ({error}): {}",
                    step.describe(),
                    remedy(error)
                )
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_failure_is_quiet_two_in_a_row_are_a_problem_until_a_success() {
        let mut f = Failures::default();
        assert_eq!(f.failed(Step::Take, "boom"), Change::Nothing);
        assert_eq!(f.problem(), None);
        // A success in between starts the count over.
        assert_eq!(f.succeeded(Step::Take), Change::Nothing);
        assert_eq!(f.failed(Step::Take, "boom"), Change::Nothing);
        let Change::Became(problem) = f.failed(
            Step::Take,
            "cannot delete from table \"captured\" because it does not have a replica identity and publishes deletes",
        ) else {
            panic!("no problem after two failures")
        };
        assert!(problem.starts_with("reading committed events"), "{problem}");
        assert!(problem.contains("REPLICA IDENTITY FULL"), "{problem}");
        assert_eq!(f.problem(), Some(problem));
        // Further failures keep it, without announcing it again.
        assert_eq!(f.failed(Step::Take, "boom"), Change::Nothing);
        assert!(f.problem().unwrap().contains("keeps failing (boom)"));
        assert_eq!(f.succeeded(Step::Take), Change::Recovered);
        assert_eq!(f.problem(), None);
    }

    #[test]
    fn steps_are_counted_apart() {
        let mut f = Failures::default();
        f.failed(Step::Purge, "canceling statement due to lock timeout");
        f.failed(Step::Round, "canceling statement due to lock timeout");
        assert_eq!(f.problem(), None);
        assert!(matches!(
            f.failed(Step::Round, "canceling statement due to lock timeout"),
            Change::Became(p) if p.contains("pg_locks")
        ));
    }

    #[test]
    fn every_class_of_error_has_its_remedy() {
        for (error, says) in [
            ("permission denied for table outbox", "privilege"),
            (
                "cannot execute UPDATE in a read-only transaction",
                "read-only",
            ),
            (
                "could not extend file \"base/5/16390\": No space left on device",
                "disk is full",
            ),
            (
                "relation \"new_user_hook.captured\" does not exist",
                "ALTER EXTENSION",
            ),
            (
                "a transaction whose snapshot is older than the worker's last read of the log still runs (8 tries in a row): it cannot be emptied, and grows",
                "backend_xmin",
            ),
            (
                "could not obtain lock on a segment of the log: another transaction holds it (8 tries in a row)",
                "pg_locks",
            ),
            ("something else", "server log"),
        ] {
            assert!(remedy(error).contains(says), "{error}: {}", remedy(error));
        }
    }
}
