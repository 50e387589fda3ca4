#!/usr/bin/env bash
# bench/cache.sh — read cache (issue 5): a read-heavy pgbench workload with a skewed (Zipf) key choice over the
# 100k rows of pgbench_accounts (scale 1), 64 clients, 10 server connections, 5% writes, through direct Postgres,
# PgBouncer (transaction mode), pgsurge with the cache off, and pgsurge with `--cache` (a second pgsurge process on
# its own port), alternating within each round. Two workload variants, each measured on all four targets:
#   same-table   the 5% writes UPDATE pgbench_accounts (the table the reads read): every write voids every
#                cached row of that table (invalidation is per table)
#   other-table  the 5% writes INSERT into pgbench_history: the reads' cache entries live out their TTL
# Reports tps, p50/p99 latency (pgbench per-transaction logs), hit ratio (pgsurge console SHOW CACHE / SHOW CACHE
# STATEMENTS), staleness observed (a checker beside every run writes a row through the target and reads it back on
# two other connections; a read that returns a value older than the write's is stale) and the CPU that Postgres,
# the proxy and pgbench each used.
#
#   bench/cache.sh
#
# Environment (defaults in brackets): DURATION [15] s per run   ROUNDS [2]   CLIENTS [64]   POOL [10]   JOBS [2]
#   WARMUP [2] s of unmeasured load per target and variant   ZIPF [1.1] random_zipfian parameter
#   WRITE_PCT [5]   RANGE_PCT [20] share of small-range SELECTs (10 rows), the rest are point SELECTs
#   MODE [extended] pgbench -M (PgBouncer 1.18 has no prepared statements in transaction mode)
#   VARIANTS ["same-table other-table"]   TARGETS ["direct pgbouncer pgsurge pgsurge-cache"]
#   CACHE_TTL [pgsurge's default, 1s] `[cache] default_ttl` of the cache-on pgsurge
#   CACHE_NOTIFY [0] 1: the cache-on pgsurge also runs `--cache-notify` (announces its writes through Postgres)
#   CHECK_PACE_MS [5] pause between staleness-checker iterations   PGSURGE_BIN   RESULTS [bench/RESULTS.md]
# Writes bench/results/cache-<timestamp>.tsv and the cache section of bench/RESULTS.md.

# shellcheck source=bench/lib.sh
. "$(dirname "$0")/lib.sh"
bench_command cache.sh "DURATION ROUNDS CLIENTS POOL JOBS WARMUP ZIPF WRITE_PCT RANGE_PCT MODE VARIANTS TARGETS CACHE_TTL CACHE_NOTIFY CHECK_PACE_MS PGSURGE_BIN" "$@"
DURATION=${DURATION:-15}
ROUNDS=${ROUNDS:-2}
CLIENTS=${CLIENTS:-64}
POOL=${POOL:-10}
JOBS=${JOBS:-2}
WARMUP=${WARMUP:-2}
ZIPF=${ZIPF:-1.1}
WRITE_PCT=${WRITE_PCT:-5}
RANGE_PCT=${RANGE_PCT:-20}
MODE=${MODE:-extended}
VARIANTS=${VARIANTS:-same-table other-table}
TARGETS=${TARGETS:-direct pgbouncer pgsurge pgsurge-cache}
CACHE_TTL=${CACHE_TTL:-}
CACHE_NOTIFY=${CACHE_NOTIFY:-0}
CHECK_PACE_MS=${CHECK_PACE_MS:-5}
SCALE=1
ROWS=100000
POINT_PCT=$((100 - WRITE_PCT - RANGE_PCT))

RESULTS=${RESULTS:-$BENCH_DIR/RESULTS.md}
read -r -a TARGET_LIST <<<"$TARGETS"
read -r -a VARIANT_LIST <<<"$VARIANTS"
has_target() { [[ " $TARGETS " == *" $1 "* ]]; }
[ "$POINT_PCT" -gt 0 ] || die "WRITE_PCT + RANGE_PCT must be below 100"

case " $TARGETS " in *" pgsurge"*) pgsurge_build ;; esac
pg_start
pgbench_init "$SCALE"
# the staleness checker's own table, so its writes do not void the workload's entries
pg_super -d app -c "CREATE TABLE bench_stale (id int PRIMARY KEY, v bigint NOT NULL)" \
  -c "INSERT INTO bench_stale SELECT g, 0 FROM generate_series(1, 10) g" -c "ALTER TABLE bench_stale OWNER TO app" \
  -c "VACUUM ANALYZE" >/dev/null || die "cannot create bench_stale"

# ---------------------------------------------------------------- targets

