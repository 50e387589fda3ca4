#!/usr/bin/env bash
# bench/batch.sh — concurrent N+1 point lookups: CLIENTS pgbench clients each running
# `SELECT val FROM items WHERE id = $1` (extended protocol) as fast as answers come back over a 100k-row table,
# POOL server connections; direct Postgres, PgBouncer, pgsurge batch off, pgsurge batch on; then 1 client batch
# off vs on (no latency floor). Rows/s, p50/p99, average batch size, CPU seconds of Postgres / proxy / pgbench.
#
#   bench/batch.sh
#
# Environment (defaults in brackets): DURATION [10] seconds per run   CLIENTS [64]   POOL [8]
#   PGSURGE_BIN [build target/release/pgsurge]   RESULTS [bench/RESULTS.md]
# Writes bench/results/batch-<timestamp>.tsv and the batch section of bench/RESULTS.md.

# shellcheck source=bench/lib.sh
. "$(dirname "$0")/lib.sh"
bench_command batch.sh "DURATION CLIENTS POOL PGSURGE_BIN" "$@"
DURATION=${DURATION:-10}
CLIENTS=${CLIENTS:-64}
POOL=${POOL:-8}

RESULTS=${RESULTS:-$BENCH_DIR/RESULTS.md}

pgsurge_build
pg_start
psql_app() { PGPASSWORD=app "$PGBIN/psql" -X -q -h 127.0.0.1 -p "$PGPORT" -U app app "$@"; }
psql_app -c "CREATE TABLE items(id int PRIMARY KEY, val int NOT NULL)" \
  -c "INSERT INTO items SELECT g, g * 7 FROM generate_series(1, 100000) g" -c "VACUUM ANALYZE items" >/dev/null \
  || die "setup failed"
printf '\\set id random(1, 100000)\nSELECT val FROM items WHERE id = :id;\n' >"$WORKDIR/lookup.sql"
pgbouncer_start "$POOL" transaction

TS=$(date -u +%Y%m%dT%H%M%SZ)
mkdir -p "$BENCH_DIR/results"
RAW=$BENCH_DIR/results/batch-$TS.tsv
{
  echo "# command: $BENCH_CMD"
  machine_facts
  printf 'scenario\tclients\ttps\tp50_ms\tp99_ms\ttx\tfailed\tpg_s\tproxy_s\tpgbench_s\tavg_batch\n'
} >"$RAW"
BENCH_ON_EXIT='grep -q "^[a-z].*	[0-9]" "$RAW" 2>/dev/null || rm -f "$RAW"'

# batch_counts: "batches lookups" summed from pgsurge's /metrics
batch_counts() {
  python3 - "$SURGE_ADMIN" <<'PY'
import sys, urllib.request
t = urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/metrics", timeout=5).read().decode()
s = lambda n: sum(float(l.rsplit(" ", 1)[1]) for l in t.splitlines() if l.startswith(n + "{"))
print(int(s("pgsurge_batch_batches_total")), int(s("pgsurge_batch_lookups_total")))
PY
}

