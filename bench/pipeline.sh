#!/usr/bin/env bash
# bench/pipeline.sh — the request pipeline's goals (the issue-9 acceptance checks 9-cache, 9-batch and 9-pooler),
# measured with their workloads on this machine, targets alternated within each round, with the CPU that pgbench,
# Postgres and the proxy each spend per request, so a goal that is missed says where the time went:
#   cache   read-only Zipf point reads (`pgbench -i -s 1`; `random_zipfian(1, 100000, 1.3)`; 64 clients, -M extended),
#           pool 10: direct / PgBouncer / pgsurge cache off / pgsurge `--cache --cache-ttl 10s` (hit ratio from the
#           console's SHOW CACHE). Goals: >= 3.5x direct tps, Postgres CPU/request >= 20x lower than direct,
#           pgsurge CPU/request <= 0.3x cache off; plus the ceiling: NPROC cores / (pgbench + Postgres CPU per
#           request with the cache on), the tps if pgsurge cost nothing, as a multiple of direct
#   batch   uniform point lookups over 1,000,000 rows (scale 10; 64 clients, -M extended), pool 8: direct / PgBouncer /
#           pgsurge batch off / pgsurge `--batch` (average batch from SHOW BATCHES), then 1 client batch off vs on.
#           Goals: >= 2x direct rows/s, Postgres CPU/lookup >= 4x lower, 1 client >= 0.95 of batch off
#   pooler  `pgbench -S` (simple protocol, scale 10), pool 20, 16 and 64 clients: PgBouncer / pgsurge (/ direct for
#           context). Goals at both client counts: pgsurge CPU/tx <= 0.85x PgBouncer's, tps >= 1.05x
#
#   bench/pipeline.sh            full run (3 rounds x 10 s per target and cell; ~10 min)
#   bench/pipeline.sh --quick    smoke run (1 round x 3 s; ~1.5 min)
#   PGSURGE_BIN=/path/to/pgsurge bench/pipeline.sh   use that binary instead of `cargo build --release`
#
# Environment (defaults in brackets; --quick changes the ones marked *):
#   ROUNDS [3 *1]   DURATION [10 *3] seconds per run   ONE_DURATION [5 *3] seconds per 1-client batch run
#   WARMUP [2 *1] seconds of unmeasured load per target before a workload's first round   JOBS [2] pgbench -j
#   WORKLOADS ["cache batch pooler"]   PGSS [1] load pg_stat_statements (track = all), as the acceptance checks' Postgres
#   PGSURGE_BIN [build target/release/pgsurge]   RESULTS [bench/RESULTS.md]   BENCH_KEEP_WORKDIR [unset] keep logs
# Writes bench/results/pipeline-<timestamp>.tsv (one line per run) and the pipeline section of bench/RESULTS.md.
# Each workload gets its own PgBouncer and pgsurge instances (its pool size), stopped by PID before the next one.

# shellcheck source=bench/lib.sh
. "$(dirname "$0")/lib.sh"
bench_command pipeline.sh "ROUNDS DURATION ONE_DURATION WARMUP JOBS WORKLOADS PGSS PGSURGE_BIN" "$@"

QUICK=0
for a in "$@"; do
  case $a in
    --quick) QUICK=1 ;;
    -h | --help) awk 'NR > 1 && !/^#/ { exit } NR > 1' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown argument: $a (try --help)" >&2; exit 2 ;;
  esac
done
if [ "$QUICK" = 1 ]; then
  ROUNDS=${ROUNDS:-1}; DURATION=${DURATION:-3}; ONE_DURATION=${ONE_DURATION:-3}; WARMUP=${WARMUP:-1}
fi
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10}
ONE_DURATION=${ONE_DURATION:-5}
WARMUP=${WARMUP:-2}
JOBS=${JOBS:-2}
WORKLOADS=${WORKLOADS:-cache batch pooler}
PGSS=${PGSS:-1}
RESULTS=${RESULTS:-$BENCH_DIR/RESULTS.md}
for w in $WORKLOADS; do
  case $w in cache | batch | pooler) ;; *) die "unknown workload '$w' in WORKLOADS" ;; esac
