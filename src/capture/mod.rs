//! Capture: the trigger that turns a committed change of a user into an outbox
//! event, and the allow-listed record an event holds.
//!
//! `install()` attaches `capture()` as deferred constraint triggers (after insert,
//! after an update of a watched column, after delete). A firing only notes the user
//! (with the user before the transaction, for an update or a deletion); notes made
//! in a subtransaction that rolls back are forgotten. When the transaction commits
//! (or prepares), after its last deferred firing, each noted user's row is followed
//! through its updates to the version the transaction leaves — the user as
//! committed — without a query, and one event per user is appended to the log
//! (`new_user_hook.log_0`) as one heap row and one index entry; the worker reads it
//! into the outbox. So whatever fires when (`SET CONSTRAINTS … IMMEDIATE`, savepoints), the
//! event reflects the committed state: a user inserted and deleted in one
//! transaction produces no event; neither does a session with
//! `pg_new_user_hook.capture` off.

use crate::model::event::Kind;
use crate::model::request;
use crate::{catalog, settings, shared, wake};
use pgrx::prelude::*;
use pgrx::{pg_sys, varlena};
use std::cell::{Cell, RefCell};
use std::ffi::{c_char, CStr};
use std::rc::Rc;

mod append;
mod record;
mod sql;

use append::*;
pub(crate) use record::tuple_attr;
use record::*;

/// Where an event comes from: the table's quoted name, and whether it is auth.users.
struct Source {
    relid: pg_sys::Oid,
    namespace: pg_sys::Oid,
    relname: Vec<u8>,
    name: String,
    auth_users: bool,
}

thread_local! {
    /// Sources already named in this backend (a schema's name is a catalog look-up).
    static SOURCES: RefCell<Vec<Rc<Source>>> = const { RefCell::new(Vec::new()) };
    static FORGET_ON_SCHEMA_CHANGE: Cell<bool> = const { Cell::new(false) };
}

/// A schema renamed (or dropped and made again) may change a source's name.
#[pg_guard]
unsafe extern "C-unwind" fn forget_sources(_arg: pg_sys::Datum, _cache: i32, _hash: u32) {
    SOURCES.with(|s| s.borrow_mut().clear());
}

unsafe fn source(rel: pg_sys::Relation) -> Rc<Source> {
    unsafe {
        let form = &*(*rel).rd_rel;
        let relname = CStr::from_ptr(form.relname.data.as_ptr()).to_bytes();
        let known = SOURCES.with(|s| {
            s.borrow()
                .iter()
                .find(|k| {
                    k.relid == (*rel).rd_id
                        && k.namespace == form.relnamespace
                        && k.relname == relname
                })
                .cloned()
        });
        if let Some(known) = known {
            return known;
        }
        if !FORGET_ON_SCHEMA_CHANGE.replace(true) {
            pg_sys::CacheRegisterSyscacheCallback(
                pg_sys::SysCacheIdentifier::NAMESPACEOID as i32,
                Some(forget_sources),
                pg_sys::Datum::from(0),
            );
        }
        let schema =
            CStr::from_ptr(pg_sys::get_namespace_name(form.relnamespace)).to_string_lossy();
        let table = String::from_utf8_lossy(relname);
        let found = Rc::new(Source {
            relid: (*rel).rd_id,
            namespace: form.relnamespace,
            relname: relname.to_vec(),
            name: format!("{}.{}", quote_identifier(&schema), quote_identifier(&table)),
            auth_users: schema == "auth" && table == "users",
        });
        SOURCES.with(|s| s.borrow_mut().push(found.clone()));
        found
    }
}

/// Which row a note is about: the table and the user's id.
type UserKey = (u32, [u8; 16]);

/// One firing of the trigger for a user, noted until the transaction commits.
struct Note {
    key: UserKey,
    /// A version of the user's row to follow, through its updates, to the version
    /// the transaction leaves: the row the firing saw (an UPDATE's or DELETE's old
    /// row, an INSERT's new one).
    tid: pg_sys::ItemPointerData,
    /// The subtransaction that fired it (moved to the parent when that commits).
    subxact: pg_sys::SubTransactionId,
    /// The transaction's first live note for the user; the others only add a
    /// version to follow (a user deleted and inserted again).
    first: bool,
    /// First notes: the user before the transaction (None: the transaction inserted it).
    before: Option<Row>,
    /// First notes: the trigger function, whose owner writes into an older schema's outbox.
    function: pg_sys::Oid,
}

