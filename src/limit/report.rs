//! What the limits have done, per key: rows for `SHOW LIMITS` and the same as Prometheus text.

use std::fmt::Write;
use std::sync::atomic::Ordering;

use super::{Limiter, Rule, Scope};

const COLUMNS: &[&str] =
    &["scope", "key", "limit", "connections", "allowed", "delayed", "rejected", "conn_allowed", "conn_rejected", "waiting"];

fn describe(rule: Option<&Rule>) -> String {
    let Some(r) = rule else { return "(removed)".into() };
    let mut parts = vec![];
    for (what, rate) in [("qps", r.qps), ("tps", r.tps), ("conn/s", r.cps)] {
        if let Some(rate) = rate {
            parts.push(format!("{what} {} burst {}", rate.per_second, rate.burst));
        }
    }
    if let Some(m) = r.max_connections {
        parts.push(format!("max_connections {m}"));
    }
    parts.join(", ")
}

impl Limiter {
    /// One row per key that a limit has seen, then one per shared connection budget. Column names for the
    /// admin console's `SHOW LIMITS`; budget rows use `allowed` for units granted, `delayed` for grants that
    /// waited in the round-robin queue, `rejected` for waits that timed out, `waiting` for the queue now.
    pub fn show_rows(&self) -> (Vec<&'static str>, Vec<Vec<String>>) {
        let rules = self.rules.load();
        let conns = self.conns.lock().clone();
        let mut stats: Vec<_> = self.stats.lock().iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        stats.sort_by(|a, b| a.0.cmp(&b.0));
        let mut rows = vec![];
        for ((scope, key), s) in stats {
            let live = conns.get(&(scope, key.clone())).map(|n| n.to_string()).unwrap_or_else(|| "0".into());
            let n = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed).to_string();
            rows.push(vec![
                scope.name().to_string(),
                key.to_string(),
                describe(rules.rule_for(scope, &key)),
                live,
                n(&s.allowed),
                n(&s.delayed),
                n(&s.rejected),
                n(&s.conn_allowed),
                n(&s.conn_rejected),
                String::new(),
            ]);
        }
        let mut budgets: Vec<_> = self.budgets.lock().iter().map(|(k, q)| (k.clone(), q.clone())).collect();
        budgets.sort_by(|a, b| a.0.cmp(&b.0));
        for ((scope, name), q) in budgets {
            let (limit, in_use, waiting) = q.usage();
            let what = if scope == Scope::User { "max_user_connections" } else { "max_db_connections" };
            rows.push(vec![
                what.to_string(),
                name,
                format!("{limit} server connections, fair by {}", fairness_name(&rules.cfg)),
                in_use.to_string(),
                q.granted.load(Ordering::Relaxed).to_string(),
                q.waited.load(Ordering::Relaxed).to_string(),
                q.timed_out.load(Ordering::Relaxed).to_string(),
                String::new(),
                String::new(),
                waiting.to_string(),
            ]);
        }
        (COLUMNS.to_vec(), rows)
    }

    /// The counters as Prometheus text exposition (for /metrics).
    pub fn prometheus(&self) -> String {
        let (_, rows) = self.show_rows();
        let mut out = String::new();
        let families: &[(&str, &str, &str, usize, Option<&str>)] = &[
            ("pgsurge_limit_requests_total", "counter", "Query and transaction tokens by outcome.", 4, Some("allowed")),
            ("pgsurge_limit_requests_total", "", "", 5, Some("delayed")),
            ("pgsurge_limit_requests_total", "", "", 6, Some("rejected")),
            ("pgsurge_limit_connections_total", "counter", "Client logins checked by connection limits, by outcome.", 7, Some("allowed")),
            ("pgsurge_limit_connections_total", "", "", 8, Some("rejected")),
            ("pgsurge_limit_connections", "gauge", "Client connections counted against a connection cap.", 3, None),
        ];
        for (name, kind, help, col, outcome) in families {
            if !kind.is_empty() {
                let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            }
            for r in rows.iter().filter(|r| !r[0].starts_with("max_")) {
                let outcome = outcome.map(|o| format!(",outcome=\"{o}\"")).unwrap_or_default();
                let _ = writeln!(out, "{name}{{scope=\"{}\",key=\"{}\"{outcome}}} {}", esc(&r[0]), esc(&r[1]), r[*col]);
            }
        }
        let budget_families: &[(&str, &str, &str, usize)] = &[
            ("pgsurge_budget_connections", "gauge", "Server connections in use out of a shared budget.", 3),
            ("pgsurge_budget_waiting", "gauge", "Checkouts waiting their turn for a shared budget.", 9),
            ("pgsurge_budget_granted_total", "counter", "Units of a shared budget granted.", 4),
            ("pgsurge_budget_timeouts_total", "counter", "Waits for a shared budget that timed out.", 6),
        ];
        for (name, kind, help, col) in budget_families {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for r in rows.iter().filter(|r| r[0].starts_with("max_")) {
                let _ = writeln!(out, "{name}{{budget=\"{}\",key=\"{}\"}} {}", esc(&r[0]), esc(&r[1]), r[*col]);
            }
        }
        let _ = writeln!(
            out,
            "# HELP pgsurge_limit_tracked_keys Keys held by the rate limiters.\n# TYPE pgsurge_limit_tracked_keys gauge\npgsurge_limit_tracked_keys {}",
            self.tracked_keys()
        );
        out
    }
}

fn fairness_name(cfg: &super::LimitConfig) -> &'static str {
    match cfg.fairness {
        super::Fairness::User => "user",
        super::Fairness::Address => "address",
    }
}

/// Escapes a Prometheus label value.
fn esc(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}
