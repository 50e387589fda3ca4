//! What the batcher and the N+1 detector report: `SHOW BATCHES`, `SHOW NPLUSONE` and their /metrics lines.

use std::fmt::Write;

use super::Batcher;
use crate::admin::table::Table;
use crate::app::App;

/// Per statement: batches run, lookups merged, average batch size, fallbacks (merged statement failed, each
/// lookup ran alone).
pub fn show_batches(app: &App) -> Table {
    let mut t = Table::new(&["statement", "batches", "lookups", "avg_batch_size", "largest_batch", "distinct_keys", "rows", "fallbacks"]);
    for (sql, s) in app.batch.stats() {
        let avg = if s.batches > 0 { s.lookups as f64 / s.batches as f64 } else { 0.0 };
        t.row(crate::row![
            String::from_utf8_lossy(&sql),
            s.batches,
            s.lookups,
            format!("{avg:.1}"),
            s.largest,
            s.distinct_keys,
            s.rows,
            s.fallbacks
        ]);
    }
    t
}

/// Per statement group: N+1 patterns seen (runs of ≥ 5 lookups), lookups in them, time they took, an
/// example and the fix.
pub fn show_nplusone(app: &App) -> Table {
    let mut t = Table::new(&["statement", "patterns", "lookups", "lookups_per_pattern", "time_ms", "suggested_fix"]);
    for p in app.batch.detect.patterns() {
        let per = if p.occurrences > 0 { p.lookups as f64 / p.occurrences as f64 } else { 0.0 };
        t.row(crate::row![p.example, p.occurrences, p.lookups, format!("{per:.1}"), p.time.as_millis(), p.fix]);
    }
    t
}

fn esc(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// A counter family: name, help, how to read it from one row.
type Family<T> = (&'static str, &'static str, fn(&T) -> u64);

/// Prometheus text for /metrics.
pub fn prometheus(b: &Batcher) -> String {
    let mut o = String::new();
    let stats = b.stats();
    let families: [Family<super::ShapeStats>; 3] = [
        ("pgsurge_batch_batches_total", "Merged statements run, by statement.", |s| s.batches),
        ("pgsurge_batch_lookups_total", "Lookups answered by merged statements, by statement.", |s| s.lookups),
        ("pgsurge_batch_fallbacks_total", "Batches whose merged statement failed; each lookup then ran alone.", |s| s.fallbacks),
    ];
    for (name, help, get) in families {
        let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} counter");
        for (sql, s) in &stats {
            let _ = writeln!(o, "{name}{{statement=\"{}\"}} {}", esc(&String::from_utf8_lossy(sql)), get(s));
        }
    }
    let patterns = b.detect.patterns();
    let families: [Family<super::detect::Pattern>; 2] = [
        ("pgsurge_nplusone_patterns_total", "N+1 patterns seen (a lookup repeated 5+ times, under 1 s apart).", |p| p.occurrences),
        ("pgsurge_nplusone_lookups_total", "Lookups that were part of N+1 patterns.", |p| p.lookups),
    ];
    for (name, help, get) in families {
        let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} counter");
        for p in &patterns {
            let _ = writeln!(o, "{name}{{statement=\"{}\"}} {}", esc(&p.example), get(p));
        }
    }
    o
}
