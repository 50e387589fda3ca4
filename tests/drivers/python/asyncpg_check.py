"""asyncpg checks (pool of 20, named prepared statements, executemany, COPY, timeouts).

Usage: asyncpg_check.py URL
"""
import asyncio
import datetime
import decimal
import hashlib
import io
import json
import sys
import time
import uuid

import asyncpg

from common import (BIG_N, CHECK_DEADLINE, CLIENTS, HOLDERS, TZ_EXPECT, CheckFailed, Reporter,
                    big_expected_digest, copy_text, expect, expect_eq, run_prefix, type_values)

URL = sys.argv[1]
DRIVER = "asyncpg"
P = run_prefix(DRIVER)
S = P
SA, SB = P + "_sa", P + "_sb"


async def connect():
    return await asyncpg.connect(URL, timeout=10)


async def expect_sqlstate(conn, query, args, want):
    try:
        await conn.execute(query, *args) if args else await conn.execute(query)
    except asyncpg.PostgresError as e:
        expect_eq(e.sqlstate, want, f"SQLSTATE of {query!r}")
        return
    raise CheckFailed(f"{query!r} succeeded, expected SQLSTATE {want}")


async def gather_clients(n, fn):
    res = await asyncio.gather(*(fn(i) for i in range(n)), return_exceptions=True)
    errs = [f"client {i}: {type(r).__name__}: {r}" for i, r in enumerate(res) if isinstance(r, BaseException)]
    if errs:
        raise CheckFailed(f"{len(errs)} of {n} clients failed, first: {errs[0]}")


async def setup():
    c = await connect()
    try:
        await c.execute(f"CREATE SCHEMA {S}")
        await c.execute(f"CREATE TABLE {S}.cr (client int, k int, v text)")
        await c.execute(f"CREATE TABLE {S}.uniq (id int PRIMARY KEY)")
        await c.execute(f"CREATE TABLE {S}.copy (id int PRIMARY KEY, t text, b bytea)")
        await c.execute(f"CREATE TABLE {S}.many (client int, k int, v text, ts timestamptz)")
        for sch, val in ((SA, "a"), (SB, "b")):
            await c.execute(f"CREATE SCHEMA {sch}")
            await c.execute(f"CREATE TABLE {sch}.sp_t (v text)")
            await c.execute(f"INSERT INTO {sch}.sp_t VALUES ($1)", val)
    finally:
        await c.close()


async def cleanup():
    c = await connect()
    try:
        for sch in (S, SA, SB):
            await c.execute(f"DROP SCHEMA IF EXISTS {sch} CASCADE")
    finally:
        await c.close()


TYPE_SQL = ("SELECT $1::int, $2::bigint, $3::numeric, $4::text, $5::timestamptz, $6::uuid, "
            "$7::bytea, $8::jsonb, $9::int[], $10::text[], $11::int, $12::text")
TYPE_KEYS = ["int", "bigint", "numeric", "text", "timestamptz", "uuid", "bytea", "jsonb",
             "int_array", "text_array"]


async def check_types(pool):
    async def client(i):
        v = type_values(i)
        params = [v[k] for k in TYPE_KEYS]
        params[TYPE_KEYS.index("jsonb")] = json.dumps(v["jsonb"])
        params += [None, None]
        async with pool.acquire() as c:
            for _ in range(3):  # statement cache: first run prepares, later runs reuse
                row = await c.fetchrow(TYPE_SQL, *params)
                got = list(row)
                got[5] = uuid.UUID(str(got[5]))
                got[7] = json.loads(got[7])
                for k, g in zip(TYPE_KEYS + ["null_int", "null_text"], got):
                    expect_eq(g, v.get(k), k)
                expect_eq(row[4].timestamp(), v["timestamptz"].timestamp(), "timestamptz instant")
            row = await c.fetchrow(
                "SELECT 9223372036854775807::bigint, (-2147483648)::int, '0.000000000000000000001'::numeric,"
                " '2000-01-01 00:00:00.000001+00'::timestamptz, '\\x00ff'::bytea,"
                " ARRAY[[1,2],[3,4]]::int[], ARRAY['x', NULL]::text[], NULL::uuid")
            want = (9223372036854775807, -2147483648, decimal.Decimal("1E-21"),
                    datetime.datetime(2000, 1, 1, 0, 0, 0, 1, tzinfo=datetime.timezone.utc),
                    b"\x00\xff", [[1, 2], [3, 4]], ["x", None], None)
            expect_eq(tuple(row), want, "literal values")
    await gather_clients(CLIENTS, client)


