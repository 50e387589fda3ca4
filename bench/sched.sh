#!/usr/bin/env bash
# bench/sched.sh — where a proxy's cost goes at pgbench -S saturation: PgBouncer vs pgsurge alternated, per run the
# proxy's user and kernel CPU per transaction, how often it was switched out (slept / preempted) per transaction,
# and the CPU Postgres, pgbench and the idle cores spent per transaction. The pooler benchmark (run.sh) says how
# fast; this says why.
#
#   bench/sched.sh
#
# Environment (defaults in brackets): ROUNDS [5]   DURATION [6] seconds per run   CLIENTS [64]   POOL [20]
#   JOBS [2]   SCALE [10]   PGSURGE_BIN [build target/release/pgsurge]   RESULTS [bench/RESULTS.md]
# Writes bench/results/sched-<timestamp>.tsv and the sched section of bench/RESULTS.md.

# shellcheck source=bench/lib.sh
. "$(dirname "$0")/lib.sh"
bench_command sched.sh "ROUNDS DURATION CLIENTS POOL JOBS SCALE PGSURGE_BIN" "$@"
ROUNDS=${ROUNDS:-5}
DURATION=${DURATION:-6}
CLIENTS=${CLIENTS:-64}
POOL=${POOL:-20}
JOBS=${JOBS:-2}
SCALE=${SCALE:-10}

RESULTS=${RESULTS:-$BENCH_DIR/RESULTS.md}

pgsurge_build
pg_start
pgbench_init "$SCALE"
pgbouncer_start "$POOL" transaction
pgsurge_start "$POOL" transaction

