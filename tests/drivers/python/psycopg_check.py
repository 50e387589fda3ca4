"""psycopg 3 checks (sync API, server-side prepared statements, pipeline mode, pool).

Usage: psycopg_check.py URL
"""
import hashlib
import sys
import threading
import time

import psycopg
from psycopg import errors as pgerr
from psycopg import sql as pgsql
from psycopg_pool import ConnectionPool

from common import (BIG_N, CLIENTS, TZ_EXPECT, CheckFailed, Reporter, big_expected_digest,
                    copy_text, expect, expect_eq, hold_slot, run_prefix, run_threads, type_values)

URL = sys.argv[1]
DRIVER = "psycopg"
P = run_prefix(DRIVER)            # e.g. psycopg_1a2b3c4d
S = P                             # schema holding this run's tables
SA, SB = P + "_sa", P + "_sb"     # schemas for the search_path check


def connect(**kw):
    kw.setdefault("autocommit", True)
    kw.setdefault("connect_timeout", 10)
    return psycopg.connect(URL, **kw)


def expect_sqlstate(conn, query, params, want):
    try:
        conn.execute(query, params)
    except psycopg.Error as e:
        expect_eq(e.sqlstate, want, f"SQLSTATE of {query!r}")
        return
    raise CheckFailed(f"{query!r} succeeded, expected SQLSTATE {want}")


def setup():
    with connect() as c:
        c.execute(f"CREATE SCHEMA {S}")
        c.execute(f"CREATE TABLE {S}.cr (client int, k int, v text)")
        c.execute(f"CREATE TABLE {S}.uniq (id int PRIMARY KEY)")
        c.execute(f"CREATE TABLE {S}.copy (id int PRIMARY KEY, t text, b bytea)")
        c.execute(f"CREATE TABLE {S}.pl (client int, k int, v text)")
        c.execute(f"CREATE TABLE {S}.many (client int, k int, v text)")
        for sch, val in ((SA, "a"), (SB, "b")):
            c.execute(f"CREATE SCHEMA {sch}")
            c.execute(f"CREATE TABLE {sch}.sp_t (v text)")
            c.execute(f"INSERT INTO {sch}.sp_t VALUES (%s)", (val,))


def cleanup():
    with connect() as c:
        for sch in (S, SA, SB):
            c.execute(f"DROP SCHEMA IF EXISTS {sch} CASCADE")


# ---------------------------------------------------------------- checks

TYPE_SQL = ("SELECT %s::int, %s::bigint, %s::numeric, %s::text, %s::timestamptz, %s::uuid, "
            "%s::bytea, %s::jsonb, %s::int[], %s::text[], %s::int, %s::text")
TYPE_KEYS = ["int", "bigint", "numeric", "text", "timestamptz", "uuid", "bytea", "jsonb",
             "int_array", "text_array"]


def check_types():
    from psycopg.types.json import Jsonb

    def client(i):
        v = type_values(i)
        params = [v[k] for k in TYPE_KEYS]
        params[TYPE_KEYS.index("jsonb")] = Jsonb(v["jsonb"])
        params += [None, None]
        with connect() as c:
            for binary in (False, True):
                for prepare in (False, True):
                    row = c.cursor(binary=binary).execute(TYPE_SQL, params, prepare=prepare).fetchone()
                    for k, got in zip(TYPE_KEYS + ["null_int", "null_text"], row):
                        want = v.get(k)
                        expect_eq(got, want, f"{k} (binary={binary}, prepare={prepare})")
                    # the timestamptz must be the same instant *and* keep microseconds
                    expect_eq(row[4].timestamp(), v["timestamptz"].timestamp(), "timestamptz instant")
            # server-side literals decode to exact values
            row = c.execute(
                "SELECT 9223372036854775807::bigint, (-2147483648)::int, '0.000000000000000000001'::numeric,"
                " 'NaN'::numeric, '2000-01-01 00:00:00.000001+00'::timestamptz,"
                " '\\x00ff'::bytea, '{\"k\": [1, null]}'::jsonb, ARRAY[[1,2],[3,4]]::int[],"
                " ARRAY['x', NULL]::text[], NULL::uuid").fetchone()
            import datetime, decimal
            want = (9223372036854775807, -2147483648, decimal.Decimal("1E-21"), None,
                    datetime.datetime(2000, 1, 1, 0, 0, 0, 1, tzinfo=datetime.timezone.utc),
                    b"\x00\xff", {"k": [1, None]}, [[1, 2], [3, 4]], ["x", None], None)
            expect_eq(row[0:3], want[0:3], "literal int/bigint/numeric")
            expect(row[3].is_nan(), f"NaN numeric: got {row[3]!r}")
            expect_eq(row[4:], want[4:], "literal values")
    run_threads(CLIENTS, client)