async def check_prepared_50x(pool):
    async def client(i):
        async with pool.acquire() as c:
            a = await c.prepare("SELECT $1::int * 2 AS d, $2::text AS t")
            b = await c.prepare("SELECT $1::text || '-x', $2::bigint + 1")
            for k in range(50):
                r = await a.fetchrow(k + i * 1000, f"c{i}-{k}")
                expect_eq(tuple(r), ((k + i * 1000) * 2, f"c{i}-{k}"), "prepared stmt A")
                r = await b.fetchrow(f"c{i}", k)
                expect_eq(tuple(r), (f"c{i}-x", k + 1), "prepared stmt B")
                # unnamed/uncached statement in between
                r = await c.fetchval(f"SELECT {k} + $1::int", i)
                expect_eq(r, k + i, "ad-hoc statement")
                if k % 10 == 0:
                    async with c.transaction():
                        r = await a.fetchrow(k, "tx")
                        expect_eq(tuple(r), (k * 2, "tx"), "prepared stmt A in transaction")
            # the cached (implicitly prepared) path as well
            for k in range(50):
                expect_eq(await c.fetchval("SELECT $1::int + 100000", k + i), k + i + 100000, "cached stmt")
    await gather_clients(CLIENTS, client)


async def check_concurrent_own_answers(pool):
    async def client(i):
        for k in range(50):
            me = i * 100000 + k
            r = await pool.fetchrow("SELECT $1::int AS me, $2::text AS tag, pg_backend_pid()", me, f"tag-{me}")
            expect_eq((r["me"], r["tag"]), (me, f"tag-{me}"), "echo")
    await gather_clients(CLIENTS, client)


async def check_commit_rollback(pool):
    # observers come from a second pool: 20 clients x 2 connections would starve one pool of 20
    # (released pool connections are reset by asyncpg, with a ROLLBACK if one is still in a
    # transaction after a failure)
    obs_pool = await asyncpg.create_pool(URL, min_size=1, max_size=CLIENTS)
    # c holds its transaction open while obs needs a server: at most POOL_SIZE - 1 such holders
    # at once, or every server of a transaction pooler is held and every observer waits
    hold = asyncio.Semaphore(HOLDERS)

    async def client(i):
        async with pool.acquire() as c, obs_pool.acquire() as obs:
            async def count(conn, k):
                return await conn.fetchval(f"SELECT count(*) FROM {S}.cr WHERE client = $1 AND k = $2", i, k)

            async with hold, c.transaction():
                await c.execute(f"INSERT INTO {S}.cr VALUES ($1, 1, 'committed')", i)
                expect_eq(await count(obs, 1), 0, "uncommitted row visible to other connection")
                expect_eq(await count(c, 1), 1, "own uncommitted row")
            expect_eq(await count(obs, 1), 1, "committed row seen by other connection")
            tr = c.transaction()
            await tr.start()
            await c.execute(f"INSERT INTO {S}.cr VALUES ($1, 2, 'rolled back')", i)
            expect_eq(await count(c, 2), 1, "own row before rollback")
            await tr.rollback()
            expect_eq(await count(c, 2), 0, "rolled back row")
            expect_eq(await count(obs, 2), 0, "rolled back row (other connection)")
            # savepoint (nested transaction) rolled back, outer committed
            async with c.transaction():
                await c.execute(f"INSERT INTO {S}.cr VALUES ($1, 3, 'outer')", i)
                try:
                    async with c.transaction():
                        await c.execute(f"INSERT INTO {S}.cr VALUES ($1, 4, 'inner')", i)
                        raise ZeroDivisionError
                except ZeroDivisionError:
                    pass
            expect_eq((await count(obs, 3), await count(obs, 4)), (1, 0), "savepoint rollback")
    try:
        await gather_clients(CLIENTS, client)
    finally:
        await obs_pool.close()


