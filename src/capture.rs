//! Capture: the trigger that turns a committed change of a user into an outbox
//! event, and the allow-listed record an event holds.
//!
//! `install()` attaches `capture()` as deferred constraint triggers (after insert,
//! after an update of a watched column, after delete), so it runs at commit, after
//! every statement of the transaction. It follows the row's update chain to the
//! version this transaction sees last — the user as committed — without a query,
//! and appends the event to the capture table (`new_user_hook.captured`) as one heap
//! row; the worker takes it into the outbox. The first firing for a user in a
//! transaction decides that transaction's one event for that user, from the user
//! before it (none: a new user) and as committed (none: deleted); the others are
//! skipped. A user inserted and deleted in one transaction produces no event;
//! neither does a session with `pg_new_user_hook.capture` off.

use crate::event::Kind;
use crate::{guc, outbox, request, wake};
use pgrx::prelude::*;
use pgrx::{pg_sys, varlena, PgTrigger};
use std::cell::{Cell, RefCell};
use std::collections::HashSet;
use std::ffi::{c_char, CStr};
use std::rc::Rc;

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
    /// The uuid `id` (install() requires one).
    id: Option<[u8; 16]>,
    /// Soft-deleted: its `deleted_at` is set (GoTrue's soft delete).
    deleted: bool,
}

