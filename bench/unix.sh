#!/usr/bin/env bash
# bench/unix.sh — what reaching Postgres over its Unix-domain socket instead of loopback TCP is worth: PgBouncer
# and pgsurge, each over TCP and over the socket, alternated under `pgbench -S` at saturation; tps and the CPU the
# proxy, Postgres and pgbench spend per transaction.
#
#   bench/unix.sh
#
# Environment (defaults in brackets): ROUNDS [3]   DURATION [8] seconds per run   CLIENTS [64]   POOL [20]
#   JOBS [2]   SCALE [10]   PGSURGE_BIN [build target/release/pgsurge]   RESULTS [bench/RESULTS.md]
# Writes bench/results/unix-<timestamp>.tsv and the unix section of bench/RESULTS.md.

# shellcheck source=bench/lib.sh
. "$(dirname "$0")/lib.sh"
bench_command unix.sh "ROUNDS DURATION CLIENTS POOL JOBS SCALE PGSURGE_BIN" "$@"
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-8}
CLIENTS=${CLIENTS:-64}
POOL=${POOL:-20}
JOBS=${JOBS:-2}
SCALE=${SCALE:-10}
RESULTS=${RESULTS:-$BENCH_DIR/RESULTS.md}
TARGETS=(pgbouncer pgbouncer-unix pgsurge pgsurge-unix)

pgsurge_build
pg_start
pgbench_init "$SCALE"
# Over the socket both proxies log in as pg_hba's `local` lines say (trust here); over TCP with SCRAM. Logins
# happen once per server connection, before the measured runs.
pgbouncer_start "$POOL" transaction "$PGSOCK"
PGB_UNIX_URL=$PGB_URL PGB_UNIX_PID=$PGB_PID
pgbouncer_start "$POOL" transaction
TCP_UPSTREAM=$UPSTREAM
UPSTREAM="postgres://app:app@/app?host=$PGSOCK&port=$PGPORT"
pgsurge_start "$POOL" transaction
SURGE_UNIX_URL=$SURGE_URL SURGE_UNIX_PID=$SURGE_PID
UPSTREAM=$TCP_UPSTREAM
pgsurge_start "$POOL" transaction

TS=$(date -u +%Y%m%dT%H%M%SZ)
mkdir -p "$BENCH_DIR/results"
RAW=$BENCH_DIR/results/unix-$TS.tsv
{
  echo "# command: $BENCH_CMD"
  machine_facts
  printf 'target\tround\ttps\ttx\tproxy_us\tpg_us\tpgbench_us\n'
} >"$RAW"
BENCH_ON_EXIT='grep -q "^pg.*	[0-9]" "$RAW" 2>/dev/null || rm -f "$RAW"'

for t in "${TARGETS[@]}"; do # warm every pool
  "$PGBENCH" -n -S -c "$CLIENTS" -j "$JOBS" -T 2 "$(target_url "$t")" >/dev/null 2>&1
done
for ((r = 1; r <= ROUNDS; r++)); do
  for t in "${TARGETS[@]}"; do
    measure_pgbench "$t" "$WORKDIR/$t-$r.log" -n -S -c "$CLIENTS" -j "$JOBS" -T "$DURATION" "$(target_url "$t")"
    [ "$M_RC" = 0 ] && [ "$M_TX" != NA ] || die "pgbench through $t failed: $(tail -n 5 "$WORKDIR/$t-$r.log")"
    python3 -c "import sys; t, r, tps, tx, p, g, b = sys.argv[1:]; tx = int(tx); us = lambda s: f'{float(s) * 1e6 / tx:.1f}'; \
print('\t'.join([t, r, tps, str(tx), us(p), us(g), us(b)]))" "$t" "$r" "$M_TPS" "$M_TX" "$M_PROXY_S" "$M_PG_S" "$M_PGBENCH_S" >>"$RAW"
    log "$t round $r: $(tail -n1 "$RAW" | cut -f3-)"
  done
done

python3 - "$RAW" "$RESULTS" "$BENCH_DIR" "$CLIENTS" "$POOL" "$DURATION" "$ROUNDS" "$JOBS" <<'PY'
import sys
raw, results, bench_dir, clients, pool, dur, rounds, jobs = sys.argv[1:]
sys.path.insert(0, bench_dir)
from report import load, medians, provenance, write_section
meta, rows = load(raw)
targets = ["pgbouncer", "pgbouncer-unix", "pgsurge", "pgsurge-unix"]
med = medians(rows, "target", ["tps", "tx", "proxy_us", "pg_us", "pgbench_us"])
label = {"pgbouncer": "PgBouncer, TCP", "pgbouncer-unix": "PgBouncer, Unix socket", "pgsurge": "pgsurge, TCP",
         "pgsurge-unix": "pgsurge, Unix socket"}
out = ["<!-- unix:begin -->", "## Upstream over the Unix socket or loopback TCP: `pgbench -S` at saturation", ""]
out += provenance(meta)
out.append(f"Setup: `pgbench -n -S -c {clients} -j {jobs} -T {dur}` over TCP to each proxy; each proxy in transaction "
           f"mode with pool {pool}, reaching Postgres over loopback TCP (SCRAM) or its Unix socket (`host=` the socket "
           f"directory; trust, as pg_hba's local lines say); the four alternated, {rounds} rounds; medians; CPU per "
           f"transaction from /proc around each run.  ")
out.append(f"Raw runs: `bench/results/{raw.rsplit('/', 1)[-1]}`")
out.append("")
out.append("| target | tps | vs PgBouncer over TCP | proxy µs/tx | Postgres µs/tx | pgbench µs/tx |")
out.append("|---|---:|---:|---:|---:|---:|")
base = med["pgbouncer"]["tps"]
for t in targets:
    m = med[t]
    out.append(f"| {label[t]} | {m['tps']:,.0f} | {m['tps'] / base:.2f} | {m['proxy_us']:.1f} | {m['pg_us']:.1f} | {m['pgbench_us']:.1f} |")
out.append("")
s, b = med["pgsurge-unix"], med["pgbouncer-unix"]
out.append(f"Over the socket, pgsurge/PgBouncer: tps {s['tps'] / b['tps']:.2f}, proxy CPU {s['proxy_us'] / b['proxy_us']:.2f}×.")
out.append("<!-- unix:end -->")
write_section(results, "\n".join(out) + "\n", "<!-- unix:begin -->", "<!-- unix:end -->")
print("\n".join(out))
PY