def check_prepared_50x():
    def client(i):
        with connect() as c:
            cur = c.cursor()
            for k in range(50):
                r = cur.execute("SELECT %s::int * 2 AS d, %s::text AS t", (k + i * 1000, f"c{i}-{k}"),
                                prepare=True).fetchone()
                expect_eq(r, ((k + i * 1000) * 2, f"c{i}-{k}"), "prepared stmt A")
                # interleave: another prepared statement, an unprepared one, a transaction
                r = cur.execute("SELECT %s::text || '-x', %s::bigint + 1", (f"c{i}", k), prepare=True).fetchone()
                expect_eq(r, (f"c{i}-x", k + 1), "prepared stmt B")
                r = cur.execute(f"SELECT {k} + %s::int", (i,), prepare=False).fetchone()
                expect_eq(r, (k + i,), "unprepared stmt")
                if k % 10 == 0:
                    with c.transaction():
                        r = cur.execute("SELECT %s::int * 2 AS d, %s::text AS t", (k, "tx"), prepare=True).fetchone()
                        expect_eq(r, (k * 2, "tx"), "prepared stmt A in transaction")
            # the statement is really prepared by the driver
            expect(len(c._prepared._names) >= 2, "psycopg did not keep the statements prepared")
            # SQL-level PREPARE / EXECUTE in later statements and transactions
            c.execute(f"PREPARE sqlprep_{i} (int) AS SELECT $1 * 3")
            for k in range(5):
                expect_eq(c.execute(f"EXECUTE sqlprep_{i} ({k})").fetchone(), (k * 3,), "SQL EXECUTE")
                with c.transaction():
                    expect_eq(c.execute(f"EXECUTE sqlprep_{i} ({k + 1})").fetchone(), ((k + 1) * 3,),
                              "SQL EXECUTE in transaction")
            c.execute(f"DEALLOCATE sqlprep_{i}")
            expect_sqlstate(c, f"EXECUTE sqlprep_{i} (1)", None, "26000")
    run_threads(CLIENTS, client)


def check_concurrent_own_answers():
    with ConnectionPool(URL, min_size=CLIENTS, max_size=CLIENTS, kwargs={"autocommit": True},
                        open=True, timeout=20) as pool:
        pool.wait(timeout=20)

        def client(i):
            for k in range(50):
                me = i * 100000 + k
                with pool.connection() as c:
                    r = c.execute("SELECT %s::int AS me, %s::text AS tag, pg_backend_pid()",
                                  (me, f"tag-{me}"), prepare=(k % 2 == 0)).fetchone()
                    expect_eq(r[0:2], (me, f"tag-{me}"), "echo")
        run_threads(CLIENTS, client)

    # and 20 threads each with its own connection, holding it throughout
    def own(i):
        with connect() as c:
            for k in range(50):
                me = -(i * 100000 + k)
                r = c.execute("SELECT %s::int AS me, pg_backend_pid()", (me,)).fetchone()
                expect_eq(r[0], me, "echo")
    run_threads(CLIENTS, own)


