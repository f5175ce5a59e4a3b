//! The SQL functions of the capture side: `snapshot` (what backfill() queues) and
//! `watched_columns` (the columns install() lists in the update trigger).

use super::*;

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
