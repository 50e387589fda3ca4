#!/usr/bin/env bash
# bench/run.sh — pooler benchmark: pgbench -S through direct Postgres, PgBouncer and pgsurge.
#
#   bench/run.sh            full run (2 rounds x 10 s, clients 1 16 64 256, simple+extended, + storm)
#   bench/run.sh --quick    smoke run (1 round x 3 s, clients 16 64, + storm)
#
# Environment (defaults in brackets):
#   BENCH_TARGETS ["direct pgbouncer pgsurge"]   ROUNDS [2]   DURATION [10]   POOL [20]
#   CLIENTS ["1 16 64 256"]   MODES ["simple extended prepared"]   STORM_CLIENTS [16]   JOBS [2]
#   SCALE [10]   WARMUP [3] seconds per target before measuring   PGSURGE_BIN [build target/release/pgsurge]
#   RESULTS [bench/RESULTS.md]   BENCH_KEEP_WORKDIR [unset] keep the temp dir (logs) after exit
# Writes bench/results/raw-<timestamp>.tsv and the pooler section of bench/RESULTS.md.
# See bench/README.md for what each column means.

# the exact command line, as typed (overridden env vars first)
# shellcheck source=bench/lib.sh
. "$(dirname "$0")/lib.sh"
bench_command run.sh "BENCH_TARGETS ROUNDS DURATION POOL CLIENTS MODES STORM_CLIENTS JOBS SCALE WARMUP PGSURGE_BIN" "$@"

QUICK=0
for a in "$@"; do
  case $a in
    --quick) QUICK=1 ;;
    -h | --help) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown argument: $a (try --help)" >&2; exit 2 ;;
  esac
done
if [ "$QUICK" = 1 ]; then
  DURATION=${DURATION:-3}; ROUNDS=${ROUNDS:-1}; CLIENTS=${CLIENTS:-"16 64"}; WARMUP=${WARMUP:-1}
fi
BENCH_TARGETS=${BENCH_TARGETS:-"direct pgbouncer pgsurge"}
ROUNDS=${ROUNDS:-2}
DURATION=${DURATION:-10}
POOL=${POOL:-20}
CLIENTS=${CLIENTS:-"1 16 64 256"}
MODES=${MODES:-"simple extended prepared"}
STORM_CLIENTS=${STORM_CLIENTS:-16}
JOBS=${JOBS:-2}
SCALE=${SCALE:-10}
WARMUP=${WARMUP:-3}

RESULTS=${RESULTS:-$BENCH_DIR/RESULTS.md}

read -r -a TARGETS <<<"$BENCH_TARGETS"
for t in "${TARGETS[@]}"; do
  case $t in direct | pgbouncer | pgsurge) ;; *) die "unknown target '$t' in BENCH_TARGETS" ;; esac
done
has_target() { [[ " $BENCH_TARGETS " == *" $1 "* ]]; }
for c in $CLIENTS $STORM_CLIENTS; do
  if has_target direct && [ "$c" -gt 390 ]; then die "direct with $c clients exceeds max_connections 400"; fi
done

# build first: a compile failure should not cost a Postgres start
if has_target pgsurge; then pgsurge_build; fi

pg_start
pgbench_init "$SCALE"
pg_super -d app -c "VACUUM ANALYZE" >/dev/null
if has_target pgbouncer; then pgbouncer_start "$POOL" transaction; fi
if has_target pgsurge; then pgsurge_start "$POOL" transaction; fi

TS=$(date -u +%Y%m%dT%H%M%SZ)
mkdir -p "$BENCH_DIR/results"
RAW=$BENCH_DIR/results/raw-$TS.tsv
{
  echo "# command: $BENCH_CMD"
  machine_facts
  echo "# targets: $BENCH_TARGETS"
  echo "# rounds: $ROUNDS"
  echo "# duration_s: $DURATION"
  echo "# pool_size: $POOL"
  echo "# jobs: $JOBS"
  echo "# scale: $SCALE"
  echo "# clk_tck: $CLK_TCK"
  printf 'round\tmode\tcell\tclients\tconnect\ttarget\tduration_s\trc\ttps\tlat_ms\ttx\tfailed\twall_s\tproxy_cpu_s\tpg_cpu_s\tpgbench_cpu_s\tsys_busy_s\n'
} >"$RAW"
# an interrupted run that measured nothing leaves no raw file behind
BENCH_ON_EXIT='grep -q "^[0-9]" "$RAW" 2>/dev/null || rm -f "$RAW"'

