//! The read cache: exact keys, per-table generations instead of scans, byte-bounded storage (moka), per-entry
//! TTLs, and single flight for identical concurrent misses. What may be cached is decided in `policy.rs` from
//! the statement analysis (src/sql) and correctness.md's rules; this file only stores and validates.

pub mod config;
pub mod policy;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::Notify;
use tokio::time::Instant;

use config::CacheConfig;

/// Everything that can change a result: never a fingerprint, always the full text and bytes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Key {
    pub database: String,
    pub user: String,
    /// Output-changing session settings and the effective role, as the SQL that set them.
    pub settings: String,
    pub sql: Bytes,
    /// Extended protocol: had a Parse, parameter type OIDs, the Bind's formats + values + result formats, and
    /// whether a Describe asked for the RowDescription. Empty for the simple protocol.
    pub shape: Bytes,
}

/// The exact bytes Postgres sent for one request, and what they depend on.
#[derive(Debug)]
pub struct Entry {
    pub bytes: Bytes,
    /// Tables read, with the generation each had when the fill started.
    pub tables: Vec<(Arc<str>, u64)>,
    pub epoch: u64,
    pub filled_at: Instant,
    pub ttl: Duration,
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

/// Per-statement figures for SHOW CACHE STATEMENTS (bounded: new statements stop being tracked past 1,000).
#[derive(Debug, Default, Clone)]
pub struct StatementStats {
    pub hits: u64,
    pub misses: u64,
    pub saved_us: u64,
}

struct Expiry;

impl moka::Expiry<Arc<Key>, Arc<Entry>> for Expiry {
    fn expire_after_create(&self, _: &Arc<Key>, v: &Arc<Entry>, _: std::time::Instant) -> Option<Duration> {
        Some(v.ttl)
    }
}

pub struct Cache {
    pub config: CacheConfig,
    pub analyses: policy::Analyses,
    store: moka::sync::Cache<Arc<Key>, Arc<Entry>>,
    generations: Mutex<HashMap<Arc<str>, u64>>,
    /// Bumped by DDL, GRANT/REVOKE, role changes: every older entry is void.
    epoch: AtomicU64,
    inflight: Mutex<HashMap<Arc<Key>, Arc<Notify>>>,
    pub stats: Arc<CacheStats>,
    statements: Mutex<HashMap<Bytes, StatementStats>>,
    /// Per table name: has row-level security or is temporary (true) or neither (false), and when checked.
    flags: Mutex<HashMap<String, (bool, Instant)>>,
}

/// How long a table's row-security / temporary flag is trusted before it is looked up again.
const FLAGS_TTL: Duration = Duration::from_secs(30);

/// The catalog lookup behind `flags`: any relation of that name (in that schema, if qualified) with row-level
/// security or temporary persistence counts. Names never match nothing dangerous: an unknown name (a CTE) is false.
pub fn flags_sql(tables: &[String]) -> String {
    let list: Vec<String> = tables.iter().map(|t| format!("'{}'", t.replace('\'', "''"))).collect();
    format!(
        "SELECT n, coalesce((SELECT bool_or(c.relrowsecurity OR c.relpersistence = 't') FROM pg_catalog.pg_class c \
         JOIN pg_catalog.pg_namespace s ON s.oid = c.relnamespace, LATERAL (SELECT pg_catalog.parse_ident(n) AS p) i \
         WHERE c.relname = i.p[pg_catalog.array_length(i.p, 1)] AND (pg_catalog.array_length(i.p, 1) = 1 OR s.nspname = i.p[1])), false) \
         FROM pg_catalog.unnest(ARRAY[{}]::text[]) n",
        list.join(",")
    )
}

/// What a lookup found.
pub enum Lookup {
    Hit(Bytes),
    /// Nobody is filling it: the caller fills it and must `finish` (the guard does on drop).
    Fill(FillGuard),
    /// Someone else is filling it: wait on this, then look again.
    Wait(Arc<Notify>),
}

impl Cache {
    pub fn new(config: CacheConfig) -> Cache {
        let stats = Arc::new(CacheStats::default());
        let evictions = stats.clone();
        let store = moka::sync::Cache::builder()
            .max_capacity(config.max_bytes)
            .weigher(|k: &Arc<Key>, v: &Arc<Entry>| (v.bytes.len() + k.sql.len() + k.shape.len() + 128).min(u32::MAX as usize) as u32)
            .expire_after(Expiry)
            .eviction_policy(moka::policy::EvictionPolicy::lru())
            .eviction_listener(move |_, _, cause| {
                if cause == moka::notification::RemovalCause::Size {
                    evictions.evictions.fetch_add(1, Ordering::Relaxed);
                }
            })
            .build();
        Cache {
            config,
            analyses: Default::default(),
            store,
            generations: Mutex::new(HashMap::new()),
            epoch: AtomicU64::new(0),
            inflight: Mutex::new(HashMap::new()),
            stats,
            statements: Mutex::new(HashMap::new()),
            flags: Mutex::new(HashMap::new()),
        }
    }

