#!/usr/bin/env python3
"""The soak's load and sampler (bench/soak.sh): mixed work through one pgsurge for --duration seconds, and every
10 s one line of what the proxy holds (RSS, open files), the server connections Postgres sees per user, and the
requests answered and errors (expected or not) in those 10 s.

Workers (asyncio, raw protocol clients from idle_clients.py; each reconnects after an error):
  steady   cached point reads of a hot set, and writes (UPDATE in BEGIN/COMMIT) that invalidate them
  batch    extended-protocol point lookups, concurrent: the N+1 batcher merges them
  churn    connect, one query, leave: server connections are shared across short sessions
  limited  a user over its qps limit: delayed, then 53400 (expected)
  cancel   a pg_sleep cancelled through the proxy (57014 expected)
  killer   a client killed mid-query or mid-transaction (its socket aborted)
Timed events: SIGHUP every 30 s (the limit's qps rewritten in the config file first, so the reload changes
something), and one Postgres restart (pg_ctl restart -m fast) at half time: errors of a lost upstream are expected
from just before it until 15 s after it.
"""
import argparse
import asyncio
import collections
import json
import os
import random
import signal
import struct
import subprocess
import sys
import time

from idle_clients import PgError, fds, login, msg, query, rss_kib

# Errors expected of a worker kind whenever they happen.
EXPECTED = {"limited": {"53400"}, "cancel": {"57014"}}
# Errors expected while Postgres restarts: admin shutdown, cannot connect now, upstream gone, and the
# connection-level failures of a client whose session pgsurge ended.
RESTART = {"57P01", "57P02", "57P03", "08006", "08001", "08003", "53300", "conn"}
RESTART_GRACE = 15.0


