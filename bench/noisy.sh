#!/usr/bin/env bash
# bench/noisy.sh — noisy neighbour: user A floods with 128 clients of `SELECT pg_sleep(0.05)`, user B runs 8
# clients of point lookups; 10 server connections. Reports B's tps and p50/p99 latency alone, and beside A through
# PgBouncer, pgsurge without limits, pgsurge with a shared FIFO cap, and pgsurge with limits and fairness on.
#
#   bench/noisy.sh
#
# Environment (defaults in brackets): DURATION [10] seconds of B per scenario (A runs 2 s longer, starting 1 s
# earlier)   POOL [10]   A_CLIENTS [128]   B_CLIENTS [8]   A_QPS [150] user A's qps limit in the last scenario
#   SCALE [10]   PGSURGE_BIN [build target/release/pgsurge]   RESULTS [bench/RESULTS.md]
# Writes bench/results/noisy-<timestamp>.tsv and the noisy section of bench/RESULTS.md.

# shellcheck source=bench/lib.sh
. "$(dirname "$0")/lib.sh"
bench_command noisy.sh "DURATION POOL A_CLIENTS B_CLIENTS A_QPS SCALE PGSURGE_BIN" "$@"
DURATION=${DURATION:-10}
POOL=${POOL:-10}
A_CLIENTS=${A_CLIENTS:-128}
B_CLIENTS=${B_CLIENTS:-8}
A_QPS=${A_QPS:-150}
SCALE=${SCALE:-10}

RESULTS=${RESULTS:-$BENCH_DIR/RESULTS.md}

pgsurge_build
pg_start
pgbench_init "$SCALE"
pg_super -d app -c "CREATE ROLE b LOGIN PASSWORD 'b'" -c "GRANT SELECT ON ALL TABLES IN SCHEMA public TO b" \
  -c "GRANT ALL ON DATABASE app TO b" -c "VACUUM ANALYZE" >/dev/null || die "cannot create role b"

echo "SELECT pg_sleep(0.05);" >"$WORKDIR/a.sql"
printf '\\set aid random(1, %d)\nSELECT abalance FROM pgbench_accounts WHERE aid = :aid;\n' $((100000 * SCALE)) >"$WORKDIR/b.sql"
printf '"app" "app"\n"b" "b"\n' >"$WORKDIR/users.txt"
printf '[limits.users.app]\nqps = %d\nburst = %d\n' "$A_QPS" "$A_QPS" >"$WORKDIR/limits.toml"

# PgBouncer: the database's POOL server connections shared by both users, as max_db_connections does.
pgbouncer_start "$POOL" transaction
PGB_DIR=$(dirname "$PGB_LOG")
printf '"b" "%s"\n' "$(pg_super -d postgres -Atc "SELECT rolpassword FROM pg_authid WHERE rolname='b'")" >>"$PGB_DIR/userlist.txt"
sed -i "s/^default_pool_size = .*/&\nmax_db_connections = $POOL/" "$PGB_DIR/pgbouncer.ini"
kill -HUP "$PGB_PID"
for ((i = 0; i < 50; i++)); do
  PGPASSWORD=b "$PGBIN/psql" -X -Atc "SELECT 1" -h 127.0.0.1 -p "$PGB_PORT" -U b app >/dev/null 2>&1 && break
  sleep 0.1
done
[ "$i" -lt 50 ] || die "user b cannot log in through PgBouncer after reload"

TS=$(date -u +%Y%m%dT%H%M%SZ)
mkdir -p "$BENCH_DIR/results"
RAW=$BENCH_DIR/results/noisy-$TS.tsv
{
  echo "# command: $BENCH_CMD"
  machine_facts
  printf 'scenario\tb_tps\tb_p50_ms\tb_p99_ms\tb_tx\tb_failed\ta_tps\ta_tx\ta_failed\ta_aborted_clients\n'
} >"$RAW"
# an interrupted run that measured nothing leaves no raw file behind
BENCH_ON_EXIT='grep -q "^[a-z].*	[0-9]" "$RAW" 2>/dev/null || rm -f "$RAW"'

