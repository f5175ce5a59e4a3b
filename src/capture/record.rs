//! A user's row → the allow-listed record an event holds (as `to_json` writes each
//! value), the row's id, the version of a row a snapshot sees, and the columns an
//! event needs that a row does not hold (PostgreSQL 18's virtual generated columns).

use super::*;

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
pub(super) unsafe fn plain_varlena(datum: pg_sys::Datum) -> *const pg_sys::varlena {
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
pub(super) unsafe fn json_value(typid: pg_sys::Oid, datum: pg_sys::Datum, out: &mut String) {
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

pub(super) fn json_string(s: &str, out: &mut String) {
    out.push_str(&serde_json::to_string(s).expect("a string serialises"));
}

/// Only the provider names of `raw_app_meta_data` leave the database.
pub(super) fn providers_only(app_meta_data: &str) -> String {
    let all: serde_json::Value = serde_json::from_str(app_meta_data).unwrap_or_default();
    serde_json::json!({ "provider": all["provider"], "providers": all["providers"] }).to_string()
}

/// One version of a user's row, as an event needs it.
pub(super) struct Row {
    /// The allow-listed columns as a JSON object.
    pub(super) record: String,
    /// Soft-deleted: its `deleted_at` is set (GoTrue's soft delete).
    pub(super) deleted: bool,
}

/// The row in `slot` (all attributes fetched): its record — the allow-listed columns
/// of auth.users, or `id` and `email` of another users table — and deletion mark.
pub(super) unsafe fn record_of(
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

/// The version of the row at `tid` that `snapshot` sees last (following updates);
/// None if it sees none (the row was deleted). A snapshot sees one version of a row
/// at most: the one at `tid` if it is visible, else the end of its update chain.
pub(super) unsafe fn latest_version(
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

/// The uuid `id` of the row in `slot` (install() requires one).
pub(super) unsafe fn row_id(
    rel: pg_sys::Relation,
    slot: *mut pg_sys::TupleTableSlot,
) -> Option<[u8; 16]> {
    unsafe {
        let desc = (*rel).rd_att;
        if has_virtual_columns(desc) {
            warn_unstored_columns(rel);
        }
        for i in 0..(*desc).natts as usize {
            let attr = tuple_attr(desc, i);
            if !attr.attisdropped
                && attr.atttypid == pg_sys::UUIDOID
                && CStr::from_ptr(attr.attname.data.as_ptr()).to_bytes() == b"id"
            {
                let mut isnull = false;
                let datum = pg_sys::slot_getattr(slot, (i + 1) as i32, &mut isnull);
                return (!isnull).then(|| *datum.cast_mut_ptr::<[u8; 16]>());
            }
        }
        None
    }
}

/// Whether the table has a virtual generated column (PostgreSQL 18; the tuple
/// descriptor says so, so a table without one pays nothing more per row).
unsafe fn has_virtual_columns(desc: pg_sys::TupleDesc) -> bool {
    #[cfg(feature = "pg18")]
    unsafe {
        !(*desc).constr.is_null() && (*(*desc).constr).has_generated_virtual
    }
    #[cfg(not(feature = "pg18"))]
    {
        let _ = desc;
        false
    }
}

/// Warns of each column an event needs that is a virtual generated column.
unsafe fn warn_unstored_columns(rel: pg_sys::Relation) {
    unsafe {
        let desc = (*rel).rd_att;
        for i in 0..(*desc).natts as usize {
            let attr = tuple_attr(desc, i);
            if !attr.attisdropped && attr.attgenerated == VIRTUAL {
                warn_unstored(rel, attr);
            }
        }
    }
}

/// `attgenerated` of a virtual generated column (PostgreSQL 18), whose value is
/// computed when a query reads it and is not in the stored row an event is made from.
pub(super) const VIRTUAL: c_char = b'v' as c_char;

thread_local! {
    /// Tables this backend has warned about (once each).
    static WARNED_UNSTORED: RefCell<Vec<pg_sys::Oid>> = const { RefCell::new(Vec::new()) };
}

/// A column an event needs (`id`, `email`, `deleted_at`) became a virtual generated
/// column after install() (which refuses one): says so in the log, once per backend
/// and table; new_user_hook.status says it for as long as it lasts.
pub(super) unsafe fn warn_unstored(rel: pg_sys::Relation, attr: &pg_sys::FormData_pg_attribute) {
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
