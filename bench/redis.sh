#!/usr/bin/env bash
# bench/redis.sh — Redis shared by instances (issue 18). Two measurements, printed as lines to paste into
# bench/RESULTS.md (section "redis"):
#   latency  one pgbench client (-S, prepared) through pgsurge with a rate limit far above what it sends, the limit
#            local and then global through a redis-server on loopback (alternated ROUNDS times): per-transaction
#            p50/p99 from pgbench's logs; the global p99 minus the local p99 is what the limiter's round trip adds.
#   cache    three pgsurge instances --cache --cache-ttl 60s, the same read workload through all three at once
#            (pgbench, one per instance, CLIENTS each, point reads over KEYS keys, prepared): how many times
#            Postgres executed the statement (pg_stat_statements), without and with --cache-redis.
#
#   bench/redis.sh
#
# Environment (defaults in brackets): DURATION [10] s per run   ROUNDS [3]   CLIENTS [4]   KEYS [1000]
#   PGSURGE_BIN [build target/release/pgsurge]
# shellcheck source=bench/lib.sh
. "$(dirname "$0")/lib.sh"
bench_command redis.sh "DURATION ROUNDS CLIENTS KEYS PGSURGE_BIN" "$@"
DURATION=${DURATION:-10}
ROUNDS=${ROUNDS:-3}
CLIENTS=${CLIENTS:-4}
KEYS=${KEYS:-1000}
REDIS=$(command -v redis-server) || die "no redis-server (apt-get install redis-server)"

pgsurge_build
pg_start "shared_preload_libraries = 'pg_stat_statements'"
pgbench_init 1
pg_super -d app -c "CREATE EXTENSION pg_stat_statements" >/dev/null || die "no pg_stat_statements"
RPORT=$(free_port)
"$REDIS" --port "$RPORT" --bind 127.0.0.1 --save '' --appendonly no --dir "$WORKDIR" >"$WORKDIR/redis.log" 2>&1 &
BENCH_PIDS+=("$!")
wait_port 127.0.0.1 "$RPORT" 10 || die "redis-server did not listen"
RURL="redis://127.0.0.1:$RPORT"

# p50 p99 (µs) of pgbench per-transaction logs PREFIX.*
percentiles() {
  cat "$1".* | awk '{print $3}' | sort -n | awk '{a[NR]=$1} END {printf "%d %d %d\n", a[int(NR*0.5)], a[int(NR*0.99)], NR}'
}

log "latency: 1 client, pgbench -S -M prepared, $DURATION s per run, $ROUNDS rounds"
for ((r = 1; r <= ROUNDS; r++)); do
  for mode in local global; do
    extra=(); [ "$mode" = global ] && extra=(--redis "$RURL")
    pgsurge_start 2 transaction --limit-qps-per-user 1000000 "${extra[@]}"
    sleep 1 # Redis connected and the first heartbeat seen (a global limit falls back to local before that)
    prefix=$WORKDIR/lat-$mode-$r
    "$PGBENCH" -n -S -M prepared -c 1 -T "$DURATION" -l --log-prefix "$prefix" "$SURGE_URL" >"$prefix.out" 2>&1 ||
      die "pgbench failed: $(tail -n 3 "$prefix.out")"
    read -r p50 p99 n < <(percentiles "$prefix")
    fb=$(curl -s "http://127.0.0.1:$SURGE_ADMIN/metrics" | awk '$1 == "pgsurge_redis_fallbacks_total" {print $2}')
    echo "latency round=$r limit=$mode transactions=$n p50_us=$p50 p99_us=$p99 redis_fallbacks=${fb:-n/a}"
    kill "$SURGE_PID"; wait "$SURGE_PID" 2>/dev/null
  done
done

cat >"$WORKDIR/read.sql" <<SQL
\set aid random(1, $KEYS)
SELECT abalance FROM pgbench_accounts WHERE aid = :aid;
SQL
log "cache: 3 instances x $CLIENTS clients, $KEYS keys, $DURATION s"
for tier in local redis; do
  redis-cli -p "$RPORT" FLUSHALL >/dev/null
  extra=(--cache --cache-ttl 60s); [ "$tier" = redis ] && extra+=(--redis "$RURL" --cache-redis)
  urls=() pids=()
  for i in 1 2 3; do
    pgsurge_start 4 transaction "${extra[@]}"
    urls+=("$SURGE_URL"); pids+=("$SURGE_PID")
  done
  sleep 1
  pg_super -d app -c "SELECT pg_stat_statements_reset()" >/dev/null
  jobs_=()
  for i in 0 1 2; do
    "$PGBENCH" -n -f "$WORKDIR/read.sql" -M prepared -c "$CLIENTS" -T "$DURATION" "${urls[$i]}" >"$WORKDIR/cache-$tier-$i.out" 2>&1 &
    jobs_+=("$!")
  done
  for j in "${jobs_[@]}"; do wait "$j" || die "pgbench failed: $(tail -n 3 "$WORKDIR"/cache-"$tier"-*.out)"; done
  tx=$(cat "$WORKDIR"/cache-"$tier"-*.out | awk '/number of transactions actually processed/ {s += $6} END {print s}')
  calls=$(pg_super -d app -Atc "SELECT coalesce(sum(calls), 0) FROM pg_stat_statements WHERE query LIKE 'SELECT abalance FROM pgbench_accounts WHERE aid%'")
  echo "cache tier=$tier instances=3 reads=$tx distinct_keys=$KEYS postgres_executions=$calls"
  for p in "${pids[@]}"; do kill "$p"; wait "$p" 2>/dev/null; done
done
