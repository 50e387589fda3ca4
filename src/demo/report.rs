//! The demo's results: one table for people, one JSON document for machines.

use std::fmt::Write;

use super::measure::Side;
use super::proxy::{ConsoleAnswer, Features};
use super::schema::Counting;

#[derive(Debug, Clone, serde::Serialize)]
pub struct WorkloadResult {
    pub key: &'static str,
    pub title: &'static str,
    pub what: &'static str,
    pub direct: Side,
    pub pgsurge: Side,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct ClusterInfo {
    pub dir: String,
    pub port: u16,
    pub postmaster_pid: Option<u32>,
    pub kept: bool,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    pub pgsurge_version: &'static str,
    pub postgres_version: String,
    /// Seconds each side (direct, pgsurge) of each workload ran.
    pub seconds_per_side: f64,
    /// Whether pgsurge ran with its read cache / N+1 batcher on (the test's assertions on workloads 3 and 4
    /// depend on these).
    pub cache_enabled: bool,
    pub batch_enabled: bool,
    pub features: Features,
    /// pgsurge's command line.
    pub command: String,
    pub pool_size: usize,
    pub flood_qps_limit: u32,
    /// What `upstream_queries` counts.
    pub counting: Counting,
    pub cluster: ClusterInfo,
    pub pgsurge_port: u16,
    pub workloads: Vec<WorkloadResult>,
    pub nplusone: ConsoleAnswer,
}

/// The table, the notes under it and the console's N+1 findings.
pub fn render(r: &Report) -> String {
    let mut out = String::new();
    let onoff = |b: bool| if b { "on" } else { "off" };
    let limited = match r.features.rate_limited_users.as_slice() {
        [] => "no rate limits".to_string(),
        users => format!("{} qps on {}", r.flood_qps_limit, users.iter().map(|u| format!("`{u}`")).collect::<Vec<_>>().join(", ")),
    };
    let _ = writeln!(
        out,
        "\npgsurge {} in front of Postgres {} — pool of {} per user, cache {}, batching {}, {limited}",
        r.pgsurge_version,
        r.postgres_version,
        r.pool_size,
        onoff(r.cache_enabled),
        onoff(r.batch_enabled),
    );
    let _ = writeln!(out, "pgsurge ran as: {}", r.command);
    let counted = match r.counting {
        Counting::PgStatStatements => "statements Postgres executed (pg_stat_statements)",
        Counting::Transactions => "transactions Postgres ran (pg_stat_database; pg_stat_statements is not installed)",
    };
    let _ = writeln!(
        out,
        "Each side ran {:.1}s. PG conns: most connections Postgres held at once. PG queries: {counted}.\n",
        r.seconds_per_side
    );
    let _ = writeln!(
        out,
        "{:<30} {:<8} {:>10} {:>9} {:>9} {:>7} {:>9} {:>11}",
        "workload", "target", "req/s", "p50 ms", "p99 ms", "errors", "PG conns", "PG queries"
    );
    let _ = writeln!(out, "{}", "-".repeat(30 + 8 + 10 + 9 + 9 + 7 + 9 + 11 + 7));
    for w in &r.workloads {
        for (i, s) in [&w.direct, &w.pgsurge].into_iter().enumerate() {
            let _ = writeln!(
                out,
                "{:<30} {:<8} {:>10} {:>9} {:>9} {:>7} {:>9} {:>11}",
                if i == 0 { w.title } else { "" },
                s.target.label(),
                thousands(s.throughput_per_s.round() as i64),
                ms(s.p50_ms),
                ms(s.p99_ms),
                thousands(s.errors as i64),
                thousands(s.peak_pg_connections),
                s.upstream_queries.map(thousands).unwrap_or_else(|| "?".into()),
            );
        }
    }
    let _ = writeln!(out);
    for w in &r.workloads {
        let _ = writeln!(out, "{}: {}.", w.title, w.what);
        for s in [&w.direct, &w.pgsurge] {
            let mut notes = vec![format!("{} requests", thousands(s.requests as i64))];
            if let (Some(c), Some(t)) = (s.clients_connected, s.connect_seconds) {
                notes.push(format!("{c} of {} clients connected in {t:.1}s", s.clients));
            }
            if let Some(f) = &s.flooder {
                notes.push(format!(
                    "flooder served {}, refused by its rate limit {}",
                    thousands(f.served as i64),
                    thousands(f.limited as i64)
                ));
            }
            if let Some(e) = &s.first_error {
                notes.push(format!("first error: {e}"));
            }
            let _ = writeln!(out, "    {:<8} {}", s.target.label(), notes.join("; "));
        }
    }
    let _ = writeln!(out, "\n{} (admin console):", r.nplusone.command);
    match &r.nplusone.error {
        Some(e) => {
            let _ = writeln!(out, "    the console answered with an error: {e}");
        }
        None if r.nplusone.rows.is_empty() => {
            let _ = writeln!(out, "    no N+1 pattern recorded");
        }
        None => {
            let _ = writeln!(out, "    {}", r.nplusone.columns.join(" | "));
            for row in &r.nplusone.rows {
                let _ = writeln!(out, "    {}", row.join(" | "));
            }
        }
    }
    out
}

fn ms(v: Option<f64>) -> String {
    match v {
        Some(x) if x >= 100.0 => format!("{x:.0}"),
        Some(x) => format!("{x:.2}"),
        None => "-".into(),
    }
}

/// 1234567 -> "1,234,567".
pub fn thousands(n: i64) -> String {
    let digits = n.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, ch) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(ch);
    }
    if n < 0 {
        format!("-{out}")
    } else {
        out
    }
}

#[cfg(test)]
mod tests {
    use super::thousands;

    #[test]
    fn thousands_separates_groups_of_three() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(-1234567), "-1,234,567");
    }
}
