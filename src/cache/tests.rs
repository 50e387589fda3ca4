//! The store's rules: what voids an entry, single flight, size limits, read-your-writes.

use std::time::Duration;

use tokio::time::Instant;

use super::capture::Capture;
use super::config::CacheConfig;
use super::*;

fn cache() -> Arc<Cache> {
    Arc::new(Cache::new(CacheConfig {
        enabled: true,
        max_bytes: 1 << 20,
        max_entry_bytes: 1000,
        default_ttl: Duration::from_secs(1),
        notify: false,
        notify_channel: "pgsurge_invalidate".into(),
        redis: false,
        rules: vec![],
    }))
}

fn nobody(_: &Dep, _: Instant) -> bool {
    false
}

fn tables(t: &[&str]) -> Invalidation {
    Invalidation::Tables(t.iter().map(|t| t.to_string()).collect())
}

/// Fills `key` with `bytes` as a forwarded reply would, reading `tables`.
fn fill(c: &Arc<Cache>, key: &[u8], tables: &[&str], bytes: &[u8], ttl: Duration) {
    let Lookup::Fill(g) = c.lookup(key, b"sql", nobody) else { panic!("expected a fill") };
    let mut cap = Capture::new(c.clone(), g, c.generations.snapshot(tables, None), ttl);
    assert!(cap.frame(bytes));
    cap.finish();
}

const REPLY: &[u8] = b"Z\0\0\0\x05I";

#[tokio::test]
async fn a_write_to_a_table_voids_its_entries_and_only_those() {
    let c = cache();
    fill(&c, b"a", &["a"], REPLY, Duration::from_secs(60));
    fill(&c, b"b", &["b"], REPLY, Duration::from_secs(60));
    assert!(c.get(b"a", nobody).is_some());
    c.apply(&tables(&["a"]));
    assert!(c.get(b"a", nobody).is_none());
    assert!(c.get(b"b", nobody).is_some());
}

#[tokio::test(start_paused = true)]
async fn an_entry_lives_its_ttl_and_no_longer() {
    let c = cache();
    fill(&c, b"k", &["t"], REPLY, Duration::from_secs(10));
    tokio::time::advance(Duration::from_millis(9_990)).await;
    assert!(c.get(b"k", nobody).is_some());
    tokio::time::advance(Duration::from_millis(20)).await;
    assert!(c.get(b"k", nobody).is_none());
}

#[tokio::test]
async fn a_second_identical_miss_waits_for_the_first() {
    let c = cache();
    let Lookup::Fill(g) = c.lookup(b"k", b"sql", nobody) else { panic!() };
    assert!(matches!(c.lookup(b"k", b"sql", nobody), Lookup::Wait(_)));
    c.finish(&g);
    assert!(matches!(c.lookup(b"k", b"sql", nobody), Lookup::Fill(_)), "the fill stored nothing: next one fills");
}

#[tokio::test]
async fn errors_big_replies_and_fills_raced_by_a_write_are_not_stored() {
    let c = cache();
    let Lookup::Fill(g) = c.lookup(b"err", b"sql", nobody) else { panic!() };
    let mut cap = Capture::new(c.clone(), g, c.generations.snapshot(&["t"], None), Duration::from_secs(9));
    cap.frame(b"E\0\0\0\x04");
    cap.frame(REPLY);
    cap.finish();
    assert!(c.get(b"err", nobody).is_none());

    let Lookup::Fill(g) = c.lookup(b"big", b"sql", nobody) else { panic!() };
    let mut cap = Capture::new(c.clone(), g, c.generations.snapshot(&["t"], None), Duration::from_secs(9));
    cap.frame(&[b'D'; 1200]);
    cap.frame(REPLY);
    cap.finish();
    assert_eq!(c.stats.too_big.load(Ordering::Relaxed), 1);

    let Lookup::Fill(g) = c.lookup(b"raced", b"sql", nobody) else { panic!() };
    let mut cap = Capture::new(c.clone(), g, c.generations.snapshot(&["t"], None), Duration::from_secs(9));
    c.apply(&tables(&["t"])); // a write lands while the read runs
    cap.frame(REPLY);
    cap.finish();
    assert!(c.get(b"raced", nobody).is_none());
}

#[tokio::test]
async fn a_session_never_reads_an_entry_older_than_its_own_write() {
    let c = cache();
    fill(&c, b"k", &["public.t"], REPLY, Duration::from_secs(60));
    let wrote_after = |d: &Dep, _: Instant| &*d.table().name == "t";
    assert!(c.get(b"k", wrote_after).is_none());
}

#[tokio::test]
async fn ddl_flushes_everything() {
    let c = cache();
    fill(&c, b"k", &[], REPLY, Duration::from_secs(60));
    c.flush();
    assert!(c.get(b"k", nobody).is_none());
    assert_eq!(c.entries().0, 0);
}