def check_commit_rollback():
    def client(i):
        with connect() as c, connect() as obs:
            def count(conn, k):
                return conn.execute(f"SELECT count(*) FROM {S}.cr WHERE client = %s AND k = %s", (i, k)).fetchone()[0]

            # c holds its transaction open while obs needs a server: at most POOL_SIZE - 1 such
            # holders at once (the transaction context rolls back inside the slot on failure)
            with hold_slot(), c.transaction():
                c.execute(f"INSERT INTO {S}.cr VALUES (%s, 1, 'committed')", (i,))
                expect_eq(count(obs, 1), 0, "uncommitted row visible to other connection")
                expect_eq(count(c, 1), 1, "own uncommitted row")
            expect_eq(count(obs, 1), 1, "committed row seen by other connection")
            try:
                with c.transaction():
                    c.execute(f"INSERT INTO {S}.cr VALUES (%s, 2, 'rolled back')", (i,))
                    expect_eq(count(c, 2), 1, "own row before rollback")
                    raise psycopg.Rollback()
            except psycopg.Rollback:
                pass
            expect_eq(count(c, 2), 0, "rolled back row")
            expect_eq(count(obs, 2), 0, "rolled back row (other connection)")
            # plain SQL BEGIN / COMMIT / ROLLBACK
            c.execute("BEGIN")
            c.execute(f"INSERT INTO {S}.cr VALUES (%s, 3, 'sql commit')", (i,))
            c.execute("COMMIT")
            c.execute("BEGIN")
            c.execute(f"INSERT INTO {S}.cr VALUES (%s, 4, 'sql rollback')", (i,))
            c.execute("ROLLBACK")
            expect_eq((count(obs, 3), count(obs, 4)), (1, 0), "SQL COMMIT/ROLLBACK")
            # non-autocommit connection: implicit transaction
            with connect(autocommit=False) as nc:
                with hold_slot():
                    try:
                        nc.execute(f"INSERT INTO {S}.cr VALUES (%s, 5, 'implicit')", (i,))
                        expect_eq(count(obs, 5), 0, "implicit transaction not yet committed")
                        nc.commit()
                    except BaseException:
                        try:
                            nc.rollback()
                        except psycopg.Error:
                            pass
                        raise
                expect_eq(count(obs, 5), 1, "implicit transaction committed")
                nc.execute(f"INSERT INTO {S}.cr VALUES (%s, 6, 'implicit rb')", (i,))
                nc.rollback()
                expect_eq(count(obs, 6), 0, "implicit transaction rolled back")
    run_threads(CLIENTS, client)


def check_errors():
    with connect() as c:
        c.execute(f"INSERT INTO {S}.uniq VALUES (-1)")

    def client(i):
        with connect() as c:
            expect_sqlstate(c, "SELECT 1 / %s::int", (0,), "22012")
            expect_eq(c.execute("SELECT %s::int", (i,)).fetchone(), (i,), "query after 22012")
            c.execute(f"INSERT INTO {S}.uniq VALUES (%s)", (i,))
            expect_sqlstate(c, f"INSERT INTO {S}.uniq VALUES (%s)", (i,), "23505")
            expect_eq(c.execute("SELECT %s::text", (f"ok{i}",)).fetchone(), (f"ok{i}",), "query after 23505")
            expect_sqlstate(c, f"SELECT * FROM {P}_no_such_table_{i}", None, "42P01")
            expect_sqlstate(c, "SELEC 1", None, "42601")
            expect_eq(c.execute("SELECT 2").fetchone(), (2,), "query after 42P01/42601")
            # error inside a transaction: aborted until rollback, then recovers
            c.execute("BEGIN")
            c.execute(f"INSERT INTO {S}.uniq VALUES (%s)", (1000 + i,))
            expect_sqlstate(c, "SELECT 1 / 0", None, "22012")
            expect_sqlstate(c, "SELECT 1", None, "25P02")
            c.execute("ROLLBACK")
            r = c.execute(f"SELECT count(*) FROM {S}.uniq WHERE id = %s", (1000 + i,)).fetchone()
            expect_eq(r, (0,), "insert of failed transaction rolled back")
            # same with prepared statements and the transaction() context
            try:
                with c.transaction():
                    c.execute("SELECT 1 / %s::int", (0,), prepare=True)
            except pgerr.DivisionByZero:
                pass
            expect_eq(c.execute("SELECT 1 / %s::int", (1,), prepare=True).fetchone(), (1,), "after prepared error")
    run_threads(CLIENTS, client)


