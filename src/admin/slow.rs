//! What the slow lane reports: `SHOW SLOW` (per statement: class, estimate, runs, time waited in the slow lane)
//! and its /metrics lines (per pool: the lane's cap, what it holds and queues, its waits and timeouts).

use std::fmt::Write;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::table::Table;
use crate::app::App;
use crate::backend::Pool;
use crate::state::estimates::Estimate;

/// Statements listed per pool: the slow ones first, then by estimate.
const LISTED: usize = 100;

/// The statements a pool's lane knows, in the order SHOW SLOW lists them.
fn listed(p: &Pool) -> Vec<Arc<Estimate>> {
    let Some(estimates) = p.lane.estimates_if_any() else { return vec![] };
    let threshold = p.lane.threshold_us();
    let mut v = estimates.all();
    v.sort_by(|a, b| {
        let key = |e: &Estimate| (e.is_slow(threshold), e.estimate());
        key(b).cmp(&key(a)).then_with(|| a.text.cmp(&b.text))
    });
    v.truncate(LISTED);
    v
}

/// Per (database, user, statement): its class now, its run-time estimate, runs measured, and its checkouts in the
/// slow lane with the time they waited.
pub fn show(app: &App) -> Table {
    let mut t = Table::new(&[
        "database",
        "user",
        "statement",
        "class",
        "estimate_ms",
        "executions",
        "slow_checkouts",
        "slow_wait_ms",
        "threshold_ms",
    ]);
    for p in app.pools() {
        let threshold = p.lane.threshold_us();
        for e in listed(&p) {
            let (checkouts, waited) = e.lane_waits();
            t.row(crate::row![
                &p.key.database,
                &p.key.user,
                &e.text,
                if e.is_slow(threshold) { "slow" } else { "fast" },
                format!("{:.3}", e.estimate().as_secs_f64() * 1e3),
                e.runs(),
                checkouts,
                format!("{:.3}", waited.as_secs_f64() * 1e3),
                format!("{:.3}", threshold as f64 / 1e3),
            ]);
        }
    }
    t
}

fn ld(a: &std::sync::atomic::AtomicU64) -> f64 {
    a.load(Ordering::Relaxed) as f64
}

fn esc(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

type Family = (&'static str, &'static str, &'static str, fn(&Pool) -> f64);

/// The lane's per-pool series, and each listed slow statement's estimate.
pub fn prometheus(app: &App) -> String {
    let mut o = String::new();
    let pools = app.pools();
    let families: [Family; 8] = [
        ("pgsurge_slow_lane_threshold_seconds", "gauge", "slow_query_threshold (0: no slow lane).", |p| p.lane.threshold_us() as f64 / 1e6),
        ("pgsurge_slow_lane_capacity", "gauge", "Server connections slow statements may hold (slow_pool_share).", |p| p.lane.cap() as f64),
        ("pgsurge_slow_lane_held", "gauge", "Server connections slow statements hold now.", |p| p.lane.held() as f64),
        ("pgsurge_slow_lane_waiting_clients", "gauge", "Slow checkouts queued in the slow lane.", |p| p.lane.waiting() as f64),
        ("pgsurge_slow_lane_checkouts_total", "counter", "Checkouts made in the slow lane.", |p| ld(&p.lane.stats.checkouts)),
        ("pgsurge_slow_lane_wait_seconds_total", "counter", "Time slow checkouts waited in the slow lane.", |p| {
            ld(&p.lane.stats.wait_us_total) / 1e6
        }),
        ("pgsurge_slow_lane_timeouts_total", "counter", "Slow checkouts that waited query_wait_timeout in vain (53300).", |p| {
            ld(&p.lane.stats.timeouts)
        }),
        (
            "pgsurge_slow_lane_promoted_total",
            "counter",
            "Transactions that began fast, turned slow and were counted against the lane.",
            |p| ld(&p.lane.stats.promoted),
        ),
    ];
    for (name, kind, help, get) in families {
        let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for p in &pools {
            let _ = writeln!(o, "{name}{{database=\"{}\",user=\"{}\"}} {}", esc(&p.key.database), esc(&p.key.user), get(p));
        }
    }
    let name = "pgsurge_slow_statement_estimate_seconds";
    let _ = writeln!(o, "# HELP {name} Run-time estimate of each statement the slow lane counts as slow.\n# TYPE {name} gauge");
    for p in &pools {
        let threshold = p.lane.threshold_us();
        for e in listed(p).into_iter().filter(|e| e.is_slow(threshold)) {
            let (db, user) = (esc(&p.key.database), esc(&p.key.user));
            let _ =
                writeln!(o, "{name}{{database=\"{db}\",user=\"{user}\",statement=\"{}\"}} {}", esc(&e.text), e.estimate().as_secs_f64());
        }
    }
    o
}
