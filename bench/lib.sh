# bench/lib.sh — shared helpers for pgsurge benchmarks. Source it from bench/<workload>.sh.
#
# Starts a throwaway Postgres 15, PgBouncer (Debian package) and pgsurge on loopback, measures
# per-process CPU from /proc, runs bounded pgbench jobs, and tears everything down on exit:
# only the PIDs started here are signalled, Postgres is stopped with `pg_ctl stop -m immediate`,
# temp dirs are removed. Runs as root; Postgres and PgBouncer run as the `postgres` OS user.
#
# Variables set for the caller:
#   BENCH_DIR MAIN WORKDIR PGBIN CLK_TCK NPROC
#   pg_start:        PGPORT PGSOCK PGDATA_DIR PG_PID DIRECT_URL UPSTREAM
#   pgbouncer_start: PGB_PORT PGB_PID PGB_URL
#   pgsurge_build:   PGSURGE
#   pgsurge_start:   SURGE_PORT SURGE_ADMIN SURGE_PID SURGE_URL
# shellcheck shell=bash
set -u
set -o pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
MAIN=$(cd "$BENCH_DIR/.." && pwd)
PGBIN=${PGBIN:-/usr/lib/postgresql/15/bin}
PGBOUNCER_BIN=${PGBOUNCER_BIN:-/usr/sbin/pgbouncer}
PGBENCH=${PGBENCH:-$PGBIN/pgbench}
CLK_TCK=$(getconf CLK_TCK)
NPROC=$(nproc)

WORKDIR=$(mktemp -d /tmp/pgsurge-bench.XXXXXX)
chmod 755 "$WORKDIR"
BENCH_PIDS=()     # daemons we started (postgres is stopped via pg_ctl instead)
BENCH_PGDIRS=()   # data dirs to `pg_ctl stop -m immediate`
BENCH_JOB_PID=""  # the wrapper (/usr/bin/time) of the pgbench currently running, if any

log() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# bench_command SCRIPT "VAR ..." [ARGS...]: sets BENCH_CMD, the command line that reproduces this run: those of the
# listed variables the caller set (call it before the script fills in its defaults), bench/SCRIPT and its arguments.
bench_command() {
  local script=$1 vars=$2 v
  shift 2
  BENCH_CMD=""
  for v in $vars; do
    if [ -n "${!v+x}" ]; then BENCH_CMD+="$v=\"${!v}\" "; fi
  done
  BENCH_CMD+="bench/$script${*:+ $*}"
}

bench_cleanup() {
  local p d
  if [ -n "${BENCH_ON_EXIT:-}" ]; then eval "$BENCH_ON_EXIT"; fi  # a workload's own hook
  if [ -n "$BENCH_JOB_PID" ]; then
    # the running pgbench is the child of our /usr/bin/time wrapper
    for p in $(ps --ppid "$BENCH_JOB_PID" -o pid= 2>/dev/null); do kill "$p" 2>/dev/null; done
    kill "$BENCH_JOB_PID" 2>/dev/null
  fi
  for p in "${BENCH_PIDS[@]}"; do kill "$p" 2>/dev/null; done
  for d in "${BENCH_PGDIRS[@]}"; do
    runuser -u postgres -- "$PGBIN/pg_ctl" -D "$d" -m immediate stop >/dev/null 2>&1
  done
  if [ -n "${BENCH_KEEP_WORKDIR:-}" ]; then log "kept $WORKDIR"; else rm -rf "$WORKDIR"; fi
}
trap bench_cleanup EXIT
trap 'log "interrupted"; exit 130' INT
trap 'log "terminated"; exit 143' TERM

ulimit -n 20000 2>/dev/null || ulimit -n "$(ulimit -Hn)"

free_port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }

