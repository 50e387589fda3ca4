//! Run-time estimates for the slow lane: per statement (its normalised text, `sql::normalize`) a moving average of
//! how long its runs take, updated at each run's ReadyForQuery, kept per pool in a bounded map. A statement is slow
//! while its estimate is over the pool's threshold, or when a `pgsurge:slow` comment says so.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::Statement;
use crate::sql::normalize::{shape, Shape};

/// Statements remembered per pool; past this the least used are forgotten (and are fast again if they return).
const CAPACITY: usize = 4096;
/// Bytes of normalised text kept for SHOW SLOW.
const TEXT_MAX: usize = 256;

/// What is known of one statement's run time.
#[derive(Debug)]
pub struct Estimate {
    /// The normalised text (constants as `?`), cut to `TEXT_MAX` bytes.
    pub text: Box<str>,
    /// A `pgsurge:slow` comment marks it slow whatever its runs take.
    pub hinted: bool,
    /// Exponentially weighted moving average of its runs, in µs (meaningful once `runs` > 0).
    avg_us: AtomicU64,
    runs: AtomicU64,
    /// Checkouts it made in the slow lane, and the time they waited there.
    lane_checkouts: AtomicU64,
    lane_wait_us: AtomicU64,
}

impl Estimate {
    pub fn new(text: &[u8], hinted: bool) -> Estimate {
        let mut cut = text.len().min(TEXT_MAX);
        while cut > 0 && cut < text.len() && (text[cut] & 0xC0) == 0x80 {
            cut -= 1; // not inside a UTF-8 character
        }
        Estimate {
            text: String::from_utf8_lossy(&text[..cut]).into(),
            hinted,
            avg_us: AtomicU64::new(0),
            runs: AtomicU64::new(0),
            lane_checkouts: AtomicU64::new(0),
            lane_wait_us: AtomicU64::new(0),
        }
    }

    /// Adds one run. The first run is the estimate; after that each run moves it a quarter of the way: one run of
    /// 5x the threshold makes a fast statement slow, and a slow one takes a handful of fast runs to come back.
    pub fn record(&self, run: Duration) {
        let us = u64::try_from(run.as_micros()).unwrap_or(u64::MAX);
        if self.runs.fetch_add(1, Ordering::Relaxed) == 0 {
            self.avg_us.store(us, Ordering::Relaxed);
        } else {
            let _ = self.avg_us.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |avg| Some(ewma(avg, us)));
        }
    }

    /// The current estimate (zero before the first run).
    pub fn estimate(&self) -> Duration {
        Duration::from_micros(self.avg_us.load(Ordering::Relaxed))
    }

    pub fn runs(&self) -> u64 {
        self.runs.load(Ordering::Relaxed)
    }

    /// Slow under `threshold_us` (0: the lane is off, nothing is slow). Never run and not hinted: fast.
    pub fn is_slow(&self, threshold_us: u64) -> bool {
        threshold_us > 0 && (self.hinted || self.runs() > 0 && self.avg_us.load(Ordering::Relaxed) > threshold_us)
    }

    /// Counts a checkout in the slow lane and how long it waited for it.
    pub fn lane_waited(&self, waited: Duration) {
        self.lane_checkouts.fetch_add(1, Ordering::Relaxed);
        self.lane_wait_us.fetch_add(u64::try_from(waited.as_micros()).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    /// (checkouts in the slow lane, total time they waited).
    pub fn lane_waits(&self) -> (u64, Duration) {
        (self.lane_checkouts.load(Ordering::Relaxed), Duration::from_micros(self.lane_wait_us.load(Ordering::Relaxed)))
    }
}

/// `avg` moved a quarter of the way to `sample`.
fn ewma(avg: u64, sample: u64) -> u64 {
    if sample >= avg {
        avg + (sample - avg) / 4
    } else {
        avg - (avg - sample) / 4
    }
}

/// The estimates of one pool's statements, by shape.
pub struct Estimates {
    map: quick_cache::sync::Cache<u64, Arc<Estimate>>,
}

impl std::fmt::Debug for Estimates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Estimates({} statements)", self.map.len())
    }
}

impl Default for Estimates {
    fn default() -> Self {
        Estimates { map: quick_cache::sync::Cache::new(CAPACITY) }
    }
}

