//! N+1 detection: per session, the same point-lookup statement run again and again within a short gap
//! (whether or not it could be merged); aggregated per statement group for `SHOW NPLUSONE`.

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::time::Instant;

use super::Batcher;

/// Lookups of one statement at most this far apart belong to one pattern.
pub const GAP: Duration = Duration::from_secs(1);
/// A run this long is an N+1 pattern.
pub const MIN_RUN: u32 = 5;
/// Lookup statements tracked per session at once (interleaved N+1 loops over several tables).
const SLOTS: usize = 4;
const MAX_PATTERNS: usize = 1024;

/// One N+1 pattern group, as SHOW NPLUSONE reports it.
#[derive(Debug, Clone, Default)]
pub struct Pattern {
    pub example: String,
    pub fix: String,
    /// Runs of ≥ MIN_RUN lookups seen.
    pub occurrences: u64,
    /// Lookups in those runs.
    pub lookups: u64,
    /// Time from the first to the last lookup of each run, summed.
    pub time: Duration,
}

#[derive(Default)]
pub struct Reports {
    patterns: Mutex<HashMap<u64, Pattern>>,
}

impl Reports {
    fn add(&self, group: u64, make: impl FnOnce() -> Pattern, f: impl FnOnce(&mut Pattern)) {
        let mut m = self.patterns.lock();
        if let Some(p) = m.get_mut(&group) {
            f(p);
        } else if m.len() < MAX_PATTERNS {
            f(m.entry(group).or_insert_with(make));
        }
    }

    /// Patterns, most lookups first.
    pub fn patterns(&self) -> Vec<Pattern> {
        let mut v: Vec<_> = self.patterns.lock().values().cloned().collect();
        v.sort_by_key(|p| std::cmp::Reverse(p.lookups));
        v
    }
}

struct Run {
    sql: Bytes,
    count: u32,
    first: Instant,
    last: Instant,
    /// The statement's fingerprint group, computed (one parse) the first time the run is long enough.
    group: Option<Option<u64>>,
}

/// One session's recent lookups.
#[derive(Default)]
pub struct Tracker {
    runs: Vec<Run>,
    /// The last statement seen that is not a lookup: repeated non-lookups cost one comparison.
    not_lookup: Option<Bytes>,
}

impl Tracker {
    /// Notes one execution of `sql` (statement text of an extended-protocol request).
    pub fn observe(&mut self, batcher: &Batcher, sql: &[u8], now: Instant) {
        if self.not_lookup.as_deref() == Some(sql) {
            return;
        }
        let i = match self.runs.iter().position(|r| r.sql == sql) {
            Some(i) => i,
            None => {
                if batcher.shape(sql).is_none() {
                    self.not_lookup = Some(Bytes::copy_from_slice(sql));
                    return;
                }
                if self.runs.len() == SLOTS {
                    let oldest = self.runs.iter().enumerate().min_by_key(|(_, r)| r.last).map_or(0, |(i, _)| i);
                    self.runs.swap_remove(oldest);
                }
                self.runs.push(Run { sql: Bytes::copy_from_slice(sql), count: 0, first: now, last: now, group: None });
                self.runs.len() - 1
            }
        };
        let r = &mut self.runs[i];
        if now.saturating_duration_since(r.last) > GAP {
            (r.count, r.first) = (0, now);
        }
        let step = now.saturating_duration_since(r.last);
        r.count += 1;
        r.last = now;
        let (count, span) = (r.count, now.saturating_duration_since(r.first));
        if count < MIN_RUN {
            return;
        }
        // Every lookup of a long run lands here: the parse behind the fingerprint is done once per run.
        let sql = &r.sql;
        let Some(group) = *r.group.get_or_insert_with(|| crate::sql::fingerprint_group(&String::from_utf8_lossy(sql))) else { return };
        let make =
            || Pattern { fix: suggested_fix(batcher, &r.sql), example: String::from_utf8_lossy(&r.sql).into_owned(), ..Default::default() };
        batcher.detect.add(group, make, |p| {
            if count == MIN_RUN {
                p.occurrences += 1;
                p.lookups += MIN_RUN as u64;
                p.time += span;
            } else {
                p.lookups += 1;
                p.time += step;
            }
        });
    }
}

fn suggested_fix(batcher: &Batcher, sql: &[u8]) -> String {
    match batcher.shape(sql) {
        Some(e) => format!(
            "fetch all keys in one query: ... FROM {} WHERE {} = ANY($1) with an array of keys, or join {} into the query that produced them",
            e.shape.table, e.shape.key_column, e.shape.table
        ),
        None => "fetch all keys in one query (= ANY($1) with an array of keys) or join".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn five_lookups_within_the_gap_are_a_pattern() {
        let b = Batcher::default();
        let mut t = Tracker::default();
        let q = b"SELECT name FROM users WHERE id = $1";
        for _ in 0..4 {
            t.observe(&b, q, Instant::now());
            t.observe(&b, b"SELECT 1", Instant::now());
            tokio::time::advance(Duration::from_millis(10)).await;
        }
        assert!(b.detect.patterns().is_empty());
        t.observe(&b, q, Instant::now());
        let p = b.detect.patterns();
        assert_eq!((p[0].occurrences, p[0].lookups), (1, 5));
        assert!(p[0].fix.contains("users WHERE id = ANY($1)"), "{}", p[0].fix);
        tokio::time::advance(Duration::from_secs(2)).await;
        for _ in 0..6 {
            t.observe(&b, q, Instant::now());
        }
        let p = b.detect.patterns();
        assert_eq!((p[0].occurrences, p[0].lookups), (2, 11));
    }
}
