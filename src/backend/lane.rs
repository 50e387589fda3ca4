//! A pool's slow lane: statements learned to be slow (state/estimates.rs) may hold at most `slow_pool_share` of the
//! pool's server connections and wait for one in a FIFO queue of their own, outside the pool's, so a fast request
//! never queues behind a slow one.
//!
//! The pool's FIFO semaphore queues fast checkouts only. A slow checkout first waits for its turn in the lane (a
//! one-permit FIFO semaphore: only the head of the lane competes); the head then takes a pool permit with
//! `try_acquire` alone, and only while the lane holds fewer than its cap and the pool has more free permits than
//! fast checkouts waiting for one; otherwise it sleeps until a permit or a lane slot comes back (`wake`). So fast
//! requests get every permit the lane does not hold, before any slow request does, and slow ones hold at most
//! `cap`, served in arrival order.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Sleep;

use crate::state::estimates::Estimates;

/// Counters read by SHOW SLOW and /metrics.
#[derive(Debug, Default)]
pub struct LaneStats {
    /// Checkouts made in the lane, and the time they waited for it.
    pub checkouts: AtomicU64,
    pub wait_us_total: AtomicU64,
    /// Slow checkouts that waited `query_wait_timeout` in vain (53300).
    pub timeouts: AtomicU64,
    /// Transactions that began fast and turned slow: counted against the lane from then on.
    pub promoted: AtomicU64,
}

#[derive(Debug)]
pub struct Lane {
    /// `slow_query_threshold` in µs; 0: the lane is off.
    threshold_us: AtomicU64,
    /// Server connections slow work may hold: max(1, floor(pool size × slow_pool_share)).
    cap: AtomicUsize,
    /// Server connections slow work holds now (more than `cap` only through transactions that turned slow).
    held: AtomicUsize,
    /// Slow checkouts in the lane's queue (the head included).
    waiting: AtomicUsize,
    turn: Semaphore,
    /// Wakes the head. It is the only task waiting on it, so `notify_one` (which keeps a wake-up given while
    /// nobody waits) loses none.
    freed: Notify,
    estimates: OnceLock<Estimates>,
    pub stats: LaneStats,
}

/// A server connection counted against the lane; given back on drop.
#[derive(Debug)]
pub struct LaneSlot(Arc<Lane>);

impl Drop for LaneSlot {
    fn drop(&mut self) {
        self.0.held.fetch_sub(1, Ordering::SeqCst);
        self.0.wake();
    }
}

/// Decrements the queue length however the wait ends (the future may be dropped on cancel).
struct Queued<'a>(&'a AtomicUsize);

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The lane's cap for a pool of `size` at `share` (0 < share ≤ 1): at least one connection.
pub fn cap_for(size: usize, share: f64) -> usize {
    // The epsilon keeps 100 × 0.29 = 28.999999999999996 at 29.
    ((size as f64 * share + 1e-9).floor() as usize).clamp(1, size.max(1))
}

impl Lane {
    pub fn new(size: usize, share: f64, threshold: Duration) -> Arc<Lane> {
        let lane = Arc::new(Lane {
            threshold_us: AtomicU64::new(0),
            cap: AtomicUsize::new(1),
            held: AtomicUsize::new(0),
            waiting: AtomicUsize::new(0),
            turn: Semaphore::new(1),
            freed: Notify::new(),
            estimates: OnceLock::new(),
            stats: LaneStats::default(),
        });
        lane.configure(size, share, threshold);
        lane
    }

    /// Applies (new) settings at once: a bigger cap lets the head go; a smaller one holds new slow checkouts
    /// until enough of the running ones end.
    pub fn configure(&self, size: usize, share: f64, threshold: Duration) {
        self.cap.store(cap_for(size, share), Ordering::SeqCst);
        self.threshold_us.store(u64::try_from(threshold.as_micros()).unwrap_or(u64::MAX), Ordering::Relaxed);
        self.wake();
    }

    /// The threshold in µs; 0 while the lane is off.
    pub fn threshold_us(&self) -> u64 {
        self.threshold_us.load(Ordering::Relaxed)
    }

    pub fn is_on(&self) -> bool {
        self.threshold_us() > 0
    }

    pub fn cap(&self) -> usize {
        self.cap.load(Ordering::Relaxed)
    }

