//! The N+1 batcher: concurrent point lookups of one shape that would wait for a server connection join one
//! pending batch; its first member (the leader) runs them as one merged statement and every member builds
//! its own reply from the shared result (correctness.md, "The N+1 batcher"). Also N+1 detection reports.
//!
//! - `wire`: Bind reading, array building, ordinal stripping, per-asker replies (pure).
//! - `run`: learning a shape's parameter type and executing a merged statement on a server connection.
//! - `stage`: the batcher's stop in a client's request path: who joins, who leads.
//! - `report`: SHOW BATCHES, SHOW NPLUSONE, /metrics.
//! - `detect`: per-session N+1 pattern tracking and the `SHOW NPLUSONE` aggregates.

pub mod detect;
pub mod report;
pub mod run;
pub mod stage;
pub mod wire;

use std::sync::Arc;

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::{oneshot, Notify};

/// Distinct statements whose counters are kept (SHOW BATCHES); past this new ones are not counted.
const MAX_STATS: usize = 4096;

/// Everything requests must share to be merged (correctness.md): the pool (database, user), the output-changing
/// settings (incl. role), the statement (its exact text and parameter types), parameter format, result formats,
/// Describe or not.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BatchKey {
    pub pool: u32,
    pub output: u64,
    pub statement: u64,
    pub param_format: i16,
    pub result_formats: Bytes,
    pub describe: bool,
}

/// One lookup in a batch: its raw parameter and where its answer goes.
pub struct Asker {
    pub param: Option<Bytes>,
    pub tx: oneshot::Sender<Outcome>,
}

/// What a member of a batch gets: the shared result and its key's position, or "run alone".
pub enum Outcome {
    Done(Arc<wire::Fetched>, usize),
    Retry,
}

#[derive(Default)]
pub struct Pending {
    askers: Mutex<Vec<Asker>>,
}

/// How a lookup takes part.
pub enum Role {
    /// Not batched: go the usual way.
    Pass,
    /// Run alone, now; the ticket counts it as running until dropped, so lookups of the same statement that
    /// arrive meanwhile merge into a batch behind it.
    Alone(Ticket),
    /// Runs the batch; the guard gives the members "retry" if it is dropped before answering them.
    Leader(LeaderGuard, oneshot::Receiver<Outcome>),
    Follower(oneshot::Receiver<Outcome>),
}

/// Counters per statement text, for SHOW BATCHES and /metrics.
#[derive(Debug, Default, Clone)]
pub struct ShapeStats {
    pub batches: u64,
    pub lookups: u64,
    pub distinct_keys: u64,
    pub rows: u64,
    /// Batches whose merged statement failed: each member ran alone.
    pub fallbacks: u64,
    pub largest: u64,
}

/// One key's state: the batch collecting members, and how many batches or lone lookups of the key run on
/// servers now.
struct Slot {
    key: Arc<BatchKey>,
    pending: Option<Arc<Pending>>,
    running: usize,
    /// Woken when one of those running finishes.
    done: Arc<Notify>,
}

#[derive(Default)]
pub struct Batcher {
    slots: Mutex<foldhash::HashMap<Arc<BatchKey>, Slot>>,
    stats: Mutex<foldhash::HashMap<Bytes, ShapeStats>>,
    pub detect: detect::Reports,
}

impl Batcher {
    /// Where a lookup goes: into the batch of its key collecting members; else, when it may run at once
    /// (`alone_ok`: a server is free and no wait window is set) and fewer than `depth` of its key run, alone;
    /// else it starts a batch and leads it.
    pub fn join(self: &Arc<Self>, key: BatchKey, param: Option<Bytes>, max: usize, alone_ok: bool, depth: usize) -> Role {
        let (tx, rx) = oneshot::channel();
        let mut slots = self.slots.lock();
        if !slots.contains_key(&key) {
            let key = Arc::new(key.clone());
            slots.insert(key.clone(), Slot { key, pending: None, running: 0, done: Arc::new(Notify::new()) });
        }
        let Some(slot) = slots.get_mut(&key) else { return Role::Pass };
        if let Some(p) = &slot.pending {
            let mut askers = p.askers.lock();
            if askers.len() < max {
                askers.push(Asker { param, tx });
                return Role::Follower(rx);
            }
        } else if slot.running < depth && alone_ok {
            slot.running += 1;
            return Role::Alone(Ticket { batcher: self.clone(), key: slot.key.clone() });
        }
        // A new batch (replacing a full one, whose leader keeps it).
        let pending = Arc::new(Pending { askers: Mutex::new(vec![Asker { param, tx }]) });
        slot.pending = Some(pending.clone());
        Role::Leader(LeaderGuard { batcher: self.clone(), key: slot.key.clone(), pending, turn: false }, rx)
    }