# proc_sched PID: "utime stime voluntary involuntary" summed over the process' threads.
proc_sched() {
  local pid=$1 line rest
  read -r line <"/proc/$pid/stat" || { echo "0 0 0 0"; return; }
  rest=${line##*) }
  # shellcheck disable=SC2086
  set -- $rest
  echo "${12} ${13} $(ctx_switches "$pid")"
}

# pg_sched: "voluntary involuntary" context switches summed over every Postgres backend (the pool's servers
# live through the whole run, so a difference around a run is theirs).
# shellcheck disable=SC2046
pg_sched() { ctx_switches $(ps --ppid "$PG_PID" -o pid= 2>/dev/null); }

TS=$(date -u +%Y%m%dT%H%M%SZ)
mkdir -p "$BENCH_DIR/results"
RAW=$BENCH_DIR/results/sched-$TS.tsv
{
  echo "# command: $BENCH_CMD"
  machine_facts
  printf 'target\tround\ttps\ttx\tproxy_user_us\tproxy_sys_us\tproxy_sleeps\tproxy_preempted\tpg_us\tpg_sleeps\tpg_preempted\tpgbench_us\tidle_us\n'
} >"$RAW"
BENCH_ON_EXIT='grep -q "^pg.*	[0-9]" "$RAW" 2>/dev/null || rm -f "$RAW"'

for t in pgbouncer pgsurge; do # warm both pools
  "$PGBENCH" -n -S -c "$CLIENTS" -j "$JOBS" -T 2 "$(target_url $t)" >/dev/null 2>&1
done
for ((r = 1; r <= ROUNDS; r++)); do
  for t in pgbouncer pgsurge; do
    pid=$(target_pid "$t")
    read -r u0 s0 v0 n0 < <(proc_sched "$pid")
    i0=$(idle_ticks)
    read -r pv0 pn0 < <(pg_sched)
    measure_pgbench "$t" "$WORKDIR/$t-$r.log" -n -S -c "$CLIENTS" -j "$JOBS" -T "$DURATION" "$(target_url $t)"
    read -r u1 s1 v1 n1 < <(proc_sched "$pid")
    i1=$(idle_ticks)
    read -r pv1 pn1 < <(pg_sched)
    [ "$M_RC" = 0 ] && [ "$M_TX" != NA ] || die "pgbench through $t failed: $(tail -n 5 "$WORKDIR/$t-$r.log")"
    python3 - "$t" "$r" "$M_TPS" "$M_TX" "$u0" "$u1" "$s0" "$s1" "$v0" "$v1" "$n0" "$n1" "$M_PG_S" "$M_PGBENCH_S" \
      "$i0" "$i1" "$CLK_TCK" "$pv0" "$pv1" "$pn0" "$pn1" >>"$RAW" <<'PY'
import sys
t, r, tps, tx, u0, u1, s0, s1, v0, v1, n0, n1, pg, pgb, i0, i1, hz, pv0, pv1, pn0, pn1 = sys.argv[1:]
tx = int(tx); hz = float(hz)
us = lambda ticks: ticks / hz * 1e6 / tx
print("\t".join([t, r, tps, str(tx), f"{us(int(u1) - int(u0)):.2f}", f"{us(int(s1) - int(s0)):.2f}",
                 f"{(int(v1) - int(v0)) / tx:.3f}", f"{(int(n1) - int(n0)) / tx:.3f}", f"{float(pg) * 1e6 / tx:.1f}",
                 f"{(int(pv1) - int(pv0)) / tx:.3f}", f"{(int(pn1) - int(pn0)) / tx:.3f}",
                 f"{float(pgb) * 1e6 / tx:.1f}", f"{us(int(i1) - int(i0)):.1f}"]))
PY
    log "$t round $r: $(tail -n1 "$RAW" | cut -f3-)"
  done
done

python3 - "$RAW" "$RESULTS" "$BENCH_DIR" "$CLIENTS" "$POOL" "$DURATION" "$ROUNDS" "$JOBS" <<'PY'
import sys
raw, results, bench_dir, clients, pool, dur, rounds, jobs = sys.argv[1:]
sys.path.insert(0, bench_dir)
from report import load, medians, provenance, write_section
meta, rows = load(raw)
cols = ["tps", "tx", "proxy_user_us", "proxy_sys_us", "proxy_sleeps", "proxy_preempted", "pg_us", "pg_sleeps", "pg_preempted", "pgbench_us", "idle_us"]
med = medians(rows, "target", cols)
b, s = med["pgbouncer"], med["pgsurge"]
out = ["<!-- sched:begin -->", "## Where a proxy's cost goes: `pgbench -S` at saturation, PgBouncer vs pgsurge", ""]
out += provenance(meta)
out.append(f"Setup: `pgbench -n -S -c {clients} -j {jobs} -T {dur}`, both proxies in transaction mode with pool {pool}, "
           f"alternated, {rounds} rounds; every figure is the median over rounds; per-transaction figures divide "
           f"/proc counters taken around each run by its transactions.  ")
out.append(f"Raw runs: `bench/results/{raw.rsplit('/', 1)[-1]}`")
out.append("")
out.append("| target | tps | proxy user µs/tx | proxy kernel µs/tx | proxy sleeps/tx | proxy preempted/tx "
           "| Postgres µs/tx | Postgres sleeps/tx | Postgres preempted/tx | pgbench µs/tx | idle cores µs/tx |")
out.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
for t in ("pgbouncer", "pgsurge"):
    m = med[t]
    out.append(f"| {t} | {m['tps']:,.0f} | {m['proxy_user_us']:.2f} | {m['proxy_sys_us']:.2f} | {m['proxy_sleeps']:.3f} "
               f"| {m['proxy_preempted']:.3f} | {m['pg_us']:.1f} | {m['pg_sleeps']:.3f} | {m['pg_preempted']:.3f} | {m['pgbench_us']:.1f} | {m['idle_us']:.1f} |")
out.append("")
out.append(f"pgsurge/PgBouncer: tps {s['tps'] / b['tps']:.2f}, proxy user CPU {s['proxy_user_us'] / b['proxy_user_us']:.2f}×, "
           f"proxy kernel CPU {s['proxy_sys_us'] / b['proxy_sys_us']:.2f}×, Postgres CPU {s['pg_us'] / b['pg_us']:.2f}×, "
           f"idle {s['idle_us'] / b['idle_us']:.2f}×.")
out.append("")
out.append("Columns: user/kernel = the proxy's utime/stime; sleeps = voluntary context switches (it waited for "
           "events), preempted = involuntary ones (the scheduler took its core while it had work), for the proxy and summed over the Postgres backends; idle cores = "
           "idle+iowait ticks of the whole machine. With every process on the same 2 cores, tps ≈ 2 s / (sum of "
           "the CPU columns + idle) per transaction.")
out.append("<!-- sched:end -->")
write_section(results, "\n".join(out) + "\n", "<!-- sched:begin -->", "<!-- sched:end -->")
print("\n".join(out))
PY
