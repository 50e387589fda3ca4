#!/usr/bin/env bash
# pgbench -M prepared checks, on tables of its own (never pgbench -i's fixed names, so that
# concurrent runs cannot clash). Usage: pgbench_check.sh URL
# Prints one "PASS pgbench/<check>" or "FAIL pgbench/<check>: <reason>" line per check.
set -u
URL="$1"
T="pgbench_$(od -An -N4 -tx4 /dev/urandom | tr -d ' \n')"
# One pgbench thread per client: pgbench prepares statements with a synchronous PQprepare that blocks its whole
# thread, so with fewer threads than clients, one client waiting for a pooled server connection would stall the
# thread's other clients that hold one inside BEGIN...END: a deadlock of the load generator, not of the pooler.
CLIENTS=20 JOBS=20 TX=200
WANT=$((CLIENTS * TX))
WORK="$(mktemp -d)"
passed=0 failed=0
pass() { passed=$((passed + 1)); echo "PASS pgbench/$1 ($2s)"; }
fail() { failed=$((failed + 1)); echo "FAIL pgbench/$1: $(echo "$2" | tr '\n' ' ' | cut -c1-600)"; }
q() { timeout 30 psql "$URL" -X -q -v ON_ERROR_STOP=1 -Atc "$1"; }
cleanup() { q "DROP TABLE IF EXISTS $T" >/dev/null 2>&1 || fail cleanup "could not drop $T"; rm -rf "$WORK"; }
trap 'q "DROP TABLE IF EXISTS $T" >/dev/null 2>&1; rm -rf "$WORK"' INT TERM

if ! err=$(q "CREATE TABLE $T (id int PRIMARY KEY, v bigint NOT NULL, n int NOT NULL);
              INSERT INTO $T SELECT g, 0, 0 FROM generate_series(1, 1000) g" 2>&1); then
  fail setup "$err"
  rm -rf "$WORK"
  echo "# pgbench: $passed passed, $failed failed"
  exit 1
fi

cat > "$WORK/rw.sql" <<SQL
\set id random(1, 1000)
\set d random(-5, 5)
BEGIN;
UPDATE $T SET v = v + :d, n = n + 1 WHERE id = :id;
SELECT v, n FROM $T WHERE id = :id;
END;
SQL
cat > "$WORK/ro.sql" <<SQL
\set id random(1, 1000)
SELECT id, v, n FROM $T WHERE id = :id;
SELECT count(*) FROM $T WHERE id BETWEEN :id AND :id + 10;
SQL

# run_bench NAME SCRIPT: pgbench -M prepared, 20 clients x 200 transactions, bounded by timeout
run_bench() {
  local name="$1" script="$2" t0 out rc
  t0=$(date +%s%N)
  out=$(timeout 90 pgbench -n -M prepared -c "$CLIENTS" -j "$JOBS" -t "$TX" -f "$script" "$URL" 2>&1)
  rc=$?
  local ms=$((($(date +%s%N) - t0) / 1000000)) secs
  secs=$(printf '%d.%02d' $((ms / 1000)) $((ms % 1000 / 10)))
  echo "$out" > "$WORK/$name.out"
  if [ $rc -ne 0 ]; then fail "$name" "pgbench exited $rc: $(echo "$out" | tail -5)"; return 1; fi
  if ! echo "$out" | grep -q "^number of transactions actually processed: $WANT/$WANT\$"; then
    fail "$name" "not all transactions processed: $(echo "$out" | grep -E 'processed|failed|abort' | head -3)"; return 1
  fi
  if echo "$out" | grep -q "^number of failed transactions:" && ! echo "$out" | grep -q "^number of failed transactions: 0 "; then
    fail "$name" "$(echo "$out" | grep '^number of failed transactions:')"; return 1
  fi
  if ! echo "$out" | grep -q "^query mode: prepared\$"; then fail "$name" "not in prepared query mode"; return 1; fi
  pass "$name" "$secs"
}

if run_bench prepared_rw "$WORK/rw.sql"; then
  # every committed transaction incremented n exactly once
  got=$(q "SELECT sum(n) FROM $T" 2>&1)
  if [ "$got" = "$WANT" ]; then pass prepared_rw_effects 0.00
  else fail prepared_rw_effects "sum(n) = $got, want $WANT"; fi
else
  fail prepared_rw_effects "skipped: the read-write run failed"
fi
run_bench prepared_ro "$WORK/ro.sql"
cleanup

echo "# pgbench: $passed passed, $failed failed"
[ $failed -eq 0 ]