has_target pgbouncer && pgbouncer_start "$POOL" transaction
if has_target pgsurge; then
  pgsurge_start "$POOL" transaction --admin-users app
  mv "$SURGE_LOG" "$WORKDIR/pgsurge-off.log"
  OFF_PID=$SURGE_PID OFF_PORT=$SURGE_PORT OFF_URL=$SURGE_URL OFF_LOG=$WORKDIR/pgsurge-off.log
fi
if has_target pgsurge-cache; then
  cache_args=(--cache)
  [ -n "$CACHE_TTL" ] && cache_args+=(--cache-ttl "$CACHE_TTL")
  [ "$CACHE_NOTIFY" = 1 ] && cache_args+=(--cache-notify)
  pgsurge_start "$POOL" transaction --admin-users app "${cache_args[@]}"
  mv "$SURGE_LOG" "$WORKDIR/pgsurge-cache.log"
  ON_PID=$SURGE_PID ON_PORT=$SURGE_PORT ON_URL=$SURGE_URL ON_LOG=$WORKDIR/pgsurge-cache.log
fi

# select TARGET: point lib.sh's pgsurge variables at the right instance; prints lib.sh's target name
select_target() {
  case $1 in
    pgsurge) SURGE_PID=$OFF_PID SURGE_PORT=$OFF_PORT SURGE_URL=$OFF_URL SURGE_LOG=$OFF_LOG ;;
    pgsurge-cache) SURGE_PID=$ON_PID SURGE_PORT=$ON_PORT SURGE_URL=$ON_URL SURGE_LOG=$ON_LOG ;;
  esac
}
lib_name() { case $1 in pgsurge*) echo pgsurge ;; *) echo "$1" ;; esac; }
port_of() { local u; u=$(target_url "$(lib_name "$1")"); u=${u##*:}; echo "${u%%/*}"; }
alive() { local p; p=$(target_pid "$(lib_name "$1")"); [ -n "$p" ] || p=$PG_PID; kill -0 "$p" 2>/dev/null; }

# ---------------------------------------------------------------- workload scripts

cat >"$WORKDIR/point.sql" <<SQL
\\set aid random_zipfian(1, $ROWS, $ZIPF)
SELECT abalance FROM pgbench_accounts WHERE aid = :aid;
SQL
cat >"$WORKDIR/range.sql" <<SQL
\\set aid random_zipfian(1, $((ROWS - 9)), $ZIPF)
\\set aid2 :aid + 9
SELECT aid, abalance FROM pgbench_accounts WHERE aid BETWEEN :aid AND :aid2;
SQL
cat >"$WORKDIR/write-same-table.sql" <<SQL
\\set aid random_zipfian(1, $ROWS, $ZIPF)
\\set delta random(-5000, 5000)
UPDATE pgbench_accounts SET abalance = abalance + :delta WHERE aid = :aid;
SQL
cat >"$WORKDIR/write-other-table.sql" <<SQL
\\set aid random_zipfian(1, $ROWS, $ZIPF)
\\set bid random(1, $SCALE)
\\set tid random(1, $((10 * SCALE)))
\\set delta random(-5000, 5000)
INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (:tid, :bid, :aid, :delta, CURRENT_TIMESTAMP);
SQL

# ---------------------------------------------------------------- staleness checker (python3 stdlib client)

cat >"$WORKDIR/stale_check.py" <<'PY'
"""Write a row through the target on one connection; read it back on two others (extended and simple protocol)
right after the write returned. A read that returns less than the value the UPDATE ... RETURNING gave is stale.
Each row is read twice before its write, so with the cache on the entry is cached when the write happens.
usage: stale_check.py PORT SECONDS PACE_MS -> prints: checks stale writes reads errors"""
import base64, hashlib, hmac, os, socket, struct, sys, time

class PgError(Exception):
    pass

class Conn:
    def __init__(self, port, user="app", password="app", db="app"):
        self.s = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""
        body = struct.pack("!I", 196608) + b"user\0" + user.encode() + b"\0database\0" + db.encode() + b"\0\0"
        self.s.sendall(struct.pack("!I", len(body) + 4) + body)
        first_bare = None
        while True:
            t, m = self.recv()
            if t == b"R":
                code = struct.unpack("!I", m[:4])[0]
                if code == 3:
                    self.send(b"p", password.encode() + b"\0")
                elif code == 5:
                    inner = hashlib.md5((password + user).encode()).hexdigest().encode()
                    self.send(b"p", b"md5" + hashlib.md5(inner + m[4:8]).hexdigest().encode() + b"\0")
                elif code == 10:
                    first_bare = "n=,r=" + base64.b64encode(os.urandom(18)).decode()
                    msg = ("n,," + first_bare).encode()
                    self.send(b"p", b"SCRAM-SHA-256\0" + struct.pack("!i", len(msg)) + msg)
                elif code == 11:
                    server_first = m[4:].decode()
                    a = dict(kv.split("=", 1) for kv in server_first.split(","))
                    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), base64.b64decode(a["s"]), int(a["i"]))
                    ck = hmac.new(salted, b"Client Key", "sha256").digest()
                    final = "c=biws,r=" + a["r"]
                    sig = hmac.new(hashlib.sha256(ck).digest(), f"{first_bare},{server_first},{final}".encode(), "sha256").digest()
                    proof = base64.b64encode(bytes(x ^ y for x, y in zip(ck, sig))).decode()
                    self.send(b"p", (final + ",p=" + proof).encode())
                elif code not in (0, 12):
                    raise PgError(f"unsupported auth {code}")
            elif t == b"E":
                raise PgError(m.decode(errors="replace"))
            elif t == b"Z":
                return

    def send(self, t, body):
        self.s.sendall(t + struct.pack("!I", len(body) + 4) + body)

    def recv(self):
        while True:
            if len(self.buf) >= 5:
                n = struct.unpack("!I", self.buf[1:5])[0]
                if len(self.buf) >= n + 1:
                    t, m, self.buf = self.buf[:1], self.buf[5:n + 1], self.buf[n + 1:]
                    return t, m
            d = self.s.recv(65536)
            if not d:
                raise PgError("connection closed")
            self.buf += d

    def result(self):
        """first column of the first row, until ReadyForQuery"""
        val, err = None, None
        while True:
            t, m = self.recv()
            if t == b"D" and val is None:
                n = struct.unpack("!i", m[2:6])[0]
                val = m[6:6 + n].decode() if n >= 0 else None
            elif t == b"E":
                err = m.decode(errors="replace")
            elif t == b"Z":
                if err:
                    raise PgError(err)
                return val

    def simple(self, sql):
        self.send(b"Q", sql.encode() + b"\0")
        return self.result()

    def extended(self, sql, *params):
        ps = [str(p).encode() for p in params]
        bind = b"\0\0" + struct.pack("!hh", 1, 0) + struct.pack("!h", len(ps))
        for p in ps:
            bind += struct.pack("!i", len(p)) + p
        bind += struct.pack("!hh", 1, 0)
        out = bytearray()
        for t, b in ((b"P", b"\0" + sql.encode() + b"\0" + struct.pack("!h", 0)), (b"B", bind),
                     (b"D", b"P\0"), (b"E", b"\0" + struct.pack("!i", 0)), (b"S", b"")):
            out += t + struct.pack("!I", len(b) + 4) + b
        self.s.sendall(out)
        return self.result()