done
has_workload() { [[ " $WORKLOADS " == *" $1 "* ]]; }

# ---------------------------------------------------------------- setup

pgsurge_build
if [ "$PGSS" = 1 ]; then
  pg_start "shared_preload_libraries = 'pg_stat_statements'" "pg_stat_statements.track = all"
  pg_super -d app -c "CREATE EXTENSION pg_stat_statements" >/dev/null || die "cannot create pg_stat_statements"
else
  pg_start
fi
export PGCONNECT_TIMEOUT=10 # libpq (pgbench, psql): a target that accepts no connection fails the run, not hangs it

# Every pgbench here, measured or warm-up, runs under `timeout`: a proxy that stops answering ends the run (as a
# failure) instead of hanging the benchmark. /usr/bin/time in measure_pgbench still counts pgbench's CPU (timeout
# reaps it).
longest=$DURATION
for s in "$ONE_DURATION" "$WARMUP"; do [ "$s" -gt "$longest" ] && longest=$s; done
BOUNDED=$WORKDIR/pgbench-bounded
printf '#!/bin/sh\nexec timeout -k 5 %s %q "$@"\n' "$((longest + 60))" "$PGBENCH" >"$BOUNDED"
chmod 755 "$BOUNDED"

cat >"$WORKDIR/cache.sql" <<'SQL'
\set aid random_zipfian(1, 100000, 1.3)
SELECT abalance FROM pgbench_accounts WHERE aid = :aid;
SQL
cat >"$WORKDIR/batch.sql" <<'SQL'
\set aid random(1, 1000000)
SELECT abalance FROM pgbench_accounts WHERE aid = :aid;
SQL

# ---------------------------------------------------------------- proxy instances

# Several pgsurge instances run at once (cache off and on, batch off and on); lib.sh's SURGE_* variables describe
# the last one started, so each instance's are saved under its target name and put back by use_target.
declare -A SURGE_PIDS SURGE_URLS SURGE_PORTS SURGE_LOGS CONSOLE_SHOW CONSOLE_COLS

# surge_up NAME POOL [pgsurge args...]
surge_up() {
  local name=$1 pool=$2
  shift 2
  pgsurge_start "$pool" transaction "$@"
  mv "$SURGE_LOG" "$WORKDIR/pgsurge-$name.log" # pgsurge keeps writing to the moved file
  SURGE_PIDS[$name]=$SURGE_PID SURGE_URLS[$name]=$SURGE_URL SURGE_PORTS[$name]=$SURGE_PORT
  SURGE_LOGS[$name]=$WORKDIR/pgsurge-$name.log
  log "  ($name: pgsurge ${*:-with no extra flags})"
}

# use_target NAME: sets LT, lib.sh's name for it (direct, pgbouncer, pgsurge), and for a pgsurge instance
# points lib.sh's SURGE_* variables at it
use_target() {
  if [ -n "${SURGE_PIDS[$1]:-}" ]; then
    LT=pgsurge SURGE_PID=${SURGE_PIDS[$1]} SURGE_URL=${SURGE_URLS[$1]} SURGE_PORT=${SURGE_PORTS[$1]} SURGE_LOG=${SURGE_LOGS[$1]}
  else
    LT=$1
  fi
}

# stop_pid PID: end a process this script started (SIGTERM, SIGKILL after 10 s), and forget it
stop_pid() {
  local p=$1 i keep=()
  kill "$p" 2>/dev/null
  for ((i = 0; i < 100; i++)); do
    case $(ps -o stat= -p "$p" 2>/dev/null) in "" | Z*) break ;; esac
    sleep 0.1
  done
  [ "$i" -lt 100 ] || kill -KILL "$p" 2>/dev/null
  wait "$p" 2>/dev/null # reaps pgsurge (our child); PgBouncer daemonized, it is not ours to reap
  for i in "${BENCH_PIDS[@]}"; do [ "$i" = "$p" ] || keep+=("$i"); done
  BENCH_PIDS=("${keep[@]}")
}