def check_search_path():
    def client(i):
        sch, want, other = (SA, "a", "b") if i % 2 == 0 else (SB, "b", "a")
        osch = SB if sch == SA else SA
        with connect() as c:
            c.execute(pgsql.SQL("SET search_path TO {}").format(pgsql.Identifier(sch)))
            for k in range(10):
                expect_eq(c.execute("SELECT v FROM sp_t").fetchone(), (want,), f"unqualified query #{k}")
                with c.transaction():
                    expect_eq(c.execute("SELECT v FROM sp_t", prepare=True).fetchone(), (want,),
                              "in a later transaction")
                time.sleep(0.002)
            expect_eq(c.execute("SHOW search_path").fetchone(), (sch,), "SHOW search_path")
            # SET LOCAL lasts only for its transaction
            with c.transaction():
                c.execute(f"SET LOCAL search_path TO {osch}")
                expect_eq(c.execute("SELECT v FROM sp_t").fetchone(), (other,), "SET LOCAL inside")
            expect_eq(c.execute("SELECT v FROM sp_t").fetchone(), (want,), "after SET LOCAL")
            # SET in a rolled-back transaction is undone
            c.execute("BEGIN")
            c.execute(f"SET search_path TO {osch}")
            c.execute("ROLLBACK")
            expect_eq(c.execute("SELECT v FROM sp_t").fetchone(), (want,), "after rolled-back SET")
            # RESET
            c.execute("RESET search_path")
            expect_sqlstate(c, "SELECT v FROM sp_t", None, "42P01")
    run_threads(CLIENTS, client)


def check_timezone():
    def client(i):
        tz, want = TZ_EXPECT[i % len(TZ_EXPECT)]
        with connect() as c:
            c.execute(f"SET TimeZone TO '{tz}'")
            expect_eq(c.info.parameter_status("TimeZone"), tz, "ParameterStatus TimeZone")
            for k in range(10):
                r = c.execute("SELECT '2024-01-01 00:00:00+00'::timestamptz::text").fetchone()
                expect_eq(r, (want,), f"timestamptz text #{k}")
                with c.transaction():
                    r = c.execute("SELECT %s::timestamptz::text", ("2024-01-01 00:00:00+00",), prepare=True).fetchone()
                    expect_eq(r, (want,), "in a later transaction")
                expect_eq(c.execute("SHOW TimeZone").fetchone(), (tz,), "SHOW TimeZone")
                time.sleep(0.002)
    run_threads(CLIENTS, client)


def check_startup_params():
    def client(i):
        tz, want = TZ_EXPECT[i % len(TZ_EXPECT)]
        sch = SA if i % 2 == 0 else SB
        with connect(application_name=f"{P}_app{i}", options=f"-c TimeZone={tz} -c search_path={sch}") as c:
            for k in range(5):
                r = c.execute("SELECT current_setting('application_name'), "
                              "'2024-01-01 00:00:00+00'::timestamptz::text, (SELECT v FROM sp_t)").fetchone()
                expect_eq(r, (f"{P}_app{i}", want, "a" if sch == SA else "b"), f"startup parameters #{k}")
                with c.transaction():
                    expect_eq(c.execute("SHOW TimeZone").fetchone(), (tz,), "SHOW TimeZone in transaction")
    run_threads(CLIENTS, client)