    /// One batch or lone lookup of `key` finished.
    fn finish(&self, key: &BatchKey) {
        let mut slots = self.slots.lock();
        if let Some(slot) = slots.get_mut(key) {
            slot.running = slot.running.saturating_sub(1);
            slot.done.notify_waiters();
            if slot.running == 0 && slot.pending.is_none() {
                slots.remove(key);
            }
        }
    }

    pub fn count(&self, sql: &Bytes, f: impl FnOnce(&mut ShapeStats)) {
        let mut m = self.stats.lock();
        if let Some(s) = m.get_mut(sql) {
            f(s);
        } else if m.len() < MAX_STATS {
            f(m.entry(sql.clone()).or_default());
        }
    }

    /// Per statement counters, busiest first.
    pub fn stats(&self) -> Vec<(Bytes, ShapeStats)> {
        let mut v: Vec<_> = self.stats.lock().iter().map(|(k, s)| (k.clone(), s.clone())).collect();
        v.sort_by_key(|s| std::cmp::Reverse(s.1.lookups));
        v
    }
}

/// A lookup running alone: counted as running until dropped.
pub struct Ticket {
    batcher: Arc<Batcher>,
    key: Arc<BatchKey>,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.batcher.finish(&self.key);
    }
}

/// Held by a batch's leader. Closing the batch takes its members; dropping the guard without answering them
/// (the leader was cancelled, timed out, lost its server) tells every member to run alone.
pub struct LeaderGuard {
    batcher: Arc<Batcher>,
    pub key: Arc<BatchKey>,
    pending: Arc<Pending>,
    /// The batch counts as running (it took its turn).
    turn: bool,
}

impl LeaderGuard {
    /// Waits until fewer than `depth` batches or lone lookups of this key run, then counts this batch as running.
    /// Members keep joining meanwhile. At `deadline` it runs anyway.
    pub async fn turn(&mut self, depth: usize, deadline: tokio::time::Instant) {
        loop {
            let done = match self.try_turn(depth) {
                Ok(()) => return,
                Err(done) => done,
            };
            let notified = done.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.try_turn(depth).is_ok() {
                return;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                let _ = self.try_turn(usize::MAX);
                return;
            }
        }
    }

    fn try_turn(&mut self, depth: usize) -> Result<(), Arc<Notify>> {
        let mut slots = self.batcher.slots.lock();
        let key = self.key.clone();
        let slot = slots.entry(key.clone()).or_insert_with(|| Slot { key, pending: None, running: 0, done: Arc::new(Notify::new()) });
        if slot.running < depth {
            slot.running += 1;
            self.turn = true;
            return Ok(());
        }
        Err(slot.done.clone())
    }

    /// Closes the batch to newcomers and takes its members (the leader first).
    pub fn close(&self) -> Vec<Asker> {
        self.unlist();
        std::mem::take(&mut *self.pending.askers.lock())
    }

    fn unlist(&self) {
        let mut slots = self.batcher.slots.lock();
        if let Some(slot) = slots.get_mut(&*self.key) {
            if slot.pending.as_ref().is_some_and(|p| Arc::ptr_eq(p, &self.pending)) {
                slot.pending = None;
            }
            if slot.running == 0 && slot.pending.is_none() {
                slots.remove(&*self.key);
            }
        }
    }
}

impl Drop for LeaderGuard {
    fn drop(&mut self) {
        self.unlist();
        for a in std::mem::take(&mut *self.pending.askers.lock()) {
            let _ = a.tx.send(Outcome::Retry);
        }
        if self.turn {
            self.batcher.finish(&self.key);
        }
    }
}