/// What this transaction's firings noted, in firing order. Subtransaction ids grow
/// with time, so the notes of a subtransaction that ends are a suffix of the list.
#[derive(Default)]
struct Notes {
    list: Vec<Note>,
    /// The index in `list` of each user's first note.
    first: std::collections::HashMap<UserKey, usize>,
}

thread_local! {
    static NOTES: RefCell<Notes> = RefCell::new(Notes::default());
    static CALLBACKS_REGISTERED: Cell<bool> = const { Cell::new(false) };
}

/// Notes a firing for the user `key` (see `Note`); `before` is asked for the user's
/// first note only.
fn note(
    key: UserKey,
    tid: pg_sys::ItemPointerData,
    before: impl FnOnce() -> Option<Row>,
    function: pg_sys::Oid,
) {
    if !CALLBACKS_REGISTERED.replace(true) {
        unsafe {
            pg_sys::RegisterXactCallback(Some(on_xact_event), std::ptr::null_mut());
            pg_sys::RegisterSubXactCallback(Some(on_subxact_event), std::ptr::null_mut());
        }
    }
    let subxact = unsafe { pg_sys::GetCurrentSubTransactionId() };
    NOTES.with(|n| {
        let mut notes = n.borrow_mut();
        let first = !notes.first.contains_key(&key);
        if first {
            let at = notes.list.len();
            notes.first.insert(key, at);
        }
        notes.list.push(Note {
            key,
            tid,
            subxact,
            first,
            before: if first { before() } else { None },
            function,
        });
    });
}

/// A subtransaction ended: its notes are forgotten (rolled back) or become its
/// parent's (released). A later note never outlives an earlier one of the same user
/// (it was made in the same subtransaction or one nested in it), so forgetting a
/// first note forgets the user's others with it.
#[pg_guard]
unsafe extern "C-unwind" fn on_subxact_event(
    event: pg_sys::SubXactEvent::Type,
    my: pg_sys::SubTransactionId,
    parent: pg_sys::SubTransactionId,
    _arg: *mut std::ffi::c_void,
) {
    use pg_sys::SubXactEvent::*;
    NOTES.with(|n| {
        let mut notes = n.borrow_mut();
        let notes = &mut *notes;
        match event {
            SUBXACT_EVENT_ABORT_SUB => {
                while notes.list.last().is_some_and(|note| note.subxact >= my) {
                    let note = notes.list.pop().expect("a last note");
                    if note.first {
                        notes.first.remove(&note.key);
                    }
                }
            }
            SUBXACT_EVENT_COMMIT_SUB => {
                for note in notes.list.iter_mut().rev() {
                    if note.subxact < my {
                        break;
                    }
                    note.subxact = parent;
                }
            }
            _ => {}
        }
    });
}

#[pg_guard]
unsafe extern "C-unwind" fn on_xact_event(
    event: pg_sys::XactEvent::Type,
    _arg: *mut std::ffi::c_void,
) {
    use pg_sys::XactEvent::*;
    match event {
        // After the deferred triggers fired, before the commit record: the events
        // are written in the transaction, as the user is at its end.
        XACT_EVENT_PRE_COMMIT | XACT_EVENT_PRE_PREPARE => {
            let notes = NOTES.with(|n| std::mem::take(&mut *n.borrow_mut()));
            if !notes.list.is_empty() {
                unsafe { write_events(notes) };
            }
        }
        XACT_EVENT_COMMIT
        | XACT_EVENT_ABORT
        | XACT_EVENT_PREPARE
        | XACT_EVENT_PARALLEL_COMMIT
        | XACT_EVENT_PARALLEL_ABORT => {
            NOTES.with(|n| *n.borrow_mut() = Notes::default());
        }
        _ => {}
    }
}