class Soak:
    def __init__(self, a):
        self.a = a
        self.t0 = time.monotonic()
        self.end = self.t0 + a.duration
        self.ok = collections.Counter()
        self.expected = collections.Counter()
        self.unexpected = collections.Counter()
        self.restart_window = None  # (start, end) in monotonic seconds
        self.reloads = 0
        self.samples = []

    def live(self):
        return time.monotonic() < self.end

    def in_restart(self):
        w = self.restart_window
        now = time.monotonic()
        return w is not None and w[0] - 1 <= now <= (w[1] if w[1] else now) + RESTART_GRACE

    def failed(self, kind, e):
        code = e.code if isinstance(e, PgError) else "conn"
        if code in EXPECTED.get(kind, ()):
            self.expected[code] += 1
        elif code in RESTART and self.in_restart():
            self.expected[f"restart:{code}"] += 1
        else:
            self.unexpected[f"{kind}:{code}:{str(e)[:60]}"] += 1

    async def connect(self, user="app", key=None):
        pw = self.a.limited_password if user == "limited" else "app"
        return await login("127.0.0.1", self.a.port, user, pw, "app", key)

    async def worker(self, kind, body, user="app", pause=0.005):
        """Runs `body(conn)` in a loop on one connection; after an error, reconnects (after 0.2 s)."""
        conn = None
        while self.live():
            try:
                if conn is None:
                    conn = await self.connect(user)
                await body(conn)
                self.ok[kind] += 1
            except (PgError, OSError, asyncio.IncompleteReadError) as e:
                self.failed(kind, e)
                if not isinstance(e, PgError) or e.code in RESTART:
                    close(conn)
                    conn = None
                await asyncio.sleep(0.2)
            await asyncio.sleep(pause)
        close(conn)

    async def steady(self, conn):
        aid = random.randint(1, 200)
        if random.random() < 0.1:
            await query(conn, f"BEGIN; UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid = {aid}; COMMIT".encode())
        else:
            await query(conn, f"SELECT abalance FROM pgbench_accounts WHERE aid = {aid}".encode())

    async def batch(self, conn):
        aid = str(random.randint(1, self.a.accounts)).encode()
        out = msg(b"P", b"\0SELECT aid, abalance FROM pgbench_accounts WHERE aid = $1\0" + struct.pack("!hI", 1, 23))
        out += msg(b"B", b"\0\0" + struct.pack("!hh", 0, 1) + struct.pack("!i", len(aid)) + aid + struct.pack("!h", 0))
        out += msg(b"D", b"P\0") + msg(b"E", b"\0" + struct.pack("!i", 0)) + msg(b"S", b"")
        await query(conn, out=out)

    async def churn(self):
        while self.live():
            try:
                conn = await self.connect()
                await query(conn, b"SELECT 1")
                conn[1].write(msg(b"X", b""))
                close(conn)
                self.ok["churn"] += 1
            except (PgError, OSError, asyncio.IncompleteReadError) as e:
                self.failed("churn", e)
                await asyncio.sleep(0.2)
            await asyncio.sleep(0.02)

    async def cancel(self):
        while self.live():
            key, conn = {}, None
            try:
                conn = await self.connect(key=key)
                run = asyncio.ensure_future(query(conn, b"SELECT pg_sleep(5)"))
                await asyncio.sleep(0.2)
                r, w = await asyncio.open_connection("127.0.0.1", self.a.port)
                w.write(struct.pack("!ii", 16, 80877102) + key["pid"] + key["secret"])
                await w.drain()
                w.close()
                await asyncio.wait_for(run, 10)
                self.unexpected["cancel:not cancelled"] += 1
            except (PgError, OSError, asyncio.IncompleteReadError, asyncio.TimeoutError) as e:
                if isinstance(e, asyncio.TimeoutError):
                    self.unexpected["cancel:no answer in 10 s"] += 1
                else:
                    self.failed("cancel", e)
            close(conn)
            await asyncio.sleep(1.0)

    async def killer(self):
        n = 0
        while self.live():
            n += 1
            conn = None
            try:
                conn = await self.connect()
                if n % 2:
                    conn[1].write(msg(b"Q", b"SELECT pg_sleep(0.5)\0"))
                else:
                    await query(conn, f"BEGIN; UPDATE pgbench_accounts SET abalance = abalance - 1 WHERE aid = {n % 200 + 1}".encode())
                await asyncio.sleep(0.05)
                conn[1].transport.abort()
                self.ok["killer"] += 1
            except (PgError, OSError, asyncio.IncompleteReadError) as e:
                self.failed("killer", e)
                close(conn)
            await asyncio.sleep(2.0)

    async def reloader(self):
        qps = [self.a.limited_qps, self.a.limited_qps + 10]
        while True:
            await asyncio.sleep(30)
            if not self.live():
                return
            text = open(self.a.config).read()
            old = qps[self.reloads % 2]
            new = qps[(self.reloads + 1) % 2]
            open(self.a.config, "w").write(text.replace(f"qps = {old}\n", f"qps = {new}\n"))
            os.kill(self.a.pid, signal.SIGHUP)
            self.reloads += 1

    async def restarter(self):
        await asyncio.sleep(self.a.duration / 2)
        self.restart_window = (time.monotonic(), None)
        loop = asyncio.get_running_loop()
        rc = await loop.run_in_executor(None, lambda: subprocess.run(self.a.restart_cmd, shell=True, capture_output=True).returncode)
        self.restart_window = (self.restart_window[0], time.monotonic())
        print(f"# postgres restarted at {self.restart_window[0] - self.t0:.0f} s (rc {rc}, took "
              f"{self.restart_window[1] - self.restart_window[0]:.1f} s)", flush=True)

    def servers(self):
        sql = ("SELECT usename, count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' "
               "AND usename IN ('app', 'limited') GROUP BY 1")
        try:
            out = subprocess.run(self.a.psql_cmd + ["-Atc", sql], capture_output=True, text=True, timeout=5).stdout
        except subprocess.TimeoutExpired:
            return None
        got = dict(line.split("|") for line in out.split() if "|" in line)
        return int(got.get("app", 0)), int(got.get("limited", 0))

    async def sampler(self):
        last_ok, last_exp, last_unexp = 0, 0, 0
        print("t_s\trss_kib\tfds\tservers_app\tservers_limited\tok\texpected_errors\tunexpected_errors\treloads", flush=True)
        while True:
            await asyncio.sleep(10)
            srv = await asyncio.get_running_loop().run_in_executor(None, self.servers)
            ok, exp, unexp = sum(self.ok.values()), sum(self.expected.values()), sum(self.unexpected.values())
            row = {"t": round(time.monotonic() - self.t0), "rss": rss_kib(self.a.pid), "fds": fds(self.a.pid),
                   "srv_app": srv[0] if srv else None, "srv_limited": srv[1] if srv else None,
                   "ok": ok - last_ok, "expected": exp - last_exp, "unexpected": unexp - last_unexp, "reloads": self.reloads}
            last_ok, last_exp, last_unexp = ok, exp, unexp
            self.samples.append(row)
            print("\t".join("NA" if v is None else str(v) for v in row.values()), flush=True)
            if not self.live():
                return

    async def run(self):
        a = self.a
        tasks = [self.worker("steady", self.steady) for _ in range(a.steady)]
        tasks += [self.worker("batch", self.batch, pause=0.002) for _ in range(a.batch)]
        tasks += [self.worker("limited", lambda c: query(c, b"SELECT 1"), user="limited", pause=0) for _ in range(2)]
        tasks += [self.churn(), self.cancel(), self.killer(), self.reloader(), self.restarter(), self.sampler()]
        await asyncio.gather(*tasks)
        print("# " + json.dumps({"ok": dict(self.ok), "expected": dict(self.expected), "unexpected": dict(self.unexpected),
                                 "reloads": self.reloads}), flush=True)


def close(conn):
    if conn is not None:
        try:
            conn[1].close()
        except Exception:
            pass


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--pid", type=int, required=True)
    p.add_argument("--config", required=True, help="pgsurge's config file, rewritten before each SIGHUP")
    p.add_argument("--duration", type=float, default=1800)
    p.add_argument("--restart-cmd", required=True)
    p.add_argument("--psql", required=True, help="a psql command line reaching Postgres as a superuser")
    p.add_argument("--steady", type=int, default=4)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--accounts", type=int, default=100000)
    p.add_argument("--limited-password", default="limited")
    p.add_argument("--limited-qps", type=int, default=50)
    a = p.parse_args()
    a.psql_cmd = a.psql.split()
    sys.exit(asyncio.run(Soak(a).run()))