# run NAME TARGET CLIENTS
run() {
  local name=$1 target=$2 clients=$3 url b0 b1 avg=NA stats
  url=$(target_url "$target")
  [ "$target" = pgsurge ] && b0=$(batch_counts)
  "$PGBENCH" -n -M extended -c "$clients" -j 2 -T 2 -f "$WORKDIR/lookup.sql" "$url" >/dev/null 2>&1 # warm-up
  rm -f "$WORKDIR"/lat-"$name".*
  [ "$target" = pgsurge ] && b0=$(batch_counts)
  measure_pgbench "$target" "$WORKDIR/$name.log" -n -M extended -c "$clients" -j $((clients < 2 ? 1 : 2)) -T "$DURATION" \
    -f "$WORKDIR/lookup.sql" -l --log-prefix="$WORKDIR/lat-$name" "$url"
  if [ "$target" = pgsurge ]; then
    b1=$(batch_counts)
    avg=$(python3 -c "b0,l0='$b0'.split(); b1,l1='$b1'.split(); b=int(b1)-int(b0); print(f'{(int(l1)-int(l0))/b:.1f}' if b else 'NA')")
  fi
  stats=$(python3 - "$WORKDIR" "lat-$name" <<'PY'
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
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$clients" "$M_TPS" "$stats" "$M_TX" "$M_FAILED" "$M_PG_S" \
    "$M_PROXY_S" "$M_PGBENCH_S" "$avg" >>"$RAW"
  log "$name: $M_TPS rows/s, p50/p99 $(echo "$stats" | tr '\t' '/') ms, pg ${M_PG_S}s proxy ${M_PROXY_S}s pgbench ${M_PGBENCH_S}s, avg batch $avg"
}

surge() { # batch on|off
  [ -n "${SURGE_PID:-}" ] && kill "$SURGE_PID" 2>/dev/null && wait "$SURGE_PID" 2>/dev/null
  pgsurge_start "$POOL" transaction --batch "$1"
}

run direct direct "$CLIENTS"
run pgbouncer pgbouncer "$CLIENTS"
surge false
run pgsurge-batch-off pgsurge "$CLIENTS"
run pgsurge-batch-off-1 pgsurge 1
surge true
run pgsurge-batch-on pgsurge "$CLIENTS"
run pgsurge-batch-on-1 pgsurge 1

python3 - "$RAW" "$RESULTS" "$BENCH_DIR" "$DURATION" "$POOL" "$CLIENTS" <<'PY'
import sys
raw, results, bench_dir, dur, pool, clients = sys.argv[1:]
sys.path.insert(0, bench_dir)
from report import write_section
meta, rows = {}, {}
for line in open(raw):
    if line.startswith("# "):
        k, _, v = line[2:].rstrip("\n").partition(": ")
        meta[k] = v
    elif line.strip() and not line.startswith("scenario"):
        r = line.rstrip("\n").split("\t")
        rows[r[0]] = r
what = {
    "direct": "direct Postgres", "pgbouncer": f"PgBouncer (pool {pool})", "pgsurge-batch-off": f"pgsurge, batch off (pool {pool})",
    "pgsurge-batch-on": f"pgsurge `--batch` (pool {pool})", "pgsurge-batch-off-1": "pgsurge, batch off, 1 client",
    "pgsurge-batch-on-1": "pgsurge `--batch`, 1 client",
}
num = lambda v: float(v) if v not in ("NA", "", "nan") else None
out = ["<!-- batch:begin -->", "## N+1 batching: concurrent point lookups", "",
       f"Command: `{meta.get('command', '')}`  ",
       f"Date: {meta.get('date', '')}  ",
       f"Machine: {meta.get('nproc', '?')} CPUs ({meta.get('cpu', '')}), {meta.get('memory', '')}, load before {meta.get('load_before', '')}  ",
       f"Versions: {meta.get('postgres', '')}; {meta.get('pgbouncer', '')}; pgsurge {meta.get('pgsurge_commit', '')}  ",
       f"Setup: `pgbench -n -M extended -c {clients} -j 2 -T {dur} -l` of `SELECT val FROM items WHERE id = :id` (random id, "
       f"100k-row table, one row per lookup), after 2 s of warm-up; {pool} server connections for the poolers; SCRAM logins; "
       f"latency percentiles from pgbench's per-transaction log; CPU seconds from /proc over the measured run "
       f"(Postgres: postmaster + all backends). Raw: `bench/results/{raw.rsplit('/', 1)[-1]}`", "",
       "| target | clients | rows/s | p50 ms | p99 ms | avg batch | Postgres CPU s | Postgres CPU µs / lookup | proxy CPU s | pgbench CPU s | failed |",
       "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
for name in ["direct", "pgbouncer", "pgsurge-batch-off", "pgsurge-batch-on", "pgsurge-batch-off-1", "pgsurge-batch-on-1"]:
    r = rows.get(name)
    if not r:
        continue
    _, c, tps, p50, p99, tx, failed, pg, proxy, pgb, avg = r
    per = f"{num(pg) * 1e6 / num(tx):.1f}" if num(pg) and num(tx) else "—"
    out.append(f"| {what[name]} | {c} | {num(tps):,.0f} | {p50} | {p99} | {avg if avg != 'NA' else '—'} | {pg} | {per} | {proxy if proxy != 'NA' else '—'} | {pgb} | {failed} |")
def ratio(a, b, f):
    ra, rb = rows.get(a), rows.get(b)
    try:
        return f(ra, rb)
    except Exception:
        return None
per_lookup = lambda r: num(r[7]) / num(r[5])
pg_ratio = ratio("direct", "pgsurge-batch-on", lambda d, s: per_lookup(d) / per_lookup(s))
tps_ratio = ratio("pgsurge-batch-on", "direct", lambda s, d: num(s[2]) / num(d[2]))
one = ratio("pgsurge-batch-on-1", "pgsurge-batch-off-1", lambda on, off: num(on[2]) / num(off[2]))
out += ["", "Ratios (issue 6 goals):",
        f"- Postgres CPU per lookup, direct / batch on: **{pg_ratio:.2f}x** (goal ≥ 3x)" if pg_ratio else "- Postgres CPU ratio: —",
        f"- rows/s, batch on / direct: **{tps_ratio:.2f}x** (goal ≥ 1.5x, aim 3x)" if tps_ratio else "- rows/s ratio: —",
        f"- 1 client, rows/s batch on / off: **{one:.3f}** (goal within 5%)" if one else "- 1-client ratio: —",
        "<!-- batch:end -->", ""]
write_section(results, "\n".join(out), "<!-- batch:begin -->", "<!-- batch:end -->")
PY
log "wrote ${RESULTS#"$MAIN"/} and ${RAW#"$MAIN"/}"
