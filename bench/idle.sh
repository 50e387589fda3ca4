#!/usr/bin/env bash
# bench/idle.sh — what idle clients cost: CLIENTS logged-in clients that sit idle, through PgBouncer and through
# pgsurge in the same run. RSS of the proxy before (after a warm-up), with the clients idle after login, after each
# ran one query, and after they all left; open files at each step. Issue 15's goals: ≤ 2 KiB of RSS per idle
# client, and RSS after they leave within 25% of before.
#
#   bench/idle.sh
#
# Environment (defaults in brackets): CLIENTS [10000]   ROUNDS [1]   POOL [20]   CONCURRENCY [200] logins in flight
#   PGSURGE_BIN [build target/release/pgsurge]   VARIANTS [none]: more pgsurge binaries to measure, as
#   "label=/path/to/pgsurge label2=/path2" (e.g. builds with another allocator)   RESULTS [bench/RESULTS.md]
# Writes bench/results/idle-<timestamp>.tsv and the idle section of bench/RESULTS.md.

# shellcheck source=bench/lib.sh
. "$(dirname "$0")/lib.sh"
bench_command idle.sh "CLIENTS ROUNDS POOL CONCURRENCY PGSURGE_BIN VARIANTS" "$@"
CLIENTS=${CLIENTS:-10000}
ROUNDS=${ROUNDS:-1}
POOL=${POOL:-20}
CONCURRENCY=${CONCURRENCY:-200}
VARIANTS=${VARIANTS:-}
RESULTS=${RESULTS:-$BENCH_DIR/RESULTS.md}
[ "$(ulimit -Hn)" -ge $((CLIENTS + 200)) ] || die "open-files hard limit $(ulimit -Hn) is below CLIENTS + 200"

pgsurge_build
pg_start
PGB_MAX_CLIENT_CONN=$((CLIENTS + 100)) pgbouncer_start "$POOL" transaction

# label -> "port pid"
declare -A TARGET
TARGET[pgbouncer]="$PGB_PORT $PGB_PID"
LABELS=(pgbouncer)
start_surge() { # label binary
  local saved=$PGSURGE
  PGSURGE=$2
  pgsurge_start "$POOL" transaction --max-client-conn $((CLIENTS + 100))
  PGSURGE=$saved
  TARGET[$1]="$SURGE_PORT $SURGE_PID"
  LABELS+=("$1")
}
start_surge pgsurge "$PGSURGE"
for v in $VARIANTS; do
  [ -x "${v#*=}" ] || die "variant ${v%%=*}: no binary at ${v#*=}"
  start_surge "${v%%=*}" "${v#*=}"
done

TS=$(date -u +%Y%m%dT%H%M%SZ)
mkdir -p "$BENCH_DIR/results"
RAW=$BENCH_DIR/results/idle-$TS.tsv
{
  echo "# command: $BENCH_CMD"
  machine_facts
  for v in $VARIANTS; do echo "# variant ${v%%=*}: ${v#*=} (sha256 $(sha256sum "${v#*=}" | cut -c1-12))"; done
  printf 'round\ttarget\tjson\n'
} >"$RAW"

for ((r = 1; r <= ROUNDS; r++)); do
  for label in "${LABELS[@]}"; do
    read -r port pid <<<"${TARGET[$label]}"
    log "round $r: $CLIENTS idle clients through $label"
    json=$(python3 "$BENCH_DIR/idle_clients.py" --port "$port" --pid "$pid" --clients "$CLIENTS" --concurrency "$CONCURRENCY") \
      || die "idle_clients.py failed against $label"
    log "$label: $json"
    printf '%s\t%s\t%s\n' "$r" "$label" "$json" >>"$RAW"
  done
done

python3 - "$RAW" "$RESULTS" "$BENCH_DIR" "$CLIENTS" "$POOL" <<'PY'
import json, statistics, sys
raw, results, bench_dir, clients, pool = sys.argv[1:]
sys.path.insert(0, bench_dir)
from report import write_section
meta, by, order = {}, {}, []
for line in open(raw):
    if line.startswith("# "):
        k, _, v = line[2:].rstrip("\n").partition(": ")
        meta[k] = v
    elif line.strip() and not line.startswith("round\t"):
        _, target, js = line.rstrip("\n").split("\t", 2)
        if target not in by:
            order.append(target)
        by.setdefault(target, []).append(json.loads(js))
med = lambda t, k: statistics.median(x[k] for x in by[t])
mib = lambda kib: f"{kib / 1024:,.1f}"
out = ["<!-- idle:begin -->", f"## Idle clients: {int(clients):,} logged-in clients doing nothing", "",
       f"Command: `{meta.get('command', '')}`  ",
       f"Date: {meta.get('date', '')}  ",
       f"Machine: {meta.get('nproc', '?')} CPUs ({meta.get('cpu', '')}), {meta.get('memory', '')}, load before {meta.get('load_before', '')}  ",
       f"Versions: {meta.get('postgres', '')}; {meta.get('pgbouncer', '')}; pgsurge {meta.get('pgsurge_commit', '')}  ",
       f"Setup: transaction pooling, pool {pool}, SCRAM logins, on loopback; `bench/idle_clients.py` (a raw asyncio client) warms each "
       "proxy with 60 short sessions, then opens the clients (200 logins in flight), waits 3 s, has each run `SELECT 1`, waits, "
       "closes them all and waits for the proxy's open files to drop back. RSS is VmRSS of the proxy's process. "
       f"Raw: `bench/results/{raw.rsplit('/', 1)[-1]}`", "",
       "| proxy | RSS before MiB | RSS idle MiB | KiB per idle client | after one query each MiB | KiB per client | RSS after they left MiB | after / before | connect s | fds before / idle / after | errors |",
       "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
for t in order:
    errs = sum(x["connect_errors"] + x["query_errors"] for x in by[t])
    out.append(f"| {t} | {mib(med(t, 'rss_before'))} | {mib(med(t, 'rss_idle'))} | {med(t, 'kib_per_idle_client'):.2f} | "
               f"{mib(med(t, 'rss_after_query'))} | {med(t, 'kib_per_client_after_query'):.2f} | {mib(med(t, 'rss_after_close'))} | "
               f"{med(t, 'after_close_vs_before'):.2f} | {med(t, 'connect_s'):.1f} | "
               f"{int(med(t, 'fds_before'))} / {int(med(t, 'fds_idle'))} / {int(med(t, 'fds_after_close'))} | {errs} |")
for k, v in meta.items():
    if k.startswith("variant "):
        out.append(f"\n`{k[8:]}`: {v}")
out += ["", "Goals (issue 15): ≤ 2 KiB per idle client; RSS after they leave within 25% of before (after / before ≤ 1.25).",
        "<!-- idle:end -->", ""]
write_section(results, "\n".join(out), "<!-- idle:begin -->", "<!-- idle:end -->")
PY
log "wrote ${RESULTS#"$MAIN"/} and ${RAW#"$MAIN"/}"
