"""Shared helpers for the Python driver checks: reporting, deadlines, test data.

Every check prints exactly one line: "PASS <driver>/<check> (<secs>s)" or
"FAIL <driver>/<check>: <reason>"; tests/drivers/run.sh counts those lines.
"""
import datetime
import decimal
import hashlib
import os
import secrets
import sys
import threading
import time
import traceback
import uuid

CLIENTS = 20          # concurrent clients/connections for the concurrency checks
CHECK_DEADLINE = 40   # seconds per check; run.sh also wraps the process in `timeout 120`

# SET TimeZone -> expected '2024-01-01 00:00:00+00'::timestamptz::text
TZ_EXPECT = [
    ("UTC", "2024-01-01 00:00:00+00"),
    ("Asia/Kolkata", "2024-01-01 05:30:00+05:30"),
    ("America/New_York", "2023-12-31 19:00:00-05"),
    ("Pacific/Chatham", "2024-01-01 13:45:00+13:45"),
    ("Europe/Berlin", "2024-01-01 01:00:00+01"),
    ("Asia/Tokyo", "2024-01-01 09:00:00+09"),
]

BIG_N = 200000

# Server connections of the pooler under test (transaction mode). A client that holds a
# transaction open keeps one server connection; if it then needs a second connection of its own
# (an observer checking what other sessions see), 20 such clients at once hold every server and
# all observers wait forever: a deadlock by construction under any transaction pooler. Those
# sections run with at most POOL_SIZE - 1 holders at once (one against Postgres directly too),
# so a server is always left for observers; the rest of each check stays concurrent.
POOL_SIZE = int(os.environ.get("POOL_SIZE", "2"))
HOLDERS = max(1, POOL_SIZE - 1)
_hold = threading.BoundedSemaphore(HOLDERS)


class hold_slot:
    """with hold_slot(): a section that holds a transaction open while another connection of the
    same client needs a server. Roll the transaction back inside the section on failure."""

    def __enter__(self):
        if not _hold.acquire(timeout=CHECK_DEADLINE):
            raise CheckFailed(f"no transaction-holder slot within {CHECK_DEADLINE}s")
        return self

    def __exit__(self, *exc):
        _hold.release()
        return False


def run_prefix(driver):
    """Unique, lower-case object-name prefix for this run of this driver."""
    return f"{driver}_{secrets.token_hex(4)}"


def copy_text(i):
    """Row text for COPY checks: tabs, newlines, backslashes, quotes, unicode."""
    return f"row {i}\tcol\\x \"q\" 'a' é€ line\nnext {i * 7}"


def type_values(i):
    """Parameter values for the type round-trip of client i (all distinct per client)."""
    return {
        "int": -2147483000 + i,
        "bigint": 9007199254740993 + i * 1000003,  # above 2**53: catches float decoding
        "numeric": decimal.Decimal(f"-12345678901234567890.{i:02d}00000000000000000001"),
        "text": f"client {i}: héllo 'wörld' \"q\" \\ \t tab € 😀",
        "timestamptz": datetime.datetime(2024, 2, 29, 12, 34, 56, 123456 + i, tzinfo=datetime.timezone.utc),
        "uuid": uuid.UUID(int=(0x1234_5678_9ABC_4DEF_8123_456789ABCDEF << 0) + i),
        "bytea": bytes(range(256)) + bytes([i]) + b"\x00\\",
        "jsonb": {"client": i, "nested": {"a": [1, 2.5, None, True, "x"]}, "s": "é\"\n"},
        "int_array": [1, -2, None, 2147483647, i],
        "text_array": ["a", "b,c", "{brace}", '"quote"', None, "NULL", "", f"c{i}"],
    }


def big_expected_digest():
    h = hashlib.md5()
    for g in range(1, BIG_N + 1):
        h.update(hashlib.md5(str(g).encode()).hexdigest().encode())
    return h.hexdigest()


class CheckFailed(Exception):
    pass


def expect(cond, msg):
    if not cond:
        raise CheckFailed(msg)


def expect_eq(got, want, what):
    if got != want:
        raise CheckFailed(f"{what}: got {got!r}, want {want!r}")


class Reporter:
    def __init__(self, driver):
        self.driver = driver
        self.passed = 0
        self.failed = 0
        self.lock = threading.Lock()

    def _emit(self, line):
        with self.lock:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()

    def ok(self, name, secs):
        self.passed += 1
        self._emit(f"PASS {self.driver}/{name} ({secs:.2f}s)")

    def fail(self, name, reason):
        self.failed += 1
        reason = " ".join(str(reason).split())[:600]
        self._emit(f"FAIL {self.driver}/{name}: {reason}")

    def run(self, name, fn, deadline=CHECK_DEADLINE):
        """Run fn() in a daemon thread; a check that outlives its deadline fails."""
        result = {}

        def body():
            try:
                fn()
                result["ok"] = True
            except BaseException as e:  # noqa: BLE001 - report everything
                result["err"] = f"{type(e).__name__}: {e}"
                if os.environ.get("DRIVERS_VERBOSE"):
                    traceback.print_exc()

        t0 = time.monotonic()
        th = threading.Thread(target=body, daemon=True, name=f"check-{name}")
        th.start()
        th.join(deadline)
        secs = time.monotonic() - t0
        if th.is_alive():
            self.fail(name, f"deadline of {deadline}s exceeded")
        elif result.get("ok"):
            self.ok(name, secs)
        else:
            self.fail(name, result.get("err", "unknown error"))

    def finish(self):
        self._emit(f"# {self.driver}: {self.passed} passed, {self.failed} failed")
        sys.stdout.flush()
        sys.stderr.flush()
        # daemon threads of timed-out checks may still block: leave hard
        os._exit(1 if self.failed else 0)


def run_threads(n, fn, deadline=CHECK_DEADLINE - 5):
    """Run fn(i) for i in range(n) concurrently; re-raise the first failure."""
    errors = []
    start = threading.Barrier(n)

    def body(i):
        try:
            start.wait(10)
            fn(i)
        except BaseException as e:  # noqa: BLE001
            errors.append(f"client {i}: {type(e).__name__}: {e}")

    ths = [threading.Thread(target=body, args=(i,), daemon=True) for i in range(n)]
    for t in ths:
        t.start()
    end = time.monotonic() + deadline
    for t in ths:
        t.join(max(0.0, end - time.monotonic()))
    alive = sum(t.is_alive() for t in ths)
    if alive:
        raise CheckFailed(f"{alive} of {n} clients still running after {deadline}s; errors so far: {errors[:3]}")
    if errors:
        raise CheckFailed(f"{len(errors)} of {n} clients failed, first: {errors[0]}")