async def check_errors(pool):
    async with pool.acquire() as c:
        await c.execute(f"INSERT INTO {S}.uniq VALUES (-1)")

    async def client(i):
        async with pool.acquire() as c:
            try:
                await c.fetchval("SELECT 1 / $1::int", 0)
                raise CheckFailed("no division_by_zero")
            except asyncpg.exceptions.DivisionByZeroError as e:
                expect_eq(e.sqlstate, "22012", "SQLSTATE")
            expect_eq(await c.fetchval("SELECT $1::int", i), i, "query after 22012")
            await c.execute(f"INSERT INTO {S}.uniq VALUES ($1)", i)
            try:
                await c.execute(f"INSERT INTO {S}.uniq VALUES ($1)", i)
                raise CheckFailed("no unique_violation")
            except asyncpg.exceptions.UniqueViolationError as e:
                expect_eq(e.sqlstate, "23505", "SQLSTATE")
            expect_eq(await c.fetchval("SELECT $1::text", f"ok{i}"), f"ok{i}", "query after 23505")
            await expect_sqlstate(c, f"SELECT * FROM {P}_no_such_table_{i}", None, "42P01")
            await expect_sqlstate(c, "SELEC 1", None, "42601")
            expect_eq(await c.fetchval("SELECT 2"), 2, "query after 42P01/42601")
            tr = c.transaction()
            await tr.start()
            await c.execute(f"INSERT INTO {S}.uniq VALUES ($1)", 1000 + i)
            await expect_sqlstate(c, "SELECT 1 / 0", None, "22012")
            await expect_sqlstate(c, "SELECT 1", None, "25P02")
            await tr.rollback()
            expect_eq(await c.fetchval(f"SELECT count(*) FROM {S}.uniq WHERE id = $1", 1000 + i), 0,
                      "insert of failed transaction rolled back")
    await gather_clients(CLIENTS, client)


async def check_search_path(_pool):
    async def client(i):
        sch, want, other = (SA, "a", "b") if i % 2 == 0 else (SB, "b", "a")
        osch = SB if sch == SA else SA
        c = await connect()
        try:
            await c.execute(f"SET search_path TO {sch}")
            for k in range(10):
                expect_eq(await c.fetchval("SELECT v FROM sp_t"), want, f"unqualified query #{k}")
                async with c.transaction():
                    expect_eq(await c.fetchval("SELECT v || '' FROM sp_t"), want, "in a later transaction")
                await asyncio.sleep(0.002)
            expect_eq(await c.fetchval("SHOW search_path"), sch, "SHOW search_path")
            async with c.transaction():
                await c.execute(f"SET LOCAL search_path TO {osch}")
                expect_eq(await c.fetchval("SELECT v FROM sp_t WHERE true"), other, "SET LOCAL inside")
            expect_eq(await c.fetchval("SELECT v FROM sp_t WHERE 1 = 1"), want, "after SET LOCAL")
            await c.execute("RESET search_path")
            await expect_sqlstate(c, "SELECT v FROM sp_t WHERE 2 = 2", None, "42P01")
        finally:
            await c.close()
    await gather_clients(CLIENTS, client)


async def check_timezone(_pool):
    async def client(i):
        tz, want = TZ_EXPECT[i % len(TZ_EXPECT)]
        c = await connect()
        try:
            await c.execute(f"SET TimeZone TO '{tz}'")
            for k in range(10):
                expect_eq(await c.fetchval("SELECT '2024-01-01 00:00:00+00'::timestamptz::text"), want,
                          f"timestamptz text #{k}")
                async with c.transaction():
                    expect_eq(await c.fetchval("SELECT $1::timestamptz::text",
                                               datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc)),
                              want, "in a later transaction")
                expect_eq(await c.fetchval("SHOW TimeZone"), tz, "SHOW TimeZone")
                await asyncio.sleep(0.002)
        finally:
            await c.close()
    await gather_clients(CLIENTS, client)


async def check_listen_notify(_pool):
    chan = f"{P}_chan"
    listener = await connect()
    notifier = await connect()
    try:
        q = asyncio.Queue()
        def on_notify(conn, pid, channel, payload):
            q.put_nowait((channel, payload))
        await listener.add_listener(chan, on_notify)
        for k in range(5):
            await notifier.fetchval("SELECT $1::int", k)
            await listener.fetchval("SELECT $1::int", k)
        await notifier.execute(f"NOTIFY {chan}, 'hello-1'")
        await notifier.execute("SELECT pg_notify($1, $2)", chan, "hello-2 é")
        got = [await asyncio.wait_for(q.get(), 5.0)]
        got.append(await asyncio.wait_for(q.get(), 5.0))
        expect_eq(got, [(chan, "hello-1"), (chan, "hello-2 é")], "notifications")
        await listener.remove_listener(chan, on_notify)
        expect_eq(await listener.fetchval("SELECT 7"), 7, "listener usable")
    finally:
        await listener.close()
        await notifier.close()


