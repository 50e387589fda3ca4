//! N+1 detection: per session, the same point-lookup statement run again and again within a short gap
//! (whether or not it could be merged); aggregated per statement group for `SHOW NPLUSONE`.

use std::collections::HashMap;
use std::time::Duration;

use std::sync::Arc;

use parking_lot::Mutex;
use tokio::time::Instant;

use crate::state::Statement;

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
    statement: Arc<Statement>,
    count: u32,
    first: Instant,
    last: Instant,
}

/// One session's recent lookups.
#[derive(Default)]
pub struct Tracker {
    runs: Vec<Run>,
}

impl Tracker {
    /// Notes one execution of `statement` (an extended-protocol request's).
    pub fn observe(&mut self, reports: &Reports, statement: &Arc<Statement>, now: Instant) {
        let i = match self.runs.iter().position(|r| Arc::ptr_eq(&r.statement, statement)) {
            Some(i) => i,
            None => {
                if statement.lookup().is_none() {
                    return;
                }
                if self.runs.len() == SLOTS {
                    let oldest = self.runs.iter().enumerate().min_by_key(|(_, r)| r.last).map_or(0, |(i, _)| i);
                    self.runs.swap_remove(oldest);
                }
                self.runs.push(Run { statement: statement.clone(), count: 0, first: now, last: now });
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
        // The fingerprint behind the group is computed once per statement.
        let Some(group) = r.statement.group() else { return };
        let make = || Pattern {
            fix: suggested_fix(&r.statement),
            example: String::from_utf8_lossy(&r.statement.query).into_owned(),
            ..Default::default()
        };
        reports.add(group, make, |p| {
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

fn suggested_fix(statement: &Statement) -> String {
    match statement.lookup() {
        Some(l) => format!(
            "fetch all keys in one query: ... FROM {} WHERE {} = ANY($1) with an array of keys, or join {} into the query that produced them",
            l.shape.table, l.shape.key_column, l.shape.table
        ),
        None => "fetch all keys in one query (= ANY($1) with an array of keys) or join".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn five_lookups_within_the_gap_are_a_pattern() {
        let b = Reports::default();
        let r = crate::state::Registry::default();
        let mut t = Tracker::default();
        let q = r.intern(b"SELECT name FROM users WHERE id = $1", b"\0\0");
        let other = r.intern(b"SELECT 1", b"\0\0");
        for _ in 0..4 {
            t.observe(&b, &q, Instant::now());
            t.observe(&b, &other, Instant::now());
            tokio::time::advance(Duration::from_millis(10)).await;
        }
        assert!(b.patterns().is_empty());
        t.observe(&b, &q, Instant::now());
        let p = b.patterns();
        assert_eq!((p[0].occurrences, p[0].lookups), (1, 5));
        assert!(p[0].fix.contains("users WHERE id = ANY($1)"), "{}", p[0].fix);
        tokio::time::advance(Duration::from_secs(2)).await;
        for _ in 0..6 {
            t.observe(&b, &q, Instant::now());
        }
        let p = b.patterns();
        assert_eq!((p[0].occurrences, p[0].lookups), (2, 11));
    }
}