# run_scenario NAME B_URL [A_URL]: B for DURATION s, A (if given) from 1 s before to 1 s after.
run_scenario() {
  local name=$1 burl=$2 aurl=${3:-} apid="" a_tps=NA a_tx=NA a_failed=NA a_aborted=NA stats
  if [ -n "$aurl" ]; then
    "$PGBENCH" -n -c "$A_CLIENTS" -j 2 -T $((DURATION + 2)) -f "$WORKDIR/a.sql" "$aurl" >"$WORKDIR/a-$name.log" 2>&1 &
    apid=$!
    sleep 1
  fi
  (cd "$WORKDIR" && "$PGBENCH" -n -c "$B_CLIENTS" -j 2 -T "$DURATION" -f b.sql -l --log-prefix="b-$name" "$burl" \
    >"$WORKDIR/b-$name.log" 2>&1)
  if [ -n "$apid" ]; then
    wait "$apid"
    a_tps=$(sed -n 's/^tps = \([0-9.]*\).*/\1/p' "$WORKDIR/a-$name.log" | head -n1)
    a_tx=$(sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' "$WORKDIR/a-$name.log")
    a_failed=$(sed -n 's/^number of failed transactions: \([0-9]*\).*/\1/p' "$WORKDIR/a-$name.log")
    # pgbench ends a client at its first error (e.g. 53400 from a rate limit)
    a_aborted=$(grep -c "aborted in command" "$WORKDIR/a-$name.log")
  fi
  stats=$(python3 - "$WORKDIR" "b-$name" <<'PY'
import glob, sys
lat = []
for f in glob.glob(f"{sys.argv[1]}/{sys.argv[2]}.*"):
    for line in open(f):
        p = line.split()
        if len(p) >= 3 and p[2].isdigit():
            lat.append(int(p[2]) / 1000.0)
lat.sort()
q = lambda x: lat[min(len(lat) - 1, int(x * len(lat)))] if lat else float("nan")
print(f"{q(0.50):.3f}\t{q(0.99):.3f}")
PY
)
  local b_tps b_tx b_failed
  b_tps=$(sed -n 's/^tps = \([0-9.]*\).*/\1/p' "$WORKDIR/b-$name.log" | head -n1)
  b_tx=$(sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' "$WORKDIR/b-$name.log")
  b_failed=$(sed -n 's/^number of failed transactions: \([0-9]*\).*/\1/p' "$WORKDIR/b-$name.log")
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "${b_tps:-NA}" "$stats" "${b_tx:-NA}" "${b_failed:-0}" \
    "${a_tps:-NA}" "${a_tx:-NA}" "${a_failed:-0}" "$a_aborted" >>"$RAW"
  log "$name: B tps ${b_tps:-NA} p50/p99 $(echo "$stats" | tr '\t' '/') ms; A tps $a_tps"
}

surge() { # name, extra pgsurge flags...: restart pgsurge with these flags
  shift
  [ -n "${SURGE_PID:-}" ] && kill "$SURGE_PID" 2>/dev/null && wait "$SURGE_PID" 2>/dev/null
  pgsurge_start "$POOL" transaction --auth-file "$WORKDIR/users.txt" "$@"
  SURGE_B="postgres://b:b@127.0.0.1:$SURGE_PORT/app"
}

surge plain
run_scenario solo "$SURGE_B"
run_scenario pgbouncer "postgres://b:b@127.0.0.1:$PGB_PORT/app" "$PGB_URL"
run_scenario pgsurge-nolimits "$SURGE_B" "$SURGE_URL"
surge fifo --max-db-connections "$POOL" --fairness address
run_scenario pgsurge-shared-fifo "$SURGE_B" "$SURGE_URL"
surge fair --max-db-connections "$POOL" --fairness user
run_scenario pgsurge-fair-only "$SURGE_B" "$SURGE_URL"
surge fair-limited --max-db-connections "$POOL" --fairness user --config "$WORKDIR/limits.toml"
run_scenario pgsurge-fair "$SURGE_B" "$SURGE_URL"

python3 - "$RAW" "$RESULTS" "$BENCH_DIR" "$DURATION" "$POOL" "$A_CLIENTS" "$B_CLIENTS" "$A_QPS" <<'PY'
import sys
raw, results, bench_dir, dur, pool, ac, bc, aqps = sys.argv[1:]
sys.path.insert(0, bench_dir)
from report import write_section
meta, rows = {}, []
for line in open(raw):
    if line.startswith("# "):
        k, _, v = line[2:].rstrip("\n").partition(": ")
        meta[k] = v
    elif line.strip() and not line.startswith("scenario"):
        rows.append(line.rstrip("\n").split("\t"))
what = {
    "solo": "B alone (pgsurge, pool 10)",
    "pgbouncer": f"A + B through PgBouncer (`default_pool_size={pool}`, `max_db_connections={pool}`)",
    "pgsurge-nolimits": f"A + B through pgsurge, no limits (`--pool-size {pool}`: a pool per user)",
    "pgsurge-shared-fifo": f"A + B through pgsurge, `--max-db-connections {pool}` served FIFO (`--fairness address`, one address)",
    "pgsurge-fair-only": f"A + B through pgsurge, fairness on (`--max-db-connections {pool} --fairness user`, no rate limit)",
    "pgsurge-fair": f"A + B through pgsurge, limits and fairness on (`--max-db-connections {pool} --fairness user`, A limited to {aqps} qps)",
}
solo = next((float(r[3]) for r in rows if r[0] == "solo"), None)
out = ["<!-- noisy:begin -->", "## Noisy neighbour: a flooding user beside a point-lookup user", "",
       f"Command: `{meta.get('command', '')}`  ",
       f"Date: {meta.get('date', '')}  ",
       f"Machine: {meta.get('nproc', '?')} CPUs ({meta.get('cpu', '')}), {meta.get('memory', '')}, load before {meta.get('load_before', '')}  ",
       f"Versions: {meta.get('postgres', '')}; {meta.get('pgbouncer', '')}; pgsurge {meta.get('pgsurge_commit', '')}  ",
       f"Setup: user A (`app`) runs `pgbench -n -c {ac} -j 2 -T {int(dur) + 2} -f a.sql` with `SELECT pg_sleep(0.05);`; "
       f"user B (`b`) runs `pgbench -n -c {bc} -j 2 -T {dur} -l -f b.sql` with a random `pgbench_accounts` point lookup "
       f"(scale 10), starting 1 s after A; {pool} server connections; SCRAM logins; B's latency percentiles from "
       f"pgbench's per-transaction log. Raw: `bench/results/{raw.rsplit('/', 1)[-1]}`", "",
       "| scenario | B tps | B p50 ms | B p99 ms | B p99 / solo | A tps | failed tx B / A | A clients aborted (of 128) |",
       "|---|---:|---:|---:|---:|---:|---:|---:|"]
for r in rows:
    name, btps, p50, p99, btx, bfail, atps, atx, afail, aab = (r + ["NA"] * 10)[:10]
    ratio = f"{float(p99) / solo:.2f}" if solo and p99 not in ("NA", "nan") else "—"
    f = lambda v: f"{float(v):,.0f}" if v not in ("NA", "") else "—"
    out.append(f"| {what.get(name, name)} | {f(btps)} | {p50} | {p99} | {ratio} | {f(atps)} | {bfail} / {afail if atps != 'NA' else '—'} | {aab if aab != 'NA' else '—'} |")
out += ["", "A client of A that is refused (53400, over its qps) is aborted by pgbench; the others go on.",
        "Goal (issue 7): with pgsurge's protection B's p99 stays within 2x its solo value.", "<!-- noisy:end -->", ""]
write_section(results, "\n".join(out), "<!-- noisy:begin -->", "<!-- noisy:end -->")
PY
log "wrote ${RESULTS#"$MAIN"/} and ${RAW#"$MAIN"/}"
