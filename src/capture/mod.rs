//! Capture: the trigger that turns a committed change of a user into an outbox
//! event, and the allow-listed record an event holds.
//!
//! `install()` attaches `capture()` as deferred constraint triggers (after insert,
//! after an update of a watched column, after delete). A firing only notes the user
//! (with the user before the transaction, for an update or a deletion); notes made
//! in a subtransaction that rolls back are forgotten. When the transaction commits
//! (or prepares), after its last deferred firing, each noted user's row is followed
//! through its updates to the version the transaction leaves — the user as
//! committed — without a query, and one event per user is appended to the capture
//! table (`new_user_hook.captured`) as one heap row; the worker takes it into the
//! outbox. So whatever fires when (`SET CONSTRAINTS … IMMEDIATE`, savepoints), the
//! event reflects the committed state: a user inserted and deleted in one
//! transaction produces no event; neither does a session with
//! `pg_new_user_hook.capture` off.

use crate::model::event::Kind;
use crate::model::request;
use crate::{catalog, settings, wake};
use pgrx::prelude::*;
use pgrx::{pg_sys, varlena};
use std::cell::{Cell, RefCell};
use std::ffi::{c_char, CStr};
use std::rc::Rc;

/// Attribute `i` (0-based) of a tuple descriptor; PostgreSQL 18 keeps them behind
/// its compact attributes.
pub(crate) unsafe fn tuple_attr<'a>(
    desc: pg_sys::TupleDesc,
    i: usize,
) -> &'a pg_sys::FormData_pg_attribute {
    unsafe {
        #[cfg(not(feature = "pg18"))]
        let attrs = (*desc).attrs.as_ptr();
        #[cfg(feature = "pg18")]
        let attrs = (*desc)
            .compact_attrs
            .as_ptr()
            .add((*desc).natts as usize)
            .cast::<pg_sys::FormData_pg_attribute>();
        &*attrs.add(i)
    }
}

/// The varlena of a datum, decompressed or fetched from TOAST if need be.
unsafe fn plain_varlena(datum: pg_sys::Datum) -> *const pg_sys::varlena {
    unsafe {
        let p = datum.cast_mut_ptr::<pg_sys::varlena>();
        if varlena::varatt_is_1b_e(p) || varlena::varatt_is_4b_c(p) {
            pg_sys::pg_detoast_datum(p)
        } else {
            p
        }
    }
}

/// How a column's value becomes JSON, as `to_json` writes it.
unsafe fn json_value(typid: pg_sys::Oid, datum: pg_sys::Datum, out: &mut String) {
    unsafe {
        match typid {
            pg_sys::BOOLOID => out.push_str(if datum.value() != 0 { "true" } else { "false" }),
            pg_sys::UUIDOID => {
                let bytes = *datum.cast_mut_ptr::<[u8; 16]>();
                let mut buf = uuid::Uuid::encode_buffer();
                out.push('"');
                out.push_str(
                    uuid::Uuid::from_bytes(bytes)
                        .hyphenated()
                        .encode_lower(&mut buf),
                );
                out.push('"');
            }
            pg_sys::TEXTOID | pg_sys::VARCHAROID => {
                let bytes = varlena::varlena_to_byte_slice(plain_varlena(datum));
                json_string(&String::from_utf8_lossy(bytes), out);
            }
            pg_sys::JSONBOID => {
                // Jsonb's layout needs the 4-byte header, which pg_detoast_datum ensures.
                let jsonb = pg_sys::pg_detoast_datum(datum.cast_mut_ptr()) as *mut pg_sys::Jsonb;
                let text = pg_sys::JsonbToCString(
                    std::ptr::null_mut(),
                    &raw mut (*jsonb).root,
                    varlena::varsize_any_exhdr(jsonb.cast()) as i32,
                );
                out.push_str(&CStr::from_ptr(text).to_string_lossy());
            }
            pg_sys::TIMESTAMPTZOID | pg_sys::TIMESTAMPOID | pg_sys::DATEOID => {
                let text = pg_sys::JsonEncodeDateTime(
                    std::ptr::null_mut(),
                    datum,
                    typid,
                    std::ptr::null(),
                );
                json_string(&CStr::from_ptr(text).to_string_lossy(), out);
            }
            _ => {
                let mut output: pg_sys::Oid = pg_sys::InvalidOid;
                let mut is_varlena = false;
                pg_sys::getTypeOutputInfo(typid, &mut output, &mut is_varlena);
                let text = pg_sys::OidOutputFunctionCall(output, datum);
                json_string(&CStr::from_ptr(text).to_string_lossy(), out);
            }
        }
    }
}

