#!/bin/bash
# Failover and dead networks (issue 15, points 4 and 5): runs the black-hole test (tests/it/blackhole.rs) and the
# failover test (tests/it/failover.rs) ROUNDS times (default 3), then the 11-failover acceptance check once, and
# writes the "network" section of bench/RESULTS.md with every figure. Run from the project root, as root (the tests
# start Postgres as the postgres OS user). About 1.5 minutes after the build.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-3}
raw=$(mktemp)
trap 'rm -f "$raw"' EXIT
cargo test --quiet --test it --no-run >/dev/null 2>&1
for i in $(seq 1 "$ROUNDS"); do
  PGSURGE_LOG=error cargo test --quiet --test it -- blackhole failover --nocapture --test-threads 1 2>&1 \
    | sed 's/\x1b\[[0-9;]*m//g' | grep -oE '(blackhole|failover): .*' | sed "s/^/$i /" >>"$raw" || true
done
acceptance=$(../shared/acceptance/11-failover 2>&1 | tail -n 1 || true)
python3 - "$raw" "$ROUNDS" "$acceptance" "$(git rev-parse --short=12 HEAD)" <<'PY'
import re, sys, datetime, os
raw, rounds, acceptance, rev = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
bh, fo = {}, {}
for line in open(raw):
    i, rest = line.split(" ", 1)
    nums = re.findall(r"(\d+\.\d+|\d+) s", rest)
    if rest.startswith("blackhole:"):
        bh[i] = nums  # pooled error, new-connection error, recovered
    elif rest.startswith("failover:"):
        m = re.search(r"again ([\d.]+) s .* took ([\d.]+) s\); (\d+) writes before the kill, (\d+) errors", rest)
        fo[i] = m.groups() if m else None
rows = []
for i in map(str, range(1, rounds + 1)):
    b = bh.get(i) or ["—"] * 3
    f = fo.get(i) or ["—"] * 4
    rows.append(f"| {i} | {b[0]} | {b[1]} | {b[2]} | {f[0]} | {f[1]} | {f[3]} |")
load = open("/proc/loadavg").read().split()[:3]
section = f"""<!-- network:begin -->
## Failover and dead networks

Command: `bench/network.sh` (ROUNDS={rounds})  
Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M:%S} UTC  
Machine: {os.cpu_count()} CPUs, load before {' '.join(load)}; pgsurge {rev} (debug build, in the test process)  
Black hole (`tests/it/blackhole.rs`): a relay between pgsurge and Postgres stops forwarding without closing anything;
`query_timeout 1s`, `query_cancel_timeout 1s`, `server_connect_timeout 1s`, `query_wait_timeout 3s`, pool 2. A client
on the pooled connection gets FATAL 57014 (its cancel is lost in the same black hole); a client that needs a new
server connection (started 0.2 s later) gets ERROR 08001 when its wait ends; then the relay forwards again and a new
client's query is timed. Failover (`tests/it/failover.rs`): a primary and a streaming standby (`pg_basebackup -R`),
upstream `h1,h2?target_session_attrs=read-write`, pool 4, one writer inserting every 5 ms through pgsurge; the primary
is stopped `-m immediate`, 0.5 s later the standby is promoted (`pg_ctl -w promote`); the figure is the start of the
first successful write after the promotion began.

| round | black hole: pooled client's error (s) | new-connection client's error (s) | recovered after the path healed (s) | failover: writes again after promotion began (s) | `pg_ctl promote` took (s) | writer errors during the switch |
|---|---:|---:|---:|---:|---:|---:|
""" + "\n".join(rows) + f"""

Acceptance `../shared/acceptance/11-failover` (release build): {acceptance}

Bounds: the pooled client's error comes at query_timeout + query_cancel_timeout (2 s), the new-connection client's at
its query_wait_timeout (3 s after it started); recovery and failover are bounded by the connect backoff (at most
500 ms between attempts) plus a login. For comparison the issue measured PgBouncer 1.25 with `query_timeout = 5`:
an error after 5.3 s, back 0.3 s after the path healed.
<!-- network:end -->
"""
text = open("bench/RESULTS.md").read()
if "<!-- network:begin -->" in text:
    a = text.index("<!-- network:begin -->"); b = text.index("<!-- network:end -->") + len("<!-- network:end -->\n")
    text = text[:a] + section + text[b:]
else:
    text = text.rstrip("\n") + "\n\n" + section
open("bench/RESULTS.md", "w").write(text)
print(section)
PY
