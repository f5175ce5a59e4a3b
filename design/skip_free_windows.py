"""Skip-free reading of a log by snapshot windows: many concurrent writers (short,
long, savepoints, subtransaction inserts, aborts), one reader moving a position."""
import random, threading, time, sys
sys.path.insert(0, '/tmp/pylib')
import psycopg

DSN = "host=/tmp/scr/d port=55432 user=supabase_admin dbname=postgres"
with psycopg.connect(DSN, autocommit=True) as c:
    c.execute("DROP TABLE IF EXISTS skiplog")
    c.execute("CREATE TABLE skiplog (id bigserial, xid xid8 NOT NULL, note text)")
    c.execute("CREATE INDEX ON skiplog (xid)")

committed, lock = set(), threading.Lock()
stop = threading.Event()
writers_done = threading.Event()

def writer(n):
    rnd = random.Random(n)
    with psycopg.connect(DSN) as c:
        while not stop.is_set():
            kind = rnd.choice(["short", "short", "short", "long", "savepoint", "abort", "early"])
            ids = []
            with c.cursor() as cur:
                if kind == "early":
                    # The row written early, the transaction going on for a while (an
                    # insert long before the commit, as SET CONSTRAINTS IMMEDIATE would).
                    cur.execute("INSERT INTO skiplog (xid, note) VALUES (pg_current_xact_id(), 'early') RETURNING id")
                    ids.append(cur.fetchone()[0])
                    time.sleep(rnd.uniform(0.05, 0.6))
                if kind == "long":
                    cur.execute("SELECT pg_current_xact_id()")  # an xid taken early
                    time.sleep(rnd.uniform(0.05, 0.8))
                if kind == "savepoint":
                    cur.execute("SAVEPOINT a")
                    cur.execute("INSERT INTO skiplog (xid, note) VALUES (pg_current_xact_id(), 'sub') RETURNING id")
                    ids.append(cur.fetchone()[0])
                    cur.execute("RELEASE a")
                cur.execute("INSERT INTO skiplog (xid, note) VALUES (pg_current_xact_id(), %s) RETURNING id", (kind,))
                ids.append(cur.fetchone()[0])
            if kind == "abort":
                c.rollback()
            else:
                c.commit()
                with lock:
                    committed.update(ids)
            time.sleep(rnd.uniform(0, 0.01))

seen, dup = {}, 0
def reader():
    global dup
    prev = None
    with psycopg.connect(DSN, autocommit=True) as c:
        while True:
            done = writers_done.is_set()
            rows = c.execute("""
                SELECT l.id, s.cur::text FROM (SELECT pg_current_snapshot() AS cur) s
                LEFT JOIN skiplog l ON %(prev)s::pg_snapshot IS NULL
                  OR (l.xid >= pg_snapshot_xmin(%(prev)s::pg_snapshot)
                      AND NOT pg_visible_in_snapshot(l.xid, %(prev)s::pg_snapshot))""", {"prev": prev}).fetchall()
            for id_, cur in rows:
                if id_ is not None:
                    if id_ in seen:
                        dup += 1
                    seen[id_] = True
            prev = rows[0][1]
            if done:
                # One more window after the writers stopped, then the last one.
                # The window read after every writer committed is the last one.
                return
            time.sleep(random.uniform(0, 0.02))

threads = [threading.Thread(target=writer, args=(i,)) for i in range(12)]
r = threading.Thread(target=reader)
for t in threads: t.start()
r.start()
time.sleep(float(sys.argv[1]) if len(sys.argv) > 1 else 20)
stop.set()
for t in threads: t.join()
writers_done.set()
r.join()
missing = committed - set(seen)
extra = set(seen) - committed
print(f"committed {len(committed)}, read {len(seen)}, read twice {dup}, missing {len(missing)}, read but never committed {len(extra)}")