def check_listen_notify():
    chan = f"{P}_chan"
    with connect() as listener, connect() as notifier:
        listener.execute(pgsql.SQL("LISTEN {}").format(pgsql.Identifier(chan)))
        # a few statements in between so a pooler has a chance to move things around
        for k in range(5):
            notifier.execute("SELECT %s::int", (k,))
            listener.execute("SELECT %s::int", (k,))
        t0 = time.monotonic()
        notifier.execute(pgsql.SQL("NOTIFY {}, 'hello-1'").format(pgsql.Identifier(chan)))
        notifier.execute("SELECT pg_notify(%s, %s)", (chan, "hello-2 é"))
        got = []
        for n in listener.notifies(timeout=5.0, stop_after=2):
            got.append((n.channel, n.payload))
        expect(time.monotonic() - t0 < 5.5, "notifications took longer than 5s")
        expect_eq(got, [(chan, "hello-1"), (chan, "hello-2 é")], "notifications")
        listener.execute(pgsql.SQL("UNLISTEN {}").format(pgsql.Identifier(chan)))
        expect_eq(listener.execute("SELECT 7").fetchone(), (7,), "listener usable")


def check_copy():
    n = 1000
    rows = [(i, copy_text(i) if i % 97 else None, bytes([i % 256, 0, 92, 10]) if i % 5 else None)
            for i in range(1, n + 1)]
    with connect() as c:
        cur = c.cursor()
        with cur.copy(f"COPY {S}.copy (id, t, b) FROM STDIN") as cp:
            for r in rows:
                cp.write_row(r)
        expect_eq(cur.rowcount, n, "COPY FROM rowcount")
        expect_eq(c.execute(f"SELECT count(*), sum(id) FROM {S}.copy").fetchone(), (n, n * (n + 1) // 2),
                  "rows after COPY FROM")
        got = []
        with cur.copy(f"COPY (SELECT id, t, b FROM {S}.copy ORDER BY id) TO STDOUT") as cp:
            cp.set_types(["int4", "text", "bytea"])
            for r in cp.rows():
                got.append(tuple(r))
        expect_eq(len(got), n, "COPY TO row count")
        for want, g in zip(rows, got):
            expect_eq(g, want, "COPY TO row")
        # binary COPY both ways too
        c.execute(f"CREATE TABLE {S}.copy2 (LIKE {S}.copy)")
        with cur.copy(f"COPY {S}.copy2 (id, t, b) FROM STDIN (FORMAT BINARY)") as cp:
            cp.set_types(["int4", "text", "bytea"])
            for r in rows:
                cp.write_row(r)
        got = []
        with cur.copy(f"COPY (SELECT id, t, b FROM {S}.copy2 ORDER BY id) TO STDOUT (FORMAT BINARY)") as cp:
            cp.set_types(["int4", "text", "bytea"])
            got = [tuple(r) for r in cp.rows()]
        expect_eq(got, rows, "binary COPY round trip")
        # raw text output equals what the server's own text rendering gives
        with cur.copy(f"COPY (SELECT id, t FROM {S}.copy ORDER BY id) TO STDOUT") as cp:
            buf = b"".join(bytes(d) for d in cp)
        expect_eq(buf.count(b"\n"), n, "raw COPY lines")
        expect_eq(c.execute("SELECT 1").fetchone(), (1,), "connection usable after COPY")


def check_cancel():
    with connect() as c:
        for attempt in range(2):  # also once inside a transaction
            timer_at = {}

            def cancel():
                timer_at["t"] = time.monotonic()
                c.cancel_safe(timeout=5)

            t = threading.Timer(0.5, cancel)
            t0 = time.monotonic()
            t.start()
            try:
                if attempt == 0:
                    c.execute("SELECT pg_sleep(10)")
                else:
                    with c.transaction():
                        c.execute("SELECT %s::int", (1,))
                        c.execute("SELECT pg_sleep(%s)", (10,))
                raise CheckFailed("pg_sleep(10) was not cancelled")
            except pgerr.QueryCanceled as e:
                took = time.monotonic() - timer_at.get("t", t0)
                expect_eq(e.sqlstate, "57014", "SQLSTATE")
                expect(took < 2.0, f"cancel took {took:.2f}s")
            t.join()
            expect_eq(c.execute("SELECT %s::int", (42 + attempt,)).fetchone(), (42 + attempt,),
                      "connection usable after cancel")
            with c.transaction():
                expect_eq(c.execute("SELECT 'after'").fetchone(), ("after",), "transaction after cancel")


def check_big_result():
    want_digest = big_expected_digest()
    with connect() as c:
        for binary in (False, True):
            cur = c.cursor(binary=binary)
            cur.execute("SELECT g, md5(g::text) FROM generate_series(1, %s) g", (BIG_N,))
            h = hashlib.md5()
            n = 0
            s = 0
            for g, m in cur:
                n += 1
                s += g
                if g != n:
                    raise CheckFailed(f"row {n} has g={g}")
                h.update(m.encode())
            expect_eq(n, BIG_N, "row count")
            expect_eq(s, BIG_N * (BIG_N + 1) // 2, "sum(g)")
            expect_eq(h.hexdigest(), want_digest, f"md5 checksum (binary={binary})")
        # a server-side cursor streaming the same rows in chunks
        with c.transaction():
            cur = c.cursor(name=f"{P}_big")
            cur.itersize = 5000
            cur.execute("SELECT g FROM generate_series(1, %s) g", (BIG_N,))
            expect_eq(sum(1 for _ in cur), BIG_N, "named cursor row count")
        expect_eq(c.execute("SELECT 3").fetchone(), (3,), "usable after big result")


def check_pipeline():
    def client(i):
        with connect() as c:
            curs = []
            with c.pipeline() as p:
                for k in range(100):
                    cur = c.cursor()
                    if k % 2 == 0:
                        cur.execute(f"INSERT INTO {S}.pl VALUES (%s, %s, %s)", (i, k, f"v{i}-{k}"))
                    else:
                        cur.execute("SELECT %s::int, %s::text", (i * 1000 + k, f"p{i}-{k}"), prepare=(k % 3 == 0))
                    curs.append((k, cur))
                p.sync()
            for k, cur in curs:
                if k % 2:
                    expect_eq(cur.fetchone(), (i * 1000 + k, f"p{i}-{k}"), f"pipelined select {k}")
            r = c.execute(f"SELECT count(*), min(k), max(k) FROM {S}.pl WHERE client = %s", (i,)).fetchone()
            expect_eq(r, (50, 0, 98), "pipelined inserts")
            # an error in a pipeline aborts the rest of its sync block, and the connection recovers
            try:
                with c.pipeline():
                    c.execute("SELECT 1 / 0")
                    c.execute("SELECT 1")
                raise CheckFailed("pipeline error not raised")
            except pgerr.DivisionByZero:
                pass
            expect_eq(c.execute("SELECT %s::int", (i,)).fetchone(), (i,), "after pipeline error")
            # executemany (runs in pipeline mode) of 1000 rows
            c.cursor().executemany(f"INSERT INTO {S}.many VALUES (%s, %s, %s)",
                                   [(i, k, f"m{k}") for k in range(1000)])
            r = c.execute(f"SELECT count(*), sum(k) FROM {S}.many WHERE client = %s", (i,)).fetchone()
            expect_eq(r, (1000, 999 * 1000 // 2), "executemany rows")
    run_threads(CLIENTS, client)


def main():
    rep = Reporter(DRIVER)
    try:
        setup()
    except Exception as e:  # noqa: BLE001
        rep.fail("setup", f"{type(e).__name__}: {e}")
        rep.finish()
    try:
        rep.run("types", check_types)
        rep.run("prepared_50x", check_prepared_50x)
        rep.run("concurrent_own_answers", check_concurrent_own_answers)
        rep.run("commit_rollback", check_commit_rollback)
        rep.run("errors_sqlstate", check_errors)
        rep.run("search_path", check_search_path)
        rep.run("timezone", check_timezone)
        rep.run("startup_params", check_startup_params)
        rep.run("listen_notify", check_listen_notify)
        rep.run("copy", check_copy)
        rep.run("cancel", check_cancel)
        rep.run("big_result", check_big_result)
        rep.run("pipeline", check_pipeline)
    finally:
        try:
            cleanup()
        except Exception as e:  # noqa: BLE001
            rep.fail("cleanup", f"{type(e).__name__}: {e}")
        rep.finish()


if __name__ == "__main__":
    main()