async def check_copy(pool):
    n = 1000
    rows = [(i, copy_text(i) if i % 97 else None, bytes([i % 256, 0, 92, 10]) if i % 5 else None)
            for i in range(1, n + 1)]
    async with pool.acquire() as c:
        res = await c.copy_records_to_table("copy", schema_name=S, records=rows, columns=["id", "t", "b"])
        expect_eq(res, f"COPY {n}", "copy_records_to_table status")
        expect_eq(tuple(await c.fetchrow(f"SELECT count(*), sum(id) FROM {S}.copy")), (n, n * (n + 1) // 2),
                  "rows after COPY FROM")
        got = [tuple(r) for r in await c.fetch(f"SELECT id, t, b FROM {S}.copy ORDER BY id")]
        expect_eq(got, rows, "rows as stored")
        # COPY TO STDOUT (text) and compare with what we expect the server to render
        chunks = []

        async def sink(data):
            chunks.append(bytes(data))
        res = await c.copy_from_query(f"SELECT id, t FROM {S}.copy ORDER BY id", output=sink)
        expect_eq(res, f"COPY {n}", "copy_from_query status")
        lines = b"".join(chunks).decode().split("\n")
        expect_eq(lines[-1], "", "trailing newline")
        lines = lines[:-1]
        expect_eq(len(lines), n, "COPY TO lines")

        def esc(t):
            if t is None:
                return "\\N"
            return t.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n")
        for (i, t, _), line in zip(rows, lines):
            expect_eq(line, f"{i}\t{esc(t)}", "COPY TO line")
        # COPY FROM STDIN of a raw text stream into a second table, then compare tables
        await c.execute(f"CREATE TABLE {S}.copy2 (id int, t text)")
        res = await c.copy_to_table("copy2", schema_name=S, source=io.BytesIO(b"".join(chunks)))
        expect_eq(res, f"COPY {n}", "copy_to_table status")
        diff = await c.fetchval(f"SELECT count(*) FROM ((SELECT id, t FROM {S}.copy EXCEPT ALL SELECT * FROM {S}.copy2)"
                                f" UNION ALL (SELECT * FROM {S}.copy2 EXCEPT ALL SELECT id, t FROM {S}.copy)) d")
        expect_eq(diff, 0, "tables differ after COPY round trip")
        expect_eq(await c.fetchval("SELECT 1"), 1, "connection usable after COPY")


async def check_cancel(_pool):
    c = await connect()
    try:
        # asyncpg's timeout= sends a CancelRequest and waits for the server's 57014 reply, then
        # raises TimeoutError: if the cancel did not reach the right backend, the
        # connection stays busy in pg_sleep(10) and the next query cannot run within 2 s.
        t0 = time.monotonic()
        try:
            await c.fetchval("SELECT pg_sleep(10)", timeout=0.5)
            raise CheckFailed("pg_sleep(10) was not cancelled")
        except asyncio.TimeoutError:
            pass
        expect_eq(await c.fetchval("SELECT $1::int", 42), 42, "connection usable after cancel")
        took = time.monotonic() - t0 - 0.5
        expect(took < 2.0, f"cancel + next query took {took:.2f}s after the timeout")
        # a cancelled task (driver cancel) in a transaction
        tr = c.transaction()
        await tr.start()
        task = asyncio.ensure_future(c.fetchval("SELECT pg_sleep(10)"))
        await asyncio.sleep(0.5)
        t1 = time.monotonic()
        task.cancel()
        try:
            await task
            raise CheckFailed("task not cancelled")
        except asyncio.CancelledError:
            pass
        await tr.rollback()
        expect_eq(await c.fetchval("SELECT 'after'"), "after", "usable after task cancel")
        took = time.monotonic() - t1
        expect(took < 2.0, f"task cancel + rollback + next query took {took:.2f}s")
        # the server's own cancel error, seen through the driver
        async with c.transaction():
            await c.execute("SET LOCAL statement_timeout = '300ms'")
            try:
                await c.execute("SELECT pg_sleep(10)")
                raise CheckFailed("statement_timeout did not fire")
            except asyncpg.exceptions.QueryCanceledError as e:
                expect_eq(e.sqlstate, "57014", "SQLSTATE")
                raise ZeroDivisionError  # roll the transaction back
    except ZeroDivisionError:
        pass
    finally:
        try:
            expect_eq(await c.fetchval("SHOW statement_timeout"), "0", "SET LOCAL statement_timeout undone")
        finally:
            await c.close()


async def check_big_result(pool):
    want_digest = big_expected_digest()
    async with pool.acquire() as c:
        rows = await c.fetch("SELECT g, md5(g::text) FROM generate_series(1, $1) g", BIG_N)
        expect_eq(len(rows), BIG_N, "row count")
        h = hashlib.md5()
        for n, (g, m) in enumerate(rows, 1):
            if g != n:
                raise CheckFailed(f"row {n} has g={g}")
            h.update(m.encode())
        expect_eq(h.hexdigest(), want_digest, "md5 checksum")
        # streamed through a cursor in a transaction
        async with c.transaction():
            n = 0
            async for r in c.cursor("SELECT g FROM generate_series(1, $1) g", BIG_N, prefetch=5000):
                n += 1
                if r[0] != n:
                    raise CheckFailed(f"cursor row {n} has g={r[0]}")
            expect_eq(n, BIG_N, "cursor row count")


async def check_executemany(pool):
    async def client(i):
        async with pool.acquire() as c:
            ts = datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc)
            await c.executemany(f"INSERT INTO {S}.many VALUES ($1, $2, $3, $4)",
                                [(i, k, f"m{i}-{k}", ts + datetime.timedelta(seconds=k)) for k in range(1000)])
            r = await c.fetchrow(f"SELECT count(*), sum(k), max(ts) FROM {S}.many WHERE client = $1", i)
            expect_eq(tuple(r), (1000, 999 * 1000 // 2, ts + datetime.timedelta(seconds=999)), "executemany rows")
            # executemany is atomic: a failing row rolls back the whole batch
            try:
                await c.executemany(f"INSERT INTO {S}.many VALUES ($1, $2, ($3::text)::int::text, NULL)",
                                    [(i, 5000 + k, "x" if k == 9 else str(k)) for k in range(10)])
                raise CheckFailed("bad row in executemany did not fail")
            except asyncpg.exceptions.InvalidTextRepresentationError as e:
                expect_eq(e.sqlstate, "22P02", "SQLSTATE of failed executemany")
            r = await c.fetchval(f"SELECT count(*) FROM {S}.many WHERE client = $1 AND k >= 5000", i)
            expect_eq(r, 0, "failed executemany left rows behind")
    await gather_clients(CLIENTS, client)


async def main():
    rep = Reporter(DRIVER)
    try:
        await asyncio.wait_for(setup(), 20)
        pool = await asyncio.wait_for(asyncpg.create_pool(URL, min_size=CLIENTS, max_size=CLIENTS), 30)
    except Exception as e:  # noqa: BLE001
        rep.fail("setup", f"{type(e).__name__}: {e}")
        rep.finish()
    checks = [
        ("types", check_types), ("prepared_50x", check_prepared_50x),
        ("concurrent_own_answers", check_concurrent_own_answers), ("commit_rollback", check_commit_rollback),
        ("errors_sqlstate", check_errors), ("search_path", check_search_path), ("timezone", check_timezone),
        ("listen_notify", check_listen_notify), ("copy", check_copy), ("cancel", check_cancel),
        ("big_result", check_big_result), ("executemany", check_executemany),
    ]
    try:
        for name, fn in checks:
            t0 = time.monotonic()
            try:
                await asyncio.wait_for(fn(pool), CHECK_DEADLINE)
                rep.ok(name, time.monotonic() - t0)
            except asyncio.TimeoutError:
                rep.fail(name, f"deadline of {CHECK_DEADLINE}s exceeded")
            except Exception as e:  # noqa: BLE001
                rep.fail(name, f"{type(e).__name__}: {e}")
        try:
            await asyncio.wait_for(pool.close(), 10)
        except Exception as e:  # noqa: BLE001
            rep.fail("pool_close", f"{type(e).__name__}: {e}")
    finally:
        try:
            await asyncio.wait_for(cleanup(), 20)
        except Exception as e:  # noqa: BLE001
            rep.fail("cleanup", f"{type(e).__name__}: {e}")
        rep.finish()


if __name__ == "__main__":
    asyncio.run(main())
