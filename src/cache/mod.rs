//! The read cache: exact keys (`key.rs`), table generations instead of scans (`deps.rs`), byte-bounded storage
//! with per-entry TTLs, and single flight for identical concurrent misses. What may be cached is decided in
//! `policy.rs`; `capture.rs` records a fill as it is forwarded, `writes.rs` voids what a write touched, and
//! `stage.rs` is the cache's stop in a client's request path.

pub mod capture;
pub mod config;
pub mod deps;
pub mod invalidation;
pub mod key;
pub mod notify;
pub mod policy;
pub mod shared;
pub mod stage;
pub mod triggers;
pub mod writes;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::Notify;
use tokio::time::Instant;

use config::CacheConfig;
use deps::{Dep, Deps, Generations};
use invalidation::Invalidation;

/// The exact bytes Postgres sent for one request, and what they depend on.
#[derive(Debug)]
pub struct Entry {
    pub bytes: Bytes,
    pub deps: Deps,
    pub filled_at: Instant,
    pub expires: Instant,
    /// The statement's counters (SHOW CACHE STATEMENTS), shared by its entries.
    pub stats: Arc<StatementStats>,
    /// Upstream time the fill took: what each hit saves.
    pub upstream_us: u64,
}

#[derive(Debug, Default)]
pub struct CacheStats {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub stores: AtomicU64,
    pub too_big: AtomicU64,
    pub evictions: AtomicU64,
    pub invalidations: AtomicU64,
    pub flushes: AtomicU64,
    pub coalesced: AtomicU64,
}

/// Per-statement figures for SHOW CACHE STATEMENTS (new statements stop being tracked past 1,000).
#[derive(Debug, Default)]
pub struct StatementStats {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub saved_us: AtomicU64,
}

/// An entry weighs its bytes, its key and a fixed overhead.
#[derive(Clone)]
struct Weigher;

impl quick_cache::Weighter<Bytes, Arc<Entry>> for Weigher {
    fn weight(&self, k: &Bytes, v: &Arc<Entry>) -> u64 {
        (v.bytes.len() + k.len() + 160) as u64
    }
}

/// Counts entries evicted for room.
#[derive(Clone)]
struct Evictions(Arc<CacheStats>);

impl quick_cache::Lifecycle<Bytes, Arc<Entry>> for Evictions {
    type RequestState = ();

    fn on_evict(&self, _: &mut (), _: Bytes, _: Arc<Entry>) {
        self.0.evictions.fetch_add(1, Ordering::Relaxed);
    }
}

type Store = quick_cache::sync::Cache<Bytes, Arc<Entry>, Weigher, quick_cache::DefaultHashBuilder, Evictions>;

pub struct Cache {
    pub config: CacheConfig,
    /// Invalidations shared with other instances through Postgres (`[cache] notify`).
    pub notifier: Option<notify::Notifier>,
    /// The tier shared through Redis (`[cache] redis`).
    pub shared: Option<Arc<shared::Shared>>,
    store: Store,
    pub generations: Generations,
    inflight: Mutex<foldhash::HashMap<Bytes, Arc<Notify>>>,
    pub stats: Arc<CacheStats>,
    statements: Mutex<HashMap<Bytes, Arc<StatementStats>>>,
    /// Per table name: what the catalog said of it (`TableFacts`), and when.
    facts: Mutex<HashMap<String, (Arc<TableFacts>, Instant)>>,
}

/// How long what the catalog said of a table is trusted before it is looked up again.
const FACTS_TTL: Duration = Duration::from_secs(30);

/// What the catalog says of a table name (any relation of that name, in that schema if qualified; an unknown
/// name, such as a CTE's, matches nothing).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct TableFacts {
    /// Not cached unless a rule opts in: row-level security, temporary, not a plain table or materialized view
    /// (a view or a foreign table changes when other tables do, or outside Postgres), or with partitions or
    /// inheritance children (writes to a child change what the parent reads).
    pub refused: bool,
    /// A write to one row may change others of the same table: a user trigger, a rule, or a foreign key to
    /// itself with a cascading action. Reads by key are then only as fresh as the whole table.
    pub side_effects: bool,
    /// Tables whose writes reach this one, transitively (bare names): through foreign keys with ON DELETE/UPDATE
    /// CASCADE, SET NULL or SET DEFAULT, and the parents of a partition or inheritance child (a write to the
    /// parent can land in it). Its readers depend on them too.
    pub parents: Vec<String>,
}

