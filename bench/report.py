#!/usr/bin/env python3
"""Turn a raw pooler benchmark TSV (bench/results/raw-*.tsv) into the pooler section of bench/RESULTS.md.

usage: bench/report.py RAW_TSV [RESULTS_MD]

Only the text between <!-- pooler:begin --> and <!-- pooler:end --> is replaced; other sections
(later workloads) are kept. Python 3 standard library only.
"""
import csv
import os
import statistics
import sys

BEGIN = "<!-- pooler:begin -->"
END = "<!-- pooler:end -->"
TARGETS = ["direct", "pgbouncer", "pgsurge"]


def num(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def load(path):
    meta, lines = {}, []
    with open(path) as f:
        for line in f:
            if line.startswith("# "):
                k, _, v = line[2:].rstrip("\n").partition(": ")
                meta[k] = v
            elif line.strip():
                lines.append(line)
    rows = list(csv.DictReader(lines, delimiter="\t"))
    return meta, rows


def medians(rows, by, cols):
    """{value of column `by`: {col: median of that column over its rows}} for rows from `load`."""
    out = {}
    for r in rows:
        out.setdefault(r[by], []).append(r)
    return {k: {c: statistics.median(float(r[c]) for r in rs) for c in cols} for k, rs in out.items()}


def provenance(meta):
    """The Command / Date / Machine / Versions lines a section opens with, from a raw file's `# key: value` header."""
    return [
        f"Command: `{meta.get('command', '')}`  ",
        f"Date: {meta.get('date', '')}  ",
        f"Machine: {meta.get('nproc', '?')} CPUs ({meta.get('cpu', '?')}), kernel {meta.get('kernel', '?')}, "
        f"load average before {meta.get('load_before', '?')}  ",
        f"Versions: {meta.get('postgres', '')}; PgBouncer {meta.get('pgbouncer', '')}; pgsurge commit "
        f"{meta.get('pgsurge_commit', '')}, binary {meta.get('pgsurge_bin', '')}  ",
    ]


def med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


class Cell:
    """All runs of one (mode, cell, target)."""

    def __init__(self, runs):
        self.runs = runs
        self.ok = [r for r in runs if r["rc"] == "0" and num(r["tps"]) is not None]
        self.bad = len(runs) - len(self.ok)
        self.failed_tx = sum(int(num(r["failed"]) or 0) for r in runs)
        self.dead = any(r["rc"] == "dead" for r in runs)

    def m(self, key):
        return med(num(r[key]) for r in self.ok)

    def per_1k(self, key):
        vals = []
        for r in self.ok:
            cpu, tx = num(r[key]), num(r["tx"])
            if cpu is not None and tx:
                vals.append(cpu / tx * 1000.0)
        return med(vals)

    def share(self, key, nproc):
        """median % of all cores used by `key` during the run"""
        vals = []
        for r in self.ok:
            cpu, wall = num(r[key]), num(r["wall_s"])
            if cpu is not None and wall:
                vals.append(100.0 * cpu / (wall * nproc))
        return med(vals)

    def other_share(self, nproc):
        vals = []
        for r in self.ok:
            wall, sysb = num(r["wall_s"]), num(r["sys_busy_s"])
            if not wall or sysb is None:
                continue
            used = sum(num(r[k]) or 0.0 for k in ("pgbench_cpu_s", "pg_cpu_s", "proxy_cpu_s"))
            vals.append(max(0.0, 100.0 * (sysb - used) / (wall * nproc)))
        return med(vals)

    def busy_share(self, nproc):
        return med(100.0 * num(r["sys_busy_s"]) / (num(r["wall_s"]) * nproc)
                   for r in self.ok if num(r["sys_busy_s"]) is not None and num(r["wall_s"]))


def f_tps(v):
    return "—" if v is None else f"{v:,.0f}"


def f_lat(v):
    return "—" if v is None else f"{v:.3f}"


def f_cpu(v):
    return "—" if v is None else f"{v:.4f}"


def f_ratio(a, b):
    return "—" if a is None or not b else f"{a / b:.2f}"


def f_pct(v):
    return "—" if v is None else f"{v:.0f}%"


def cell_label(cell, clients):
    return f"storm (-C, {clients})" if cell == "storm" else cell


def build(meta, rows):
    nproc = int(meta.get("nproc", "1") or 1)
    targets = meta.get("targets", " ".join(TARGETS)).split()
    modes, cells = [], []
    for r in rows:
        if r["mode"] not in modes:
            modes.append(r["mode"])
        if (r["cell"], r["clients"]) not in cells:
            cells.append((r["cell"], r["clients"]))
    # numeric client counts first, storm last
    cells.sort(key=lambda c: (c[0] == "storm", int(c[1])))

    def get(mode, cell, target):
        runs = [r for r in rows if r["mode"] == mode and r["cell"] == cell and r["target"] == target]
        return Cell(runs) if runs else None

    out = []
    w = out.append
    w(BEGIN)
    w("## Pooler: `pgbench -S`, direct Postgres vs PgBouncer vs pgsurge")
    w("")
    w(f"Command: `{meta.get('command', '?')}`  ")
    w(f"Date: {meta.get('date', '?')}  ")
    w(f"Machine: {nproc} CPUs ({meta.get('cpu', '?')}), {meta.get('memory', '?')} RAM, "
      f"kernel {meta.get('kernel', '?')}, load average before/after {meta.get('load_before', '?')} / "
      f"{meta.get('load_after', '?')}  ")
    w(f"Versions: {meta.get('postgres', '?')}; {meta.get('pgbench', '?')}; {meta.get('pgbouncer', '?')}; "
      f"pgsurge commit {meta.get('pgsurge_commit', '?')}, binary {meta.get('pgsurge_bin', '?')}  ")
    w(f"Setup: all on loopback on this one machine; `pgbench -i -s {meta.get('scale', '?')}`; "
      f"`pgbench -n -S -M <mode> -c <clients> -j {meta.get('jobs', '?')} -T {meta.get('duration_s', '?')}`; "
      f"PgBouncer and pgsurge in transaction mode with pool size {meta.get('pool_size', '?')}, SCRAM logins, "
      f"default logging (both log every login); "
      f"Postgres max_connections 400, fsync off; targets alternated within each cell, "
      f"{meta.get('rounds', '?')} round(s); every figure is the median over rounds.  ")
    w(f"Raw runs: `bench/results/{os.path.basename(meta.get('_raw', ''))}`")
    w("")

    notes = set()
    shares_text = []
    for mode in modes:
        w(f"### `-M {mode}`")
        w("")
        w("| clients | tps direct | tps pgbouncer | tps pgsurge | pgsurge/pgbouncer | pgsurge/direct "
          "| lat ms direct | lat ms pgbouncer | lat ms pgsurge "
          "| proxy CPU s/1k tx pgbouncer | proxy CPU s/1k tx pgsurge "
          "| PG CPU s/1k tx direct | PG CPU s/1k tx pgbouncer | PG CPU s/1k tx pgsurge |")
        w("|---|" + "---:|" * 13)
        for cell, clients in cells:
            c = {t: get(mode, cell, t) for t in TARGETS}

            def tps(t):
                x = c[t]
                if x is None:
                    return "—"
                if x.dead and not x.ok:
                    notes.add("dead")
                    return "dead"
                s = f_tps(x.m("tps"))
                if x.bad or x.failed_tx:
                    notes.add("bad")
                    s += f" †{x.bad}/{len(x.runs)}" if x.bad else " †"
                return s

            def val(t, fn):
                return None if c[t] is None else fn(c[t])

            tp = {t: val(t, lambda x: x.m("tps")) for t in TARGETS}
            w("| " + " | ".join([
                cell_label(cell, clients),
                tps("direct"), tps("pgbouncer"), tps("pgsurge"),
                f_ratio(tp["pgsurge"], tp["pgbouncer"]), f_ratio(tp["pgsurge"], tp["direct"]),
                *[f_lat(val(t, lambda x: x.m("lat_ms"))) for t in TARGETS],
                f_cpu(val("pgbouncer", lambda x: x.per_1k("proxy_cpu_s"))),
                f_cpu(val("pgsurge", lambda x: x.per_1k("proxy_cpu_s"))),
                *[f_cpu(val(t, lambda x: x.per_1k("pg_cpu_s"))) for t in TARGETS],
            ]) + " |")
        w("")
        # CPU detail: per 1k tx and share of the machine's cores, for every target
        w(f"CPU, `-M {mode}` (s per 1,000 tx, and share of all {nproc} cores during the run; "
          "\"other\" = everything else on the machine, e.g. a compiler):")
        w("")
        w("| clients | target | pgbench s/1k | Postgres s/1k | proxy s/1k | pgbench | Postgres | proxy | other | idle |")
        w("|---|---|" + "---:|" * 8)
        for cell, clients in cells:
            for t in targets:
                x = get(mode, cell, t)
                if x is None or not x.ok:
                    continue
                busy = x.busy_share(nproc)
                w("| " + " | ".join([
                    cell_label(cell, clients), t,
                    f_cpu(x.per_1k("pgbench_cpu_s")), f_cpu(x.per_1k("pg_cpu_s")),
                    f_cpu(x.per_1k("proxy_cpu_s")) if t != "direct" else "—",
                    f_pct(x.share("pgbench_cpu_s", nproc)), f_pct(x.share("pg_cpu_s", nproc)),
                    f_pct(x.share("proxy_cpu_s", nproc)) if t != "direct" else "—",
                    f_pct(x.other_share(nproc)),
                    f_pct(None if busy is None else max(0.0, 100.0 - busy)),
                ]) + " |")
        w("")
        # where the CPU went: at the largest client count of this mode
        numeric = [cc for cc in cells if cc[0] != "storm"]
        if numeric:
            cell, clients = numeric[-1]
            parts = []
            for t in targets:
                x = get(mode, cell, t)
                if x is None or not x.ok:
                    continue
                p = f"{t}: pgbench {f_pct(x.share('pgbench_cpu_s', nproc))}, Postgres {f_pct(x.share('pg_cpu_s', nproc))}"
                if t != "direct":
                    p += f", proxy {f_pct(x.share('proxy_cpu_s', nproc))}"
                p += f", other {f_pct(x.other_share(nproc))}"
                parts.append(p)
            if parts:
                line = f"- `-M {mode}`, {clients} clients: " + "; ".join(parts) + "."
                b, s = get(mode, cell, "pgbouncer"), get(mode, cell, "pgsurge")
                if b and s and b.per_1k("proxy_cpu_s") and s.per_1k("proxy_cpu_s"):
                    line += (f" pgsurge used {s.per_1k('proxy_cpu_s') / b.per_1k('proxy_cpu_s'):.2f}× PgBouncer's "
                             "CPU per transaction.")
                d = get(mode, cell, "direct")
                pg = [f"{t} {get(mode, cell, t).per_1k('pg_cpu_s'):.4f}" for t in targets
                      if get(mode, cell, t) and get(mode, cell, t).per_1k("pg_cpu_s")]
                if len(pg) > 1 and d:
                    line += " Postgres CPU s/1k tx: " + ", ".join(pg) + "."
                shares_text.append(line)

    w("### Where the CPU went")
    w("")
    others = [x.other_share(nproc) for mode in modes for cell, _ in cells for t in targets
              for x in [get(mode, cell, t)] if x is not None and x.ok]
    others = [o for o in others if o is not None]
    if others and statistics.median(others) > 10:
        w(f"**Noisy run:** processes outside the benchmark used a median {statistics.median(others):.0f}% "
          f"(max {max(others):.0f}%) of the {nproc} cores during the runs; compare targets only within a row, "
          "and rerun on a quiet machine for published numbers.")
        w("")
    if shares_text:
        w(f"Share of the {nproc} cores during the run at the largest client count (medians):")
        w("")
        for line in shares_text:
            w(line)
        w("")
        w("pgbench, Postgres and the proxy share the same cores, so every CPU second the proxy spends per "
          "transaction is taken from Postgres and pgbench: a cheaper proxy shows up directly as more tps. "
          "In the storm, pgbench's own SCRAM login dominates; the pooler's gain there is the Postgres CPU per "
          "1k tx (no backend started per connection).")
    else:
        w("No successful runs.")
    w("")
    if notes:
        w("Notes: " + " ".join(sorted({
            "bad": "† = some runs failed (pgbench exit code ≠ 0 or failed transactions; count failed/total), "
                   "the median is over the successful ones.",
            "dead": "dead = the proxy was not running at that point, its runs were skipped.",
        }[n] for n in notes)))
        w("")
    w("Columns: see `bench/README.md`. tps = pgbench's `tps` line; lat = pgbench's `latency average`; "
      "CPU s/1k tx = (utime+stime during the run) / transactions × 1000.")
    w(END)
    return "\n".join(out) + "\n"


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    raw = sys.argv[1]
    dst = sys.argv[2] if len(sys.argv) > 2 else os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")
    meta, rows = load(raw)
    meta["_raw"] = raw
    section = build(meta, rows)
    write_section(dst, section)


def write_section(dst, section, begin=BEGIN, end=END):
    """Replace the text between begin/end markers in dst (or append it; or create dst). Reusable by
    other workloads' reports: `from report import write_section`."""
    if os.path.exists(dst):
        with open(dst) as f:
            old = f.read()
        if begin in old and end in old:
            head, _, rest = old.partition(begin)
            _, _, tail = rest.partition(end)
            new = head + section.rstrip("\n") + tail
        else:
            new = old.rstrip("\n") + "\n\n" + section
    else:
        new = "# pgsurge benchmark results\n\nEach section is written by its script in `bench/`; " \
              "see `bench/README.md`.\n\n" + section
    tmp = dst + ".tmp"
    with open(tmp, "w") as f:
        f.write(new)
    os.replace(tmp, dst)

if __name__ == "__main__":
    main()