# stop_proxies: end the current workload's PgBouncer and pgsurge instances
stop_proxies() {
  local n
  [ -n "${PGB_PID:-}" ] && stop_pid "$PGB_PID"
  PGB_PID=""
  for n in "${!SURGE_PIDS[@]}"; do
    if ! kill -0 "${SURGE_PIDS[$n]}" 2>/dev/null; then log "$n had exited; its log: $(tail -n 5 "${SURGE_LOGS[$n]}" | tr '\n' ' ')"; fi
    stop_pid "${SURGE_PIDS[$n]}"
  done
  SURGE_PIDS=() SURGE_URLS=() SURGE_PORTS=() SURGE_LOGS=() CONSOLE_SHOW=() CONSOLE_COLS=()
}

# console_sum PORT "SHOW ..." COLUMN...: those columns of a pgsurge admin console SHOW, each summed over its rows
# ("NA" when the console does not answer or has no such column)
console_sum() {
  local port=$1 show=$2
  shift 2
  timeout 15 "$PGBIN/psql" -X -A -F $'\t' -P footer=off "postgres://app:app@127.0.0.1:$port/pgsurge" -c "$show" 2>/dev/null |
    python3 -c '
import sys
rows = [l.rstrip("\n").split("\t") for l in sys.stdin if l.strip()]
cols = sys.argv[1:]
head = rows[0] if rows else []
def total(c):
    try:
        return str(sum(int(float(r[head.index(c)])) for r in rows[1:]))
    except (ValueError, IndexError):
        return "NA"
print(" ".join(total(c) for c in cols))' "$@"
}

# ---------------------------------------------------------------- raw file

TS=$(date -u +%Y%m%dT%H%M%SZ)
mkdir -p "$BENCH_DIR/results"
RAW=$BENCH_DIR/results/pipeline-$TS.tsv
{
  echo "# command: $BENCH_CMD"
  machine_facts
  echo "# workloads: $WORKLOADS"
  echo "# rounds: $ROUNDS"
  echo "# duration_s: $DURATION"
  echo "# one_duration_s: $ONE_DURATION"
  echo "# warmup_s: $WARMUP"
  echo "# jobs: $JOBS"
  echo "# pg_stat_statements: $([ "$PGSS" = 1 ] && echo "loaded, track = all" || echo "not loaded")"
  echo "# clk_tck: $CLK_TCK"
  printf 'workload\tround\ttarget\tclients\tduration_s\trc\ttps\ttx\tfailed\twall_s\tproxy_cpu_s\tpg_cpu_s\tpgbench_cpu_s\tsys_busy_s'
  printf '\thits\tmisses\tbatches\tlookups\n'
} >"$RAW"
# an interrupted run that measured nothing leaves no raw file behind
BENCH_ON_EXIT='grep -q "^[a-z]*	[0-9]" "$RAW" 2>/dev/null || rm -f "$RAW"'

# ---------------------------------------------------------------- one run, one round

