#!/usr/bin/env bash
# pgsurge driver suite: real client drivers must behave through a Postgres URL exactly as they
# do against Postgres directly. Run it against Postgres itself (the reference) and against pgsurge
# (transaction mode, tiny pool): every check must pass both ways.
#
#   tests/drivers/run.sh [--install] [URL]
#     URL        postgres://user[:pass]@host:port/db  (the role must be able to CREATE SCHEMA in db)
#     --install  install what a fresh Debian 12 machine lacks, then run the checks if a URL is given:
#                Debian libpostgresql-jdbc-java (apt-get), a venv in tests/drivers/.venv with
#                psycopg[binary,pool] 3.x and asyncpg (pip), and tests/drivers/node/node_modules
#                from the committed package-lock.json (npm ci: pg, pg-copy-streams, postgres).
#   env DRIVERS="psycopg asyncpg pg postgresjs jdbc pgbench"  runs only the named drivers (this order)
#   env DRIVER_TIMEOUT=120  seconds allowed to each driver process before it is killed (a failure)
#   env DRIVERS_VERBOSE=1   stack traces of failures on stderr
#   env POOL_SIZE=2         server connections of the pooler under test: sections where a client
#                           holds a transaction open while another of its connections must query
#                           run at most POOL_SIZE-1 at a time (else a deadlock by construction)
#
# Drivers: Python psycopg 3 (sync API, server-side prepared statements, pipeline mode,
# psycopg_pool), Python asyncpg (pool of 20), Node pg (pg.Pool of 20, named statements,
# pipeline mode, pg-copy-streams), Node postgres.js (max 20, reserve(), pipelining), Java pgJDBC
# (prepareThreshold=1, 20 threads with a connection each), and pgbench -M prepared
# (20 clients, 2 threads, 200 transactions each, on tables of its own).
#
# Checks of each client driver (the ones marked * run 20 clients at once, each with its own
# connection or pool checkout and its own values, so that a pooler moves them between server
# connections all the time):
#   types*                  int, bigint (> 2^53), numeric (40 digits), text (quotes, tabs,
#                           unicode), timestamptz (microseconds where the driver keeps them), uuid,
#                           bytea (all 256 byte values), jsonb, int[], text[] and NULL, sent as
#                           parameters and read back, plus server literals; compared exactly
#   prepared_50x*           the same prepared statement 50x, interleaved with another prepared
#                           statement, unprepared statements and transactions (psycopg also:
#                           SQL-level PREPARE/EXECUTE/DEALLOCATE)
#   concurrent_own_answers* SELECT $1::int AS me, pg_backend_pid(): each client gets its own `me`
#   commit_rollback*        committed rows visible to another connection, uncommitted and
#                           rolled-back rows not (own rows per client; savepoints where offered)
#   errors_sqlstate*        22012, 23505, 42P01, 42601, 25P02 in a failed transaction, each
#                           followed by a working query on the same connection
#   search_path*            SET search_path to one of two schemas, then unqualified queries in
#                           later statements and transactions; SET LOCAL; RESET
#   timezone*               SET TimeZone (6 zones) then '2024-01-01 00:00:00+00'::timestamptz::text
#                           in later statements and transactions; SHOW TimeZone
#   startup_params*         (psycopg) application_name and options=-c TimeZone/search_path
#   listen_notify           LISTEN on one connection, NOTIFY and pg_notify() with payloads on
#                           another; both received within 5 s
#   copy                    COPY FROM STDIN of 1000 rows (tabs, newlines, backslashes, NULLs,
#                           bytea), COPY TO STDOUT compared byte for byte / row for row
#   cancel                  SELECT pg_sleep(10) cancelled by the driver's cancel API (also inside a
#                           transaction): SQLSTATE 57014 within 2 s of the cancel, connection usable
#                           after. asyncpg raises TimeoutError rather than 57014 for timeout=/task
#                           cancel, so it checks that the next query runs within 2 s (it could
#                           not if the cancel had missed) and gets 57014 from statement_timeout
#   big_result              SELECT g, md5(g::text) FROM generate_series(1,200000): count, order and
#                           md5 over all rows (also streamed with a cursor/fetch size)
#   pipeline / executemany / batch / pipelining*
#                           psycopg pipeline mode (100 statements) and executemany of 1000 rows;
#                           asyncpg executemany of 1000 rows; JDBC addBatch/executeBatch of 1000
#                           rows; pg pipeline mode and postgres.js pipelining of 100 queries on one
#                           connection; an error inside fails only what it should
# pgbench: prepared_rw (BEGIN/UPDATE/SELECT/END, all 4000 transactions processed, 0 failed),
#   prepared_rw_effects (sum of per-row update counters == 4000), prepared_ro (select-only).
#
# Each check prints "PASS driver/check (secs)" or "FAIL driver/check: reason". A driver process
# that dies or times out counts as a failure. Objects are named <driver>_<random>_..., and dropped
# at the end, so runs can overlap. The last line is "N passed, M failed"; exit status 0 iff M == 0.
set -u
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="$HERE/.venv"
JAR=/usr/share/java/postgresql.jar
DRIVER_TIMEOUT="${DRIVER_TIMEOUT:-120}"