impl Estimates {
    /// The estimate of a simple query's text (normalised into `buf`, which is reused across calls).
    pub fn of_text(&self, sql: &[u8], buf: &mut Vec<u8>) -> Arc<Estimate> {
        let s = shape(sql, buf);
        self.map.get(&s.hash).unwrap_or_else(|| self.insert(s, buf))
    }

    /// The estimate of a prepared statement: its shape is memoised on it, so this is one map lookup.
    pub fn of_statement(&self, stmt: &Statement, buf: &mut Vec<u8>) -> Arc<Estimate> {
        let s = stmt.shape();
        self.map.get(&s.hash).unwrap_or_else(|| {
            shape(&stmt.query, buf);
            self.insert(s, buf)
        })
    }

    fn insert(&self, s: Shape, text: &[u8]) -> Arc<Estimate> {
        let e = Arc::new(Estimate::new(text, s.slow_hint));
        self.map.insert(s.hash, e.clone());
        e
    }

    /// Every statement remembered.
    pub fn all(&self) -> Vec<Arc<Estimate>> {
        self.map.iter().map(|(_, e)| e).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1000;

    #[test]
    fn a_statement_never_run_is_fast_and_its_first_run_is_its_estimate() {
        let e = Estimate::new(b"select pg_sleep(?)", false);
        assert!(!e.is_slow(20 * MS));
        e.record(Duration::from_millis(100));
        assert_eq!(e.estimate(), Duration::from_millis(100));
        assert!(e.is_slow(20 * MS));
        assert!(!e.is_slow(0), "threshold 0: the lane is off");
    }

    #[test]
    fn the_estimate_crosses_the_threshold_both_ways_and_stays_slow_until_it_falls_back_under() {
        let e = Estimate::new(b"select f(?)", false);
        for _ in 0..20 {
            e.record(Duration::from_millis(1));
        }
        assert_eq!(e.estimate(), Duration::from_millis(1));
        e.record(Duration::from_millis(200));
        assert!(e.is_slow(20 * MS), "one run of 10x the threshold moves it: {:?}", e.estimate());
        let mut fast_runs = 0;
        while e.is_slow(20 * MS) {
            e.record(Duration::from_millis(1));
            fast_runs += 1;
        }
        assert!((3..=10).contains(&fast_runs), "a handful of fast runs bring it back: {fast_runs}");
        assert!(e.estimate() <= Duration::from_millis(20));
        assert_eq!(e.runs(), 21 + fast_runs);
    }

    #[test]
    fn the_average_converges_on_a_steady_run_time() {
        let e = Estimate::new(b"x", false);
        e.record(Duration::from_millis(500));
        for _ in 0..60 {
            e.record(Duration::from_millis(30));
        }
        let est = e.estimate().as_micros();
        assert!((30_000..30_010).contains(&est), "{est}");
        assert_eq!(ewma(100, 200), 125);
        assert_eq!(ewma(200, 100), 175);
    }

    #[test]
    fn a_hint_makes_a_statement_slow_before_any_run() {
        let m = Estimates::default();
        let e = m.of_text(b"/* pgsurge:slow */ SELECT report(1)", &mut vec![]);
        assert!(e.hinted && e.is_slow(MS));
        assert_eq!(&*e.text, "select report(?) /* pgsurge:slow */");
    }

    #[test]
    fn calls_of_one_statement_share_an_estimate() {
        let m = Estimates::default();
        let mut buf = vec![];
        let a = m.of_text(b"SELECT pg_sleep(0.1)", &mut buf);
        let b = m.of_text(b"select pg_sleep(2)", &mut buf);
        assert!(Arc::ptr_eq(&a, &b));
        let r = crate::state::Registry::default();
        let c = m.of_statement(&r.intern(b"SELECT pg_sleep($1)", &[0, 0]), &mut buf);
        assert!(Arc::ptr_eq(&a, &c), "a prepared form with a parameter is the same statement");
        assert!(!Arc::ptr_eq(&a, &m.of_text(b"SELECT pg_sleep(1) FROM t", &mut buf)));
        assert_eq!(m.all().len(), 2);
        let long = "x".repeat(1000);
        assert_eq!(Estimate::new(long.as_bytes(), false).text.len(), TEXT_MAX);
        assert_eq!(&*Estimate::new("ab€".as_bytes(), false).text, "ab€");
    }
}