    fn generation(&self, table: &str) -> u64 {
        self.generations.lock().get(table).copied().unwrap_or(0)
    }

    /// The generations of `tables` now, for an entry whose fill starts now.
    pub fn snapshot(&self, tables: &[String]) -> (Vec<(Arc<str>, u64)>, u64) {
        let g = self.generations.lock();
        let v = tables.iter().map(|t| (Arc::<str>::from(t.as_str()), g.get(t.as_str()).copied().unwrap_or(0))).collect();
        (v, self.epoch.load(Ordering::SeqCst))
    }

    /// A write to `tables` through pgsurge: every entry that read them is void from now on.
    pub fn bump(&self, tables: &[String]) {
        let mut g = self.generations.lock();
        for t in tables {
            *g.entry(Arc::from(t.as_str())).or_insert(0) += 1;
        }
        self.stats.invalidations.fetch_add(tables.len() as u64, Ordering::Relaxed);
    }

    /// Whether any of `tables` has row-level security or is temporary; None if one was not looked up lately.
    pub fn flagged(&self, tables: &[String]) -> Option<bool> {
        let f = self.flags.lock();
        let mut any = false;
        for t in tables {
            match f.get(t) {
                Some((flag, at)) if at.elapsed() < FLAGS_TTL => any |= flag,
                _ => return None,
            }
        }
        Some(any)
    }

    pub fn record_flags(&self, rows: Vec<Vec<Option<String>>>) {
        let now = Instant::now();
        let mut f = self.flags.lock();
        for r in rows {
            if let [Some(name), Some(flag)] = r.as_slice() {
                f.insert(name.clone(), (flag == "t", now));
            }
        }
    }

    /// DDL, privileges, roles: everything is void.
    pub fn flush(&self) {
        self.flags.lock().clear();
        self.epoch.fetch_add(1, Ordering::SeqCst);
        self.stats.flushes.fetch_add(1, Ordering::Relaxed);
        self.store.invalidate_all();
    }

    fn valid(&self, e: &Entry, wrote: &HashMap<String, Instant>) -> bool {
        e.epoch == self.epoch.load(Ordering::SeqCst)
            && e.tables.iter().all(|(t, g)| self.generation(t) == *g)
            // Read-your-writes: never an entry filled before this session's own write to one of its tables.
            && e.tables.iter().all(|(t, _)| wrote.get(&**t).is_none_or(|w| *w < e.filled_at))
    }

    /// Looks `key` up; on a miss, either hands out the right to fill it or the notification to wait for.
    pub fn lookup(&self, key: &Arc<Key>, wrote: &HashMap<String, Instant>) -> Lookup {
        if let Some(e) = self.store.get(key) {
            if self.valid(&e, wrote) {
                self.stats.hits.fetch_add(1, Ordering::Relaxed);
                self.note(&key.sql, |s| {
                    s.hits += 1;
                    s.saved_us += e.upstream_us;
                });
                return Lookup::Hit(e.bytes.clone());
            }
            self.store.invalidate(key);
        }
        let mut inflight = self.inflight.lock();
        if let Some(n) = inflight.get(key) {
            self.stats.coalesced.fetch_add(1, Ordering::Relaxed);
            return Lookup::Wait(n.clone());
        }
        inflight.insert(key.clone(), Arc::new(Notify::new()));
        self.stats.misses.fetch_add(1, Ordering::Relaxed);
        self.note(&key.sql, |s| s.misses += 1);
        Lookup::Fill(FillGuard { key: key.clone() })
    }