/// Writes the events of the noted users: each user as the transaction leaves it,
/// compared with the user before it.
unsafe fn write_events(notes: Notes) {
    unsafe {
        let kinds = settings::events();
        // Every change of this transaction visible, the last statement's included.
        pg_sys::CommandCounterIncrement();
        pg_sys::PushActiveSnapshot(pg_sys::GetLatestSnapshot());
        let snapshot = pg_sys::GetActiveSnapshot();
        let mut reinserted: std::collections::HashMap<UserKey, Vec<pg_sys::ItemPointerData>> =
            std::collections::HashMap::new();
        for note in notes.list.iter().filter(|n| !n.first) {
            reinserted.entry(note.key).or_default().push(note.tid);
        }
        let mut target = None;
        let mut wrote = false;
        for note in notes.list.iter().filter(|n| n.first) {
            // Held already (the firing's statement locked it); gone if dropped since.
            let rel = pg_sys::try_table_open(
                pg_sys::Oid::from(note.key.0),
                pg_sys::AccessShareLock as pg_sys::LOCKMODE,
            );
            if rel.is_null() {
                continue;
            }
            let source = source(rel);
            let auth_users = source.auth_users;
            let mut committed = latest_version(rel, note.tid, snapshot, auth_users);
            if committed.is_none() {
                if let Some(tids) = reinserted.get(&note.key) {
                    committed = tids
                        .iter()
                        .find_map(|tid| latest_version(rel, *tid, snapshot, auth_users));
                }
            }
            pg_sys::table_close(rel, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
            let event = match &note.before {
                None => committed
                    .filter(|_| kinds.created)
                    .map(|row| (Kind::Created, row.record, None)),
                Some(before) => change_event(before, committed.as_ref(), kinds)
                    .map(|(kind, record, old)| (kind, record.to_string(), old.map(str::to_string))),
            };
            let Some((kind, record, old_record)) = event else {
                continue;
            };
            let mut user_id = note.key.1;
            let target = target.get_or_insert_with(|| open_target());
            match target {
                Target::Log { .. } | Target::Captured(_) => append_row(
                    target,
                    kind,
                    &mut user_id,
                    &source.name,
                    &record,
                    old_record.as_deref(),
                ),
                Target::LogByInsert(segment) => as_owner_of(note.function, || {
                    insert_event(
                        Some(*segment),
                        kind,
                        &mut user_id,
                        &source.name,
                        &record,
                        old_record.as_deref(),
                    )
                }),
                Target::Outbox if kind == Kind::Created || catalog::lifecycle_columns() => {
                    // An installed schema older than this library (until ALTER EXTENSION
                    // UPDATE): the event goes into the outbox, which before 0.6.0 holds
                    // new users only.
                    as_owner_of(note.function, || {
                        insert_event(
                            None,
                            kind,
                            &mut user_id,
                            &source.name,
                            &record,
                            old_record.as_deref(),
                        )
                    });
                }
                Target::Outbox => continue,
            }
            wrote = true;
        }
        let into_outbox = matches!(target, Some(Target::Outbox));
        if let Some(target) = target {
            close_target(target);
        }
        pg_sys::PopActiveSnapshot();
        if wrote {
            if into_outbox {
                // An older schema: the event went into the outbox.
                wake::wake_on_commit();
            } else {
                wake::wake_on_commit_for_log();
            }
        }
    }
}

/// Test support: writes the events noted so far, as a commit would (a `#[pg_test]`
/// never commits).
#[cfg(any(test, feature = "pg_test"))]
pub fn write_noted_events() {
    let notes = NOTES.with(|n| std::mem::take(&mut *n.borrow_mut()));
    if !notes.list.is_empty() {
        unsafe { write_events(notes) };
    }
}

/// The one event of a transaction for a user who existed before it: from the user
/// before the transaction and as committed (None: hard-deleted).
fn change_event<'r>(
    before: &'r Row,
    committed: Option<&'r Row>,
    kinds: crate::model::event::Kinds,
) -> Option<(Kind, &'r str, Option<&'r str>)> {
    if before.deleted {
        // Already soft-deleted, and announced as such.
        return None;
    }
    match committed {
        // A deletion carries the user as it was: never a soft delete's obfuscated values.
        None => kinds
            .deleted
            .then_some((Kind::Deleted, before.record.as_str(), None)),
        Some(after) if after.deleted => {
            kinds
                .deleted
                .then_some((Kind::Deleted, before.record.as_str(), None))
        }
        Some(after) => (kinds.updated
            && request::differ_in(&before.record, &after.record, &settings::update_fields()))
        .then_some((
            Kind::Updated,
            after.record.as_str(),
            Some(before.record.as_str()),
        )),
    }
}