    pub fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }

    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }

    /// The pool's statement estimates (made on first use: a pool whose lane was never on has none).
    pub fn estimates(&self) -> &Estimates {
        self.estimates.get_or_init(Estimates::default)
    }

    pub fn estimates_if_any(&self) -> Option<&Estimates> {
        self.estimates.get()
    }

    /// A pool permit or a lane slot came back, or a fast checkout stopped waiting: the head looks again. One
    /// atomic load when no slow checkout waits.
    pub fn wake(&self) {
        if self.waiting.load(Ordering::SeqCst) > 0 {
            self.freed.notify_one();
        }
    }

    /// Counts a transaction that turned slow against the lane, without waiting: it holds its connection already,
    /// so the lane may go over its cap until it ends; new slow checkouts wait meanwhile.
    pub fn promote(self: &Arc<Self>) -> LaneSlot {
        self.held.fetch_add(1, Ordering::SeqCst);
        self.stats.promoted.fetch_add(1, Ordering::Relaxed);
        LaneSlot(self.clone())
    }

    /// Waits (FIFO among slow checkouts) until the lane has room and a pool permit is free that no fast checkout
    /// waits for; None when `timer` fires first. `fast_waiting`: the pool's count of fast checkouts waiting.
    pub(super) async fn acquire(
        self: &Arc<Self>,
        permits: &Arc<Semaphore>,
        fast_waiting: &AtomicUsize,
        mut timer: Pin<&mut Sleep>,
    ) -> Option<(OwnedSemaphorePermit, LaneSlot)> {
        // Counted before the first look, so a release after that look wakes this task (SeqCst on both sides).
        self.waiting.fetch_add(1, Ordering::SeqCst);
        let _queued = Queued(&self.waiting);
        let _turn = tokio::select! {
            biased;
            t = self.turn.acquire() => t.ok()?,
            _ = timer.as_mut() => return None,
        };
        loop {
            // A lane switched off by a reload lets its queue go (still after fast checkouts).
            let room = !self.is_on() || self.held.load(Ordering::SeqCst) < self.cap.load(Ordering::SeqCst);
            if room && permits.available_permits() > fast_waiting.load(Ordering::SeqCst) {
                if let Ok(p) = permits.clone().try_acquire_owned() {
                    self.held.fetch_add(1, Ordering::SeqCst);
                    return Some((p, LaneSlot(self.clone())));
                }
            }
            tokio::select! {
                biased;
                _ = self.freed.notified() => {}
                _ = timer.as_mut() => return None,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sleep() -> Pin<Box<Sleep>> {
        Box::pin(tokio::time::sleep(Duration::from_secs(3600)))
    }

    #[test]
    fn the_cap_is_a_floor_share_of_the_pool_and_at_least_one() {
        assert_eq!(cap_for(10, 0.3), 3);
        assert_eq!(cap_for(10, 0.5), 5);
        assert_eq!(cap_for(100, 0.29), 29);
        assert_eq!(cap_for(2, 0.1), 1);
        assert_eq!(cap_for(4, 1.0), 4);
    }

    #[tokio::test(start_paused = true)]
    async fn slow_checkouts_hold_at_most_the_cap_and_wait_in_order() {
        let permits = Arc::new(Semaphore::new(4));
        let fast_waiting = AtomicUsize::new(0);
        let lane = Lane::new(4, 0.5, Duration::from_millis(20));
        let a = lane.acquire(&permits, &fast_waiting, sleep().as_mut()).await.unwrap();
        let b = lane.acquire(&permits, &fast_waiting, sleep().as_mut()).await.unwrap();
        assert_eq!((lane.held(), permits.available_permits()), (2, 2));
        // A third waits although the pool has permits free; fast checkouts take them meanwhile.
        let l2 = lane.clone();
        let p2 = permits.clone();
        let third = tokio::spawn(async move { l2.acquire(&p2, &AtomicUsize::new(0), sleep().as_mut()).await });
        tokio::task::yield_now().await;
        assert_eq!(lane.waiting(), 1);
        let fast = permits.clone().try_acquire_owned().expect("a fast checkout is not held up by the lane");
        drop(a);
        let (_p, _s) = third.await.unwrap().expect("the slot given back goes to the next slow checkout");
        assert_eq!((lane.held(), lane.waiting()), (2, 0));
        drop((b, fast));
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_checkout_leaves_a_free_permit_to_a_waiting_fast_one_and_times_out_alone() {
        let permits = Arc::new(Semaphore::new(2));
        let lane = Lane::new(2, 1.0, Duration::from_millis(20));
        let held = permits.clone().try_acquire_owned().unwrap();
        let fast_waiting = AtomicUsize::new(1); // a fast checkout is queued for the one permit left
        let mut timer = Box::pin(tokio::time::sleep(Duration::from_millis(50)));
        assert!(lane.acquire(&permits, &fast_waiting, timer.as_mut()).await.is_none(), "times out instead of overtaking");
        assert_eq!((lane.waiting(), lane.held(), permits.available_permits()), (0, 0, 1));
        drop(held);
        let promoted = lane.promote();
        assert_eq!(lane.held(), 1);
        drop(promoted);
        assert_eq!(lane.held(), 0);
    }
}
