//! The read cache against real Postgres: one test per rule of correctness.md ("The read cache").

use std::sync::atomic::Ordering;
use std::time::Duration;

use pgsurge::cache::config::CacheSettings;
use pgsurge::config::{Dur, Settings};
use tokio_postgres::{Client, SimpleQueryMessage};

use crate::harness::{connect, eventually, pg, unique, Proxy};

fn cached(cache: CacheSettings) -> Settings {
    Settings { cache_flag: Some(true), cache, pool_size: Some(4), ..Default::default() }
}

/// Executions Postgres recorded of statements mentioning `table` (pg_stat_statements).
async fn upstream_calls(table: &str) -> i64 {
    let s = pg().super_client("app").await;
    s.query_one(
        "SELECT coalesce(sum(calls), 0)::int8 FROM pg_stat_statements WHERE query ILIKE $1 AND query NOT ILIKE '%pg_stat_statements%'",
        &[&format!("%{table}%")],
    )
    .await
    .unwrap()
    .get(0)
}

/// First column of the first row of a simple query, as text.
async fn one(c: &Client, sql: &str) -> String {
    for m in c.simple_query(sql).await.unwrap() {
        if let SimpleQueryMessage::Row(r) = m {
            return r.get(0).unwrap_or("NULL").to_string();
        }
    }
    panic!("no row from {sql}")
}