alive() { # target: is its proxy (or postgres) still running?
  local p
  p=$(target_pid "$1"); [ -n "$p" ] || p=$PG_PID
  kill -0 "$p" 2>/dev/null
}

# warm-up: fill shared buffers, open the proxies' server connections
for t in "${TARGETS[@]}"; do
  [ "$WARMUP" -gt 0 ] || break
  "$PGBENCH" -n -S -c 16 -j "$JOBS" -T "$WARMUP" "$(target_url "$t")" >"$WORKDIR/warmup-$t.log" 2>&1 \
    || log "warm-up against $t failed: $(grep -v '^pgbench' "$WORKDIR/warmup-$t.log" | tail -n 3 | tr '\n' ' ')"
done

ntargets=${#TARGETS[@]}
cells=()
for c in $CLIENTS; do cells+=("$c"); done
[ "$STORM_CLIENTS" -gt 0 ] && cells+=("storm")
total=0; for _ in $MODES; do total=$((total + ${#cells[@]} * ROUNDS * ntargets)); done
n=0
log "runs: $total x ${DURATION}s (targets: $BENCH_TARGETS; raw: ${RAW#"$MAIN"/})"

for mode in $MODES; do
  for cell in "${cells[@]}"; do
    if [ "$cell" = storm ]; then clients=$STORM_CLIENTS; connect=1; else clients=$cell; connect=0; fi
    j=$JOBS; [ "$clients" -lt "$j" ] && j=$clients
    for ((round = 1; round <= ROUNDS; round++)); do
      # alternate: each round starts with the next target, so no target always runs first
      for ((k = 0; k < ntargets; k++)); do
        t=${TARGETS[$(((k + round - 1) % ntargets))]}
        n=$((n + 1))
        out=$WORKDIR/run-$n-$t-$mode-$cell-$round.log
        if ! alive "$t"; then
          log "[$n/$total] $t $mode $cell r$round: SKIPPED, $t is not running"
          printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\tdead\tNA\tNA\tNA\tNA\tNA\tNA\tNA\tNA\tNA\n' \
            "$round" "$mode" "$cell" "$clients" "$connect" "$t" "$DURATION" >>"$RAW"
          continue
        fi
        args=(-n -S -M "$mode" -c "$clients" -j "$j" -T "$DURATION")
        [ "$connect" = 1 ] && args+=(-C)
        measure_pgbench "$t" "$out" "${args[@]}" "$(target_url "$t")"
        printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' \
          "$round" "$mode" "$cell" "$clients" "$connect" "$t" "$DURATION" "$M_RC" "$M_TPS" "$M_LAT" "$M_TX" \
          "$M_FAILED" "$M_WALL" "$M_PROXY_S" "$M_PG_S" "$M_PGBENCH_S" "$M_SYS_S" >>"$RAW"
        log "[$n/$total] $(printf '%-9s %-8s %-5s r%s' "$t" "$mode" "$cell" "$round"): tps $M_TPS lat ${M_LAT}ms proxy ${M_PROXY_S}s pg ${M_PG_S}s pgbench ${M_PGBENCH_S}s (rc $M_RC)"
        if [ "$M_RC" != 0 ] || [ "$M_TPS" = NA ]; then
          log "  pgbench output: $(grep -v '^\(pgbench (\|transaction type\|scaling factor\|query mode\|number of \(clients\|threads\)\|duration\|maximum number\)' "$out" | tail -n 4 | tr '\n' ' ')"
          lf=$(target_log "$t"); [ -n "$lf" ] && [ -f "$lf" ] && log "  $t log: $(tail -n 4 "$lf" | tr '\n' ' ')"
        fi
      done
    done
  done
done

if has_target pgsurge && ! alive pgsurge; then
  log "pgsurge exited during the run; last log lines:"; tail -n 20 "$SURGE_LOG" >&2
fi
echo "# load_after: $(cut -d' ' -f1-3 /proc/loadavg)" >>"$RAW"

python3 "$BENCH_DIR/report.py" "$RAW" "$RESULTS" || die "report.py failed"
log "wrote ${RESULTS#"$MAIN"/} and ${RAW#"$MAIN"/}"
