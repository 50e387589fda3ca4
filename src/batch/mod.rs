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

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::oneshot;

/// Distinct statements whose counters are kept (SHOW BATCHES); past this new ones are not counted.
const MAX_STATS: usize = 4096;

/// Everything requests must share to be merged (correctness.md): the pool (database, user), the output-changing
/// settings (incl. role), the statement (its exact text and parameter types), parameter format, result formats,
/// Describe or not.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BatchKey {
    pub pool: u32,
    pub output: u32,
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

#[derive(Default)]
pub struct Batcher {
    pending: Mutex<HashMap<Arc<BatchKey>, Arc<Pending>>>,
    stats: Mutex<HashMap<Bytes, ShapeStats>>,
    pub detect: detect::Reports,
}

impl Batcher {
    /// Whether any batch is pending (a lookup with a free server and no batch to join passes without
    /// building its key).
    pub fn any_pending(&self) -> bool {
        !self.pending.lock().is_empty()
    }

    /// Joins the pending batch for `key`, or starts one (as its leader) when the lookup would otherwise wait
    /// (`must_wait`: no free server connection, or a `max_wait` window); else `Pass`.
    pub fn join(self: &Arc<Self>, key: BatchKey, param: Option<Bytes>, max: usize, must_wait: bool) -> Role {
        let (tx, rx) = oneshot::channel();
        let mut map = self.pending.lock();
        if let Some(p) = map.get(&key) {
            let mut askers = p.askers.lock();
            if askers.len() < max {
                askers.push(Asker { param, tx });
                return Role::Follower(rx);
            }
        } else if !must_wait {
            return Role::Pass;
        }
        let key = Arc::new(key);
        let pending = Arc::new(Pending { askers: Mutex::new(vec![Asker { param, tx }]) });
        map.insert(key.clone(), pending.clone());
        Role::Leader(LeaderGuard { batcher: self.clone(), key, pending }, rx)
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

/// Held by a batch's leader. Closing the batch takes its members; dropping the guard without answering them
/// (the leader was cancelled, timed out, lost its server) tells every member to run alone.
pub struct LeaderGuard {
    batcher: Arc<Batcher>,
    pub key: Arc<BatchKey>,
    pending: Arc<Pending>,
}

impl LeaderGuard {
    /// Closes the batch to newcomers and takes its members (the leader first).
    pub fn close(&self) -> Vec<Asker> {
        self.unlist();
        std::mem::take(&mut *self.pending.askers.lock())
    }

    fn unlist(&self) {
        let mut map = self.batcher.pending.lock();
        if map.get(&self.key).is_some_and(|p| Arc::ptr_eq(p, &self.pending)) {
            map.remove(&self.key);
        }
    }
}

impl Drop for LeaderGuard {
    fn drop(&mut self) {
        self.unlist();
        for a in std::mem::take(&mut *self.pending.askers.lock()) {
            let _ = a.tx.send(Outcome::Retry);
        }
    }
}

/// Answers every member from one merged result; identical raw parameters share one array element.
/// Returns the distinct keys to send, and each member's position among them.
pub fn distinct(askers: &[Asker]) -> (Vec<Option<Bytes>>, Vec<usize>) {
    let mut keys: Vec<Option<Bytes>> = Vec::with_capacity(askers.len());
    let mut seen: HashMap<&Option<Bytes>, usize> = HashMap::with_capacity(askers.len());
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
    fn a_lone_lookup_with_a_free_server_passes() {
        let b = Arc::new(Batcher::default());
        assert!(matches!(b.join(key("q"), None, 10, false), Role::Pass));
    }

    #[test]
    fn lookups_that_would_wait_join_one_batch_until_it_is_full() {
        let b = Arc::new(Batcher::default());
        let Role::Leader(g, _rx) = b.join(key("q"), Some("1".into()), 2, true) else { panic!() };
        let Role::Follower(mut f) = b.join(key("q"), Some("2".into()), 2, false) else { panic!() };
        // full: the next one leads a new batch
        let Role::Leader(g2, _) = b.join(key("q"), Some("3".into()), 2, true) else { panic!() };
        assert_eq!(g.close().len(), 2);
        drop(g2);
        assert!(f.try_recv().is_err()); // still owed an answer by g's owner
        assert!(matches!(b.join(key("q"), None, 2, false), Role::Pass));
    }

    #[test]
    fn a_dropped_leader_sends_its_members_to_retry() {
        let b = Arc::new(Batcher::default());
        let Role::Leader(g, _) = b.join(key("q"), None, 10, true) else { panic!() };
        let Role::Follower(mut f) = b.join(key("q"), None, 10, false) else { panic!() };
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