/// The catalog lookup behind `TableFacts`: one row per (name, parent), a name without parents once.
pub fn facts_sql(tables: &[String]) -> String {
    let list: Vec<String> = tables.iter().map(|t| format!("'{}'", t.replace('\'', "''"))).collect();
    const CASCADES: &str = "k.contype = 'f' AND (k.confdeltype IN ('c', 'n', 'd') OR k.confupdtype IN ('c', 'n', 'd'))";
    format!(
        "SELECT n.n, coalesce(f.refused, false), coalesce(f.side, false), u.parent \
         FROM pg_catalog.unnest(ARRAY[{}]::text[]) AS n(n) \
         LEFT JOIN LATERAL (SELECT \
           bool_or(c.relrowsecurity OR c.relpersistence = 't' OR c.relkind NOT IN ('r', 'm') OR c.relhassubclass) AS refused, \
           bool_or(c.relhasrules OR EXISTS (SELECT 1 FROM pg_catalog.pg_trigger t WHERE t.tgrelid = c.oid AND NOT t.tgisinternal \
             AND t.tgname <> '{}')) AS side, \
           pg_catalog.array_agg(c.oid) AS oids \
           FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace s ON s.oid = c.relnamespace, \
             LATERAL (SELECT pg_catalog.parse_ident(n.n) AS p) i \
           WHERE c.relname = i.p[pg_catalog.array_length(i.p, 1)] AND (pg_catalog.array_length(i.p, 1) = 1 OR s.nspname = i.p[1])) f ON true \
         LEFT JOIN LATERAL (WITH RECURSIVE edges(child, parent) AS ( \
             SELECT k.conrelid, k.confrelid FROM pg_catalog.pg_constraint k WHERE {CASCADES} \
             UNION ALL SELECT i.inhrelid, i.inhparent FROM pg_catalog.pg_inherits i), \
           up(rel) AS (SELECT e.parent FROM edges e WHERE e.child = ANY(f.oids) \
             UNION SELECT e.parent FROM edges e JOIN up ON e.child = up.rel) \
           SELECT p.relname::text AS parent FROM up JOIN pg_catalog.pg_class p ON p.oid = up.rel) u ON true",
        list.join(","),
        triggers::TRIGGER,
    )
}

/// What a lookup found.
pub enum Lookup {
    Hit(Arc<Entry>),
    /// Nobody is filling it: the caller fills it and must `finish` (the guard does on drop).
    Fill(FillGuard),
    /// Someone else is filling it: wait on this, then look again.
    Wait(Arc<Notify>),
}

impl Cache {
    pub fn new(config: CacheConfig) -> Cache {
        Cache::with_redis(config, None)
    }

    /// A cache whose entries are shared through `redis` too when `[cache] redis` is on.
    pub fn with_redis(config: CacheConfig, redis: Option<Arc<crate::redis::Redis>>) -> Cache {
        let stats = Arc::new(CacheStats::default());
        // quick_cache wants an estimate of the item count: assume entries of ~1 KiB.
        let items = (config.max_bytes / 1024).clamp(1024, 1 << 22) as usize;
        let store = Store::with(items, config.max_bytes, Weigher, quick_cache::DefaultHashBuilder::default(), Evictions(stats.clone()));
        Cache {
            notifier: config.notify.then(|| notify::Notifier::new(config.notify_channel.clone())),
            shared: redis.filter(|_| config.redis).map(shared::Shared::new),
            config,
            store,
            generations: Generations::default(),
            inflight: Mutex::default(),
            stats,
            statements: Mutex::new(HashMap::new()),
            facts: Mutex::new(HashMap::new()),
        }
    }

    /// The valid entry under `key`, if any: nothing it read was written since, its TTL has not run out, and (read
    /// your writes) `wrote_since` says this session wrote nothing it read after it was filled.
    pub fn get(&self, key: &[u8], wrote_since: impl Fn(&Dep, Instant) -> bool) -> Option<Arc<Entry>> {
        if self.blind() {
            return None;
        }
        let e = self.store.get(key)?;
        let fresh =
            Instant::now() < e.expires && self.generations.current(&e.deps) && !e.deps.reads.iter().any(|d| wrote_since(d, e.filled_at));
        if fresh {
            self.stats.hits.fetch_add(1, Ordering::Relaxed);
            e.stats.hits.fetch_add(1, Ordering::Relaxed);
            e.stats.saved_us.fetch_add(e.upstream_us, Ordering::Relaxed);
            return Some(e);
        }
        self.store.remove(key);
        None
    }

    /// Looks `key` up; on a miss, either hands out the right to fill it or the notification to wait for.
    pub fn lookup(&self, key: &[u8], sql: &[u8], wrote_since: impl Fn(&Dep, Instant) -> bool) -> Lookup {
        if let Some(e) = self.get(key, wrote_since) {
            return Lookup::Hit(e);
        }
        let mut inflight = self.inflight.lock();
        if let Some(n) = inflight.get(key) {
            self.stats.coalesced.fetch_add(1, Ordering::Relaxed);
            return Lookup::Wait(n.clone());
        }
        let key = Bytes::copy_from_slice(key);
        inflight.insert(key.clone(), Arc::new(Notify::new()));
        drop(inflight);
        self.stats.misses.fetch_add(1, Ordering::Relaxed);
        let stats = self.statement(sql);
        stats.misses.fetch_add(1, Ordering::Relaxed);
        Lookup::Fill(FillGuard { key, stats })
    }