/// Answers every member from one merged result; identical raw parameters share one array element.
/// Returns the distinct keys to send, and each member's position among them.
pub fn distinct(askers: &[Asker]) -> (Vec<Option<Bytes>>, Vec<usize>) {
    let mut keys: Vec<Option<Bytes>> = Vec::with_capacity(askers.len());
    let mut seen: foldhash::HashMap<&Option<Bytes>, usize> = Default::default();
    let mut at = Vec::with_capacity(askers.len());
    for a in askers {
        let i = *seen.entry(&a.param).or_insert_with(|| {
            keys.push(a.param.clone());
            keys.len() - 1
        });
        at.push(i);
    }
    (keys, at)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(statement: &'static str) -> BatchKey {
        BatchKey { pool: 1, output: 1, statement: statement.len() as u64, param_format: 0, result_formats: Bytes::new(), describe: true }
    }

    #[test]
    fn a_lone_lookup_with_a_free_server_runs_alone_and_later_ones_batch_behind_it() {
        let b = Arc::new(Batcher::default());
        let Role::Alone(t) = b.join(key("q"), None, 10, true, 1) else { panic!("runs alone") };
        let Role::Leader(g, _rx) = b.join(key("q"), Some("1".into()), 10, true, 1) else { panic!("one is running: a batch starts") };
        let Role::Follower(_f) = b.join(key("q"), Some("2".into()), 10, true, 1) else { panic!("and collects members") };
        drop(t);
        assert_eq!(g.close().len(), 2);
        drop(g);
        assert!(b.slots.lock().is_empty(), "nothing left behind");
        let Role::Alone(_) = b.join(key("q"), None, 10, true, 1) else { panic!("alone again") };
    }

    #[test]
    fn lookups_that_would_wait_join_one_batch_until_it_is_full() {
        let b = Arc::new(Batcher::default());
        let Role::Leader(g, _rx) = b.join(key("q"), Some("1".into()), 2, false, 1) else { panic!() };
        let Role::Follower(mut f) = b.join(key("q"), Some("2".into()), 2, true, 1) else { panic!() };
        // full: the next one leads a new batch
        let Role::Leader(g2, _) = b.join(key("q"), Some("3".into()), 2, false, 1) else { panic!() };
        assert_eq!(g.close().len(), 2);
        drop(g2);
        assert!(f.try_recv().is_err()); // still owed an answer by g's owner
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_takes_its_turn_when_one_of_its_key_finishes() {
        let b = Arc::new(Batcher::default());
        let Role::Alone(t) = b.join(key("q"), None, 10, true, 1) else { panic!() };
        let Role::Leader(mut g, _rx) = b.join(key("q"), None, 10, true, 1) else { panic!() };
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
        let waiting = tokio::spawn(async move {
            g.turn(1, deadline).await;
            (tokio::time::Instant::now(), g)
        });
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        let released = tokio::time::Instant::now();
        drop(t);
        let (at, g) = waiting.await.unwrap();
        assert_eq!(at, released, "its turn came when the lone lookup finished");
        drop(g);
        assert!(b.slots.lock().is_empty());
    }

    #[test]
    fn a_dropped_leader_sends_its_members_to_retry() {
        let b = Arc::new(Batcher::default());
        let Role::Leader(g, _) = b.join(key("q"), None, 10, false, 1) else { panic!() };
        let Role::Follower(mut f) = b.join(key("q"), None, 10, false, 1) else { panic!() };
        drop(g);
        assert!(matches!(f.try_recv(), Ok(Outcome::Retry)));
    }

    #[test]
    fn duplicates_share_a_key() {
        let mk = |p: Option<&'static str>| Asker { param: p.map(Bytes::from_static_str), tx: oneshot::channel().0 };
        let askers = vec![mk(Some("1")), mk(None), mk(Some("1")), mk(Some("2")), mk(None)];
        let (keys, at) = distinct(&askers);
        assert_eq!(keys.len(), 3);
        assert_eq!(at, vec![0, 1, 0, 2, 1]);
    }

    trait FromStaticStr {
        fn from_static_str(s: &'static str) -> Bytes;
    }
    impl FromStaticStr for Bytes {
        fn from_static_str(s: &'static str) -> Bytes {
            Bytes::from_static(s.as_bytes())
        }
    }
}