async fn table_with_rows(c: &Client, prefix: &str) -> String {
    let t = unique(prefix);
    c.batch_execute(&format!(
        "CREATE TABLE {t}(id int PRIMARY KEY, v text); INSERT INTO {t} SELECT g, 'v' || g FROM generate_series(1, 100) g"
    ))
    .await
    .unwrap();
    t
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_reads_are_answered_from_memory_in_both_protocols() {
    // A TTL longer than the 100 reads take on a loaded machine: what is checked is that they come from memory.
    let ttl = pgsurge::config::Dur(std::time::Duration::from_secs(60));
    let proxy = Proxy::start(Settings { cache_ttl: Some(ttl), ..cached(Default::default()) }).await;
    let c = proxy.client().await;
    let t = table_with_rows(&c, "hot").await;
    let before = upstream_calls(&t).await;
    for _ in 0..50 {
        assert_eq!(one(&c, &format!("SELECT v FROM {t} WHERE id = 7")).await, "v7");
        let r = c.query_one(&format!("SELECT v FROM {t} WHERE id = $1"), &[&7i32]).await.unwrap();
        assert_eq!(r.get::<_, String>(0), "v7");
    }
    let calls = upstream_calls(&t).await - before;
    assert!(calls <= 2, "100 reads reached Postgres {calls} times");
    assert!(proxy.app.cache.as_ref().unwrap().stats.hits.load(Ordering::Relaxed) >= 98);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_through_pgsurge_is_seen_by_the_next_read_of_any_client() {
    let proxy = Proxy::start(cached(Default::default())).await;
    let (a, b) = (proxy.client().await, proxy.client().await);
    let t = table_with_rows(&a, "rw").await;
    let read = format!("SELECT v FROM {t} WHERE id = 1");
    assert_eq!(one(&b, &read).await, "v1");
    assert_eq!(one(&b, &read).await, "v1");
    a.execute(&format!("UPDATE {t} SET v = 'new' WHERE id = 1"), &[]).await.unwrap();
    assert_eq!(one(&a, &read).await, "new", "the writer reads its write");
    assert_eq!(one(&b, &read).await, "new", "and so does everyone else");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_s_write_shows_after_commit_and_never_after_rollback() {
    let proxy = Proxy::start(cached(Default::default())).await;
    let (w, r) = (proxy.client().await, proxy.client().await);
    let t = table_with_rows(&w, "tx").await;
    let read = format!("SELECT v FROM {t} WHERE id = 2");
    assert_eq!(one(&r, &read).await, "v2");
    w.batch_execute(&format!("BEGIN; UPDATE {t} SET v = 'committed' WHERE id = 2")).await.unwrap();
    assert_eq!(one(&r, &read).await, "v2", "not yet committed");
    w.batch_execute("COMMIT").await.unwrap();
    assert_eq!(one(&r, &read).await, "committed");
    w.batch_execute(&format!("BEGIN; UPDATE {t} SET v = 'rolled back' WHERE id = 2; ROLLBACK")).await.unwrap();
    assert_eq!(one(&r, &read).await, "committed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_hidden_in_ctes_copy_truncate_and_merge_invalidate() {
    use futures_util::SinkExt;
    let proxy = Proxy::start(cached(Default::default())).await;
    let c = proxy.client().await;
    let t = table_with_rows(&c, "hidden").await;
    let count = format!("SELECT count(*) FROM {t}");
    assert_eq!(one(&c, &count).await, "100");
    one(&c, &format!("WITH d AS (DELETE FROM {t} WHERE id > 90 RETURNING id) SELECT count(*) FROM d")).await;
    assert_eq!(one(&c, &count).await, "90", "a DELETE inside a CTE");
    let sink = c.copy_in(&format!("COPY {t} FROM STDIN")).await.unwrap();
    futures_util::pin_mut!(sink);
    sink.send(bytes::Bytes::from_static(b"1001\tx\n1002\ty\n")).await.unwrap();
    sink.finish().await.unwrap();
    assert_eq!(one(&c, &count).await, "92", "COPY FROM");
    c.batch_execute(&format!(
        "MERGE INTO {t} USING (SELECT 2000 AS id) s ON {t}.id = s.id WHEN NOT MATCHED THEN INSERT VALUES (s.id, 'm')"
    ))
    .await
    .unwrap();
    assert_eq!(one(&c, &count).await, "93", "MERGE");
    c.batch_execute(&format!("TRUNCATE {t}")).await.unwrap();
    assert_eq!(one(&c, &count).await, "0", "TRUNCATE");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volatile_and_session_dependent_functions_are_never_cached() {
    // A TTL far longer than the test: an answer served from memory would repeat.
    let proxy = Proxy::start(cached(CacheSettings { default_ttl: Some(Dur(Duration::from_secs(600))), ..Default::default() })).await;
    let c = proxy.client().await;
    let seq = unique("seq");
    c.batch_execute(&format!("CREATE SEQUENCE {seq}")).await.unwrap();
    let marker = unique("volatile");
    for f in ["random()", &format!("nextval('{seq}')"), "clock_timestamp()", "now()", "current_user", "current_setting('TimeZone')"] {
        let sql = format!("SELECT {f}::text /* {marker} */");
        let before = upstream_calls(&marker).await;
        let mut answers = vec![];
        for _ in 0..5 {
            answers.push(one(&c, &sql).await);
        }
        assert_eq!(upstream_calls(&marker).await - before, 5, "{f}: every read reaches Postgres");
        if ["random()", "clock_timestamp()"].contains(&f) || f.starts_with("nextval") {
            let distinct: std::collections::HashSet<_> = answers.iter().collect();
            assert_eq!(distinct.len(), 5, "{f}: {answers:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn different_search_paths_time_zones_and_roles_never_share_an_entry() {
    let proxy = Proxy::start(cached(Default::default())).await;
    let (a, b) = (proxy.client().await, proxy.client().await);
    let (s1, s2) = (unique("sa"), unique("sb"));
    a.batch_execute(&format!("CREATE SCHEMA {s1}; CREATE SCHEMA {s2}; CREATE TABLE {s1}.t(v text); CREATE TABLE {s2}.t(v text); INSERT INTO {s1}.t VALUES ('one'); INSERT INTO {s2}.t VALUES ('two')")).await.unwrap();
    a.batch_execute(&format!("SET search_path = {s1}")).await.unwrap();
    b.batch_execute(&format!("SET search_path = {s2}")).await.unwrap();
    for _ in 0..3 {
        assert_eq!(one(&a, "SELECT v FROM t").await, "one");
        assert_eq!(one(&b, "SELECT v FROM t").await, "two");
    }
    let tz = unique("tz");
    a.batch_execute(&format!("CREATE TABLE {s1}.{tz}(ts timestamptz); INSERT INTO {s1}.{tz} VALUES ('2024-01-01 00:00:00+00')"))
        .await
        .unwrap();
    b.batch_execute(&format!("SET search_path = {s1}")).await.unwrap();
    a.batch_execute("SET TimeZone = 'UTC'").await.unwrap();
    b.batch_execute("SET TimeZone = 'Asia/Tokyo'").await.unwrap();
    let read = format!("SELECT ts::text FROM {tz}");
    for _ in 0..3 {
        assert_eq!(one(&a, &read).await, "2024-01-01 00:00:00+00");
        assert_eq!(one(&b, &read).await, "2024-01-01 09:00:00+09");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_inside_a_transaction_are_not_cached() {
    let proxy = Proxy::start(cached(Default::default())).await;
    let c = proxy.client().await;
    let t = table_with_rows(&c, "intx").await;
    let before = upstream_calls(&t).await;
    c.batch_execute("BEGIN").await.unwrap();
    for _ in 0..3 {
        one(&c, &format!("SELECT v FROM {t} WHERE id = 3")).await;
    }
    c.batch_execute("COMMIT").await.unwrap();
    assert_eq!(upstream_calls(&t).await - before, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_level_security_table_is_not_cached_without_opt_in() {
    let proxy = Proxy::start(cached(Default::default())).await;
    let c = proxy.client().await;
    let t = table_with_rows(&c, "rls").await;
    c.batch_execute(&format!(
        "ALTER TABLE {t} ENABLE ROW LEVEL SECURITY; ALTER TABLE {t} FORCE ROW LEVEL SECURITY; CREATE POLICY p ON {t} USING (id <= 10)"
    ))
    .await
    .unwrap();
    let before = upstream_calls(&t).await;
    for _ in 0..5 {
        assert_eq!(one(&c, &format!("SELECT count(*) FROM {t}")).await, "10");
    }
    assert_eq!(upstream_calls(&t).await - before, 5, "every read went to Postgres");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_that_bypasses_pgsurge_is_seen_once_the_ttl_passes() {
    let proxy = Proxy::start(cached(CacheSettings { default_ttl: Some(Dur(Duration::from_millis(300))), ..Default::default() })).await;
    let c = proxy.client().await;
    let t = table_with_rows(&c, "ttl").await;
    let read = format!("SELECT v FROM {t} WHERE id = 4");
    assert_eq!(one(&c, &read).await, "v4");
    pg().psql_super("app", &format!("UPDATE {t} SET v = 'behind your back' WHERE id = 4"));
    assert!(eventually(Duration::from_secs(10), || async { one(&c, &read).await == "behind your back" }).await, "stale beyond the TTL");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_over_max_entry_bytes_are_not_stored() {
    let proxy = Proxy::start(cached(CacheSettings { max_entry_bytes: Some(1000), ..Default::default() })).await;
    let c = proxy.client().await;
    let t = table_with_rows(&c, "big").await;
    let before = upstream_calls(&t).await;
    for _ in 0..3 {
        one(&c, &format!("SELECT * FROM {t}")).await;
    }
    assert_eq!(upstream_calls(&t).await - before, 3);
    assert!(proxy.app.cache.as_ref().unwrap().stats.too_big.load(Ordering::Relaxed) >= 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_identical_misses_make_one_upstream_query() {
    // A TTL far longer than the query: on a loaded machine a client whose request is scheduled after the fill
    // must still find the entry (what is checked here is the single flight, not expiry).
    let ttl = pgsurge::config::Dur(std::time::Duration::from_secs(60));
    let proxy = Proxy::start(Settings { pool_size: Some(10), cache_ttl: Some(ttl), ..cached(Default::default()) }).await;
    let c = proxy.client().await;
    let t = unique("flight");
    c.batch_execute(&format!("CREATE TABLE {t}(x int); INSERT INTO {t} SELECT g FROM generate_series(1, 200) g")).await.unwrap();
    let slow = format!("SELECT count(*) FROM {t} a, {t} b, {t} c WHERE a.x + b.x + c.x > 0");
    let url = proxy.app_url();
    let clients = futures_util::future::join_all((0..50).map(|_| connect(&url))).await;
    let before = upstream_calls(&t).await;
    let answers = futures_util::future::join_all(clients.iter().map(|c| one(c, &slow))).await;
    assert!(answers.iter().all(|a| a == "8000000"), "{answers:?}");
    assert_eq!(upstream_calls(&t).await - before, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_cache_evicts_without_errors() {
    let proxy = Proxy::start(cached(CacheSettings { max_bytes: Some(20_000), max_entry_bytes: Some(2_000), ..Default::default() })).await;
    let c = proxy.client().await;
    let t = table_with_rows(&c, "evict").await;
    for round in 0..2 {
        for id in 1..=100 {
            assert_eq!(one(&c, &format!("SELECT v FROM {t} WHERE id = {id}")).await, format!("v{id}"), "round {round}");
        }
    }
    let cache = proxy.app.cache.as_ref().unwrap();
    let (_, bytes) = cache.entries();
    assert!(bytes <= 20_000, "{bytes} bytes kept");
    assert!(cache.stats.evictions.load(Ordering::Relaxed) > 0);
}