fn json_string(s: &str, out: &mut String) {
    out.push_str(&serde_json::to_string(s).expect("a string serialises"));
}

/// Only the provider names of `raw_app_meta_data` leave the database.
fn providers_only(app_meta_data: &str) -> String {
    let all: serde_json::Value = serde_json::from_str(app_meta_data).unwrap_or_default();
    serde_json::json!({ "provider": all["provider"], "providers": all["providers"] }).to_string()
}

/// One version of a user's row, as an event needs it.
struct Row {
    /// The allow-listed columns as a JSON object.
    record: String,
    /// Soft-deleted: its `deleted_at` is set (GoTrue's soft delete).
    deleted: bool,
}

/// The row in `slot` (all attributes fetched): its record — the allow-listed columns
/// of auth.users, or `id` and `email` of another users table — and deletion mark.
unsafe fn record_of(
    rel: pg_sys::Relation,
    slot: *mut pg_sys::TupleTableSlot,
    auth_users: bool,
) -> Row {
    unsafe {
        let desc = (*rel).rd_att;
        let mut out = String::with_capacity(512);
        let mut deleted = false;
        out.push('{');
        for i in 0..(*desc).natts as usize {
            let attr = tuple_attr(desc, i);
            if attr.attisdropped {
                continue;
            }
            let name = CStr::from_ptr(attr.attname.data.as_ptr()).to_bytes();
            if name == b"deleted_at" {
                deleted = !*(*slot).tts_isnull.add(i);
            }
            let wanted = if auth_users {
                request::ALLOWED_FIELDS.iter().any(|f| f.as_bytes() == name)
            } else {
                name == b"id" || name == b"email"
            };
            if !wanted {
                continue;
            }
            let name = std::str::from_utf8(name).expect("allowed names are ASCII");
            if out.len() > 1 {
                out.push(',');
            }
            json_string(name, &mut out);
            out.push(':');
            if *(*slot).tts_isnull.add(i) {
                out.push_str("null");
                continue;
            }
            let datum = *(*slot).tts_values.add(i);
            if auth_users && name == "raw_app_meta_data" {
                let mut full = String::new();
                json_value(attr.atttypid, datum, &mut full);
                out.push_str(&providers_only(&full));
            } else {
                json_value(attr.atttypid, datum, &mut out);
            }
        }
        out.push('}');
        Row {
            record: out,
            deleted,
        }
    }
}

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

/// The version of the row at `tid` that `snapshot` sees last (following updates);
/// None if it sees none (the row was deleted). A snapshot sees one version of a row
/// at most: the one at `tid` if it is visible, else the end of its update chain.
unsafe fn latest_version(
    rel: pg_sys::Relation,
    tid: pg_sys::ItemPointerData,
    snapshot: pg_sys::Snapshot,
    auth_users: bool,
) -> Option<Row> {
    unsafe {
        let slot = pg_sys::table_slot_create(rel, std::ptr::null_mut());
        let mut tid = tid;
        let mut found = pg_sys::table_tuple_fetch_row_version(rel, &mut tid, snapshot, slot);
        if !found {
            let scan = pg_sys::table_beginscan_tid(rel, snapshot);
            pg_sys::table_tuple_get_latest_tid(scan, &mut tid);
            pg_sys::table_endscan(scan);
            found = pg_sys::table_tuple_fetch_row_version(rel, &mut tid, snapshot, slot);
        }
        let row = found.then(|| {
            pg_sys::slot_getallattrs(slot);
            record_of(rel, slot, auth_users)
        });
        pg_sys::ExecDropSingleTupleTableSlot(slot);
        row
    }
}

thread_local! {
    /// The event INSERTs, planned once per backend (plans of other backends are their own):
    /// a new user's, and a later change's.
    static CREATED_PLAN: Cell<pg_sys::SPIPlanPtr> = const { Cell::new(std::ptr::null_mut()) };
    static CHANGE_PLAN: Cell<pg_sys::SPIPlanPtr> = const { Cell::new(std::ptr::null_mut()) };
    /// A new user's, into an outbox without the lifecycle columns (before ALTER EXTENSION UPDATE).
    static LEGACY_PLAN: Cell<pg_sys::SPIPlanPtr> = const { Cell::new(std::ptr::null_mut()) };
}

