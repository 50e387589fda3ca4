#!/usr/bin/env bash
# bench/park.sh — what parking idle clients between requests (src/frontend/park.rs) costs per request: two pgsurge
# binaries, BASE_BIN (without) and PGSURGE_BIN (with), alternated within each round on one Postgres, `pgbench -S`
# (simple protocol, scale 10) with CLIENTS clients, pool 20: tps and the proxy's CPU µs per transaction, per round
# and as medians. Prints lines to paste into bench/RESULTS.md.
#
#   BASE_BIN=/path/to/pgsurge-before PGSURGE_BIN=/path/to/pgsurge-after bench/park.sh
#
# Environment (defaults in brackets): ROUNDS [5]   DURATION [10] s per run   CLIENTS [16]   JOBS [2] pgbench -j
# shellcheck source=bench/lib.sh
. "$(dirname "$0")/lib.sh"
bench_command park.sh "BASE_BIN PGSURGE_BIN ROUNDS DURATION CLIENTS JOBS" "$@"
ROUNDS=${ROUNDS:-5}
DURATION=${DURATION:-10}
CLIENTS=${CLIENTS:-16}
JOBS=${JOBS:-2}
[ -x "${BASE_BIN:-}" ] || die "give BASE_BIN, the pgsurge binary to compare against"
pgsurge_build
pg_start
pgbench_init 10

declare -A PID URL
for label in base park; do
  bin=$PGSURGE; [ "$label" = base ] && bin=$BASE_BIN
  saved=$PGSURGE; PGSURGE=$bin
  pgsurge_start 20 transaction
  PGSURGE=$saved
  PID[$label]=$SURGE_PID URL[$label]=$SURGE_URL
  "$PGBENCH" -n -S -c "$CLIENTS" -j "$JOBS" -T 2 "$SURGE_URL" >/dev/null 2>&1 || die "warm-up through $label failed"
done

for ((r = 1; r <= ROUNDS; r++)); do
  for label in base park; do
    p0=$(ticks "${PID[$label]}")
    out=$WORKDIR/$label-$r.out
    timeout $((DURATION + 30)) "$PGBENCH" -n -S -c "$CLIENTS" -j "$JOBS" -T "$DURATION" "${URL[$label]}" >"$out" 2>&1 ||
      die "pgbench through $label failed: $(tail -n 3 "$out")"
    p1=$(ticks "${PID[$label]}")
    tps=$(sed -n 's/^tps = \([0-9.]*\).*/\1/p' "$out" | head -n1)
    tx=$(sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' "$out")
    us=$(python3 -c "print(f'{($p1 - $p0) / $CLK_TCK * 1e6 / $tx:.1f}')")
    echo "park round=$r target=$label clients=$CLIENTS tps=${tps%.*} proxy_cpu_us_per_tx=$us"
  done
done
