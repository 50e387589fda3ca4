//! A counting budget whose waiters are served by key (users or client addresses) instead of in one FIFO, so one
//! key with many waiters cannot starve a key with few: a freed unit goes to the waiting key that holds the fewest
//! units (ties: the key served longest ago, i.e. round-robin). Holding fewest first matters when keys hold units
//! for very different times: strict turns would give a key of 0.1 ms lookups only every other grant behind a key
//! of 50 ms statements, while fewest-first lets it keep its fair share. FIFO within a key.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::rate::Key;

struct Inner {
    limit: usize,
    in_use: usize,
    /// Waiters per key, oldest first.
    queues: HashMap<Key, VecDeque<(u64, oneshot::Sender<()>)>>,
    /// Keys with waiters, in the order they are served next (among those holding equally few).
    ring: VecDeque<Key>,
    /// Units held per key (keys holding none are absent).
    held: HashMap<Key, usize>,
}

pub struct FairQueue {
    pub name: String,
    inner: Mutex<Inner>,
    next_id: AtomicU64,
    pub granted: AtomicU64,
    pub waited: AtomicU64,
    pub timed_out: AtomicU64,
}

/// A unit of the budget; returned (to the next waiter in turn) on drop.
pub struct FairPermit {
    queue: Arc<FairQueue>,
    key: Key,
}

impl Drop for FairPermit {
    fn drop(&mut self) {
        self.queue.release(&self.key);
    }
}

impl FairQueue {
    pub fn new(name: String, limit: usize) -> Arc<FairQueue> {
        Arc::new(FairQueue {
            name,
            inner: Mutex::new(Inner { limit, in_use: 0, queues: HashMap::new(), ring: VecDeque::new(), held: HashMap::new() }),
            next_id: AtomicU64::new(0),
            granted: AtomicU64::new(0),
            waited: AtomicU64::new(0),
            timed_out: AtomicU64::new(0),
        })
    }

