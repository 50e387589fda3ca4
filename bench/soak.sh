#!/usr/bin/env bash
# bench/soak.sh — one pgsurge under mixed work for a long time (issue 15): pooling with churned connections, the
# cache and the batcher on, a rate-limited user, cancels, clients killed now and then, a SIGHUP reload every 30 s
# and a Postgres restart at half time (bench/soak_load.py has the details). Every 10 s: pgsurge's RSS and open
# files, the server connections Postgres sees per user, requests answered and errors. Goal: after warm-up RSS and
# open files within ±10% of their warm level, server connections never above the pool, no unexpected error.
#
#   DURATION=1800 bench/soak.sh
#
# Environment (defaults in brackets): DURATION [1800] seconds   WARMUP [120] seconds not judged   POOL [8] per user
#   SCALE [1]   PGSURGE_BIN [build target/release/pgsurge]   RESULTS [bench/RESULTS.md]
# Writes bench/results/soak-<timestamp>.tsv and the soak section of bench/RESULTS.md.

# shellcheck source=bench/lib.sh
. "$(dirname "$0")/lib.sh"
bench_command soak.sh "DURATION WARMUP POOL SCALE PGSURGE_BIN" "$@"
DURATION=${DURATION:-1800}
WARMUP=${WARMUP:-120}
POOL=${POOL:-8}
SCALE=${SCALE:-1}
RESULTS=${RESULTS:-$BENCH_DIR/RESULTS.md}
LIMITED_QPS=50

pgsurge_build
pg_start
pgbench_init "$SCALE"
pg_super -d app -c "CREATE ROLE limited LOGIN PASSWORD 'limited'" -c "GRANT SELECT ON ALL TABLES IN SCHEMA public TO limited" >/dev/null \
  || die "cannot create role limited"

CONF=$WORKDIR/pgsurge.toml
cat >"$CONF" <<TOML
query_wait_timeout = "20s"

[users.app]
password = "app"

[users.limited]
password = "limited"

[limits.users.limited]
qps = $LIMITED_QPS
burst = 10

[cache]
enabled = true
default_ttl = "2s"
# Small, so that it is full (and steady) soon after warm-up: the batched lookups span every account.
max_bytes = 4194304

[batch]
enabled = true
TOML
pgsurge_start "$POOL" transaction --config "$CONF"

TS=$(date -u +%Y%m%dT%H%M%SZ)
mkdir -p "$BENCH_DIR/results"
RAW=$BENCH_DIR/results/soak-$TS.tsv
{
  echo "# command: $BENCH_CMD"
  machine_facts
  echo "# duration: $DURATION"
  echo "# warmup: $WARMUP"
  echo "# pool: $POOL"
} >"$RAW"

log "soak: ${DURATION} s of mixed work through pgsurge (pid $SURGE_PID); a line every 10 s"
python3 "$BENCH_DIR/soak_load.py" --port "$SURGE_PORT" --pid "$SURGE_PID" --config "$CONF" --duration "$DURATION" \
  --accounts $((SCALE * 100000)) --limited-qps "$LIMITED_QPS" \
  --restart-cmd "runuser -u postgres -- $PGBIN/pg_ctl -D $PGDATA_DIR -l $PGDATA_DIR/log -m fast -w -t 60 restart" \
  --psql "runuser -u postgres -- $PGBIN/psql -X -q -h $PGSOCK -p $PGPORT -U postgres -d postgres" | tee -a "$RAW" >&2 \
  || die "soak_load.py failed"
kill -0 "$SURGE_PID" 2>/dev/null || die "pgsurge is gone: $(tail -n 20 "$SURGE_LOG")"
grep -c "ERROR\|panicked" "$SURGE_LOG" | sed 's/^/# pgsurge_log_errors: /' >>"$RAW"

python3 - "$RAW" "$RESULTS" "$BENCH_DIR" <<'PY'
import json, sys
raw, results, bench_dir = sys.argv[1:]
sys.path.insert(0, bench_dir)
from report import write_section
meta, rows, summary, notes = {}, [], {}, []
for line in open(raw):
    if line.startswith("# {"):
        summary = json.loads(line[2:])
    elif line.startswith("# postgres restarted"):
        notes.append(line[2:].strip())
    elif line.startswith("# "):
        k, _, v = line[2:].rstrip("\n").partition(": ")
        meta[k] = v
    elif line[:1].isdigit():
        t, rss, fds, sa, sl, ok, exp, unexp, reloads = line.rstrip("\n").split("\t")
        rows.append(dict(t=int(t), rss=int(rss), fds=int(fds), sa=None if sa == "NA" else int(sa),
                         sl=None if sl == "NA" else int(sl), ok=int(ok), exp=int(exp), unexp=int(unexp), reloads=int(reloads)))