// The records go in as `json` Datums (their text): no input function parses them
// again. The event id is a UUIDv7: time-ordered, so the outbox's primary key grows
// at its end. `seq` orders a user's events: the WAL insert position when the event
// is written, at the commit of its transaction — a later transaction changing the
// same user waits for this one's row lock, so its position is higher. A change's
// event also comes after any event of the user still pending (events restored
// from a dump carry the positions of the cluster they were written in).
const INSERT_CREATED: &CStr =
    c"INSERT INTO new_user_hook.outbox (id, user_id, source, record, kind, old_record, seq) \
      VALUES ($1, $2, $3, $4, $5, $6, $7)";
const INSERT_LEGACY: &CStr =
    c"INSERT INTO new_user_hook.outbox (id, user_id, source, record) VALUES ($1, $2, $3, $4)";
const INSERT_CHANGE: &CStr = c"INSERT INTO new_user_hook.outbox (id, user_id, source, record, kind, old_record, seq) \
      VALUES ($1, $2, $3, $4, $5, $6, GREATEST($7, (SELECT max(p.seq) + 1 FROM new_user_hook.outbox p \
                                                    WHERE p.user_id = $2 AND p.status NOT IN ('delivered', 'failed'))))";

fn text_datum(s: &str) -> pg_sys::Datum {
    pg_sys::Datum::from(unsafe {
        pg_sys::cstring_to_text_with_len(s.as_ptr() as *const c_char, s.len() as i32)
    })
}

unsafe fn insert_event(
    kind: Kind,
    user_id: &mut [u8; 16],
    source: &str,
    record: &str,
    old_record: Option<&str>,
) {
    unsafe {
        if pg_sys::SPI_connect() != pg_sys::SPI_OK_CONNECT as i32 {
            error!("pg_new_user_hook: SPI_connect failed");
        }
        let legacy = !catalog::lifecycle_columns();
        let (cache, sql) = match kind {
            _ if legacy => (&LEGACY_PLAN, INSERT_LEGACY),
            Kind::Created => (&CREATED_PLAN, INSERT_CREATED),
            Kind::Updated | Kind::Deleted => (&CHANGE_PLAN, INSERT_CHANGE),
        };
        let mut plan = cache.get();
        if plan.is_null() {
            let mut types = [
                pg_sys::UUIDOID,
                pg_sys::UUIDOID,
                pg_sys::TEXTOID,
                pg_sys::JSONOID,
                pg_sys::TEXTOID,
                pg_sys::JSONOID,
                pg_sys::INT8OID,
            ];
            let count = if legacy { 4 } else { types.len() };
            plan = pg_sys::SPI_prepare(sql.as_ptr(), count as i32, types.as_mut_ptr());
            if plan.is_null() || pg_sys::SPI_keepplan(plan) != 0 {
                error!("pg_new_user_hook: preparing the event insert failed");
            }
            cache.set(plan);
        }
        let mut event_id = *uuid::Uuid::now_v7().as_bytes();
        let seq = pg_sys::GetXLogInsertRecPtr() as i64;
        let mut values = [
            pg_sys::Datum::from(event_id.as_mut_ptr()),
            pg_sys::Datum::from(user_id.as_mut_ptr()),
            text_datum(source),
            text_datum(record),
            text_datum(kind.name()),
            old_record.map_or(pg_sys::Datum::from(0), text_datum),
            pg_sys::Datum::from(seq),
        ];
        let nulls = [
            b' ',
            b' ',
            b' ',
            b' ',
            b' ',
            if old_record.is_some() { b' ' } else { b'n' },
            b' ',
            0,
        ];
        let rc = pg_sys::SPI_execute_plan(
            plan,
            values.as_mut_ptr(),
            nulls.as_ptr() as *const c_char,
            false,
            0,
        );
        if rc != pg_sys::SPI_OK_INSERT as i32 {
            error!("pg_new_user_hook: queuing the event failed (SPI code {rc})");
        }
        pg_sys::SPI_finish();
    }
}

/// The capture table's columns (sql/outbox.sql), in order, with their types.
const CAPTURED_COLUMNS: [(&[u8], pg_sys::Oid); 8] = [
    (b"id", pg_sys::UUIDOID),
    (b"user_id", pg_sys::UUIDOID),
    (b"source", pg_sys::TEXTOID),
    (b"kind", pg_sys::TEXTOID),
    (b"record", pg_sys::JSONOID),
    (b"old_record", pg_sys::JSONOID),
    (b"seq", pg_sys::INT8OID),
    (b"created_at", pg_sys::TIMESTAMPTZOID),
];