    /// Stores a finished fill (if it is still valid: a write may have happened meanwhile).
    pub fn store(&self, key: Arc<Key>, entry: Entry) {
        if entry.bytes.len() > self.config.max_entry_bytes {
            self.stats.too_big.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if !self.valid(&entry, &HashMap::new()) {
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

    fn note(&self, sql: &Bytes, f: impl FnOnce(&mut StatementStats)) {
        let mut m = self.statements.lock();
        if let Some(s) = m.get_mut(sql) {
            f(s);
        } else if m.len() < 1000 {
            f(m.entry(sql.clone()).or_default());
        }
    }

    /// Whether someone is filling `key` now.
    pub fn filling(&self, key: &Arc<Key>) -> bool {
        self.inflight.lock().contains_key(key)
    }

    pub fn entries(&self) -> (u64, u64) {
        self.store.run_pending_tasks();
        (self.store.entry_count(), self.store.weighted_size())
    }

    /// The statements with most hits first.
    pub fn top_statements(&self, n: usize) -> Vec<(Bytes, StatementStats)> {
        let mut v: Vec<_> = self.statements.lock().iter().map(|(k, s)| (k.clone(), s.clone())).collect();
        v.sort_by_key(|s| std::cmp::Reverse(s.1.hits));
        v.truncate(n);
        v
    }
}

/// The right (and duty) to fill one key: dropping it without `Cache::finish` would strand waiters, so the
/// session keeps it inside its capture and finishes it however the request ends.
pub struct FillGuard {
    pub key: Arc<Key>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache() -> Cache {
        Cache::new(CacheConfig {
            enabled: true,
            max_bytes: 1 << 20,
            max_entry_bytes: 1000,
            default_ttl: Duration::from_secs(1),
            rules: vec![],
        })
    }

    fn key(sql: &'static str) -> Arc<Key> {
        Arc::new(Key {
            database: "d".into(),
            user: "u".into(),
            settings: String::new(),
            sql: Bytes::from_static(sql.as_bytes()),
            shape: Bytes::new(),
        })
    }

    fn fill(c: &Cache, k: &Arc<Key>, tables: &[String], bytes: &'static [u8]) {
        let Lookup::Fill(g) = c.lookup(k, &HashMap::new()) else { panic!("expected a fill") };
        let (tables, epoch) = c.snapshot(tables);
        c.store(
            k.clone(),
            Entry {
                bytes: Bytes::from_static(bytes),
                tables,
                epoch,
                filled_at: Instant::now(),
                ttl: Duration::from_secs(60),
                upstream_us: 5,
            },
        );
        c.finish(&g);
    }

    #[tokio::test]
    async fn a_write_to_a_table_voids_its_entries_and_only_those() {
        let c = cache();
        let (a, b) = (key("SELECT * FROM a"), key("SELECT * FROM b"));
        fill(&c, &a, &["a".into()], b"A");
        fill(&c, &b, &["b".into()], b"B");
        assert!(matches!(c.lookup(&a, &HashMap::new()), Lookup::Hit(x) if x == "A"));
        c.bump(&["a".into()]);
        assert!(matches!(c.lookup(&a, &HashMap::new()), Lookup::Fill(_)));
        assert!(matches!(c.lookup(&b, &HashMap::new()), Lookup::Hit(_)));
    }

    #[tokio::test]
    async fn a_second_identical_miss_waits_for_the_first() {
        let c = cache();
        let k = key("SELECT 1");
        let Lookup::Fill(g) = c.lookup(&k, &HashMap::new()) else { panic!() };
        assert!(matches!(c.lookup(&k, &HashMap::new()), Lookup::Wait(_)));
        c.finish(&g);
        assert!(matches!(c.lookup(&k, &HashMap::new()), Lookup::Fill(_)), "the fill stored nothing: next one fills");
    }

    #[tokio::test]
    async fn entries_over_the_size_limit_and_fills_raced_by_a_write_are_not_stored() {
        let c = cache();
        let k = key("SELECT big");
        let Lookup::Fill(g) = c.lookup(&k, &HashMap::new()) else { panic!() };
        let (tables, epoch) = c.snapshot(&[]);
        c.store(
            k.clone(),
            Entry {
                bytes: Bytes::from(vec![0u8; 2000]),
                tables,
                epoch,
                filled_at: Instant::now(),
                ttl: Duration::from_secs(9),
                upstream_us: 0,
            },
        );
        c.finish(&g);
        assert_eq!(c.stats.too_big.load(Ordering::Relaxed), 1);

        let k = key("SELECT * FROM t");
        let Lookup::Fill(g) = c.lookup(&k, &HashMap::new()) else { panic!() };
        let (tables, epoch) = c.snapshot(&["t".into()]);
        c.bump(&["t".into()]); // a write lands while the read runs
        c.store(
            k.clone(),
            Entry {
                bytes: Bytes::from_static(b"old"),
                tables,
                epoch,
                filled_at: Instant::now(),
                ttl: Duration::from_secs(9),
                upstream_us: 0,
            },
        );
        c.finish(&g);
        assert!(matches!(c.lookup(&k, &HashMap::new()), Lookup::Fill(_)));
    }

    #[tokio::test]
    async fn a_session_never_reads_an_entry_older_than_its_own_write() {
        let c = cache();
        let k = key("SELECT * FROM t");
        fill(&c, &k, &["t".into()], b"x");
        let mut wrote = HashMap::new();
        wrote.insert("t".to_string(), Instant::now());
        assert!(!matches!(c.lookup(&k, &wrote), Lookup::Hit(_)));
    }

    #[tokio::test]
    async fn ddl_flushes_everything() {
        let c = cache();
        let k = key("SELECT 1");
        fill(&c, &k, &[], b"1");
        c.flush();
        assert!(!matches!(c.lookup(&k, &HashMap::new()), Lookup::Hit(_)));
    }
}