wait_port() { # host port seconds
  local i
  for ((i = 0; i < ${3:-20} * 10; i++)); do
    (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null && return 0
    sleep 0.1
  done
  return 1
}

# ---------------------------------------------------------------- CPU accounting (/proc, clock ticks)

# ticks PID [with_children]: utime+stime of a whole process (all threads); with_children adds
# cutime+cstime (CPU of children it already reaped). Prints 0 when the process is gone.
ticks() {
  local line rest flag=${2:-}
  if ! read -r line <"/proc/$1/stat" 2>/dev/null; then echo 0; return; fi
  rest=${line##*) }
  # shellcheck disable=SC2086
  set -- $rest
  # after "pid (comm) ": $1=state ... $12=utime $13=stime $14=cutime $15=cstime
  if [ "$flag" = with_children ]; then echo $((${12} + ${13} + ${14} + ${15})); else echo $((${12} + ${13})); fi
}

# pg_ticks: all Postgres processes: postmaster (+ the backends it reaped) + every live (or zombie) child.
# Consistent snapshot: if the postmaster reaped a child while we listed them (its cutime changed), retry;
# otherwise an exiting backend could be counted twice or not at all.
pg_ticks() {
  local a1 a2 t p i
  for ((i = 0; i < 20; i++)); do
    a1=$(ticks "$PG_PID" with_children)
    t=0
    for p in $(ps --ppid "$PG_PID" -o pid= 2>/dev/null); do t=$((t + $(ticks "$p"))); done
    a2=$(ticks "$PG_PID" with_children)
    [ "$a1" = "$a2" ] && break
  done
  echo $((a2 + t))
}

pg_nchildren() { ps --ppid "$PG_PID" -o pid= 2>/dev/null | wc -l; }

# pg_settle N: wait (up to 3 s) until the postmaster has at most N children, so that backends of
# clients that just disconnected have exited and been reaped into the postmaster's cutime.
pg_settle() {
  local i
  for ((i = 0; i < 30; i++)); do
    [ "$(pg_nchildren)" -le "$1" ] && return 0
    sleep 0.1
  done
  return 1
}

# sys_busy_ticks: machine-wide non-idle ticks (all CPUs) from /proc/stat.
sys_busy_ticks() {
  local cpu user nice system idle iowait irq softirq steal rest
  read -r cpu user nice system idle iowait irq softirq steal rest </proc/stat
  echo $((user + nice + system + irq + softirq + steal))
}

# idle_ticks: machine-wide idle+iowait ticks (all CPUs) from /proc/stat; the complement of sys_busy_ticks.
idle_ticks() {
  local cpu user nice system idle iowait rest
  read -r cpu user nice system idle iowait rest </proc/stat
  echo $((idle + iowait))
}

# ctx_switches PID...: "voluntary involuntary" context switches summed over every thread of the given processes
# (voluntary: it waited for something; involuntary: the scheduler took its core while it had work).
ctx_switches() {
  local p
  for p in "$@"; do cat /proc/"$p"/task/*/status 2>/dev/null; done |
    awk '/^voluntary_ctxt/{v+=$2} /^nonvoluntary_ctxt/{n+=$2} END{print v+0, n+0}'
}

ticks_to_s() { python3 -c "print(f'{$1/$CLK_TCK:.3f}')"; }

# ---------------------------------------------------------------- Postgres

pg_super() { runuser -u postgres -- "$PGBIN/psql" -X -q -h "$PGSOCK" -p "$PGPORT" -U postgres -v ON_ERROR_STOP=1 "$@"; }

# pg_start [extra postgresql.conf lines...]: throwaway cluster, role app/app owning db app.
# pgbench_init SCALE: loads pgbench's tables into the direct database.
pgbench_init() {
  log "pgbench -i -s $1"
  "$PGBENCH" -i -s "$1" -q "$DIRECT_URL" >"$WORKDIR/init.log" 2>&1 || die "pgbench -i failed: $(tail -n 5 "$WORKDIR/init.log")"
}

pg_start() {
  local d=$WORKDIR/pg line
  PGPORT=$(free_port)
  PGDATA_DIR=$d
  install -d -o postgres -g postgres -m 700 "$d"
  runuser -u postgres -- "$PGBIN/initdb" -D "$d" -U postgres --auth-local=trust --auth-host=scram-sha-256 \
    -E UTF8 --locale=C.UTF-8 >"$WORKDIR/initdb.log" 2>&1 || die "initdb failed: $(tail -n 3 "$WORKDIR/initdb.log")"
  cat >>"$d/postgresql.conf" <<CONF
listen_addresses = '127.0.0.1'
port = $PGPORT
unix_socket_directories = '$d'
max_connections = 400
fsync = off
synchronous_commit = off
full_page_writes = off
shared_buffers = 256MB
password_encryption = 'scram-sha-256'
CONF
  for line in "$@"; do echo "$line" >>"$d/postgresql.conf"; done
  runuser -u postgres -- "$PGBIN/pg_ctl" -D "$d" -l "$d/log" -w -t 60 start >/dev/null \
    || die "postgres did not start: $(tail -n 5 "$d/log")"
  BENCH_PGDIRS+=("$d")
  PGSOCK=$d
  PG_PID=$(head -n1 "$d/postmaster.pid")
  pg_super -c "CREATE ROLE app LOGIN PASSWORD 'app'" -c "CREATE DATABASE app OWNER app" >/dev/null \
    || die "cannot create role/database app"
  DIRECT_URL="postgres://app:app@127.0.0.1:$PGPORT/app"
  UPSTREAM=$DIRECT_URL
  log "postgres $("$PGBIN/postgres" --version | awk '{print $3}') on 127.0.0.1:$PGPORT (postmaster pid $PG_PID)"
}

# ---------------------------------------------------------------- PgBouncer

# pgbouncer_start POOL_SIZE [pool_mode] [upstream host: 127.0.0.1, or a socket directory such as $PGSOCK]
pgbouncer_start() {
  local pool=$1 mode=${2:-transaction} host=${3:-127.0.0.1} d=$WORKDIR/pgbouncer${3:+-${3//\//_}} secret
  [ -x "$PGBOUNCER_BIN" ] || die "no $PGBOUNCER_BIN (apt-get install pgbouncer)"
  PGB_PORT=$(free_port)
  install -d -o postgres -g postgres -m 750 "$d"
  secret=$(pg_super -d postgres -Atc "SELECT rolpassword FROM pg_authid WHERE rolname='app'") || die "cannot read app's secret"
  printf '"app" "%s"\n' "$secret" >"$d/userlist.txt"
  cat >"$d/pgbouncer.ini" <<INI
[databases]
app = host=$host port=$PGPORT dbname=app
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $PGB_PORT
unix_socket_dir =
auth_type = scram-sha-256
auth_file = $d/userlist.txt
pool_mode = $mode
default_pool_size = $pool
max_client_conn = ${PGB_MAX_CLIENT_CONN:-5000}
ignore_startup_parameters = extra_float_digits
logfile = $d/pgbouncer.log
pidfile = $d/pgbouncer.pid
INI
  chown -R postgres:postgres "$d"
  chmod 600 "$d/userlist.txt"
  runuser -u postgres -- bash -c "ulimit -n 20000 && exec $PGBOUNCER_BIN -d $d/pgbouncer.ini" \
    >"$WORKDIR/pgbouncer.start.log" 2>&1 || die "pgbouncer did not start: $(cat "$WORKDIR/pgbouncer.start.log")"
  wait_port 127.0.0.1 "$PGB_PORT" 10 || die "pgbouncer did not listen: $(tail -n 5 "$d/pgbouncer.log")"
  PGB_PID=$(cat "$d/pgbouncer.pid")
  BENCH_PIDS+=("$PGB_PID")
  PGB_URL="postgres://app:app@127.0.0.1:$PGB_PORT/app"
  PGB_LOG=$d/pgbouncer.log
  log "pgbouncer $("$PGBOUNCER_BIN" --version | awk 'NR==1{print $2}') on 127.0.0.1:$PGB_PORT (pid $PGB_PID, pool $pool, $mode)"
}

# ---------------------------------------------------------------- pgsurge

# pgsurge_build: sets PGSURGE to $PGSURGE_BIN, or builds target/release/pgsurge.
pgsurge_build() {
  if [ -n "${PGSURGE_BIN:-}" ]; then
    PGSURGE=$PGSURGE_BIN
  else
    [ -f "$MAIN/Cargo.toml" ] || die "no Cargo.toml in $MAIN"
    log "cargo build --release (set PGSURGE_BIN to skip)"
    (cd "$MAIN" && cargo build --release --quiet) >"$WORKDIR/build.log" 2>&1 \
      || die "cargo build --release failed: $(tail -n 20 "$WORKDIR/build.log")"
    PGSURGE=${CARGO_TARGET_DIR:-$MAIN/target}/release/pgsurge
  fi
  [ -x "$PGSURGE" ] || die "no pgsurge binary at $PGSURGE"
}

# pgsurge_start POOL_SIZE [pool_mode] [extra args...]
pgsurge_start() {
  local pool=$1 mode=${2:-transaction}
  shift; [ $# -gt 0 ] && shift
  SURGE_PORT=$(free_port)
  SURGE_ADMIN=$(free_port)
  SURGE_LOG=$WORKDIR/pgsurge.log
  "$PGSURGE" --upstream "$UPSTREAM" --listen "127.0.0.1:$SURGE_PORT" --admin-listen "127.0.0.1:$SURGE_ADMIN" \
    --pool-size "$pool" --pool-mode "$mode" "$@" >"$SURGE_LOG" 2>&1 &
  SURGE_PID=$!
  BENCH_PIDS+=("$SURGE_PID")
  local i
  for ((i = 0; i < 200; i++)); do
    (exec 3<>"/dev/tcp/127.0.0.1/$SURGE_PORT") 2>/dev/null && break
    if ! kill -0 "$SURGE_PID" 2>/dev/null; then
      wait "$SURGE_PID"
      die "pgsurge exited with status $? before listening on 127.0.0.1:$SURGE_PORT; log: $(tail -n 10 "$SURGE_LOG")"
    fi
    sleep 0.1
  done
  [ "$i" -lt 200 ] || die "pgsurge did not listen within 20 s: $(tail -n 10 "$SURGE_LOG")"
  SURGE_URL="postgres://app:app@127.0.0.1:$SURGE_PORT/app"
  log "pgsurge on 127.0.0.1:$SURGE_PORT admin $SURGE_ADMIN (pid $SURGE_PID, pool $pool, $mode)"
}

# ---------------------------------------------------------------- targets

target_url() {
  case $1 in
    direct) echo "$DIRECT_URL" ;;
    pgbouncer) echo "$PGB_URL" ;;
    pgsurge) echo "$SURGE_URL" ;;
    pgbouncer-unix) echo "$PGB_UNIX_URL" ;;
    pgsurge-unix) echo "$SURGE_UNIX_URL" ;;
    *) die "unknown target $1" ;;
  esac
}

target_pid() { # proxy pid, empty for direct
  case $1 in
    pgbouncer) echo "$PGB_PID" ;;
    pgsurge) echo "$SURGE_PID" ;;
    pgbouncer-unix) echo "$PGB_UNIX_PID" ;;
    pgsurge-unix) echo "$SURGE_UNIX_PID" ;;
    *) echo "" ;;
  esac
}

target_log() {
  case $1 in
    pgbouncer) echo "${PGB_LOG:-}" ;;
    pgsurge) echo "${SURGE_LOG:-}" ;;
    *) echo "$PGDATA_DIR/log" ;;
  esac
}

# ---------------------------------------------------------------- one measured pgbench run

# measure_pgbench TARGET OUTFILE pgbench-args...
# Runs pgbench (through /usr/bin/time for its own CPU) and samples CPU around it. Sets:
#   M_RC M_TPS M_LAT M_TX M_FAILED M_WALL M_PROXY_S M_PG_S M_PGBENCH_S M_SYS_S
measure_pgbench() {
  local target=$1 out=$2 ppid p0 p1 g0 g1 s0 s1 t0 t1 tf n0
  shift 2
  ppid=$(target_pid "$target")
  tf=$out.time
  n0=$(pg_nchildren)
  p0=0; [ -n "$ppid" ] && p0=$(ticks "$ppid")
  g0=$(pg_ticks); s0=$(sys_busy_ticks); t0=$(date +%s.%N)
  /usr/bin/time -f '%U %S' -o "$tf" "$PGBENCH" "$@" >"$out" 2>&1 &
  BENCH_JOB_PID=$!
  wait "$BENCH_JOB_PID"; M_RC=$?
  BENCH_JOB_PID=""
  # direct: pgbench's backends are exiting now; let them finish so their CPU is counted
  [ -z "$ppid" ] && pg_settle "$n0"
  t1=$(date +%s.%N)
  s1=$(sys_busy_ticks); g1=$(pg_ticks)
  p1=0; [ -n "$ppid" ] && p1=$(ticks "$ppid")
  M_TPS=$(sed -n 's/^tps = \([0-9.]*\).*/\1/p' "$out" | head -n1)
  M_LAT=$(sed -n 's/^latency average = \([0-9.]*\) ms.*/\1/p' "$out" | head -n1)
  M_TX=$(sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' "$out" | head -n1)
  M_FAILED=$(sed -n 's/^number of failed transactions: \([0-9]*\).*/\1/p' "$out" | head -n1)
  M_WALL=$(python3 -c "print(f'{$t1-$t0:.3f}')")
  if [ -n "$ppid" ]; then M_PROXY_S=$(ticks_to_s $((p1 - p0))); else M_PROXY_S=NA; fi
  M_PG_S=$(ticks_to_s $((g1 - g0)))
  M_SYS_S=$(ticks_to_s $((s1 - s0)))
  M_PGBENCH_S=$(awk 'NF==2 && $1 ~ /^[0-9.]+$/ {printf "%.3f", $1+$2}' "$tf" 2>/dev/null)
  : "${M_TPS:=NA}" "${M_LAT:=NA}" "${M_TX:=NA}" "${M_FAILED:=0}" "${M_PGBENCH_S:=NA}"
}

# machine/version facts as "# key: value" lines (the header of a raw TSV)
machine_facts() {
  local commit dirty
  commit=$(git -C "$MAIN" rev-parse --short=12 HEAD 2>/dev/null || echo "none (no commit yet)")
  dirty=$(git -C "$MAIN" status --porcelain -- src Cargo.toml Cargo.lock 2>/dev/null | wc -l)
  [ "$dirty" -gt 0 ] && commit="$commit + uncommitted changes"
  echo "# date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
  echo "# nproc: $NPROC"
  echo "# cpu: $(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n1)"
  echo "# memory: $(awk '/^MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo)"
  echo "# kernel: $(uname -r)"
  echo "# postgres: $("$PGBIN/postgres" --version)"
  echo "# pgbench: $("$PGBENCH" --version)"
  echo "# pgbouncer: $("$PGBOUNCER_BIN" --version 2>/dev/null | head -n1)"
  echo "# pgsurge_commit: $commit"
  if [ -n "${PGSURGE:-}" ] && [ -f "$PGSURGE" ]; then
    echo "# pgsurge_bin: $PGSURGE (sha256 $(sha256sum "$PGSURGE" | cut -c1-12), built $(date -u -r "$PGSURGE" '+%Y-%m-%d %H:%M UTC'))"
  else
    echo "# pgsurge_bin: not used"
  fi
  echo "# load_before: $(cut -d' ' -f1-3 /proc/loadavg)"
}
