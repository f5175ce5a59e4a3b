//! Writing an event: one heap row appended to the capture table, or — into a schema
//! older than 0.7.0 — an INSERT into the outbox as the extension's owner.

use super::*;

thread_local! {
    /// The event INSERTs, planned once per backend (plans of other backends are their own):
    /// a new user's, and a later change's.
    static CREATED_PLAN: Cell<pg_sys::SPIPlanPtr> = const { Cell::new(std::ptr::null_mut()) };
    static CHANGE_PLAN: Cell<pg_sys::SPIPlanPtr> = const { Cell::new(std::ptr::null_mut()) };
    /// Any event, into log_0 or log_1 when it cannot be written directly.
    static LOG_0_PLAN: Cell<pg_sys::SPIPlanPtr> = const { Cell::new(std::ptr::null_mut()) };
    static LOG_1_PLAN: Cell<pg_sys::SPIPlanPtr> = const { Cell::new(std::ptr::null_mut()) };
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
pub(super) const INSERT_CREATED: &CStr =
    c"INSERT INTO new_user_hook.outbox (id, user_id, source, record, kind, old_record, seq) \
      VALUES ($1, $2, $3, $4, $5, $6, $7)";
/// Into the log's segments (their trigger stamps the transaction's id).
pub(super) const INSERT_LOG: [&CStr; 2] = [
    c"INSERT INTO new_user_hook.log_0 (id, user_id, source, record, kind, old_record, seq, created_at) \
      VALUES ($1, $2, $3, $4, $5, $6, $7, pg_catalog.clock_timestamp())",
    c"INSERT INTO new_user_hook.log_1 (id, user_id, source, record, kind, old_record, seq, created_at) \
      VALUES ($1, $2, $3, $4, $5, $6, $7, pg_catalog.clock_timestamp())",
];
pub(super) const INSERT_LEGACY: &CStr =
    c"INSERT INTO new_user_hook.outbox (id, user_id, source, record) VALUES ($1, $2, $3, $4)";
pub(super) const INSERT_CHANGE: &CStr = c"INSERT INTO new_user_hook.outbox (id, user_id, source, record, kind, old_record, seq) \
      VALUES ($1, $2, $3, $4, $5, $6, GREATEST($7, (SELECT max(p.seq) + 1 FROM new_user_hook.outbox p \
                                                    WHERE p.user_id = $2 AND p.status NOT IN ('delivered', 'failed'))))";

pub(super) fn text_datum(s: &str) -> pg_sys::Datum {
    pg_sys::Datum::from(unsafe {
        pg_sys::cstring_to_text_with_len(s.as_ptr() as *const c_char, s.len() as i32)
    })
}

pub(super) unsafe fn insert_event(
    into_log: Option<usize>,
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
        let legacy = into_log.is_none() && !catalog::lifecycle_columns();
        let (cache, sql) = match (kind, into_log) {
            (_, Some(0)) => (&LOG_0_PLAN, INSERT_LOG[0]),
            (_, Some(_)) => (&LOG_1_PLAN, INSERT_LOG[1]),
            _ if legacy => (&LEGACY_PLAN, INSERT_LEGACY),
            (Kind::Created, None) => (&CREATED_PLAN, INSERT_CREATED),
            (Kind::Updated | Kind::Deleted, None) => (&CHANGE_PLAN, INSERT_CHANGE),
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

/// The capture table's columns (a 0.7.0 schema), in order, with their types; the
/// log's are these and `xid`.
pub(super) const CAPTURED_COLUMNS: [(&[u8], pg_sys::Oid); 8] = [
    (b"id", pg_sys::UUIDOID),
    (b"user_id", pg_sys::UUIDOID),
    (b"source", pg_sys::TEXTOID),
    (b"kind", pg_sys::TEXTOID),
    (b"record", pg_sys::JSONOID),
    (b"old_record", pg_sys::JSONOID),
    (b"seq", pg_sys::INT8OID),
    (b"created_at", pg_sys::TIMESTAMPTZOID),
];
const XID_COLUMN: (&[u8], pg_sys::Oid) = (b"xid", pg_sys::XID8OID);

/// Where this transaction's events go.
pub(super) enum Target {
    /// The log segment signups append to (`new_user_hook.log_0` or `log_1`, 0.8.0),
    /// with its one index, on xid: a heap row and an index entry, written directly.
    Log {
        heap: pg_sys::Relation,
        index: pg_sys::Relation,
        info: *mut pg_sys::IndexInfo,
    },
    /// The log segment (0 or 1), changed by hand (an index or a column added): an
    /// INSERT as the owner, so that every index is kept.
    LogByInsert(usize),
    /// A 0.7.0 schema's capture table (until ALTER EXTENSION UPDATE): a heap row.
    Captured(pg_sys::Relation),
    /// An older schema: the outbox, by INSERT as the owner.
    Outbox,
}

/// Opens `name` in new_user_hook if it has exactly `columns` (and `extra`); None when
/// it is missing, different, or was dropped since it was looked up.
unsafe fn open_with_columns(
    name: &CStr,
    extra: Option<(&[u8], pg_sys::Oid)>,
) -> Option<pg_sys::Relation> {
    unsafe {
        let relid = catalog::table_oid(name)?;
        let rel = pg_sys::try_table_open(relid, pg_sys::RowExclusiveLock as pg_sys::LOCKMODE);
        if rel.is_null() {
            return None;
        }
        let desc = (*rel).rd_att;
        let columns = CAPTURED_COLUMNS.iter().chain(extra.iter());
        let count = CAPTURED_COLUMNS.len() + extra.iter().count();
        // Checked at each use (nine comparisons): a column whose type changed would
        // otherwise be written with datums of the old type.
        let same = (*desc).natts as usize == count
            && columns.enumerate().all(|(i, (name, typid))| {
                let attr = tuple_attr(desc, i);
                !attr.attisdropped
                    && attr.atttypid == *typid
                    && CStr::from_ptr(attr.attname.data.as_ptr()).to_bytes() == *name
            });
        if !same {
            pg_sys::table_close(rel, pg_sys::RowExclusiveLock as pg_sys::LOCKMODE);
            return None;
        }
        Some(rel)
    }
}

/// The log's index on xid, opened, if it is the segment's only index and a plain
/// btree on that column: then a signup writes its entry itself.
unsafe fn only_xid_index(
    heap: pg_sys::Relation,
) -> Option<(pg_sys::Relation, *mut pg_sys::IndexInfo)> {
    unsafe {
        let list = pg_sys::RelationGetIndexList(heap);
        let oids = pgrx::PgList::<pg_sys::Oid>::from_pg(list);
        if oids.len() != 1 {
            return None;
        }
        let index_oid = oids.get_oid(0)?;
        let index = pg_sys::index_open(index_oid, pg_sys::RowExclusiveLock as pg_sys::LOCKMODE);
        let info = pg_sys::BuildIndexInfo(index);
        let xid_attnum = (CAPTURED_COLUMNS.len() + 1) as pg_sys::AttrNumber;
        let plain = (*(*index).rd_rel).relam == pg_sys::BTREE_AM_OID
            && (*info).ii_NumIndexAttrs == 1
            && (*info).ii_IndexAttrNumbers[0] == xid_attnum
            && (*info).ii_Expressions.is_null()
            && (*info).ii_Predicate.is_null()
            && (*info).ii_ExclusionOps.is_null()
            && !(*info).ii_Unique
            && (*info).ii_ReadyForInserts;
        if !plain {
            pg_sys::index_close(index, pg_sys::RowExclusiveLock as pg_sys::LOCKMODE);
            return None;
        }
        Some((index, info))
    }
}

/// Where this transaction's events go, looked up once per transaction: the log
/// segment the worker points signups to now (shared memory; a transaction that read
/// it just before the worker switched writes into the other segment, which is read
/// as well and only emptied once read), else what an older schema has.
pub(super) unsafe fn open_target() -> Target {
    unsafe {
        let segment = shared::write_segment();
        let name = [c"log_0", c"log_1"][segment];
        if let Some(heap) = open_with_columns(name, Some(XID_COLUMN)) {
            if let Some((index, info)) = only_xid_index(heap) {
                return Target::Log { heap, index, info };
            }
            pg_sys::table_close(heap, pg_sys::NoLock as pg_sys::LOCKMODE);
            return Target::LogByInsert(segment);
        }
        if catalog::table_oid(name).is_some() {
            return Target::LogByInsert(segment);
        }
        match open_with_columns(c"captured", None) {
            Some(rel) => Target::Captured(rel),
            None => Target::Outbox,
        }
    }
}

/// Releases what open_target opened; the locks are kept until the transaction
/// ends, as an INSERT's are.
pub(super) unsafe fn close_target(target: Target) {
    unsafe {
        match target {
            Target::Log { heap, index, .. } => {
                pg_sys::index_close(index, pg_sys::NoLock as pg_sys::LOCKMODE);
                pg_sys::table_close(heap, pg_sys::NoLock as pg_sys::LOCKMODE);
            }
            Target::Captured(rel) => pg_sys::table_close(rel, pg_sys::NoLock as pg_sys::LOCKMODE),
            Target::LogByInsert(_) | Target::Outbox => {}
        }
    }
}

/// Appends the event as one heap row, written directly — the table has no
/// constraint or default to run, so the executor's set-up for a statement (most of
/// what a one-row INSERT costs) is skipped — and, into the log, its entry in the
/// index on xid: the transaction's own id (not the row's xmin, which is a
/// subtransaction's after SET CONSTRAINTS … IMMEDIATE in a savepoint). The worker
/// gives a change's `seq` its place after the user's pending events when it reads
/// the event into the outbox.
pub(super) unsafe fn append_row(
    target: &Target,
    kind: Kind,
    user_id: &mut [u8; 16],
    source: &str,
    record: &str,
    old_record: Option<&str>,
) {
    unsafe {
        let (heap, index) = match target {
            Target::Log { heap, index, info } => (*heap, Some((*index, *info))),
            Target::Captured(heap) => (*heap, None),
            Target::LogByInsert(_) | Target::Outbox => unreachable!("written by INSERT"),
        };
        let xid = pg_sys::GetTopFullTransactionId().value;
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
            pg_sys::Datum::from(xid),
        ];
        let mut nulls = [false; 9];
        nulls[5] = old_record.is_none();
        let tuple =
            pg_sys::heap_form_tuple((*heap).rd_att, values.as_mut_ptr(), nulls.as_mut_ptr());
        pg_sys::simple_heap_insert(heap, tuple);
        if let Some((index, info)) = index {
            let mut key = [pg_sys::Datum::from(xid)];
            let mut key_null = [false];
            pg_sys::index_insert(
                index,
                key.as_mut_ptr(),
                key_null.as_mut_ptr(),
                &mut (*tuple).t_self,
                heap,
                pg_sys::IndexUniqueCheck::UNIQUE_CHECK_NO,
                false,
                info,
            );
        }
        pg_sys::heap_freetuple(tuple);
    }
}

/// Runs `f` as the owner of function `function` (the extension's owner), as SECURITY
/// DEFINER would — without its cost per call, which a trigger pays at every signup.
/// An error inside leaves the switch to the transaction's abort, which undoes it.
pub(super) unsafe fn as_owner_of<T>(function: pg_sys::Oid, f: impl FnOnce() -> T) -> T {
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

pub(super) fn quote_identifier(name: &str) -> String {
    let c = std::ffi::CString::new(name).expect("no NUL in a name");
    unsafe { CStr::from_ptr(pg_sys::quote_identifier(c.as_ptr())) }
        .to_string_lossy()
        .into_owned()
}
