#!/usr/bin/env bash
# bench/slow.sh — the slow lane: one user, pool 10; 8 clients of random point lookups (extended protocol) beside 40
# clients of `SELECT pg_sleep(0.1)`. Reports the lookups' tps and p50/p99 latency alone, and beside the sleeps through
# pgsurge without the lane, PgBouncer, and pgsurge with `--slow-query-threshold 20ms --slow-pool-share 0.3`; and the
# sleeps' tps in each.
#
#   bench/slow.sh
#
# Environment (defaults in brackets): DURATION [8] seconds of the lookups per scenario (the sleeps run 2 s longer,
# starting 1.5 s earlier)   ROUNDS [2] rounds of every scenario, alternated   POOL [10]   FAST_CLIENTS [8]
#   SLOW_CLIENTS [40]   THRESHOLD [20ms]   SHARE [0.3]   SCALE [10]   PGSURGE_BIN [build target/release/pgsurge]
#   RESULTS [bench/RESULTS.md]
# Writes bench/results/slow-<timestamp>.tsv and the slow section of bench/RESULTS.md (medians over the rounds).

# shellcheck source=bench/lib.sh
. "$(dirname "$0")/lib.sh"
bench_command slow.sh "DURATION ROUNDS POOL FAST_CLIENTS SLOW_CLIENTS THRESHOLD SHARE SCALE PGSURGE_BIN" "$@"
DURATION=${DURATION:-8}
ROUNDS=${ROUNDS:-2}
POOL=${POOL:-10}
FAST_CLIENTS=${FAST_CLIENTS:-8}
SLOW_CLIENTS=${SLOW_CLIENTS:-40}
THRESHOLD=${THRESHOLD:-20ms}
SHARE=${SHARE:-0.3}
SCALE=${SCALE:-10}

RESULTS=${RESULTS:-$BENCH_DIR/RESULTS.md}

pgsurge_build
pg_start
pgbench_init "$SCALE"
pg_super -d app -c "VACUUM ANALYZE" >/dev/null || die "vacuum failed"

printf '\\set aid random(1, %d)\nSELECT abalance FROM pgbench_accounts WHERE aid = :aid;\n' $((100000 * SCALE)) >"$WORKDIR/fast.sql"
echo "SELECT pg_sleep(0.1);" >"$WORKDIR/slow.sql"

pgbouncer_start "$POOL" transaction
# Two pgsurge instances side by side (lib.sh's pgsurge_start keeps one in SURGE_*): without and with the lane.
pgsurge_start "$POOL" transaction
PLAIN_URL=$SURGE_URL
mv "$SURGE_LOG" "$WORKDIR/pgsurge-plain.log" # it keeps writing there; the next instance gets pgsurge.log
pgsurge_start "$POOL" transaction --slow-query-threshold "$THRESHOLD" --slow-pool-share "$SHARE"
LANE_URL=$SURGE_URL
LANE_ADMIN=$SURGE_ADMIN

TS=$(date -u +%Y%m%dT%H%M%SZ)
mkdir -p "$BENCH_DIR/results"
RAW=$BENCH_DIR/results/slow-$TS.tsv
{
  echo "# command: $BENCH_CMD"
  machine_facts
  printf 'round\tscenario\tfast_tps\tfast_p50_ms\tfast_p99_ms\tfast_tx\tfast_failed\tslow_tps\tslow_tx\tslow_failed\tlane_checkouts\tlane_wait_s\n'
} >"$RAW"
# an interrupted run that measured nothing leaves no raw file behind
BENCH_ON_EXIT='grep -q "^[0-9].*	[0-9]" "$RAW" 2>/dev/null || rm -f "$RAW"'

# lane_metric NAME: the lane instance's /metrics sample of NAME for pool app/app.
lane_metric() {
  python3 - "$LANE_ADMIN" "$1" <<'PY'
import sys, urllib.request
port, name = sys.argv[1:]
body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
print(next((l.split()[-1] for l in body.splitlines() if l.startswith(name + '{database="app",user="app"}')), "NA"))
PY
}