/// The trigger function (SQL: `new_user_hook.capture()`), fired at commit (a deferred
/// constraint trigger) or at the end of a statement (SET CONSTRAINTS … IMMEDIATE).
/// A firing only notes the user; the events are written when the transaction
/// commits, from the user as it leaves the transaction (`write_events`). The changing
/// role needs no privilege on the extension's tables: the event is appended to the
/// capture table directly (no privilege is checked there), or, into an older
/// schema's outbox, inserted as the function's owner.
unsafe fn capture(data: &pg_sys::TriggerData) {
    unsafe {
        let event = data.tg_event;
        let op = event & pg_sys::TRIGGER_EVENT_OPMASK;
        let after_row = event & pg_sys::TRIGGER_EVENT_TIMINGMASK == pg_sys::TRIGGER_EVENT_AFTER
            && event & pg_sys::TRIGGER_EVENT_ROW != 0
            && op != pg_sys::TRIGGER_EVENT_TRUNCATE;
        if !after_row {
            refuse_trigger_kind(event);
        }
        if !settings::capturing() {
            return;
        }
        let kinds = settings::events();
        let rel = data.tg_relation;
        let relid = (*rel).rd_id.to_u32();
        let function = (*data.tg_trigger).tgfoid;
        match op {
            pg_sys::TRIGGER_EVENT_INSERT => {
                if let Some(id) = row_id(rel, data.tg_trigslot) {
                    note((relid, id), (*data.tg_trigtuple).t_self, || None, function);
                }
            }
            pg_sys::TRIGGER_EVENT_UPDATE | pg_sys::TRIGGER_EVENT_DELETE if kinds.lifecycle() => {
                let Some(id) = row_id(rel, data.tg_trigslot) else {
                    return;
                };
                let auth_users = source(rel).auth_users;
                note(
                    (relid, id),
                    (*data.tg_trigtuple).t_self,
                    || {
                        pg_sys::slot_getallattrs(data.tg_trigslot);
                        Some(record_of(rel, data.tg_trigslot, auth_users))
                    },
                    function,
                );
            }
            _ => {}
        }
    }
}

/// `new_user_hook.capture()`'s entry point (symbol `capture_wrapper`, as in every
/// release's install script). Called other than as a trigger, it says so.
#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn capture_wrapper(fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum {
    unsafe {
        if !pgrx::trigger_support::called_as_trigger(fcinfo) {
            pgrx::pg_sys::panic::ErrorReport::new(
                PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
                "new_user_hook.capture() is a trigger function: it cannot be called directly",
                "capture",
            )
            .set_hint("Attach it with SELECT new_user_hook.install('schema.table').")
            .report(PgLogLevel::ERROR);
        }
        capture(&*((*fcinfo).context as *const pg_sys::TriggerData));
        pg_sys::Datum::from(0)
    }
}

#[unsafe(no_mangle)]
pub extern "C" fn pg_finfo_capture_wrapper() -> &'static pg_sys::Pg_finfo_record {
    const V1_API: pg_sys::Pg_finfo_record = pg_sys::Pg_finfo_record { api_version: 1 };
    &V1_API
}

fn refuse_trigger_kind(event: pg_sys::TriggerEvent) -> ! {
    let when = match event & pg_sys::TRIGGER_EVENT_TIMINGMASK {
        pg_sys::TRIGGER_EVENT_BEFORE => "BEFORE",
        pg_sys::TRIGGER_EVENT_INSTEAD => "INSTEAD OF",
        _ => "AFTER",
    };
    let op = match event & pg_sys::TRIGGER_EVENT_OPMASK {
        pg_sys::TRIGGER_EVENT_INSERT => "INSERT",
        pg_sys::TRIGGER_EVENT_UPDATE => "UPDATE",
        pg_sys::TRIGGER_EVENT_DELETE => "DELETE",
        _ => "TRUNCATE",
    };
    let level = if event & pg_sys::TRIGGER_EVENT_ROW != 0 {
        "ROW"
    } else {
        "STATEMENT"
    };
    pgrx::pg_sys::panic::ErrorReport::new(
        PgSqlErrorCode::ERRCODE_TRIGGERED_ACTION_EXCEPTION,
        format!(
            "new_user_hook.capture() must run AFTER INSERT, UPDATE or DELETE ... FOR EACH ROW, not {when} {op} ... FOR EACH {level}"
        ),
        "capture",
    )
    .set_hint("Use SELECT new_user_hook.install('schema.table'), which creates the right triggers.")
    .report(PgLogLevel::ERROR);
    unreachable!("an ERROR does not return")
}
