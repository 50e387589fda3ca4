//! A pool's counters (read by the admin console and /metrics), what SHOW SERVERS lists of each server connection,
//! and the guard that counts a checkout in the wait queue.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// Counters read by the admin console and /metrics.
#[derive(Debug, Default)]
pub struct PoolStats {
    pub checkouts: AtomicU64,
    pub transactions: AtomicU64,
    pub queries: AtomicU64,
    pub wait_us_total: AtomicU64,
    pub wait_timeouts: AtomicU64,
    pub connects: AtomicU64,
    pub connect_failures: AtomicU64,
    pub closed_dirty: AtomicU64,
    pub bytes_to_server: AtomicU64,
    pub bytes_to_client: AtomicU64,
    pub waiting: AtomicUsize,
    pub active: AtomicUsize,
    /// Sessions holding their server connection because of LISTEN, temp tables, locks, ... (now / ever).
    pub pinned: AtomicUsize,
    pub pins_total: AtomicU64,
    /// Checkout wait times by `WAIT_BUCKETS_US` upper bound (not cumulative; the last is +Inf).
    pub wait_hist: [AtomicU64; WAIT_BUCKETS_US.len() + 1],
}

/// Upper bounds of the wait-time histogram buckets, in µs (exported in seconds).
pub const WAIT_BUCKETS_US: [u64; 12] =
    [100, 500, 1_000, 5_000, 10_000, 50_000, 100_000, 500_000, 1_000_000, 5_000_000, 10_000_000, 30_000_000];

impl PoolStats {
    pub(super) fn record_wait(&self, us: u64) {
        let i = WAIT_BUCKETS_US.iter().position(|&b| us <= b).unwrap_or(WAIT_BUCKETS_US.len());
        self.wait_hist[i].fetch_add(1, Ordering::Relaxed);
        self.wait_us_total.fetch_add(us, Ordering::Relaxed);
    }
}

/// What SHOW SERVERS lists of one server connection (kept from connect to close, not touched per query).
#[derive(Debug, Clone)]
pub struct ServerInfo {
    pub id: u64,
    pub connect_time: std::time::SystemTime,
    pub local_addr: Option<std::net::SocketAddr>,
    pub remote: String,
    /// The host and port it is to: one of the target's hosts (after a failover, not the first).
    pub host: String,
    pub port: u16,
    pub backend_pid: u32,
    pub tls: bool,
}

/// Counts a checkout in the wait queue until dropped, however the wait ends (the future may be dropped on cancel).
pub(super) struct Waiting<'a>(&'a AtomicUsize);

impl<'a> Waiting<'a> {
    pub(super) fn new(n: &'a AtomicUsize) -> Waiting<'a> {
        // SeqCst: the slow lane's head compares this with the free permits (backend/lane.rs).
        n.fetch_add(1, Ordering::SeqCst);
        Waiting(n)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}
