#!/usr/bin/env python3
"""Idle clients for bench/idle.sh: opens N logged-in connections to a proxy and measures the proxy's RSS and open
files while they sit idle, after each ran one query, and after they all left.

A raw protocol-3 client on asyncio (no driver: 10,000 driver connections would cost more here than in the proxy).
SCRAM-SHA-256 with the salted password computed once per salt (the PBKDF2 is the client's cost, not the proxy's),
md5 and trust. Loopback only; every phase is bounded in time and the connection count is the one given.

Prints one JSON object: rss_kib / fds at each phase, connect seconds, failures.
"""
import argparse
import asyncio
import base64
import hashlib
import hmac
import json
import os
import resource
import struct
import sys
import time

SALTED = {}


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def fds(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def msg(tag, body):
    return tag + struct.pack("!i", len(body) + 4) + body


async def read_msg(r):
    head = await r.readexactly(5)
    n = struct.unpack("!i", head[1:5])[0]
    return head[:1], await r.readexactly(n - 4)


async def scram(r, w, password, body):
    nonce = base64.b64encode(os.urandom(18)).decode()
    first_bare = f"n=,r={nonce}"
    first = ("n,," + first_bare).encode()
    w.write(msg(b"p", b"SCRAM-SHA-256\0" + struct.pack("!i", len(first)) + first))
    tag, body = await read_msg(r)
    assert tag == b"R" and struct.unpack("!i", body[:4])[0] == 11, (tag, body[:8])
    server_first = body[4:].decode()
    attrs = dict(kv.split("=", 1) for kv in server_first.split(","))
    salt, iters = base64.b64decode(attrs["s"]), int(attrs["i"])
    key = (salt, iters)
    if key not in SALTED:
        SALTED[key] = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iters)
    salted = SALTED[key]
    final_bare = f"c=biws,r={attrs['r']}"
    auth = f"{first_bare},{server_first},{final_bare}".encode()
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    stored = hashlib.sha256(client_key).digest()
    sig = hmac.new(stored, auth, hashlib.sha256).digest()
    proof = base64.b64encode(bytes(a ^ b for a, b in zip(client_key, sig))).decode()
    w.write(msg(b"p", f"{final_bare},p={proof}".encode()))


class PgError(Exception):
    """An ErrorResponse: its SQLSTATE and message."""

    def __init__(self, body):
        fields = {f[:1]: f[1:].decode(errors="replace") for f in body.split(b"\0") if f}
        self.code = fields.get(b"C", "?????")
        super().__init__(f"{self.code} {fields.get(b'M', '')}")


async def login(host, port, user, password, db, key=None):
    """A logged-in connection (reader, writer); `key`, a dict, gets the BackendKeyData as pid and secret."""
    r, w = await asyncio.open_connection(host, port)
    params = b"user\0" + user.encode() + b"\0database\0" + db.encode() + b"\0\0"
    w.write(struct.pack("!ii", len(params) + 8, 196608) + params)
    while True:
        tag, body = await read_msg(r)
        if tag == b"R":
            code = struct.unpack("!i", body[:4])[0]
            if code == 10:
                await scram(r, w, password, body)
            elif code == 5:
                inner = hashlib.md5((password + user).encode()).hexdigest().encode()
                outer = b"md5" + hashlib.md5(inner + body[4:8]).hexdigest().encode()
                w.write(msg(b"p", outer + b"\0"))
            elif code not in (0, 12):
                raise RuntimeError(f"auth request {code}")
        elif tag == b"E":
            w.close()
            raise PgError(body)
        elif tag == b"K" and key is not None:
            key["pid"], key["secret"] = body[:4], body[4:8]
        elif tag == b"Z":
            return r, w


async def query(conn, sql=b"SELECT 1", out=None):
    """Sends bytes `out` (default: a simple Query of `sql`) and reads to ReadyForQuery; the first error raised."""
    r, w = conn
    w.write(out if out is not None else msg(b"Q", sql + b"\0"))
    err = None
    while True:
        tag, body = await read_msg(r)
        if tag == b"E" and err is None:
            err = PgError(body)
        if tag == b"Z":
            if err is not None:
                raise err
            return


async def gather_bounded(coros, limit):
    sem = asyncio.Semaphore(limit)

    async def one(c):
        async with sem:
            try:
                return await c
            except Exception as e:  # counted, not fatal: the figure says how many failed
                return e

    return await asyncio.gather(*(one(c) for c in coros))


async def settle(pid, seconds):
    await asyncio.sleep(seconds)
    return rss_kib(pid), fds(pid)


async def main(a):
    out = {"clients": a.clients}
    # Warm-up: the pool's first server login, the allocator's first arenas.
    for _ in range(3):
        warm = await gather_bounded([login(a.host, a.port, a.user, a.password, a.db) for _ in range(20)], 20)
        await gather_bounded([query(c) for c in warm if not isinstance(c, Exception)], 20)
        for c in warm:
            if not isinstance(c, Exception):
                c[1].close()
    out["rss_before"], out["fds_before"] = await settle(a.pid, a.settle)

    t0 = time.monotonic()
    conns = await gather_bounded([login(a.host, a.port, a.user, a.password, a.db) for _ in range(a.clients)], a.concurrency)
    out["connect_s"] = round(time.monotonic() - t0, 2)
    errors = [c for c in conns if isinstance(c, Exception)]
    conns = [c for c in conns if not isinstance(c, Exception)]
    out["connected"], out["connect_errors"] = len(conns), len(errors)
    if errors:
        out["first_error"] = repr(errors[0])[:200]
    out["rss_idle"], out["fds_idle"] = await settle(a.pid, a.settle)

    results = await gather_bounded([query(c) for c in conns], a.concurrency)
    out["query_errors"] = sum(isinstance(x, Exception) for x in results)
    out["rss_after_query"], out["fds_after_query"] = await settle(a.pid, a.settle)

    for r, w in conns:
        try:
            w.write(msg(b"X", b""))
            w.close()
        except Exception:
            pass
    await asyncio.gather(*(w.wait_closed() for _, w in conns), return_exceptions=True)
    deadline = time.monotonic() + 30
    while fds(a.pid) > out["fds_before"] + 5 and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    out["rss_after_close"], out["fds_after_close"] = await settle(a.pid, a.settle)
    n = max(out["connected"], 1)
    out["kib_per_idle_client"] = round((out["rss_idle"] - out["rss_before"]) / n, 3)
    out["kib_per_client_after_query"] = round((out["rss_after_query"] - out["rss_before"]) / n, 3)
    out["after_close_vs_before"] = round(out["rss_after_close"] / max(out["rss_before"], 1), 3)
    return out


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--pid", type=int, required=True, help="the proxy's pid, for /proc/PID/status and /proc/PID/fd")
    p.add_argument("--clients", type=int, default=10000)
    p.add_argument("--concurrency", type=int, default=200, help="logins in flight at once")
    p.add_argument("--settle", type=float, default=3.0, help="seconds to wait before each measurement")
    p.add_argument("--user", default="app")
    p.add_argument("--password", default="app")
    p.add_argument("--db", default="app")
    p.add_argument("--timeout", type=float, default=300.0)
    a = p.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hard < a.clients + 100:
        sys.exit(f"open-files hard limit {hard} is below {a.clients + 100}")
    print(json.dumps(asyncio.run(asyncio.wait_for(main(a), a.timeout))))