thread_local! {
    /// The capture table last found with the columns above (its columns are checked once).
    static CAPTURED_CHECKED: Cell<pg_sys::Oid> = const { Cell::new(pg_sys::InvalidOid) };
}

/// new_user_hook.captured, opened, if the installed schema has it as this library
/// writes it (0.7.0 and later); None before ALTER EXTENSION UPDATE, or when the
/// extension was dropped since the table was looked up (no event to write then).
unsafe fn open_captured() -> Option<pg_sys::Relation> {
    unsafe {
        let relid = catalog::table_oid(c"captured")?;
        let rel = pg_sys::try_table_open(relid, pg_sys::RowExclusiveLock as pg_sys::LOCKMODE);
        if rel.is_null() {
            return None;
        }
        let desc = (*rel).rd_att;
        let same = (*desc).natts as usize == CAPTURED_COLUMNS.len()
            && (CAPTURED_CHECKED.get() == relid
                || CAPTURED_COLUMNS
                    .iter()
                    .enumerate()
                    .all(|(i, (name, typid))| {
                        let attr = tuple_attr(desc, i);
                        !attr.attisdropped
                            && attr.atttypid == *typid
                            && CStr::from_ptr(attr.attname.data.as_ptr()).to_bytes() == *name
                    }));
        if !same {
            pg_sys::table_close(rel, pg_sys::RowExclusiveLock as pg_sys::LOCKMODE);
            return None;
        }
        CAPTURED_CHECKED.set(relid);
        Some(rel)
    }
}