def main():
    port, seconds, pace = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]) / 1000
    checks = stale = writes = reads = errors = 0
    deadline = time.monotonic() + seconds
    try:
        w, r1, r2 = Conn(port), Conn(port), Conn(port)
        k = 0
        read1 = lambda k: int(r1.extended("SELECT v FROM bench_stale WHERE id = $1", k))
        read2 = lambda k: int(r2.simple(f"SELECT v FROM bench_stale WHERE id = {k}"))
        while time.monotonic() < deadline:
            k = k % 10 + 1
            try:
                for _ in range(2):  # fill, then (cache on) a hit: the entry is cached before the write
                    read1(k); read2(k); reads += 2
                n = int(w.simple(f"UPDATE bench_stale SET v = v + 1 WHERE id = {k} RETURNING v"))
                writes += 1
                for rd in (read1, read2):
                    got = rd(k); reads += 1; checks += 1
                    if got < n:
                        stale += 1
            except PgError:
                errors += 1
            time.sleep(pace)
    except (PgError, OSError) as e:
        print(f"checker: {e}", file=sys.stderr)
        errors += 1
    print(checks, stale, writes, reads, errors)

main()
PY

# ---------------------------------------------------------------- cache console snapshots

cache_snapshot() { # PORT FILE: SHOW CACHE and SHOW CACHE STATEMENTS, tab separated with headers
  {
    "$PGBIN/psql" -X -A -F $'\t' -P footer=off "postgres://app:app@127.0.0.1:$1/pgsurge" -c 'SHOW CACHE' &&
      echo "--" &&
      "$PGBIN/psql" -X -A -F $'\t' -P footer=off "postgres://app:app@127.0.0.1:$1/pgsurge" -c 'SHOW CACHE STATEMENTS'
  } >"$2" 2>&1
}