# run_scenario ROUND NAME FAST_URL [SLOW_URL]: the lookups for DURATION s; the sleeps (if given) from 1.5 s before to
# about 0.5 s after.
run_scenario() {
  local round=$1 name=$2 furl=$3 surl=${4:-} spid="" s_tps=NA s_tx=NA s_failed=NA stats c0=NA w0=NA c1=NA w1=NA
  if [ "$furl" = "$LANE_URL" ]; then c0=$(lane_metric pgsurge_slow_lane_checkouts_total); w0=$(lane_metric pgsurge_slow_lane_wait_seconds_total); fi
  if [ -n "$surl" ]; then
    "$PGBENCH" -n -c "$SLOW_CLIENTS" -j 2 -T $((DURATION + 2)) -f "$WORKDIR/slow.sql" "$surl" >"$WORKDIR/slow-$name-$round.log" 2>&1 &
    spid=$!
    sleep 1.5
  fi
  rm -f "$WORKDIR/fast-$name-$round".*
  (cd "$WORKDIR" && "$PGBENCH" -n -M extended -c "$FAST_CLIENTS" -j 2 -T "$DURATION" -f fast.sql -l --log-prefix="fast-$name-$round" \
    "$furl" >"$WORKDIR/fast-$name-$round.log" 2>&1)
  if [ -n "$spid" ]; then
    wait "$spid"
    s_tps=$(sed -n 's/^tps = \([0-9.]*\).*/\1/p' "$WORKDIR/slow-$name-$round.log" | head -n1)
    s_tx=$(sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' "$WORKDIR/slow-$name-$round.log")
    s_failed=$(sed -n 's/^number of failed transactions: \([0-9]*\).*/\1/p' "$WORKDIR/slow-$name-$round.log")
  fi
  if [ "$furl" = "$LANE_URL" ]; then c1=$(lane_metric pgsurge_slow_lane_checkouts_total); w1=$(lane_metric pgsurge_slow_lane_wait_seconds_total); fi
  stats=$(python3 - "$WORKDIR" "fast-$name-$round" <<'PY'
import glob, sys
lat = []
for f in glob.glob(f"{sys.argv[1]}/{sys.argv[2]}.*"):
    if f.endswith(".log"):
        continue
    for line in open(f):
        p = line.split()
        if len(p) >= 3 and p[2].isdigit():
            lat.append(int(p[2]) / 1000.0)
lat.sort()
q = lambda x: lat[min(len(lat) - 1, int(x * len(lat)))] if lat else float("nan")
print(f"{q(0.50):.3f}\t{q(0.99):.3f}")
PY
)
  local f_tps f_tx f_failed lane_c=NA lane_w=NA
  f_tps=$(sed -n 's/^tps = \([0-9.]*\).*/\1/p' "$WORKDIR/fast-$name-$round.log" | head -n1)
  f_tx=$(sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' "$WORKDIR/fast-$name-$round.log")
  f_failed=$(sed -n 's/^number of failed transactions: \([0-9]*\).*/\1/p' "$WORKDIR/fast-$name-$round.log")
  if [ "$c0" != NA ] && [ "$c1" != NA ]; then
    lane_c=$(python3 -c "print(int($c1 - $c0))")
    lane_w=$(python3 -c "print(f'{$w1 - $w0:.3f}')")
  fi
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$round" "$name" "${f_tps:-NA}" "$stats" "${f_tx:-NA}" "${f_failed:-0}" \
    "${s_tps:-NA}" "${s_tx:-NA}" "${s_failed:-0}" "$lane_c" "$lane_w" >>"$RAW"
  log "round $round $name: lookups tps ${f_tps:-NA} p50/p99 $(echo "$stats" | tr '\t' '/') ms; sleeps tps $s_tps; lane checkouts $lane_c"
}

# Warm both pgsurge instances and PgBouncer (logins, server connections, the lane's estimate of the sleep).
for url in "$PLAIN_URL" "$LANE_URL" "$PGB_URL"; do
  "$PGBENCH" -n -c 4 -j 2 -T 1 -f "$WORKDIR/slow.sql" "$url" >/dev/null 2>&1
  "$PGBENCH" -n -M extended -c 4 -j 2 -T 1 -f "$WORKDIR/fast.sql" "$url" >/dev/null 2>&1
done

for ((r = 1; r <= ROUNDS; r++)); do
  run_scenario "$r" solo "$PLAIN_URL"
  run_scenario "$r" solo-lane "$LANE_URL"
  run_scenario "$r" pgsurge "$PLAIN_URL" "$PLAIN_URL"
  run_scenario "$r" pgbouncer "$PGB_URL" "$PGB_URL"
  run_scenario "$r" pgsurge-lane "$LANE_URL" "$LANE_URL"
done

python3 - "$RAW" "$RESULTS" "$BENCH_DIR" "$DURATION" "$POOL" "$FAST_CLIENTS" "$SLOW_CLIENTS" "$THRESHOLD" "$SHARE" "$ROUNDS" <<'PY'
import statistics, sys
raw, results, bench_dir, dur, pool, fc, sc, threshold, share, rounds = sys.argv[1:]
sys.path.insert(0, bench_dir)
from report import write_section
meta, rows = {}, []
for line in open(raw):
    if line.startswith("# "):
        k, _, v = line[2:].rstrip("\n").partition(": ")
        meta[k] = v
    elif line.strip() and not line.startswith("round"):
        rows.append(line.rstrip("\n").split("\t"))
cols = ["fast_tps", "p50", "p99", "fast_tx", "fast_failed", "slow_tps", "slow_tx", "slow_failed", "lane_checkouts", "lane_wait_s"]
by = {}
for r in rows:
    by.setdefault(r[1], []).append(dict(zip(cols, r[2:])))
def med(name, col):
    vals = [float(x[col]) for x in by.get(name, []) if x.get(col) not in (None, "NA", "nan", "")]
    return statistics.median(vals) if vals else None
def total(name, col):
    return sum(int(x[col]) for x in by.get(name, []) if x.get(col, "NA").isdigit())
what = {
    "solo": f"lookups alone (pgsurge, pool {pool})",
    "solo-lane": f"lookups alone (pgsurge with the lane on)",
    "pgsurge": f"lookups + sleeps through pgsurge, no lane (`--pool-size {pool}`)",
    "pgbouncer": f"lookups + sleeps through PgBouncer (`default_pool_size={pool}`)",
    "pgsurge-lane": f"lookups + sleeps through pgsurge, `--slow-query-threshold {threshold} --slow-pool-share {share}`",
}
f = lambda v, d=0: "—" if v is None else f"{v:,.{d}f}"
solo99 = med("solo", "p99")
plain_slow = med("pgsurge", "slow_tps")
out = ["<!-- slow:begin -->", "## Slow lane: slow statements beside fast ones, one user", "",
       f"Command: `{meta.get('command', '')}`  ",
       f"Date: {meta.get('date', '')}  ",
       f"Machine: {meta.get('nproc', '?')} CPUs ({meta.get('cpu', '')}), {meta.get('memory', '')}, load before {meta.get('load_before', '')}  ",
       f"Versions: {meta.get('postgres', '')}; {meta.get('pgbouncer', '')}; pgsurge {meta.get('pgsurge_commit', '')}  ",
       f"Setup: one user (`app`), {pool} server connections. Lookups: `pgbench -n -M extended -c {fc} -j 2 -T {dur} -l` with a random "
       f"`pgbench_accounts` point lookup (scale 10); sleeps: `pgbench -n -c {sc} -j 2 -T {int(dur) + 2}` with `SELECT pg_sleep(0.1);`, "
       f"starting 1.5 s before the lookups. Percentiles from pgbench's per-transaction log; medians of {rounds} rounds, scenarios "
       f"alternated. Raw: `bench/results/{raw.rsplit('/', 1)[-1]}`", "",
       "| scenario | lookups tps | p50 ms | p99 ms | p99 / alone | sleeps tps | sleeps tps / no lane | failed tx lookups / sleeps | slow-lane checkouts (wait s) |",
       "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
for name in ["solo", "solo-lane", "pgsurge", "pgbouncer", "pgsurge-lane"]:
    if name not in by:
        continue
    p99, stps = med(name, "p99"), med(name, "slow_tps")
    ratio = f"{p99 / solo99:.1f}" if p99 is not None and solo99 else "—"
    sratio = f"{stps / plain_slow:.2f}" if stps is not None and plain_slow else "—"
    lane = "—"
    if med(name, "lane_checkouts") is not None:
        lane = f"{total(name, 'lane_checkouts'):,} ({sum(float(x['lane_wait_s']) for x in by[name] if x['lane_wait_s'] != 'NA'):,.1f})"
    slow_failed = "—" if stps is None else total(name, "slow_failed")
    out.append(f"| {what[name]} | {f(med(name, 'fast_tps'))} | {f(med(name, 'p50'), 3)} | {f(p99, 3)} | {ratio} | {f(stps)} | {sratio} | "
               f"{total(name, 'fast_failed')} / {slow_failed} | {lane} |")
goal = None
lane99, lane_slow = med("pgsurge-lane", "p99"), med("pgsurge-lane", "slow_tps")
if None not in (solo99, lane99, lane_slow, plain_slow):
    limit = max(5 * solo99, 20.0)
    goal = (f"Goal (issue 17): with the lane, the lookups' p99 ≤ max(5 × alone, 20 ms) = {limit:.1f} ms: "
            f"{lane99:.3f} ms, {'holds' if lane99 <= limit else 'MISSED'}; the sleeps keep ≥ 0.25 × their tps without the lane: "
            f"{lane_slow / plain_slow:.2f}, {'holds' if lane_slow >= 0.25 * plain_slow else 'MISSED'}.")
out += ["", "The lane's share of 10 connections at 0.3 is 3: the sleeps' ceiling is 30 tps with it, 100 tps without.",
        "The two rows of lookups alone differ by run-to-run noise on this shared 2-core machine (each round's figures are in the raw file).",
        goal or "", "<!-- slow:end -->", ""]
write_section(results, "\n".join(out), "<!-- slow:begin -->", "<!-- slow:end -->")
PY
log "wrote ${RESULTS#"$MAIN"/} and ${RAW#"$MAIN"/}"