/// Appends the event to new_user_hook.captured: one heap row, written directly — the
/// table has no index, trigger, constraint or default to run, so the executor's
/// set-up for a statement (most of what a one-row INSERT costs) is skipped. The
/// worker gives a change's `seq` its place after the user's pending events when it
/// takes the event into the outbox.
unsafe fn append_captured(
    captured: pg_sys::Relation,
    kind: Kind,
    user_id: &mut [u8; 16],
    source: &str,
    record: &str,
    old_record: Option<&str>,
) {
    unsafe {
        let mut event_id = *uuid::Uuid::now_v7().as_bytes();
        let mut values = [
            pg_sys::Datum::from(event_id.as_mut_ptr()),
            pg_sys::Datum::from(user_id.as_mut_ptr()),
            text_datum(source),
            text_datum(kind.name()),
            text_datum(record),
            old_record.map_or(pg_sys::Datum::from(0), text_datum),
            pg_sys::Datum::from(pg_sys::GetXLogInsertRecPtr() as i64),
            // Written as the transaction commits: its commit time, near enough.
            pg_sys::Datum::from(pg_sys::GetCurrentTimestamp()),
        ];
        let mut nulls = [false; 8];
        nulls[5] = old_record.is_none();
        let tuple =
            pg_sys::heap_form_tuple((*captured).rd_att, values.as_mut_ptr(), nulls.as_mut_ptr());
        pg_sys::simple_heap_insert(captured, tuple);
        pg_sys::heap_freetuple(tuple);
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
        let mut captured = None;
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
            if captured.is_none() {
                captured = Some(open_captured());
            }
            match captured.expect("looked up above") {
                Some(table) => append_captured(
                    table,
                    kind,
                    &mut user_id,
                    &source.name,
                    &record,
                    old_record.as_deref(),
                ),
                None if kind == Kind::Created || catalog::lifecycle_columns() => {
                    // An installed schema older than this library (until ALTER EXTENSION
                    // UPDATE): the event goes into the outbox, which before 0.6.0 holds
                    // new users only.
                    as_owner_of(note.function, || {
                        insert_event(
                            kind,
                            &mut user_id,
                            &source.name,
                            &record,
                            old_record.as_deref(),
                        )
                    });
                }
                None => continue,
            }
            wrote = true;
        }
        if let Some(Some(table)) = captured {
            // The lock is kept until the transaction ends, as an INSERT's is.
            pg_sys::table_close(table, pg_sys::NoLock as pg_sys::LOCKMODE);
        }
        pg_sys::PopActiveSnapshot();
        if wrote {
            wake::wake_on_commit();
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

/// The uuid `id` of the row in `slot` (install() requires one).
unsafe fn row_id(rel: pg_sys::Relation, slot: *mut pg_sys::TupleTableSlot) -> Option<[u8; 16]> {
    unsafe {
        let desc = (*rel).rd_att;
        let mut id = None;
        for i in 0..(*desc).natts as usize {
            let attr = tuple_attr(desc, i);
            if attr.attisdropped {
                continue;
            }
            if attr.attgenerated == VIRTUAL {
                warn_unstored(rel, attr);
            }
            if attr.atttypid == pg_sys::UUIDOID
                && CStr::from_ptr(attr.attname.data.as_ptr()).to_bytes() == b"id"
                && id.is_none()
            {
                let mut isnull = false;
                let datum = pg_sys::slot_getattr(slot, (i + 1) as i32, &mut isnull);
                id = Some((!isnull).then(|| *datum.cast_mut_ptr::<[u8; 16]>()));
            }
        }
        id.flatten()
    }
}

/// `attgenerated` of a virtual generated column (PostgreSQL 18), whose value is
/// computed when a query reads it and is not in the stored row an event is made from.
const VIRTUAL: c_char = b'v' as c_char;

thread_local! {
    /// Tables this backend has warned about (once each).
    static WARNED_UNSTORED: RefCell<Vec<pg_sys::Oid>> = const { RefCell::new(Vec::new()) };
}

/// A column an event needs (`id`, `email`, `deleted_at`) became a virtual generated
/// column after install() (which refuses one): says so in the log, once per backend
/// and table; new_user_hook.status says it for as long as it lasts.
unsafe fn warn_unstored(rel: pg_sys::Relation, attr: &pg_sys::FormData_pg_attribute) {
    unsafe {
        let column = CStr::from_ptr(attr.attname.data.as_ptr()).to_string_lossy();
        let consequence = match column.as_ref() {
            "id" => "no event is made for its users",
            "email" => "its events carry a null email",
            "deleted_at" => "its soft deletes make no event",
            _ => return,
        };
        let relid = (*rel).rd_id;
        if WARNED_UNSTORED.with_borrow(|warned| warned.contains(&relid)) {
            return;
        }
        WARNED_UNSTORED.with_borrow_mut(|warned| warned.push(relid));
        let table = CStr::from_ptr(pg_sys::get_rel_name(relid)).to_string_lossy();
        pgrx::pg_sys::panic::ErrorReport::new(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!(
                "pg_new_user_hook: column \"{column}\" of table \"{table}\" is a virtual generated column, \
                 whose value a changed row does not hold: {consequence}"
            ),
            "warn_unstored",
        )
        .set_hint("Make it a stored generated column (GENERATED ALWAYS AS (...) STORED) or a plain column.")
        .report(PgLogLevel::WARNING);
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

/// Runs `f` as the owner of function `function` (the extension's owner), as SECURITY
/// DEFINER would — without its cost per call, which a trigger pays at every signup.
/// An error inside leaves the switch to the transaction's abort, which undoes it.
unsafe fn as_owner_of<T>(function: pg_sys::Oid, f: impl FnOnce() -> T) -> T {
    unsafe {
        let proc = pg_sys::SearchSysCache1(
            pg_sys::SysCacheIdentifier::PROCOID as i32,
            pg_sys::Datum::from(function),
        );
        if proc.is_null() {
            error!("pg_new_user_hook: function {} not found", function.to_u32());
        }
        let form = ((*proc).t_data as *mut u8).add((*(*proc).t_data).t_hoff as usize)
            as *mut pg_sys::FormData_pg_proc;
        let owner = (*form).proowner;
        pg_sys::ReleaseSysCache(proc);
        let mut user = pg_sys::InvalidOid;
        let mut context = 0;
        pg_sys::GetUserIdAndSecContext(&mut user, &mut context);
        pg_sys::SetUserIdAndSecContext(
            owner,
            context | pg_sys::SECURITY_LOCAL_USERID_CHANGE as i32,
        );
        let result = f();
        pg_sys::SetUserIdAndSecContext(user, context);
        result
    }
}

fn quote_identifier(name: &str) -> String {
    let c = std::ffi::CString::new(name).expect("no NUL in a name");
    unsafe { CStr::from_ptr(pg_sys::quote_identifier(c.as_ptr())) }
        .to_string_lossy()
        .into_owned()
}

/// The record an event of this row would hold (SQL: `new_user_hook.snapshot(regclass,
/// tid) RETURNS json` — a json Datum is its text), for `backfill()`. Needs SELECT on
/// the table, which must be a plain table (a partition is one): a view, an index, a
/// partitioned table, a sequence or a type has no rows of its own to read.
#[pg_extern(stable, parallel_safe, sql = false)]
fn snapshot(target: pg_sys::Oid, row_id: pg_sys::ItemPointerData) -> Option<String> {
    unsafe {
        let relkind = pg_sys::get_rel_relkind(target);
        if relkind == 0 {
            no_such_table(target);
        }
        // The heap is read directly, so the privilege a query would need is checked here.
        let allowed = pg_sys::pg_class_aclcheck(
            target,
            pg_sys::GetUserId(),
            pg_sys::ACL_SELECT as pg_sys::AclMode,
        );
        if allowed != pg_sys::AclResult::ACLCHECK_OK {
            pg_sys::aclcheck_error(
                allowed,
                pg_sys::ObjectType::OBJECT_TABLE,
                pg_sys::get_rel_name(target),
            );
        }
        if relkind != pg_sys::RELKIND_RELATION as c_char {
            let name = CStr::from_ptr(pg_sys::get_rel_name(target)).to_string_lossy();
            pgrx::pg_sys::panic::ErrorReport::new(
                PgSqlErrorCode::ERRCODE_WRONG_OBJECT_TYPE,
                format!("\"{name}\" is not a table: new_user_hook.snapshot() reads a row of a table"),
                "snapshot",
            )
            .set_hint("Pass the users table (a partitioned table's rows are in its partitions: pass the partition, e.g. tableoid of the row).")
            .report(PgLogLevel::ERROR);
        }
        let rel = pg_sys::table_open(target, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        // A tid past the table's end, or offset 0, names no row.
        let (block, offset) = pgrx::itemptr::item_pointer_get_both(row_id);
        let blocks = pg_sys::RelationGetNumberOfBlocksInFork(rel, pg_sys::ForkNumber::MAIN_FORKNUM);
        let found = (offset != 0 && block < blocks)
            .then(|| {
                latest_version(
                    rel,
                    row_id,
                    pg_sys::GetActiveSnapshot(),
                    source(rel).auth_users,
                )
            })
            .flatten();
        pg_sys::table_close(rel, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        found.map(|row| row.record)
    }
}

fn no_such_table(oid: pg_sys::Oid) -> ! {
    pgrx::pg_sys::panic::ErrorReport::new(
        PgSqlErrorCode::ERRCODE_UNDEFINED_TABLE,
        format!("no table with OID {}", oid.to_u32()),
        "pg_new_user_hook",
    )
    .report(PgLogLevel::ERROR);
    unreachable!("an ERROR does not return")
}

/// The columns of a users table whose change can make an event (SQL:
/// `new_user_hook.watched_columns(regclass)`): every column an event may carry
/// except the id and bookkeeping, and `deleted_at` (a soft delete). install() lists
/// them in the update trigger (`AFTER UPDATE OF …`), so an update of other columns
/// only — a sign-in — queues nothing at all; an update that sets one of them to the
/// same value is compared by `capture()` at commit.
#[pg_extern(stable, parallel_safe, sql = false)]
fn watched_columns(target: pg_sys::Oid) -> Vec<String> {
    unsafe {
        let namespace = pg_sys::get_namespace_name(pg_sys::get_rel_namespace(target));
        let table = pg_sys::get_rel_name(target);
        if namespace.is_null() || table.is_null() {
            no_such_table(target);
        }
        let auth_users = CStr::from_ptr(namespace).to_bytes() == b"auth"
            && CStr::from_ptr(table).to_bytes() == b"users";
        let candidates: Vec<&str> = if auth_users {
            request::ALLOWED_FIELDS.to_vec()
        } else {
            vec!["email"]
        };
        candidates
            .into_iter()
            .filter(|c| *c != "id" && !request::BOOKKEEPING_FIELDS.contains(c))
            .chain(std::iter::once("deleted_at"))
            .filter(|c| {
                let name = std::ffi::CString::new(*c).expect("no NUL in a column name");
                pg_sys::get_attnum(target, name.as_ptr()) != pg_sys::InvalidAttrNumber as i16
            })
            .map(str::to_string)
            .collect()
    }
}