warm, pool = int(meta["warmup"]), int(meta["pool"])
# Judged: after warm-up, while the load runs (the last sample, taken as the workers leave, is not).
judged = [r for r in rows if warm < r["t"] <= int(meta["duration"])]
ref = None
if judged:
    # The reference is the median of the judged samples: one sample catches connections of the moment (churn,
    # cancels, killed clients) that the next does not.
    ref = {k: sorted(r[k] for r in judged)[len(judged) // 2] for k in ("rss", "fds")}
    ref["t"] = f"{judged[0]['t']}–{judged[-1]['t']}"
def spread(key):
    vals = [r[key] for r in judged]
    return (min(vals) / ref[key] - 1) * 100, (max(vals) / ref[key] - 1) * 100
out = ["<!-- soak:begin -->", f"## Soak: {int(meta['duration']) // 60} minutes of mixed work through one pgsurge", "",
       f"Command: `{meta.get('command', '')}`  ",
       f"Date: {meta.get('date', '')}  ",
       f"Machine: {meta.get('nproc', '?')} CPUs ({meta.get('cpu', '')}), {meta.get('memory', '')}, load before {meta.get('load_before', '')}  ",
       f"Versions: {meta.get('postgres', '')}; pgsurge {meta.get('pgsurge_commit', '')}  ",
       f"Setup: transaction pooling, pool {pool} per user (`app`, and `limited` at 50–60 qps), cache (TTL 2 s) and batcher on; "
       "`bench/soak_load.py`: 4 clients reading a hot set and writing it, 8 extended-protocol point lookups (batched), connect-"
       "query-leave churn, 2 clients of the limited user flat out, a cancel every ~1 s, a client killed mid-query or mid-"
       "transaction every ~2 s, SIGHUP every 30 s (the limit's qps changed each time), Postgres restarted (`pg_ctl restart -m fast`) "
       f"at half time. Raw: `bench/results/{raw.rsplit('/', 1)[-1]}`", ""]
out += [f"- {n}" for n in notes]
if ref:
    (rlo, rhi), (flo, fhi) = spread("rss"), spread("fds")
    maxa = max((r["sa"] for r in rows if r["sa"] is not None), default=0)
    maxl = max((r["sl"] for r in rows if r["sl"] is not None), default=0)
    unexp = sum(r["unexp"] for r in rows)
    out += [f"- After warm-up ({warm} s), samples at {ref['t']} s: RSS median {ref['rss'] / 1024:.1f} MiB, range {rlo:+.1f}% to {rhi:+.1f}% "
            f"({'holds' if -10 <= rlo and rhi <= 10 else 'MISSED'} ±10%); open files median {ref['fds']}, range {flo:+.1f}% to {fhi:+.1f}% "
            f"({'holds' if -10 <= flo and fhi <= 10 else 'MISSED'} ±10%).",
            f"- Server connections at most {maxa} (app) and {maxl} (limited) against a pool of {pool} each: "
            f"{'holds' if maxa <= pool and maxl <= pool else 'MISSED'}.",
            f"- Requests answered: {sum(r['ok'] for r in rows):,}; expected errors: {sum(r['exp'] for r in rows):,} "
            f"({', '.join(f'{k} {v:,}' for k, v in sorted(summary.get('expected', {}).items()))}); unexpected: {unexp}"
            + (f" ({'; '.join(f'{k} ×{v}' for k, v in summary.get('unexpected', {}).items())})" if unexp else "") + ".",
            f"- Reloads: {summary.get('reloads', '?')}; ERROR or panic lines in pgsurge's log: {meta.get('pgsurge_log_errors', '?')}.",
            f"- The limited user's two flat-out clients were answered {summary.get('ok', {}).get('limited', 0) / int(meta['duration']):.0f} "
            "times a second in all: its limit held by delaying them (within `limit_max_delay`), so no 53400 was needed.", ""]
out += ["Every 10 s (t, RSS MiB, open files, server connections app / limited, answered, expected errors, unexpected):", "",
        "| t s | RSS MiB | fds | servers app / limited | answered | expected err | unexpected |", "|---:|---:|---:|---|---:|---:|---:|"]
for r in rows:
    sa = "—" if r["sa"] is None else r["sa"]
    sl = "—" if r["sl"] is None else r["sl"]
    out.append(f"| {r['t']} | {r['rss'] / 1024:.1f} | {r['fds']} | {sa} / {sl} | {r['ok']:,} | {r['exp']} | {r['unexp']} |")
out += ["<!-- soak:end -->", ""]
write_section(results, "\n".join(out), "<!-- soak:begin -->", "<!-- soak:end -->")
PY
log "wrote ${RESULTS#"$MAIN"/} and ${RAW#"$MAIN"/}"
