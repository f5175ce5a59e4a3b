//! Capture: the trigger that turns a committed insert into an outbox event, and the
//! allow-listed record an event holds.
//!
//! `install()` attaches `capture()` as a deferred constraint trigger, so it runs at
//! commit, after GoTrue's UPDATEs of the same transaction. It follows the inserted
//! row's update chain to the version this transaction sees last — the user as
//! committed — without a query, and writes the event with one saved INSERT plan. A
//! row deleted before commit produces no event; neither does a session with
//! `pg_new_user_hook.capture` off.

use crate::{guc, request, wake};
use pgrx::prelude::*;
use pgrx::{pg_sys, varlena, PgTrigger};
use std::cell::{Cell, RefCell};
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

/// The record of the row in `slot` (all attributes fetched) — the allow-listed columns
/// of auth.users, or `id` and `email` of another users table — and its uuid `id`
/// (install() requires one).
unsafe fn record_of(
    rel: pg_sys::Relation,
    slot: *mut pg_sys::TupleTableSlot,
    auth_users: bool,
) -> (String, Option<[u8; 16]>) {
    unsafe {
        let desc = (*rel).rd_att;
        let mut out = String::with_capacity(512);
        let mut id = None;
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
        (out, id)
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

/// The version of the row at `tid` that `snapshot` sees last (following updates):
/// its record and its `id`; None if it sees none (the row was deleted).
unsafe fn latest_version(
    rel: pg_sys::Relation,
    tid: pg_sys::ItemPointerData,
    snapshot: pg_sys::Snapshot,
    auth_users: bool,
) -> Option<(String, Option<[u8; 16]>)> {
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
    /// The event INSERT, planned once per backend (plans of other backends are their own).
    static INSERT_PLAN: Cell<pg_sys::SPIPlanPtr> = const { Cell::new(std::ptr::null_mut()) };
}

// The record goes in as a `json` Datum (its text): no input function parses it again.
// The event id is a UUIDv7: time-ordered, so the outbox's primary key grows at its end.
const INSERT_EVENT: &CStr =
    c"INSERT INTO new_user_hook.outbox (id, user_id, source, record) VALUES ($1, $2, $3, $4)";

unsafe fn insert_event(user_id: pg_sys::Datum, source: &str, record: &str) {
    unsafe {
        if pg_sys::SPI_connect() != pg_sys::SPI_OK_CONNECT as i32 {
            error!("pg_new_user_hook: SPI_connect failed");
        }
        let mut plan = INSERT_PLAN.get();
        if plan.is_null() {
            let mut types = [
                pg_sys::UUIDOID,
                pg_sys::UUIDOID,
                pg_sys::TEXTOID,
                pg_sys::JSONOID,
            ];
            plan = pg_sys::SPI_prepare(
                INSERT_EVENT.as_ptr(),
                types.len() as i32,
                types.as_mut_ptr(),
            );
            if plan.is_null() || pg_sys::SPI_keepplan(plan) != 0 {
                error!("pg_new_user_hook: preparing the event insert failed");
            }
            INSERT_PLAN.set(plan);
        }
        let source =
            pg_sys::cstring_to_text_with_len(source.as_ptr() as *const c_char, source.len() as i32);
        let record =
            pg_sys::cstring_to_text_with_len(record.as_ptr() as *const c_char, record.len() as i32);
        let mut event_id = *uuid::Uuid::now_v7().as_bytes();
        let mut values = [
            pg_sys::Datum::from(event_id.as_mut_ptr()),
            user_id,
            pg_sys::Datum::from(source),
            pg_sys::Datum::from(record),
        ];
        let rc = pg_sys::SPI_execute_plan(plan, values.as_mut_ptr(), std::ptr::null(), false, 0);
        if rc != pg_sys::SPI_OK_INSERT as i32 {
            error!("pg_new_user_hook: queuing the event failed (SPI code {rc})");
        }
        pg_sys::SPI_finish();
    }
}

/// The trigger function (SQL: `new_user_hook.capture()`). The event is written as
/// the function's owner: the inserting role needs no privilege on the outbox.
#[pg_trigger(sql = false)]
fn capture<'a>(
    trigger: &'a PgTrigger<'a>,
) -> Result<Option<PgHeapTuple<'a, pgrx::AllocatedByPostgres>>, std::convert::Infallible> {
    let data = trigger.trigger_data();
    let event = data.tg_event;
    let after_row_insert = event & pg_sys::TRIGGER_EVENT_TIMINGMASK == pg_sys::TRIGGER_EVENT_AFTER
        && event & pg_sys::TRIGGER_EVENT_ROW != 0
        && event & pg_sys::TRIGGER_EVENT_OPMASK == pg_sys::TRIGGER_EVENT_INSERT;
    if !after_row_insert {
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
                "new_user_hook.capture() must run AFTER INSERT ... FOR EACH ROW, not {when} {op} ... FOR EACH {level}"
            ),
            "capture",
        )
        .set_hint("Use SELECT new_user_hook.install('schema.table'), which creates the right trigger.")
        .report(PgLogLevel::ERROR);
    }
    if !guc::capturing() {
        return Ok(None);
    }
    unsafe {
        let rel = data.tg_relation;
        let source = source(rel);
        let auth_users = source.auth_users;
        let header = (*data.tg_trigtuple).t_data;
        let untouched = (*header).t_infomask as u32 & pg_sys::HEAP_XMAX_INVALID != 0
            || (*header).t_choice.t_heap.t_xmax == pg_sys::InvalidTransactionId;
        let found = if untouched {
            // Neither updated nor deleted since the insert: the row at hand is the user
            // as committed (the trigger's row is read afresh when it fires).
            let slot = data.tg_trigslot;
            pg_sys::slot_getallattrs(slot);
            Some(record_of(rel, slot, auth_users))
        } else {
            // A snapshot that sees this transaction's every change, the insert's own
            // statement included (as a query in a PL/pgSQL trigger would).
            pg_sys::CommandCounterIncrement();
            let snapshot = pg_sys::GetLatestSnapshot();
            latest_version(rel, (*data.tg_trigtuple).t_self, snapshot, auth_users)
        };
        let Some((record, Some(mut user_id))) = found else {
            return Ok(None);
        };
        as_owner_of((*data.tg_trigger).tgfoid, || {
            insert_event(
                pg_sys::Datum::from(user_id.as_mut_ptr()),
                &source.name,
                &record,
            )
        });
    }
    wake::wake_on_commit();
    Ok(None)
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
        found.map(|(record, _)| record)
    }
}