# cache_diff BEFORE AFTER: hits misses coalesced invalidations workload_hits workload_misses checker_hits checker_misses
cache_diff() {
  python3 - "$1" "$2" <<'PY'
import sys
def load(path):
    text = open(path).read()
    top, _, stm = text.partition("\n--\n")
    lines = [l for l in top.splitlines() if l.strip()]
    head, row = lines[0].split("\t"), lines[1].split("\t")
    tot = dict(zip(head, row))
    st = {}
    lines = [l for l in stm.splitlines() if l.strip()]
    h = lines[0].split("\t")
    for l in lines[1:]:
        d = dict(zip(h, l.split("\t")))
        st[d["statement"]] = (int(d["hits"]), int(d["misses"]))
    return tot, st
try:
    (a, sa), (b, sb) = load(sys.argv[1]), load(sys.argv[2])
except Exception as e:
    print("NA\tNA\tNA\tNA\tNA\tNA\tNA\tNA"); sys.exit(0)
d = lambda k: int(b[k]) - int(a[k])
wl, ck = [0, 0], [0, 0]
for s, (h, m) in sb.items():
    h0, m0 = sa.get(s, (0, 0))
    acc = ck if "bench_stale" in s else wl if "pgbench_accounts" in s else None
    if acc is not None:
        acc[0] += h - h0; acc[1] += m - m0
print("\t".join(str(x) for x in (d("hits"), d("misses"), d("coalesced"), d("invalidations"), wl[0], wl[1], ck[0], ck[1])))
PY
}

# latencies LOGPREFIX: p50 p99 (all), read p50 p99, write p50 p99, in ms, from pgbench's per-transaction logs
latencies() {
  python3 - "$1" <<'PY'
import glob, sys
allv, reads, writes = [], [], []
for f in glob.glob(sys.argv[1] + ".*"):
    for line in open(f):
        p = line.split()
        if len(p) >= 4 and p[2].isdigit():
            v = int(p[2]) / 1000.0
            allv.append(v)
            (writes if p[3] == "2" else reads).append(v)
def q(lat, x):
    return f"{lat[min(len(lat) - 1, int(x * len(lat)))]:.3f}" if lat else "NA"
out = []
for lat in (allv, reads, writes):
    lat.sort()
    out += [q(lat, 0.50), q(lat, 0.99)]
print("\t".join(out))
PY
}

# ---------------------------------------------------------------- raw file

TS=$(date -u +%Y%m%dT%H%M%SZ)
mkdir -p "$BENCH_DIR/results"
RAW=$BENCH_DIR/results/cache-$TS.tsv
{
  echo "# command: $BENCH_CMD"
  machine_facts
  echo "# targets: $TARGETS"
  echo "# variants: $VARIANTS"
  echo "# rounds: $ROUNDS"
  echo "# duration_s: $DURATION"
  echo "# clients: $CLIENTS"
  echo "# jobs: $JOBS"
  echo "# pool_size: $POOL"
  echo "# mode: $MODE"
  echo "# mix: point $POINT_PCT% range $RANGE_PCT% write $WRITE_PCT%"
  echo "# zipf: $ZIPF"
  echo "# rows: $ROWS"
  echo "# cache_ttl: ${CACHE_TTL:-default (1s)}"
  echo "# cache_notify: $CACHE_NOTIFY"
  echo "# check_pace_ms: $CHECK_PACE_MS"
  echo "# clk_tck: $CLK_TCK"
  printf 'variant\tround\ttarget\tduration_s\trc\ttps\tlat_ms\ttx\tfailed\twall_s\tproxy_cpu_s\tpg_cpu_s\tpgbench_cpu_s\tsys_busy_s\tchecker_cpu_s'
  printf '\tp50_ms\tp99_ms\tread_p50_ms\tread_p99_ms\twrite_p50_ms\twrite_p99_ms'
  printf '\thits\tmisses\tcoalesced\tinvalidations\twl_hits\twl_misses\tchk_hits\tchk_misses'
  printf '\tchk_checks\tchk_stale\tchk_writes\tchk_reads\tchk_errors\n'
} >"$RAW"
CHECK_PID=""
# an interrupted run that measured nothing leaves no raw file behind; a running checker is stopped
BENCH_ON_EXIT='if [ -n "$CHECK_PID" ]; then for p in $(ps --ppid "$CHECK_PID" -o pid=); do kill "$p"; done; kill "$CHECK_PID"; fi 2>/dev/null; grep -q "^[a-z-]*	[0-9]" "$RAW" 2>/dev/null || rm -f "$RAW"'