    /// Waits for a unit until `deadline`; `None` if none came in time.
    pub async fn acquire(self: &Arc<Self>, key: &Key, deadline: Instant) -> Option<FairPermit> {
        let (id, rx) = {
            let mut g = self.inner.lock();
            if g.in_use < g.limit && g.ring.is_empty() {
                g.in_use += 1;
                *g.held.entry(key.clone()).or_insert(0) += 1;
                self.granted.fetch_add(1, Ordering::Relaxed);
                return Some(FairPermit { queue: self.clone(), key: key.clone() });
            }
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            let (tx, rx) = oneshot::channel();
            let q = g.queues.entry(key.clone()).or_default();
            if q.is_empty() {
                g.ring.push_back(key.clone());
            }
            g.queues.get_mut(key).expect("just added").push_back((id, tx));
            (id, rx)
        };
        self.waited.fetch_add(1, Ordering::Relaxed);
        // If this future is dropped (client cancelled or left), the guard takes the waiter out of the queue, or
        // passes on a unit that was handed to it meanwhile.
        let mut guard = Waiting { queue: self, key, id, done: false };
        let got = tokio::time::timeout_at(deadline, rx).await;
        guard.done = true;
        match got {
            Ok(Ok(())) => Some(FairPermit { queue: self.clone(), key: key.clone() }),
            _ if guard.leave() => Some(FairPermit { queue: self.clone(), key: key.clone() }),
            _ => {
                self.timed_out.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }

    /// Takes back `key`'s unit and hands it to the next waiter in turn, or puts it back.
    fn release(&self, key: &Key) {
        let mut g = self.inner.lock();
        if let Some(n) = g.held.get_mut(key) {
            *n -= 1;
            if *n == 0 {
                g.held.remove(key);
            }
        }
        if g.in_use <= g.limit {
            while let Some(tx) = next_waiter(&mut g) {
                if tx.send(()).is_ok() {
                    self.granted.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            }
        }
        g.in_use -= 1;
    }

    /// Changes the size (reload); new room goes to waiters at once, excess units are not handed on.
    pub fn set_limit(&self, limit: usize) {
        let mut g = self.inner.lock();
        g.limit = limit;
        while g.in_use < g.limit {
            let Some(tx) = next_waiter(&mut g) else { break };
            if tx.send(()).is_ok() {
                g.in_use += 1;
                self.granted.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// (limit, in use, waiting)
    pub fn usage(&self) -> (usize, usize, usize) {
        let g = self.inner.lock();
        (g.limit, g.in_use, g.queues.values().map(VecDeque::len).sum())
    }
}

/// Takes the oldest waiter of the waiting key that holds the fewest units (first in the ring among equals), counts
/// the unit as that key's, and moves the key to the back of the ring.
fn next_waiter(g: &mut Inner) -> Option<oneshot::Sender<()>> {
    let held = |k: &Key| g.held.get(k).copied().unwrap_or(0);
    let (at, _) = g.ring.iter().enumerate().min_by_key(|(i, k)| (held(k), *i))?;
    let key = g.ring.remove(at).expect("in range");
    *g.held.entry(key.clone()).or_insert(0) += 1;
    let q = g.queues.get_mut(&key).expect("ring keys have queues");
    let (_, tx) = q.pop_front().expect("queues in the ring are not empty");
    if q.is_empty() {
        g.queues.remove(&key);
    } else {
        g.ring.push_back(key);
    }
    Some(tx)
}

struct Waiting<'a> {
    queue: &'a FairQueue,
    key: &'a Key,
    id: u64,
    done: bool,
}

impl Waiting<'_> {
    /// Removes this waiter; true if it was already handed a unit (which the caller now owns).
    fn leave(&self) -> bool {
        let mut g = self.queue.inner.lock();
        let Some(q) = g.queues.get_mut(self.key) else { return true };
        let Some(pos) = q.iter().position(|(id, _)| *id == self.id) else { return true };
        q.remove(pos);
        if q.is_empty() {
            g.queues.remove(self.key);
            g.ring.retain(|k| k != self.key);
        }
        false
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if !self.done && self.leave() {
            self.queue.release(self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn waiters_are_served_round_robin_across_keys() {
        let q = FairQueue::new("db".into(), 1);
        let far = Instant::now() + Duration::from_secs(60);
        let (a, b): (Key, Key) = ("a".into(), "b".into());
        let first = q.acquire(&a, far).await.unwrap();
        let order = Arc::new(Mutex::new(vec![]));
        let mut tasks = vec![];
        for (i, k) in [&a, &a, &a, &a, &b, &b].into_iter().enumerate() {
            let (q, k, order) = (q.clone(), k.clone(), order.clone());
            tasks.push(tokio::spawn(async move {
                let p = q.acquire(&k, far).await.unwrap();
                order.lock().push(k.to_string());
                tokio::time::sleep(Duration::from_millis(1)).await;
                drop(p);
            }));
            // queue them in a known order
            for _ in 0..=i {
                tokio::task::yield_now().await;
            }
        }
        drop(first);
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(*order.lock(), ["a", "b", "a", "b", "a", "a"]);
        assert_eq!(q.usage(), (1, 0, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn a_freed_unit_goes_to_the_waiting_key_holding_fewest() {
        let q = FairQueue::new("db".into(), 3);
        let far = Instant::now() + Duration::from_secs(60);
        let (a, b): (Key, Key) = ("a".into(), "b".into());
        let a1 = q.acquire(&a, far).await.unwrap();
        let _a2 = q.acquire(&a, far).await.unwrap();
        let b1 = q.acquire(&b, far).await.unwrap();
        let qa = q.clone();
        let ka = a.clone();
        let wa = tokio::spawn(async move { qa.acquire(&ka, far).await.map(|_| ()) });
        tokio::task::yield_now().await;
        let qb = q.clone();
        let kb = b.clone();
        let wb = tokio::spawn(async move { qb.acquire(&kb, far).await.map(|p| (p, ())) });
        tokio::task::yield_now().await;
        // b holds 1 (after this release: 0), a holds 2; b's waiter goes first though a's came first.
        drop(b1);
        let (p, ()) = wb.await.unwrap().unwrap();
        assert!(!wa.is_finished());
        drop(p);
        drop(a1);
        assert!(wa.await.unwrap().is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn a_timed_out_or_dropped_waiter_leaves_no_trace() {
        let q = FairQueue::new("db".into(), 1);
        let k: Key = "a".into();
        let p = q.acquire(&k, Instant::now()).await.unwrap();
        assert!(q.acquire(&k, Instant::now() + Duration::from_millis(10)).await.is_none());
        let fut = q.acquire(&k, Instant::now() + Duration::from_secs(10));
        assert!(tokio::time::timeout(Duration::from_millis(5), fut).await.is_err());
        assert_eq!(q.usage(), (1, 1, 0));
        drop(p);
        assert_eq!(q.usage(), (1, 0, 0));
        let _p = q.acquire(&k, Instant::now()).await.expect("free again");
        q.set_limit(2);
        assert!(q.acquire(&k, Instant::now()).await.is_some());
    }
}