/// The row in `slot` (all attributes fetched): its record — the allow-listed columns
/// of auth.users, or `id` and `email` of another users table —, id and deletion mark.
unsafe fn record_of(
    rel: pg_sys::Relation,
    slot: *mut pg_sys::TupleTableSlot,
    auth_users: bool,
) -> Row {
    unsafe {
        let desc = (*rel).rd_att;
        let mut out = String::with_capacity(512);
        let mut id = None;
        let mut deleted = false;
        out.push('{');
        for i in 0..(*desc).natts as usize {
            let attr = &*(*desc).attrs.as_ptr().add(i);
            if attr.attisdropped {
                continue;
            }
            let name = CStr::from_ptr(attr.attname.data.as_ptr()).to_bytes();
            if name == b"id" && attr.atttypid == pg_sys::UUIDOID && !*(*slot).tts_isnull.add(i) {
                id = Some(*(*(*slot).tts_values.add(i)).cast_mut_ptr::<[u8; 16]>());
            }
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
            id,
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
/// None if it sees none (the row was deleted).
unsafe fn latest_version(
    rel: pg_sys::Relation,
    tid: pg_sys::ItemPointerData,
    snapshot: pg_sys::Snapshot,
    auth_users: bool,
) -> Option<Row> {
    unsafe {
        let mut tid = tid;
        let scan = pg_sys::table_beginscan_tid(rel, snapshot);
        pg_sys::table_tuple_get_latest_tid(scan, &mut tid);
        pg_sys::table_endscan(scan);
        let slot = pg_sys::table_slot_create(rel, std::ptr::null_mut());
        let found =
            pg_sys::table_tuple_fetch_row_version(rel, &mut tid, snapshot, slot).then(|| {
                pg_sys::slot_getallattrs(slot);
                record_of(rel, slot, auth_users)
            });
        pg_sys::ExecDropSingleTupleTableSlot(slot);
        found
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
        let legacy = !outbox::lifecycle_columns();
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
/// writes it (0.7.0 and later); None before ALTER EXTENSION UPDATE.
unsafe fn open_captured() -> Option<pg_sys::Relation> {
    unsafe {
        let relid = outbox::table_oid(c"captured")?;
        let rel = pg_sys::table_open(relid, pg_sys::RowExclusiveLock as pg_sys::LOCKMODE);
        let desc = (*rel).rd_att;
        let same = (*desc).natts as usize == CAPTURED_COLUMNS.len()
            && (CAPTURED_CHECKED.get() == relid
                || CAPTURED_COLUMNS
                    .iter()
                    .enumerate()
                    .all(|(i, (name, typid))| {
                        let attr = &*(*desc).attrs.as_ptr().add(i);
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
            pg_sys::Datum::from(pg_sys::GetCurrentTransactionStartTimestamp()),
        ];
        let mut nulls = [false; 8];
        nulls[5] = old_record.is_none();
        let tuple =
            pg_sys::heap_form_tuple((*captured).rd_att, values.as_mut_ptr(), nulls.as_mut_ptr());
        pg_sys::simple_heap_insert(captured, tuple);
        pg_sys::heap_freetuple(tuple);
        // The lock is kept until the transaction ends, as an INSERT's is.
        pg_sys::table_close(captured, pg_sys::NoLock as pg_sys::LOCKMODE);
    }
}

thread_local! {
    /// The users this transaction's firings have decided an event for (by table and
    /// id), and the transaction they belong to.
    static DECIDED: RefCell<(pg_sys::TransactionId, HashSet<(u32, [u8; 16])>)> =
        RefCell::new((pg_sys::InvalidTransactionId, HashSet::new()));
}

/// Whether this is the transaction's first firing for the user (and notes it).
fn first_firing(relid: pg_sys::Oid, user_id: [u8; 16]) -> bool {
    let xid = unsafe { pg_sys::GetTopTransactionIdIfAny() };
    DECIDED.with(|d| {
        let mut d = d.borrow_mut();
        if d.0 != xid {
            d.0 = xid;
            d.1.clear();
        }
        d.1.insert((relid.to_u32(), user_id))
    })
}

/// The one event of a transaction for a user who existed before it: from the user
/// before the transaction and as committed (None: hard-deleted).
fn change_event<'r>(
    before: &'r Row,
    committed: Option<&'r Row>,
    kinds: crate::event::Kinds,
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
            && request::differ_in(&before.record, &after.record, &guc::update_fields()))
        .then_some((
            Kind::Updated,
            after.record.as_str(),
            Some(before.record.as_str()),
        )),
    }
}

/// The version of a firing's row that the transaction sees last: the row at hand if
/// nothing changed it since, else its update chain's end (None: deleted).
unsafe fn committed_version(
    rel: pg_sys::Relation,
    tuple: pg_sys::HeapTuple,
    slot: *mut pg_sys::TupleTableSlot,
    auth_users: bool,
) -> Option<Row> {
    unsafe {
        let header = (*tuple).t_data;
        let untouched = (*header).t_infomask as u32 & pg_sys::HEAP_XMAX_INVALID != 0
            || (*header).t_choice.t_heap.t_xmax == pg_sys::InvalidTransactionId;
        if untouched {
            // Neither updated nor deleted since: the row at hand is the user as
            // committed (the trigger's row is read afresh when it fires).
            pg_sys::slot_getallattrs(slot);
            Some(record_of(rel, slot, auth_users))
        } else {
            // A snapshot that sees this transaction's every change, the firing
            // statement's own included (as a query in a PL/pgSQL trigger would).
            pg_sys::CommandCounterIncrement();
            let snapshot = pg_sys::GetLatestSnapshot();
            latest_version(rel, (*tuple).t_self, snapshot, auth_users)
        }
    }
}

/// The trigger function (SQL: `new_user_hook.capture()`). The changing role needs no
/// privilege on the extension's tables: the event is appended to the capture table
/// directly (no privilege is checked there), or, into an older schema's outbox,
/// inserted as the function's owner.
#[pg_trigger(sql = false)]
fn capture<'a>(
    trigger: &'a PgTrigger<'a>,
) -> Result<Option<PgHeapTuple<'a, pgrx::AllocatedByPostgres>>, std::convert::Infallible> {
    let data = trigger.trigger_data();
    let event = data.tg_event;
    let op = event & pg_sys::TRIGGER_EVENT_OPMASK;
    let after_row = event & pg_sys::TRIGGER_EVENT_TIMINGMASK == pg_sys::TRIGGER_EVENT_AFTER
        && event & pg_sys::TRIGGER_EVENT_ROW != 0
        && op != pg_sys::TRIGGER_EVENT_TRUNCATE;
    if !after_row {
        refuse_trigger_kind(event);
    }
    if !guc::capturing() {
        return Ok(None);
    }
    let kinds = guc::events();
    unsafe {
        let rel = data.tg_relation;
        let source = source(rel);
        let auth_users = source.auth_users;
        let (kind, user_id, record, old_record) = match op {
            pg_sys::TRIGGER_EVENT_INSERT => {
                let committed =
                    committed_version(rel, data.tg_trigtuple, data.tg_trigslot, auth_users);
                if kinds.lifecycle() {
                    // Later firings for this user in this transaction are part of its creation.
                    let id = match &committed {
                        Some(row) => row.id,
                        None => {
                            pg_sys::slot_getallattrs(data.tg_trigslot);
                            record_of(rel, data.tg_trigslot, auth_users).id
                        }
                    };
                    if let Some(id) = id {
                        first_firing((*rel).rd_id, id);
                    }
                }
                match committed {
                    Some(Row {
                        record,
                        id: Some(id),
                        ..
                    }) if kinds.created => (Kind::Created, id, record, None),
                    _ => return Ok(None),
                }
            }
            pg_sys::TRIGGER_EVENT_UPDATE | pg_sys::TRIGGER_EVENT_DELETE => {
                if !kinds.lifecycle() {
                    return Ok(None);
                }
                pg_sys::slot_getallattrs(data.tg_trigslot);
                let before = record_of(rel, data.tg_trigslot, auth_users);
                let Some(id) = before.id else {
                    return Ok(None);
                };
                if !first_firing((*rel).rd_id, id) {
                    return Ok(None);
                }
                let committed = if op == pg_sys::TRIGGER_EVENT_UPDATE {
                    committed_version(rel, data.tg_newtuple, data.tg_newslot, auth_users)
                } else {
                    None
                };
                match change_event(&before, committed.as_ref(), kinds) {
                    Some((kind, record, old)) => {
                        (kind, id, record.to_string(), old.map(str::to_string))
                    }
                    None => return Ok(None),
                }
            }
            _ => return Ok(None),
        };
        let mut user_id = user_id;
        if let Some(captured) = open_captured() {
            append_captured(
                captured,
                kind,
                &mut user_id,
                &source.name,
                &record,
                old_record.as_deref(),
            );
        } else if kind == Kind::Created || outbox::lifecycle_columns() {
            // An installed schema older than this library (until ALTER EXTENSION UPDATE):
            // the event goes into the outbox, which before 0.6.0 holds new users only.
            as_owner_of((*data.tg_trigger).tgfoid, || {
                insert_event(
                    kind,
                    &mut user_id,
                    &source.name,
                    &record,
                    old_record.as_deref(),
                )
            });
        } else {
            return Ok(None);
        }
    }
    wake::wake_on_commit();
    Ok(None)
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
/// the table.
#[pg_extern(stable, parallel_safe, sql = false)]
fn snapshot(target: pg_sys::Oid, row_id: pg_sys::ItemPointerData) -> Option<String> {
    unsafe {
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
        let rel = pg_sys::relation_open(target, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        let found = latest_version(
            rel,
            row_id,
            pg_sys::GetActiveSnapshot(),
            source(rel).auth_users,
        );
        pg_sys::relation_close(rel, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        found.map(|row| row.record)
    }
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
            error!("pg_new_user_hook: table {} does not exist", target.to_u32());
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