mkdir -p "$WORKDIR/logs"
ntargets=${#TARGET_LIST[@]}
total=$((${#VARIANT_LIST[@]} * ROUNDS * ntargets))
n=0
log "runs: $total x ${DURATION}s ($CLIENTS clients, pool $POOL, -M $MODE; raw: ${RAW#"$MAIN"/})"

for variant in "${VARIANT_LIST[@]}"; do
  scripts=(-f "$WORKDIR/point.sql@$POINT_PCT" -f "$WORKDIR/range.sql@$RANGE_PCT")
  [ "$WRITE_PCT" -gt 0 ] && scripts+=(-f "$WORKDIR/write-$variant.sql@$WRITE_PCT")
  # warm-up per target: shared buffers, server connections, the cache's statement analyses
  for t in "${TARGET_LIST[@]}"; do
    [ "$WARMUP" -gt 0 ] || break
    select_target "$t"
    "$PGBENCH" -n -M "$MODE" -c "$CLIENTS" -j "$JOBS" -T "$WARMUP" "${scripts[@]}" "$(target_url "$(lib_name "$t")")" \
      >"$WORKDIR/warmup-$variant-$t.log" 2>&1 \
      || log "warm-up of $variant against $t failed: $(tail -n 3 "$WORKDIR/warmup-$variant-$t.log" | tr '\n' ' ')"
  done
  for ((round = 1; round <= ROUNDS; round++)); do
    # alternate: each round starts with the next target
    for ((k = 0; k < ntargets; k++)); do
      t=${TARGET_LIST[$(((k + round - 1) % ntargets))]}
      n=$((n + 1))
      select_target "$t"
      if ! alive "$t"; then
        log "[$n/$total] $variant $t r$round: SKIPPED, $t is not running"
        printf '%s\t%s\t%s\t%s\tdead' "$variant" "$round" "$t" "$DURATION" >>"$RAW"
        for _ in $(seq 29); do printf '\tNA' >>"$RAW"; done
        echo >>"$RAW"
        continue
      fi
      out=$WORKDIR/run-$n-$variant-$t-$round.log
      lp=$WORKDIR/logs/tx-$n
      port=$(port_of "$t")
      [ "$t" = pgsurge-cache ] && cache_snapshot "$port" "$WORKDIR/cache-$n.before"
      /usr/bin/time -f '%U %S' -o "$WORKDIR/check-$n.time" \
        python3 "$WORKDIR/stale_check.py" "$port" "$DURATION" "$CHECK_PACE_MS" >"$WORKDIR/check-$n.out" 2>&1 &
      CHECK_PID=$!
      sleep 0.3  # its connections are open (and counted) before the measurement starts
      measure_pgbench "$(lib_name "$t")" "$out" -n -M "$MODE" -c "$CLIENTS" -j "$JOBS" -T "$DURATION" \
        -l --log-prefix="$lp" "${scripts[@]}" "$(target_url "$(lib_name "$t")")"
      wait "$CHECK_PID"
      CHECK_PID=""
      read -r c_checks c_stale c_writes c_reads c_errors < <(tail -n 1 "$WORKDIR/check-$n.out")
      c_cpu=$(awk 'NF==2 && $1 ~ /^[0-9.]+$/ {printf "%.3f", $1+$2}' "$WORKDIR/check-$n.time" 2>/dev/null)
      if [ "$t" = pgsurge-cache ]; then
        cache_snapshot "$port" "$WORKDIR/cache-$n.after"
        cd_line=$(cache_diff "$WORKDIR/cache-$n.before" "$WORKDIR/cache-$n.after")
      else
        cd_line=$'NA\tNA\tNA\tNA\tNA\tNA\tNA\tNA'
      fi
      lat_line=$(latencies "$lp")
      rm -f "$lp".*
      printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' \
        "$variant" "$round" "$t" "$DURATION" "$M_RC" "$M_TPS" "$M_LAT" "$M_TX" "$M_FAILED" "$M_WALL" "$M_PROXY_S" \
        "$M_PG_S" "$M_PGBENCH_S" "$M_SYS_S" "${c_cpu:-NA}" "$lat_line" "$cd_line" \
        "${c_checks:-NA}" "${c_stale:-NA}" "${c_writes:-NA}" "${c_reads:-NA}" "${c_errors:-NA}" >>"$RAW"
      hr=""
      if [ "$t" = pgsurge-cache ]; then
        hr=$(echo "$cd_line" | awk -F'\t' '$1 != "NA" && $1 + $2 > 0 {printf " hit %.3f", $1 / ($1 + $2)}')
      fi
      log "[$n/$total] $(printf '%-11s %-13s r%s' "$variant" "$t" "$round"): tps $M_TPS p50/p99 $(echo "$lat_line" | cut -f1,2 | tr '\t' '/') ms$hr proxy ${M_PROXY_S}s pg ${M_PG_S}s pgbench ${M_PGBENCH_S}s stale ${c_stale:-NA}/${c_checks:-NA} (rc $M_RC)"
      if [ "$M_RC" != 0 ] || [ "$M_TPS" = NA ]; then
        log "  pgbench output: $(grep -v '^\(pgbench (\|transaction type\|scaling factor\|query mode\|number of \(clients\|threads\)\|duration\|maximum number\)' "$out" | tail -n 4 | tr '\n' ' ')"
        lf=$(target_log "$(lib_name "$t")"); [ -n "$lf" ] && [ -f "$lf" ] && log "  $t log: $(tail -n 4 "$lf" | tr '\n' ' ')"
      fi
      [ "${c_errors:-0}" = 0 ] || log "  checker: $(head -n 3 "$WORKDIR/check-$n.out" | tr '\n' ' ')"
    done
  done
done

for t in pgsurge pgsurge-cache; do
  if has_target "$t" && ! alive "$t"; then
    select_target "$t"; log "$t exited during the run; last log lines:"; tail -n 20 "$SURGE_LOG" >&2
  fi
done
echo "# load_after: $(cut -d' ' -f1-3 /proc/loadavg)" >>"$RAW"

# ---------------------------------------------------------------- report

python3 - "$RAW" "$RESULTS" "$BENCH_DIR" <<'PY' || die "report failed"
import csv, statistics, sys
raw, results, bench_dir = sys.argv[1:]
sys.path.insert(0, bench_dir)
from report import write_section

meta, lines = {}, []
for line in open(raw):
    if line.startswith("# "):
        k, _, v = line[2:].rstrip("\n").partition(": ")
        meta[k] = v
    elif line.strip():
        lines.append(line)
rows = list(csv.DictReader(lines, delimiter="\t"))
nproc = int(meta.get("nproc", "2"))
targets = meta["targets"].split()
variants = meta["variants"].split()
NAMES = {"direct": "direct Postgres", "pgbouncer": "PgBouncer", "pgsurge": "pgsurge, cache off",
         "pgsurge-cache": "pgsurge, cache on"}

def num(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return None

def med(vals):
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None

class Cell:
    def __init__(self, runs):
        self.runs = runs
        self.ok = [r for r in runs if r["rc"] == "0" and num(r["tps"]) is not None]
        self.bad = len(runs) - len(self.ok)
    def m(self, k):
        return med(num(r[k]) for r in self.ok)
    def per_tx_us(self, k):
        return med(num(r[k]) / num(r["tx"]) * 1e6 for r in self.ok if num(r[k]) is not None and num(r["tx"]))
    def share(self, k):
        return med(num(r[k]) / (num(r["wall_s"]) * nproc) for r in self.ok if num(r[k]) is not None and num(r["wall_s"]))
    def other(self):
        v = []
        for r in self.ok:
            used = sum(num(r[k]) or 0 for k in ("proxy_cpu_s", "pg_cpu_s", "pgbench_cpu_s", "checker_cpu_s"))
            v.append((num(r["sys_busy_s"]) - used) / (num(r["wall_s"]) * nproc))
        return med(v)
    def idle(self):
        return med(1 - num(r["sys_busy_s"]) / (num(r["wall_s"]) * nproc) for r in self.ok)
    def ratio(self, a, b):  # sum over runs, e.g. hits / (hits + misses)
        x = sum(num(r[a]) or 0 for r in self.ok)
        y = sum((num(r[a]) or 0) + (num(r[b]) or 0) for r in self.ok)
        return x / y if y else None
    def total(self, k):
        vals = [num(r[k]) for r in self.ok if num(r[k]) is not None]
        return int(sum(vals)) if vals else None

def f_num(v, d=0):
    return "—" if v is None else f"{v:,.{d}f}"
def f_pct(v):
    return "—" if v is None else f"{max(0.0, 100 * v):.0f}%"
def f_x(v):
    return "—" if v is None else f"{v:.2f}×"

cells = {(v, t): Cell([r for r in rows if r["variant"] == v and r["target"] == t]) for v in variants for t in targets}
out = []
w = out.append
w("<!-- cache:begin -->")
w("## Read cache: skewed read-heavy workload with 5% writes")
w("")
w(f"Command: `{meta.get('command', '')}`  ")
w(f"Date: {meta.get('date', '')}  ")
w(f"Machine: {nproc} CPUs ({meta.get('cpu', '')}), {meta.get('memory', '')}, load before {meta.get('load_before', '')}, after {meta.get('load_after', '')}  ")
w(f"Versions: {meta.get('postgres', '')}; {meta.get('pgbouncer', '')}; pgsurge {meta.get('pgsurge_commit', '')}  ")
w(f"Binary: {meta.get('pgsurge_bin', '')}  ")
w(f"Raw: `bench/results/{raw.rsplit('/', 1)[-1]}`")
w("")
w(f"Workload: `pgbench -n -M {meta['mode']} -c {meta['clients']} -j {meta['jobs']} -T {meta['duration_s']} -l` with three weighted "
  f"scripts ({meta['mix']}) over the {int(meta['rows']):,} rows of `pgbench_accounts` (`pgbench -i -s 1`); every key from "
  f"`random_zipfian(1, {meta['rows']}, {meta['zipf']})` (the hottest row gets ~9% of the requests): "
  "point `SELECT abalance FROM pgbench_accounts WHERE aid = :aid`; range `SELECT aid, abalance FROM pgbench_accounts "
  "WHERE aid BETWEEN :aid AND :aid + 9` (10 rows); and a write, which differs by variant:")
w("")
w("- **same-table**: `UPDATE pgbench_accounts SET abalance = abalance + :delta WHERE aid = :aid` — the table the reads "
  "read. A write pinned by key voids the point reads of its `aid` and every range read of the table (row-precise "
  "invalidation; before it, every write voided every cached read of `pgbench_accounts`).")
w("- **other-table**: `INSERT INTO pgbench_history …` — the reads' entries are voided only by their TTL.")
w("")
w(f"Targets, alternating in each of {meta['rounds']} rounds per variant (each round starts with the next target): direct "
  f"Postgres; PgBouncer (transaction mode, `default_pool_size={meta['pool_size']}`); pgsurge `--pool-size {meta['pool_size']} "
  f"--pool-mode transaction` with the cache off; a second pgsurge process with the same flags plus `--cache` (TTL "
  f"{meta.get('cache_ttl', '')}, 256 MiB{', `--cache-notify`' if meta.get('cache_notify') == '1' else ''}). Each number is the median over rounds; a transaction is one statement, so "
  "per tx = per request.")
w("")
w("- **p50/p99**: exact percentiles of every transaction's latency in pgbench's per-transaction log (`-l`), all scripts together.")
w("- **hit ratio**: the cache-on pgsurge's `SHOW CACHE` hits / (hits + misses) over the run (admin console, before/after "
  "each run); \"reads only\" counts the `pgbench_accounts` statements from `SHOW CACHE STATEMENTS` (the checker's excluded).")
w(f"- **stale reads**: a checker ran beside every run through the same target (python3, its own table `bench_stale`, "
  f"so its writes void none of the workload's entries): read row k twice on connection R1 (extended protocol) and R2 "
  f"(simple), `UPDATE … SET v = v + 1 … RETURNING v` on connection W, then read row k on R1 and R2 once each right "
  f"after the UPDATE returned; a read that returns less than the UPDATE's value is stale. \"cached\": how often the "
  "row's entry was in the cache when the write came (its 2nd pre-write read on R1/R2 was a hit), so that the write "
  "really had an entry to void.")
w("- **CPU µs/tx**: CPU seconds (user+system, from /proc before/after) of Postgres (all its processes), the proxy, and "
  "pgbench (`/usr/bin/time`), per transaction pgbench completed. Shares are of all the machine's cores during the run; "
  "\"other\" = machine busy time minus those three and the checker.")
w("")

for v in variants:
    w(f"### {v}")
    w("")
    w("| target | tps | tps / direct | p50 ms | p99 ms | read p99 ms | write p99 ms | hit ratio (reads only) | stale reads / checks (cached) | Postgres CPU µs/tx | proxy CPU µs/tx | pgbench CPU µs/tx |")
    w("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    d = cells[(v, "direct")] if "direct" in targets else None
    dtps = d.m("tps") if d else None
    for t in targets:
        c = cells[(v, t)]
        tps = c.m("tps")
        hit = "—"
        if t == "pgsurge-cache":
            hr, wr = c.ratio("hits", "misses"), c.ratio("wl_hits", "wl_misses")
            hit = f"{f_pct(hr)} ({f_pct(wr)})" if hr is not None else "—"
        chk, stale = c.total("chk_checks"), c.total("chk_stale")
        cached = ""
        if t == "pgsurge-cache":
            # only the 2nd pre-write read of each connection can hit (each write voids the whole table, and
            # the row written before it is another one): hits / (2 x writes) = how often the entry was cached
            ch, cw = c.total("chk_hits"), c.total("chk_writes")
            if ch is not None and cw:
                cached = f" ({f_pct(ch / (2 * cw))} cached)"
        bad = f" † {c.bad}/{len(c.runs)}" if c.bad else ""
        w(f"| {NAMES.get(t, t)}{bad} | {f_num(tps)} | {f_x(tps / dtps) if tps and dtps else '—'} | {f_num(c.m('p50_ms'), 2)} | "
          f"{f_num(c.m('p99_ms'), 2)} | {f_num(c.m('read_p99_ms'), 2)} | {f_num(c.m('write_p99_ms'), 2)} | {hit} | "
          f"{stale if stale is not None else '—'} / {chk if chk is not None else '—'}{cached} | "
          f"{f_num(c.per_tx_us('pg_cpu_s'), 1)} | {f_num(c.per_tx_us('proxy_cpu_s'), 1) if t != 'direct' else '—'} | "
          f"{f_num(c.per_tx_us('pgbench_cpu_s'), 1)} |")
    w("")
    w(f"Where the CPU went ({v}; share of all {nproc} cores during the run):")
    w("")
    w("| target | pgbench | Postgres | proxy | checker | other | idle |")
    w("|---|---:|---:|---:|---:|---:|---:|")
    for t in targets:
        c = cells[(v, t)]
        w(f"| {NAMES.get(t, t)} | {f_pct(c.share('pgbench_cpu_s'))} | {f_pct(c.share('pg_cpu_s'))} | "
          f"{f_pct(c.share('proxy_cpu_s')) if t != 'direct' else '—'} | {f_pct(c.share('checker_cpu_s'))} | "
          f"{f_pct(c.other())} | {f_pct(c.idle())} |")
    w("")
    lim = []
    for t in targets:
        c = cells[(v, t)]
        parts = {"pgbench": c.share("pgbench_cpu_s"), "Postgres": c.share("pg_cpu_s"), "proxy": c.share("proxy_cpu_s"),
                 "other": c.other()}
        parts = {k: x for k, x in parts.items() if x is not None}
        if parts and c.idle() is not None:
            top = max(parts, key=parts.get)
            state = "CPU-bound" if c.idle() < 0.05 else f"{f_pct(c.idle())} idle"
            lim.append(f"{NAMES.get(t, t)}: {state}, most CPU to {top} ({f_pct(parts[top])} of the machine)")
    if lim:
        w(f"Limit ({v}): " + "; ".join(lim) + ".")
        w("")
    # goals
    on, off = cells.get((v, "pgsurge-cache")), cells.get((v, "pgsurge"))
    if on and d and on.ok and d.ok:
        pg_d, pg_on = d.per_tx_us("pg_cpu_s"), on.per_tx_us("pg_cpu_s")
        tps_r = on.m("tps") / d.m("tps") if d.m("tps") else None
        hr = on.ratio("hits", "misses")
        g = []
        g.append(f"Postgres CPU per request, direct / cache on: **{pg_d / pg_on:.1f}×** lower (goal ≥ 5×: "
                 f"{'met' if pg_d / pg_on >= 5 else 'not met'}).")
        g.append(f"End-to-end tps, cache on / direct: **{tps_r:.2f}×** at a {f_pct(hr)} hit ratio (goal ≥ 2× at ≥ 90%, aim 3×: "
                 f"{'met' if tps_r >= 2 and (hr or 0) >= 0.9 else 'not met'}).")
        if off and off.ok:
            p_on, p_off = on.per_tx_us("proxy_cpu_s"), off.per_tx_us("proxy_cpu_s")
            s = (f"Proxy CPU per request, cache on / cache off: {p_on:.1f} / {p_off:.1f} µs = **{p_on / p_off:.2f}×**")
            if hr and hr > 0:
                # cpu_on = h * hit + (1 - h) * miss; with miss >= a cache-off forward, hit <= this estimate
                est = (p_on - (1 - hr) * p_off) / hr
                s += (f"; if a miss costs what a cache-off forward does, a hit costs ≤ {est:.1f} µs vs {p_off:.1f} µs "
                      f"forwarded (goal: a hit costs the proxy less than a forward: {'met' if est < p_off else 'not met'}).")
            g.append(s)
        inv, co = on.m("invalidations"), on.m("coalesced")
        if inv is not None:
            g.append(f"Cache traffic per run (median): {inv:,.0f} table invalidations ({inv / float(meta['duration_s']):,.0f}/s, "
                     f"the workload's writes and the checker's), {co:,.0f} requests that waited on an identical in-flight miss "
                     "(single flight; counted neither hit nor miss).")
        g.append(f"Stale reads seen by the checker through the cache-on pgsurge: {on.total('chk_stale')} of {on.total('chk_checks')}.")
        w(f"Goals ({v}):")
        w("")
        for x in g:
            w(f"- {x}")
        w("")
w("On this 2-core machine pgbench, Postgres and the proxy share the cores: whatever CPU a request costs one of them "
  "is taken from the others, so the idle column near 0% means the run is CPU-bound and the shares say who spent it.")
w("<!-- cache:end -->")
w("")
write_section(results, "\n".join(out), "<!-- cache:begin -->", "<!-- cache:end -->")
PY
log "wrote ${RESULTS#"$MAIN"/} and ${RAW#"$MAIN"/}"