N=0
# one_run WORKLOAD ROUND TARGET CLIENTS SECONDS pgbench-args...: one measured pgbench run, one line of $RAW
one_run() {
  local wl=$1 r=$2 t=$3 c=$4 secs=$5 pid out j=$JOBS show c0="NA NA" c1="NA NA" d1 d2 console per note=""
  shift 5
  N=$((N + 1))
  use_target "$t"
  pid=$(target_pid "$LT")
  [ -n "$pid" ] || pid=$PG_PID
  if ! kill -0 "$pid" 2>/dev/null; then
    log "[$N/$RUNS] $wl $t r$r c$c: SKIPPED, $t is not running"
    printf '%s\t%s\t%s\t%s\t%s\tdead' "$wl" "$r" "$t" "$c" "$secs" >>"$RAW"
    printf '\tNA%.0s' {1..12} >>"$RAW"
    echo >>"$RAW"
    return
  fi
  [ "$c" -lt "$j" ] && j=$c
  out=$WORKDIR/run-$N-$wl-$t-c$c-r$r.log
  show=${CONSOLE_SHOW[$t]:-}
  # shellcheck disable=SC2086
  [ -n "$show" ] && c0=$(console_sum "$SURGE_PORT" "$show" ${CONSOLE_COLS[$t]})
  PGBENCH=$BOUNDED measure_pgbench "$LT" "$out" "$@" -c "$c" -j "$j" -T "$secs" "$(target_url "$LT")"
  # shellcheck disable=SC2086
  [ -n "$show" ] && c1=$(console_sum "$SURGE_PORT" "$show" ${CONSOLE_COLS[$t]})
  # the console counters' change over the run: hits misses (SHOW CACHE) or batches lookups (SHOW BATCHES)
  read -r d1 d2 < <(python3 -c 'import sys; a, b = sys.argv[1].split(), sys.argv[2].split()
print(" ".join(str(int(y) - int(x)) if "NA" not in (x, y) else "NA" for x, y in zip(a, b)))' "$c0" "$c1")
  case $show in
    "SHOW CACHE") console="$d1\t$d2\tNA\tNA" note=", hits/misses $d1/$d2" ;;
    "SHOW BATCHES") console="NA\tNA\t$d1\t$d2" note=", batches/lookups $d1/$d2" ;;
    *) console="NA\tNA\tNA\tNA" ;;
  esac
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%b\n' "$wl" "$r" "$t" "$c" "$secs" "$M_RC" \
    "$M_TPS" "$M_TX" "$M_FAILED" "$M_WALL" "$M_PROXY_S" "$M_PG_S" "$M_PGBENCH_S" "$M_SYS_S" "$console" >>"$RAW"
  per=$(awk -v tx="$M_TX" -v p="$M_PROXY_S" -v g="$M_PG_S" -v b="$M_PGBENCH_S" 'BEGIN {
    if (tx + 0 == 0) { print "—"; exit }
    printf "Postgres %.1f, proxy %s, pgbench %.1f", g * 1e6 / tx, p == "NA" ? "—" : sprintf("%.1f", p * 1e6 / tx), b * 1e6 / tx }')
  log "[$N/$RUNS] $(printf '%-6s %-9s c%-2s r%s' "$wl" "$t" "$c" "$r"): tps $M_TPS; CPU µs/request: $per$note (rc $M_RC)"
  if [ "$M_RC" != 0 ] || [ "$M_TPS" = NA ]; then
    log "  pgbench output: $(grep -v '^\(pgbench (\|transaction type\|scaling factor\|query mode\|number of \(clients\|threads\)\|duration\|maximum number\)' "$out" | tail -n 4 | tr '\n' ' ')"
  fi
}