    /// Whether invalidations from other instances may be missing now (their listener is down): nothing is answered
    /// or stored then.
    pub fn blind(&self) -> bool {
        self.notifier.as_ref().is_some_and(|n| n.blind())
    }

    /// Whether someone is filling `key` now.
    pub fn filling(&self, key: &[u8]) -> bool {
        self.inflight.lock().contains_key(key)
    }

    fn statement(&self, sql: &[u8]) -> Arc<StatementStats> {
        let mut m = self.statements.lock();
        if let Some(s) = m.get(sql) {
            return s.clone();
        }
        let s = Arc::new(StatementStats::default());
        if m.len() < 1000 {
            m.insert(Bytes::copy_from_slice(sql), s.clone());
        }
        s
    }

    /// Stores an entry found in the shared tier and counts the hit; the entry to answer with.
    pub fn store_shared(&self, key: Bytes, entry: Entry) -> Arc<Entry> {
        self.stats.hits.fetch_add(1, Ordering::Relaxed);
        entry.stats.hits.fetch_add(1, Ordering::Relaxed);
        let e = Arc::new(entry);
        if self.generations.current(&e.deps) && !self.blind() && e.bytes.len() <= self.config.max_entry_bytes {
            self.store.insert(key, e.clone());
        }
        e
    }

    /// Stores a finished fill, unless a write voided it meanwhile or it is too big.
    pub fn store(&self, key: Bytes, entry: Entry) {
        if entry.bytes.len() > self.config.max_entry_bytes {
            self.stats.too_big.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if !self.generations.current(&entry.deps) || self.blind() {
            return;
        }
        self.stats.stores.fetch_add(1, Ordering::Relaxed);
        self.store.insert(key, Arc::new(entry));
    }

    /// Ends a fill (stored or not) and wakes the identical requests waiting for it.
    pub fn finish(&self, fill: &FillGuard) {
        if let Some(n) = self.inflight.lock().remove(&fill.key) {
            n.notify_waiters();
        }
    }

    /// A write pgsurge forwarded or heard of: what it touched is void from now on.
    pub fn apply(&self, inv: &Invalidation) {
        if let (Some(s), false) = (&self.shared, *inv == Invalidation::Flush) {
            s.bump(inv);
        }
        match inv {
            Invalidation::Flush => self.flush(),
            Invalidation::Tables(t) => {
                let n = self.generations.bump_tables(t);
                self.stats.invalidations.fetch_add(n as u64, Ordering::Relaxed);
            }
            Invalidation::Rows { table, column, keys } => {
                self.generations.bump_rows(table, column, keys);
                self.stats.invalidations.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// DDL, privileges, roles: everything is void.
    pub fn flush(&self) {
        if let Some(s) = &self.shared {
            s.bump(&Invalidation::Flush);
        }
        self.facts.lock().clear();
        self.generations.flush();
        self.stats.flushes.fetch_add(1, Ordering::Relaxed);
        self.store.clear();
    }

    /// What the catalog said of each of `tables`; None if one was not looked up lately.
    pub fn facts(&self, tables: &[String]) -> Option<Vec<Arc<TableFacts>>> {
        let f = self.facts.lock();
        tables.iter().map(|t| f.get(t).filter(|(_, at)| at.elapsed() < FACTS_TTL).map(|(facts, _)| facts.clone())).collect()
    }

    /// Records the rows of `facts_sql`.
    pub fn record_facts(&self, rows: Vec<Vec<Option<String>>>) {
        let mut found: HashMap<String, TableFacts> = HashMap::new();
        for r in rows {
            if let [Some(name), Some(refused), Some(side), parent] = r.as_slice() {
                let f = found.entry(name.clone()).or_default();
                f.refused = refused == "t";
                f.side_effects |= side == "t";
                if let Some(p) = parent {
                    // A cascade from the table into itself changes other rows of it.
                    f.side_effects |= p == deps::bare(name);
                    if !f.parents.contains(p) {
                        f.parents.push(p.clone());
                    }
                }
            }
        }
        let now = Instant::now();
        let mut f = self.facts.lock();
        for (name, facts) in found {
            f.insert(name, (Arc::new(facts), now));
        }
    }

    /// Entries and bytes held.
    pub fn entries(&self) -> (u64, u64) {
        (self.store.len() as u64, self.store.weight())
    }

    /// The statements with most hits first: (text, hits, misses, saved µs).
    pub fn top_statements(&self, n: usize) -> Vec<(Bytes, u64, u64, u64)> {
        let ld = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut v: Vec<_> = self.statements.lock().iter().map(|(k, s)| (k.clone(), ld(&s.hits), ld(&s.misses), ld(&s.saved_us))).collect();
        v.sort_by_key(|s| std::cmp::Reverse(s.1));
        v.truncate(n);
        v
    }
}

/// The right (and duty) to fill one key: dropping it without `Cache::finish` would strand waiters, so the
/// session keeps it inside its capture and finishes it however the request ends.
pub struct FillGuard {
    pub key: Bytes,
    pub stats: Arc<StatementStats>,
}

#[cfg(test)]
mod tests;