usage() { echo "usage: $0 [--install] [postgres://user:pass@host:port/db]" >&2; exit 2; }

INSTALL=0 URL=""
for a in "$@"; do
  case "$a" in
    --install) INSTALL=1 ;;
    -h|--help) usage ;;
    postgres://*|postgresql://*) URL="$a" ;;
    *) usage ;;
  esac
done

install() {
  set -e
  if [ ! -f "$JAR" ]; then
    echo "== apt-get install libpostgresql-jdbc-java"
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq libpostgresql-jdbc-java >/dev/null
  fi
  echo "== pip: psycopg[binary,pool] 3.x, asyncpg into $VENV"
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check 'psycopg[binary,pool]>=3.2,<4' 'asyncpg>=0.29,<1'
  echo "== npm ci in $HERE/node"
  (cd "$HERE/node" && npm ci --no-audit --no-fund --loglevel=error)
  set +e
}

if [ $INSTALL -eq 1 ]; then
  install || { echo "install failed" >&2; exit 1; }
  [ -z "$URL" ] && exit 0
fi
[ -n "$URL" ] || usage

TOTAL_PASS=0 TOTAL_FAIL=0
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

# run_driver NAME CMD...: runs CMD under timeout, echoes its output, counts PASS/FAIL lines
run_driver() {
  local name="$1"; shift
  local log="$WORK/$name.log" t0 rc p f
  echo "== $name"
  t0=$(date +%s)
  timeout -k 5 "$DRIVER_TIMEOUT" "$@" 2>"$WORK/$name.err" </dev/null | tee "$log"
  rc=${PIPESTATUS[0]}
  p=$(grep -c '^PASS ' "$log")
  f=$(grep -c '^FAIL ' "$log")
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
    echo "FAIL $name/process: killed after ${DRIVER_TIMEOUT}s"; f=$((f + 1))
  elif [ $rc -ne 0 ] && [ "$f" -eq 0 ]; then
    echo "FAIL $name/process: exited $rc without reporting a failure: $(tail -3 "$WORK/$name.err" | tr '\n' ' ' | cut -c1-400)"
    f=$((f + 1))
  elif [ $rc -eq 0 ] && ! grep -q "^# $name: " "$log"; then
    echo "FAIL $name/process: exited 0 without its closing summary line"; f=$((f + 1))
  fi
  if [ -s "$WORK/$name.err" ] && { [ $rc -ne 0 ] || [ -n "${DRIVERS_VERBOSE:-}" ]; }; then
    sed 's/^/  stderr: /' "$WORK/$name.err" | tail -40
  fi
  echo "-- $name: $p passed, $f failed ($(( $(date +%s) - t0 ))s)"
  TOTAL_PASS=$((TOTAL_PASS + p)); TOTAL_FAIL=$((TOTAL_FAIL + f))
}

missing() { # NAME WHAT: a driver whose dependencies are not installed fails
  echo "== $1"; echo "FAIL $1/setup: $2 missing: run $0 --install"; TOTAL_FAIL=$((TOTAL_FAIL + 1))
}

run_java() {
  local cls="$WORK/java"
  mkdir -p "$cls"
  javac -nowarn -encoding UTF-8 -cp "$JAR" -d "$cls" "$HERE/java/JdbcCheck.java" || return 3
  exec java -XX:TieredStopAtLevel=1 -Xss512k -cp "$JAR:$cls" JdbcCheck "$1"
}
export -f run_java
export JAR WORK HERE

for d in ${DRIVERS:-psycopg asyncpg pg postgresjs jdbc pgbench}; do
  case "$d" in
    psycopg|asyncpg)
      if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c 'import psycopg, psycopg_pool, asyncpg' 2>/dev/null; then
        run_driver "$d" "$VENV/bin/python" -u "$HERE/python/${d}_check.py" "$URL"
      else missing "$d" "Python venv $VENV with psycopg/asyncpg"; fi ;;
    pg|postgresjs)
      if [ -d "$HERE/node/node_modules/pg" ] && [ -d "$HERE/node/node_modules/postgres" ]; then
        run_driver "$d" node --no-deprecation "$HERE/node/${d}_check.js" "$URL"
      else missing "$d" "$HERE/node/node_modules"; fi ;;
    jdbc)
      if [ -f "$JAR" ] && command -v javac >/dev/null; then
        run_driver jdbc bash -c 'run_java "$1"' _ "$URL"
      else missing jdbc "$JAR (libpostgresql-jdbc-java) or javac"; fi ;;
    pgbench)
      if command -v pgbench >/dev/null && command -v psql >/dev/null; then
        run_driver pgbench bash "$HERE/pgbench/pgbench_check.sh" "$URL"
      else missing pgbench "pgbench/psql"; fi ;;
    *) echo "unknown driver $d" >&2; exit 2 ;;
  esac
done

echo "$TOTAL_PASS passed, $TOTAL_FAIL failed"
[ "$TOTAL_FAIL" -eq 0 ]