# one_round WORKLOAD ROUND CLIENTS SECONDS "TARGET..." pgbench-args...: one run per target, round r starting with
# the r-th target (so no target always runs first, right after another's load)
one_round() {
  local wl=$1 r=$2 c=$3 secs=$4 targets k n
  read -r -a targets <<<"$5"
  shift 5
  n=${#targets[@]}
  for ((k = 0; k < n; k++)); do
    one_run "$wl" "$r" "${targets[$(((k + r - 1) % n))]}" "$c" "$secs" "$@"
  done
}

# warm_up CLIENTS "TARGET..." pgbench-args...: WARMUP seconds of unmeasured load per target (shared buffers, the
# proxies' server connections and prepared statements)
warm_up() {
  local c=$1 t j=$JOBS
  local -a targets
  read -r -a targets <<<"$2"
  shift 2
  [ "$WARMUP" -gt 0 ] || return 0
  [ "$c" -lt "$j" ] && j=$c
  for t in "${targets[@]}"; do
    use_target "$t"
    "$BOUNDED" "$@" -c "$c" -j "$j" -T "$WARMUP" "$(target_url "$LT")" >"$WORKDIR/warmup-$t.log" 2>&1 \
      || log "warm-up against $t failed: $(grep -v '^pgbench' "$WORKDIR/warmup-$t.log" | tail -n 3 | tr '\n' ' ')"
  done
}

# ---------------------------------------------------------------- the workloads

RUNS=0
has_workload cache && RUNS=$((RUNS + 4 * ROUNDS))
has_workload batch && RUNS=$((RUNS + 6 * ROUNDS))
has_workload pooler && RUNS=$((RUNS + 6 * ROUNDS))
log "$RUNS runs of ${DURATION}s (1-client batch runs: ${ONE_DURATION}s); raw: ${RAW#"$MAIN"/}"

if has_workload cache; then
  log "cache: pgbench -i -s 1, pool 10, 64 clients, Zipf point reads"
  pgbench_init 1
  pgbouncer_start 10 transaction
  surge_up cache-off 10
  surge_up cache-on 10 --cache --cache-ttl 10s --admin-users app
  CONSOLE_SHOW[cache-on]="SHOW CACHE" CONSOLE_COLS[cache-on]="hits misses"
  targets="direct pgbouncer cache-off cache-on"
  args=(-n -M extended -f "$WORKDIR/cache.sql")
  warm_up 64 "$targets" "${args[@]}"
  for ((r = 1; r <= ROUNDS; r++)); do one_round cache "$r" 64 "$DURATION" "$targets" "${args[@]}"; done
  stop_proxies
fi

if has_workload batch; then
  log "batch: pgbench -i -s 10, pool 8, 64 clients then 1, uniform point lookups"
  pgbench_init 10
  pgbouncer_start 8 transaction
  surge_up batch-off 8
  surge_up batch-on 8 --batch --admin-users app
  CONSOLE_SHOW[batch-on]="SHOW BATCHES" CONSOLE_COLS[batch-on]="batches lookups"
  targets="direct pgbouncer batch-off batch-on"
  args=(-n -M extended -f "$WORKDIR/batch.sql")
  warm_up 64 "$targets" "${args[@]}"
  for ((r = 1; r <= ROUNDS; r++)); do
    one_round batch "$r" 64 "$DURATION" "$targets" "${args[@]}"
    one_round batch "$r" 1 "$ONE_DURATION" "batch-off batch-on" "${args[@]}"
  done
  stop_proxies
fi

if has_workload pooler; then
  log "pooler: scale 10, pool 20, pgbench -S at 16 and 64 clients"
  has_workload batch || pgbench_init 10 # the batch workload left scale 10 loaded
  pgbouncer_start 20 transaction
  surge_up pgsurge 20
  targets="pgbouncer pgsurge direct"
  args=(-n -S)
  warm_up 16 "$targets" "${args[@]}"
  for c in 16 64; do
    for ((r = 1; r <= ROUNDS; r++)); do one_round pooler "$r" "$c" "$DURATION" "$targets" "${args[@]}"; done
  done
  stop_proxies
fi
echo "# load_after: $(cut -d' ' -f1-3 /proc/loadavg)" >>"$RAW"

# ---------------------------------------------------------------- report

python3 - "$RAW" "$RESULTS" "$BENCH_DIR" <<'PY'
import statistics
import sys

raw, results, bench_dir = sys.argv[1:]
sys.path.insert(0, bench_dir)
from report import load, provenance, write_section

meta, rows = load(raw)
nproc = int(meta.get("nproc", "1") or 1)
BEGIN, END = "<!-- pipeline:begin -->", "<!-- pipeline:end -->"


def num(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def med(vals):
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None


def ratio(a, b):
    return a / b if a is not None and b else None


def f(v, fmt, suffix=""):
    return "—" if v is None else format(v, fmt) + suffix


class Cell:
    """The runs of one (workload, target, clients); medians over the successful ones."""

    def __init__(self, wl, target, clients):
        self.runs = [r for r in rows if (r["workload"], r["target"], r["clients"]) == (wl, target, str(clients))]
        self.ok = [r for r in self.runs if r["rc"] == "0" and num(r["tps"]) is not None and num(r["tx"])]
        self.failed_tx = sum(int(num(r["failed"]) or 0) for r in self.runs)

    def tps(self):
        return med(num(r["tps"]) for r in self.ok)

    def us(self, key):
        """CPU µs per request (transaction) of proxy_cpu_s, pg_cpu_s or pgbench_cpu_s"""
        return med(num(r[key]) * 1e6 / num(r["tx"]) if num(r[key]) is not None else None for r in self.ok)

    def other(self):
        """share (%) of all cores used by anything but pgbench, Postgres and the proxy"""
        return med(max(0.0, 100.0 * (num(r["sys_busy_s"]) - sum(num(r[k]) or 0.0 for k in
                                                                 ("proxy_cpu_s", "pg_cpu_s", "pgbench_cpu_s")))
                       / (num(r["wall_s"]) * nproc)) for r in self.ok if num(r["wall_s"]))

    def total(self, key):
        vals = [num(r[key]) for r in self.ok if num(r[key]) is not None]
        return sum(vals) if vals else None

    def hit_pct(self):
        h, m = self.total("hits"), self.total("misses")
        return 100.0 * h / (h + m) if h is not None and m is not None and h + m else None

    def avg_batch(self):
        return ratio(self.total("lookups"), self.total("batches"))

    def runs_note(self):
        return f"{len(self.ok)}/{len(self.runs)}" + (f", {self.failed_tx} failed tx" if self.failed_tx else "")


out = [BEGIN, "## Request pipeline: cache hits, batching and pooling against their goals", ""]
out += [l.replace("PgBouncer PgBouncer", "PgBouncer") for l in provenance(meta)]  # machine_facts says "PgBouncer 1.18.0"
out.append(f"Setup: everything on loopback on this one {nproc}-core machine; the workloads of the acceptance checks "
           f"`9-cache`, `9-batch` and `9-pooler`; Postgres 15 (fsync off, pg_stat_statements "
           f"{meta.get('pg_stat_statements', '?')}); PgBouncer and pgsurge in transaction mode, SCRAM logins, a fresh "
           f"instance of each per workload; targets alternated within each round, {meta.get('rounds', '?')} round(s) of "
           f"{meta.get('duration_s', '?')} s per target (1-client batch runs {meta.get('one_duration_s', '?')} s), after "
           f"{meta.get('warmup_s', '?')} s of warm-up per target; every figure is the median over rounds. CPU µs per "
           f"request = CPU (user + system) over the run / transactions; Postgres: postmaster and all backends, from "
           f"/proc; proxy: its process, from /proc; pgbench: /usr/bin/time.  ")
out.append(f"Raw runs: `bench/results/{raw.rsplit('/', 1)[-1]}`")
out.append("")

goals = []   # (workload, text, holds: True / False / None = not measured)
notes = []   # (workload, text): context for the goals (hit ratio, ceilings)
where = []   # "where the CPU went", one line per workload
others = []  # share of the cores other processes used, per cell (noise)


def goal(wl, what, value, unit, target, holds):
    shown = "—" if value is None else f"**{value:.2f}{unit}**"
    goals.append((wl, f"{what}: {shown} (goal {target})", None if value is None else holds(value)))


def ceiling(wl, cell, direct, what):
    """the tps if the proxy cost nothing: all cores / (pgbench + Postgres CPU per request), as a multiple of direct"""
    pb, pg = cell.us("pgbench_cpu_s"), cell.us("pg_cpu_s")
    if pb is None or pg is None or not direct.tps():
        return
    top = nproc * 1e6 / (pb + pg)
    notes.append((wl, f"ceiling, {what}: pgbench and Postgres alone spend {pb:.1f} + {pg:.1f} µs per request, so "
                      f"{nproc} cores serve at most {top:,.0f}/s if pgsurge cost nothing: **{top / direct.tps():.2f}x** direct"))


def cpu_parts(cell, proxy):
    """'pgbench 20.1 µs (40%), Postgres …': CPU µs per request and each one's share of their sum"""
    parts = [("pgbench", cell.us("pgbench_cpu_s")), ("Postgres", cell.us("pg_cpu_s"))]
    if proxy:
        parts.append((proxy, cell.us("proxy_cpu_s")))
    tot = sum(v for _, v in parts if v is not None)
    return ", ".join(f"{n} {f(v, '.1f')} µs" + (f" ({100 * v / tot:.0f}%)" if v is not None and tot else "")
                     for n, v in parts)


def table(lines, base_name, base_of, extra=None):
    """lines: (label, clients, cell); base_of(clients) -> the cell the tps ratio is to; extra: (title, cell -> text)"""
    out.append(f"| target | clients | tps | vs {base_name} | Postgres µs/req | proxy µs/req | pgbench µs/req |"
               + (f" {extra[0]} |" if extra else "") + " runs ok |")
    out.append("|---|---:|---:|---:|---:|---:|---:|" + ("---:|" if extra else "") + "---:|")
    for label, clients, c in lines:
        if not c.runs:
            continue
        row = [label, str(clients), f(c.tps(), ",.0f"), f(ratio(c.tps(), base_of(clients).tps()), ".2f"),
               f(c.us("pg_cpu_s"), ".1f"), f(c.us("proxy_cpu_s"), ".1f"), f(c.us("pgbench_cpu_s"), ".1f")]
        out.append("| " + " | ".join(row + ([extra[1](c)] if extra else []) + [c.runs_note()]) + " |")
        others.append(c.other())
    out.append("")


workloads = meta.get("workloads", "").split()

if "cache" in workloads:
    d, b, off, on = (Cell("cache", t, 64) for t in ("direct", "pgbouncer", "cache-off", "cache-on"))
    out += ["### Cache: read-only Zipf point reads", "",
            "`pgbench -i -s 1` (100,000 rows); `\\set aid random_zipfian(1, 100000, 1.3)` / "
            "`SELECT abalance FROM pgbench_accounts WHERE aid = :aid;` as `pgbench -n -M extended -c 64 -j 2`; pool 10; "
            "cache on = `--cache --cache-ttl 10s` (hits and misses from the admin console's `SHOW CACHE`).", ""]
    table([("direct Postgres", 64, d), ("PgBouncer", 64, b), ("pgsurge, cache off", 64, off),
           ("pgsurge, cache on", 64, on)], "direct", lambda c: d, ("hit ratio", lambda c: f(c.hit_pct(), ".1f", "%")))
    goal("cache", "tps, cache on / direct", ratio(on.tps(), d.tps()), "x", "≥ 3.5x", lambda v: v >= 3.5)
    goal("cache", "Postgres CPU per request, cache on vs direct", ratio(d.us("pg_cpu_s"), on.us("pg_cpu_s")),
         "x lower", "≥ 20x lower", lambda v: v >= 20)
    goal("cache", "pgsurge CPU per request, cache on / cache off", ratio(on.us("proxy_cpu_s"), off.us("proxy_cpu_s")),
         "x", "≤ 0.3x", lambda v: v <= 0.3)
    notes.append(("cache", f"hit ratio with the cache on: {f(on.hit_pct(), '.1f', '%')} (9-cache counts its goals only "
                           "at ≥ 90% hits)"))
    ceiling("cache", on, d, "cache on")
    where.append(f"- cache: direct: {cpu_parts(d, None)}; cache off: {cpu_parts(off, 'pgsurge')}; "
                 f"cache on: {cpu_parts(on, 'pgsurge')}; per request")

if "batch" in workloads:
    d, b, off, on = (Cell("batch", t, 64) for t in ("direct", "pgbouncer", "batch-off", "batch-on"))
    off1, on1 = Cell("batch", "batch-off", 1), Cell("batch", "batch-on", 1)
    out += ["### Batch: concurrent uniform point lookups", "",
            "`pgbench -i -s 10` (1,000,000 rows); `\\set aid random(1, 1000000)` / "
            "`SELECT abalance FROM pgbench_accounts WHERE aid = :aid;` as `pgbench -n -M extended -c 64 -j 2`, then "
            "`-c 1 -j 1`; pool 8; batch on = `--batch` (average batch = lookups / batches from the admin console's "
            "`SHOW BATCHES`). One transaction = one lookup = one row, so tps = rows/s; 1-client rows are compared "
            "with batch off at 1 client.", ""]
    table([("direct Postgres", 64, d), ("PgBouncer", 64, b), ("pgsurge, batch off", 64, off),
           ("pgsurge, batch on", 64, on), ("pgsurge, batch off", 1, off1), ("pgsurge, batch on", 1, on1)],
          "direct / batch off", lambda c: d if c == 64 else off1, ("avg batch", lambda c: f(c.avg_batch(), ".1f")))
    goal("batch", "rows/s, batch on / direct (64 clients)", ratio(on.tps(), d.tps()), "x", "≥ 2x", lambda v: v >= 2)
    goal("batch", "Postgres CPU per lookup, batch on vs direct", ratio(d.us("pg_cpu_s"), on.us("pg_cpu_s")),
         "x lower", "≥ 4x lower", lambda v: v >= 4)
    goal("batch", "1 client, rows/s batch on / off", ratio(on1.tps(), off1.tps()), "", "≥ 0.95", lambda v: v >= 0.95)
    ceiling("batch", on, d, "batch on")
    where.append(f"- batch, 64 clients: direct: {cpu_parts(d, None)}; batch off: {cpu_parts(off, 'pgsurge')}; "
                 f"batch on: {cpu_parts(on, 'pgsurge')}; per lookup")

if "pooler" in workloads:
    out += ["### Pooler: `pgbench -S`", "",
            "`pgbench -i -s 10`; `pgbench -n -S` (simple protocol) `-c 16` and `-c 64`, `-j 2`; pool 20; PgBouncer and "
            "pgsurge with no other options; direct Postgres for context. Ratios are to PgBouncer at the same client "
            "count.", ""]
    bouncer = {c: Cell("pooler", "pgbouncer", c) for c in (16, 64)}
    surge = {c: Cell("pooler", "pgsurge", c) for c in (16, 64)}
    lines = [x for c in (16, 64) for x in (("PgBouncer", c, bouncer[c]), ("pgsurge", c, surge[c]),
                                           ("direct Postgres", c, Cell("pooler", "direct", c)))]
    table(lines, "PgBouncer", lambda c: bouncer[c],
          ("proxy CPU vs PgBouncer", lambda c: f(ratio(c.us("proxy_cpu_s"), bouncer[int(c.runs[0]["clients"])].us("proxy_cpu_s")), ".2f")))
    for c in (16, 64):
        goal("pooler", f"{c} clients, proxy CPU per tx, pgsurge / PgBouncer",
             ratio(surge[c].us("proxy_cpu_s"), bouncer[c].us("proxy_cpu_s")), "x", "≤ 0.85x", lambda v: v <= 0.85)
        goal("pooler", f"{c} clients, tps, pgsurge / PgBouncer", ratio(surge[c].tps(), bouncer[c].tps()), "x", "≥ 1.05x",
             lambda v: v >= 1.05)
    where.append(f"- pooler, 64 clients: PgBouncer: {cpu_parts(bouncer[64], 'PgBouncer')}; "
                 f"pgsurge: {cpu_parts(surge[64], 'pgsurge')}; per transaction")

held = sum(1 for g in goals if g[2])
unmeasured = sum(1 for g in goals if g[2] is None)
out += ["### Goals", "", f"{held} of {len(goals)} goals hold" + (f" ({unmeasured} not measured)" if unmeasured else "")
        + ":", ""]
for wl, text, holds in goals:
    out.append(f"- {wl}: {text}: " + ("holds" if holds else "not measured" if holds is None else "**does not hold**"))
out.append("")
for wl, text in notes:
    out.append(f"- {wl}: {text}")
out += ["", "### Where the CPU went", "",
        f"Median CPU µs per request and each one's share of their sum; pgbench, Postgres and the proxy share the same "
        f"{nproc} cores, so what one of them spends per request is taken from the others.", ""]
out += where
others = [o for o in others if o is not None]
if others and statistics.median(others) > 10:
    out += ["", f"**Noisy run:** processes outside the benchmark used a median {statistics.median(others):.0f}% "
                f"(max {max(others):.0f}%) of the {nproc} cores during the runs; rerun on a quiet machine for "
                "published numbers."]
out.append(END)
section = "\n".join(out) + "\n"
write_section(results, section, BEGIN, END)
print(section)
PY
[ $? = 0 ] || die "rendering the report failed (raw file kept: ${RAW#"$MAIN"/})"
log "wrote ${RESULTS#"$MAIN"/} and ${RAW#"$MAIN"/}"
