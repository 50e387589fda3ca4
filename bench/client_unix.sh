#!/usr/bin/env bash
# bench/client_unix.sh — what clients gain by reaching pgsurge over its Unix-domain socket (`unix_socket_dir`,
# `.s.PGSQL.<port>`) instead of loopback TCP: one pgsurge, `pgbench -S` at saturation alternately over each; tps
# and the CPU pgsurge, Postgres and pgbench spend per transaction.
#
#   bench/client_unix.sh
#
# Environment (defaults in brackets): ROUNDS [3]   DURATION [8] seconds per run   CLIENTS [64]   POOL [20]
#   JOBS [2]   SCALE [10]   PGSURGE_BIN [build target/release/pgsurge]   RESULTS [bench/RESULTS.md]
# Writes bench/results/client-unix-<timestamp>.tsv and the client-unix section of bench/RESULTS.md.

# shellcheck source=bench/lib.sh
. "$(dirname "$0")/lib.sh"
bench_command client_unix.sh "ROUNDS DURATION CLIENTS POOL JOBS SCALE PGSURGE_BIN" "$@"
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-8}
CLIENTS=${CLIENTS:-64}
POOL=${POOL:-20}
JOBS=${JOBS:-2}
SCALE=${SCALE:-10}
RESULTS=${RESULTS:-$BENCH_DIR/RESULTS.md}

pgsurge_build
pg_start
pgbench_init "$SCALE"
SOCKDIR=$WORKDIR/surge-sock
mkdir -p "$SOCKDIR"
pgsurge_start "$POOL" transaction --unix-socket-dir "$SOCKDIR"
TCP_URL=$SURGE_URL
UNIX_URL="postgres://app:app@/app?host=$SOCKDIR&port=$SURGE_PORT"

TS=$(date -u +%Y%m%dT%H%M%SZ)
mkdir -p "$BENCH_DIR/results"
RAW=$BENCH_DIR/results/client-unix-$TS.tsv
{
  echo "# command: $BENCH_CMD"
  machine_facts
  printf 'target\tround\ttps\ttx\tproxy_us\tpg_us\tpgbench_us\n'
} >"$RAW"
BENCH_ON_EXIT='grep -q "^[a-z].*	[0-9]" "$RAW" 2>/dev/null || rm -f "$RAW"'

for url in "$TCP_URL" "$UNIX_URL"; do # warm the pool
  "$PGBENCH" -n -S -c "$CLIENTS" -j "$JOBS" -T 2 "$url" >/dev/null 2>&1
done
for ((r = 1; r <= ROUNDS; r++)); do
  for t in tcp unix; do
    url=$TCP_URL; [ "$t" = unix ] && url=$UNIX_URL
    measure_pgbench pgsurge "$WORKDIR/$t-$r.log" -n -S -c "$CLIENTS" -j "$JOBS" -T "$DURATION" "$url"
    [ "$M_RC" = 0 ] && [ "$M_TX" != NA ] || die "pgbench over $t failed: $(tail -n 5 "$WORKDIR/$t-$r.log")"
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
med = medians(rows, "target", ["tps", "tx", "proxy_us", "pg_us", "pgbench_us"])
out = ["<!-- client-unix:begin -->", "## Clients over pgsurge's Unix socket or loopback TCP: `pgbench -S` at saturation", ""]
out += provenance(meta)
out.append(f"Setup: one pgsurge (transaction mode, pool {pool}, upstream over loopback TCP) with `--unix-socket-dir`; "
           f"`pgbench -n -S -c {clients} -j {jobs} -T {dur}` alternately to `127.0.0.1:<port>` and to "
           f"`<dir>/.s.PGSQL.<port>`, {rounds} rounds; medians; CPU per transaction from /proc around each run.  ")
out.append(f"Raw runs: `bench/results/{raw.rsplit('/', 1)[-1]}`")
out.append("")
out.append("| clients reach pgsurge over | tps | vs TCP | pgsurge µs/tx | Postgres µs/tx | pgbench µs/tx |")
out.append("|---|---:|---:|---:|---:|---:|")
base = med["tcp"]["tps"]
for t, label in [("tcp", "loopback TCP"), ("unix", "Unix socket")]:
    m = med[t]
    out.append(f"| {label} | {m['tps']:,.0f} | {m['tps'] / base:.2f} | {m['proxy_us']:.1f} | {m['pg_us']:.1f} | {m['pgbench_us']:.1f} |")
out.append("<!-- client-unix:end -->")
write_section(results, "\n".join(out) + "\n", "<!-- client-unix:begin -->", "<!-- client-unix:end -->")
print("\n".join(out))
PY
