//! Cache invalidation beyond one session: row-precise voiding, instances told through Postgres NOTIFY, writes
//! that bypass pgsurge announced by triggers, the cache bypassed while blind, and a randomized check that no cached
//! answer ever differs from Postgres.

use std::sync::atomic::Ordering;
use std::time::Duration;

use pgsurge::cache::config::CacheSettings;
use pgsurge::cache::triggers::{run as install_triggers, TriggerArgs};
use pgsurge::config::{Dur, Settings};
use rand::{Rng, SeedableRng};
use tokio_postgres::{Client, SimpleQueryMessage};

use crate::harness::{connect, eventually, pg, unique, Proxy};

/// A proxy with the cache on for 10 minutes (only invalidation can make a read fresh), notifying on `channel`.
async fn instance(channel: Option<&str>) -> Proxy {
    let cache = CacheSettings {
        default_ttl: Some(Dur(Duration::from_secs(600))),
        notify: channel.map(|_| true),
        notify_channel: channel.map(str::to_string),
        ..Default::default()
    };
    let p = Proxy::start(Settings { cache_flag: Some(true), cache, pool_size: Some(4), ..Default::default() }).await;
    if channel.is_some() {
        // The listener starts with the first pool: log in once, then wait until it listens.
        p.client().await.simple_query("SELECT 1").await.unwrap();
        assert!(eventually(Duration::from_secs(10), || async { !p.app.cache.as_ref().unwrap().blind() }).await, "listener up");
    }
    p
}

async fn one(c: &Client, sql: &str) -> String {
    for m in c.simple_query(sql).await.unwrap() {
        if let SimpleQueryMessage::Row(r) = m {
            return r.get(0).unwrap_or("NULL").to_string();
        }
    }
    "no row".into()
}

/// Executions Postgres recorded of statements mentioning `marker` (pg_stat_statements).
async fn calls(marker: impl AsRef<str>) -> i64 {
    let s = pg().super_client("app").await;
    s.query_one(
        "SELECT coalesce(sum(calls), 0)::int8 FROM pg_stat_statements WHERE query LIKE $1 AND query NOT LIKE '%pg_stat_statements%'",
        &[&format!("%{}%", marker.as_ref())],
    )
    .await
    .unwrap()
    .get(0)
}

async fn table(c: &Client) -> String {
    let t = unique("inv");
    c.batch_execute(&format!(
        "CREATE TABLE {t}(id int PRIMARY KEY, grp int NOT NULL, v int NOT NULL); \
         INSERT INTO {t} SELECT g, g % 5, g FROM generate_series(1, 50) g"
    ))
    .await
    .unwrap();
    t
}

fn received(p: &Proxy) -> u64 {
    p.app.cache.as_ref().unwrap().notifier.as_ref().unwrap().received.load(Ordering::Relaxed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_through_one_instance_voids_the_entry_another_instance_holds() {
    let channel = unique("ch");
    let (a, b) = (instance(Some(&channel)).await, instance(Some(&channel)).await);
    let (ca, cb) = (a.client().await, b.client().await);
    let t = table(&ca).await;
    // B hears of the table's creation (it voids everything) before it reads.
    assert!(eventually(Duration::from_secs(2), || async { received(&b) >= 1 }).await);
    let read = format!("SELECT v FROM {t} WHERE id = 7");
    for _ in 0..3 {
        assert_eq!(one(&cb, &read).await, "7");
    }
    let before = calls(&format!("{t} WHERE id")).await;
    assert_eq!(one(&cb, &read).await, "7");
    assert_eq!(calls(&format!("{t} WHERE id")).await, before, "B answers from memory");
    ca.execute(&format!("UPDATE {t} SET v = 70 WHERE id = $1"), &[&7i32]).await.unwrap();
    assert_eq!(one(&ca, &read).await, "70", "the writing instance at once");
    assert!(eventually(Duration::from_secs(2), || async { one(&cb, &read).await == "70" }).await, "the other instance once told");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolled_back_write_is_announced_to_nobody() {
    let channel = unique("ch");
    let (a, b) = (instance(Some(&channel)).await, instance(Some(&channel)).await);
    let mut ca = a.client().await;
    let t = table(&ca).await;
    // Let the notifications of the table's creation arrive first.
    ca.batch_execute(&format!("UPDATE {t} SET v = 1 WHERE id = 1")).await.unwrap();
    assert!(eventually(Duration::from_secs(2), || async { received(&b) >= 2 }).await);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let start = received(&b);
    // Rolled back over the extended protocol (the NOTIFY rides in the write's run) and the simple one.
    let tx = ca.transaction().await.unwrap();
    tx.execute(&format!("UPDATE {t} SET v = 0 WHERE id = $1"), &[&1i32]).await.unwrap();
    tx.rollback().await.unwrap();
    for step in ["BEGIN", &format!("UPDATE {t} SET v = 0 WHERE id = 1"), "ROLLBACK"] {
        ca.batch_execute(step).await.unwrap();
    }
    let tx = ca.transaction().await.unwrap();
    tx.execute(&format!("UPDATE {t} SET v = 0 WHERE id = $1"), &[&2i32]).await.unwrap();
    tx.commit().await.unwrap();
    // Notifications arrive in commit order: once the committed one is in, a rolled-back one would be too.
    assert!(eventually(Duration::from_secs(2), || async { received(&b) > start }).await);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(received(&b), start + 1, "only the committed transaction's NOTIFY was delivered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_pinned_by_key_voids_its_rows_and_the_table_s_other_readers_only() {
    let p = instance(None).await;
    let c = p.client().await;
    let t = table(&c).await;
    let (row1, row2, by_grp, total) = (
        format!("SELECT v FROM {t} WHERE id = 1"),
        format!("SELECT v, grp FROM {t} WHERE id = 2"),
        format!("SELECT count(*) FROM {t} WHERE grp = 1"),
        format!("SELECT sum(v) FROM {t}"),
    );
    // pg_stat_statements records literals as $n: count each shape by its text up to the literal.
    let shape = |q: &str| q.rsplit_once("= ").map_or(q.to_string(), |(head, _)| format!("{head}= "));
    for q in [&row1, &row2, &by_grp, &total] {
        one(&c, q).await;
    }
    let count = |q: &String| calls(shape(q));
    let (c1, c2, cg, ct) = (count(&row1).await, count(&row2).await, count(&by_grp).await, count(&total).await);
    // Bound as binary: the server's ParameterDescription tells pgsurge the parameter is an int4.
    c.execute(&format!("UPDATE {t} SET v = 100 WHERE id = $1"), &[&1i32]).await.unwrap();
    assert_eq!(one(&c, &row1).await, "100");
    assert_eq!(one(&c, &row2).await, "2");
    assert_eq!(one(&c, &total).await, (50 * 51 / 2 + 99).to_string());
    one(&c, &by_grp).await;
    assert_eq!(count(&row1).await, c1 + 1, "the written row is read again");
    assert_eq!(count(&row2).await, c2, "another key of the same column stays cached");
    assert_eq!(count(&total).await, ct + 1, "a whole-table reader is voided");
    assert!(count(&by_grp).await <= cg + 1, "a read by another column may be voided");
}

/// Writes pinned to one row whose effects reach other rows: a foreign key cascading into its own table, one
/// cascading into another table, a trigger updating a neighbour, a write to a partitioned table landing in a
/// partition read directly. The catalog says so, and the reads stay fresh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_pinned_to_one_row_whose_cascades_and_triggers_reach_others_voids_those_too() {
    let p = instance(None).await;
    let c = p.client().await;
    let (tree, parent, child, audited, parted) = (unique("tree"), unique("par"), unique("chi"), unique("aud"), unique("prt"));
    c.batch_execute(&format!(
        "CREATE TABLE {tree}(id int PRIMARY KEY, up int REFERENCES {tree} ON DELETE CASCADE); \
         INSERT INTO {tree} VALUES (1, NULL), (2, 1), (3, 2); \
         CREATE TABLE {parent}(id int PRIMARY KEY); INSERT INTO {parent} VALUES (1), (2); \
         CREATE TABLE {child}(id int PRIMARY KEY, p int REFERENCES {parent} ON DELETE CASCADE); \
         INSERT INTO {child} VALUES (10, 1), (20, 2); \
         CREATE TABLE {audited}(id int PRIMARY KEY, v int); INSERT INTO {audited} VALUES (1, 0), (2, 0); \
         CREATE FUNCTION {audited}_f() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
           UPDATE {audited} SET v = v + 1 WHERE id = 2 AND NEW.id <> 2; RETURN NULL; END $$; \
         CREATE TRIGGER t AFTER UPDATE ON {audited} FOR EACH ROW EXECUTE FUNCTION {audited}_f(); \
         CREATE TABLE {parted}(id int, v int) PARTITION BY RANGE (id); \
         CREATE TABLE {parted}_1 PARTITION OF {parted} FOR VALUES FROM (0) TO (100); \
         INSERT INTO {parted} VALUES (1, 0)"
    ))
    .await
    .unwrap();
    // Point reads (plain columns by key), as row-precise invalidation knows them; each answers how many rows
    // it found, or for the audited table the value.
    let reads = [
        (format!("SELECT id FROM {tree} WHERE id = $1"), 3i32),
        (format!("SELECT id FROM {child} WHERE id = $1"), 10),
        (format!("SELECT id FROM {child} WHERE p = $1"), 1),
        (format!("SELECT v FROM {audited} WHERE id = $1"), 2),
        (format!("SELECT v FROM {parted}_1 WHERE id = $1"), 1),
    ];
    let read = |i: usize| {
        let (sql, k) = reads[i].clone();
        let c = &c;
        async move {
            let rows = c.query(&sql, &[&k]).await.unwrap();
            if i >= 3 {
                rows[0].get::<_, i32>(0) as usize
            } else {
                rows.len()
            }
        }
    };
    for i in 0..reads.len() {
        read(i).await;
    }
    let cache = p.app.cache.as_ref().unwrap();
    let hits = cache.stats.hits.load(Ordering::Relaxed);
    assert_eq!((read(0).await, read(1).await, read(2).await, read(3).await, read(4).await), (1, 1, 1, 0, 0));
    assert_eq!(cache.stats.hits.load(Ordering::Relaxed), hits + 5, "all five answered from memory");

    c.execute(&format!("DELETE FROM {tree} WHERE id = $1"), &[&1i32]).await.unwrap();
    assert_eq!(read(0).await, 0, "row 3 went with row 1, by cascade within the table");
    c.execute(&format!("DELETE FROM {parent} WHERE id = $1"), &[&1i32]).await.unwrap();
    assert_eq!((read(1).await, read(2).await), (0, 0), "the child rows went with their parent");
    c.execute(&format!("UPDATE {audited} SET v = 5 WHERE id = $1"), &[&1i32]).await.unwrap();
    assert_eq!(read(3).await, 1, "the trigger changed row 2");
    c.execute(&format!("UPDATE {parted} SET v = 7 WHERE id = $1"), &[&1i32]).await.unwrap();
    assert_eq!(read(4).await, 7, "a write through the partitioned table changed its partition");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_the_listener_is_down_nothing_is_answered_from_memory() {
    let channel = unique("ch");
    let p = instance(Some(&channel)).await;
    let c = p.client().await;
    let t = table(&c).await;
    let read = format!("SELECT v FROM {t} WHERE id = 3");
    let cache = p.app.cache.as_ref().unwrap();
    // (A read sent while the table's NOTIFY is still on the server goes straight there.)
    let hit = || async {
        one(&c, &read).await;
        cache.stats.hits.load(Ordering::Relaxed) > 0
    };
    assert!(eventually(Duration::from_secs(2), hit).await, "answered from memory");
    let s = pg().super_client("postgres").await;
    let killed: i64 = s
        .query_one("SELECT count(pg_terminate_backend(pid))::int8 FROM pg_stat_activity WHERE query = $1", &[&format!("LISTEN {channel}")])
        .await
        .unwrap()
        .get(0);
    assert_eq!(killed, 1, "this instance's listener");
    assert!(eventually(Duration::from_secs(5), || async { cache.blind() }).await, "it notices");
    // Blind: what it holds may be stale, so the read goes to Postgres (and is not stored).
    let hits = cache.stats.hits.load(Ordering::Relaxed);
    if cache.blind() {
        assert_eq!(one(&c, &read).await, "3");
        assert_eq!(cache.stats.hits.load(Ordering::Relaxed), hits, "no hit while blind");
    }
    assert!(eventually(Duration::from_secs(10), || async { !cache.blind() }).await, "back, with backoff");
    assert_eq!(cache.notifier.as_ref().unwrap().state(), "listening");
    assert_eq!(cache.entries().0, 0, "everything it held was voided when it listened again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn triggers_announce_writes_that_bypass_pgsurge_idempotently_and_drop_cleanly() {
    let db = unique("trig");
    pg().psql_super("postgres", &format!("CREATE DATABASE {db} OWNER app"));
    let url = format!("{}/{db}", pg().app_url.rsplit_once('/').unwrap().0);
    let direct = connect(&url).await;
    direct
        .batch_execute("CREATE TABLE kv(k int PRIMARY KEY, v int NOT NULL); INSERT INTO kv SELECT g, 0 FROM generate_series(1, 10) g")
        .await
        .unwrap();
    let channel = unique("ch");
    let args = TriggerArgs { upstream: url.clone(), channel: channel.clone(), drop: false };
    let first = install_triggers(&args).await.unwrap();
    assert_eq!(first.tables, 1);
    let second = install_triggers(&args).await.unwrap();
    assert_eq!(second.tables, 1);
    let count = "SELECT count(*)::int8 FROM pg_trigger WHERE NOT tgisinternal AND tgname = 'pgsurge_invalidate'";
    assert_eq!(direct.query_one(count, &[]).await.unwrap().get::<_, i64>(0), 1, "running it twice leaves one trigger");

    let cache = CacheSettings {
        default_ttl: Some(Dur(Duration::from_secs(600))),
        notify: Some(true),
        notify_channel: Some(channel.clone()),
        ..Default::default()
    };
    let p = Proxy::start(Settings { upstream: Some(url.clone()), cache_flag: Some(true), cache, ..Default::default() }).await;
    let c = connect(&p.url("app", "app", &db)).await;
    one(&c, "SELECT 1").await;
    assert!(eventually(Duration::from_secs(10), || async { !p.app.cache.as_ref().unwrap().blind() }).await);
    let read = "SELECT v FROM kv WHERE k = 4";
    assert_eq!(one(&c, read).await, "0");
    assert_eq!(one(&c, read).await, "0");
    direct.execute("UPDATE kv SET v = 44 WHERE k = 4", &[]).await.unwrap();
    assert!(eventually(Duration::from_secs(2), || async { one(&c, read).await == "44" }).await, "seen through the cache");

    install_triggers(&TriggerArgs { drop: true, ..args }).await.unwrap();
    assert_eq!(direct.query_one(count, &[]).await.unwrap().get::<_, i64>(0), 0);
}

/// Random writes of every shape row-precise invalidation knows (and some it must not trust), through one of two
/// instances, each followed by reads through both compared with the same reads straight from Postgres: a cached
/// answer that differs is a missed invalidation, local or announced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn randomized_writes_never_leave_a_cached_answer_different_from_postgres() {
    let channel = unique("ch");
    let instances = [instance(Some(&channel)).await, instance(Some(&channel)).await];
    let clients = [instances[0].client().await, instances[1].client().await];
    let direct = connect(&pg().app_url).await;
    let t = table(&clients[0]).await;
    // Every write below sends one notification, which both instances receive (the writer its own too): count
    // them from here, once the table's own has arrived.
    let heard = || instances.iter().map(received).collect::<Vec<_>>();
    assert!(eventually(Duration::from_secs(2), || async { heard().iter().all(|&n| n >= 1) }).await);
    let base = heard();
    let seed = std::env::var("INVALIDATION_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(42);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let reads = [
        format!("SELECT v::text FROM {t} WHERE id = $1"),
        format!("SELECT v::text, grp::text FROM {t} WHERE grp = $1"),
        format!("SELECT count(*)::text, sum(v)::text FROM {t}"),
    ];
    let rows = |rs: Vec<tokio_postgres::Row>| {
        let mut v: Vec<Vec<Option<String>>> = rs.iter().map(|r| (0..r.len()).map(|j| r.get(j)).collect()).collect();
        v.sort();
        v
    };
    let mut checked = 0;
    for step in 0..200 {
        let (k, k2, g, v) = (rng.gen_range(1..60), rng.gen_range(1..60), rng.gen_range(0..5), rng.gen_range(0..1000));
        let kind = rng.gen_range(0..11);
        let write = match kind {
            0 => format!("UPDATE {t} SET v = {v} WHERE id = {k}"),
            1 => format!("UPDATE {t} SET v = v + 1 WHERE grp = {g}"),
            2 => format!("UPDATE {t} SET id = {} WHERE id = {k}", 1000 + step),
            3 => format!("INSERT INTO {t} (id, grp, v) VALUES ({k}, {g}, {v}), ({k2}, {g}, {v}) ON CONFLICT DO NOTHING"),
            4 => format!("INSERT INTO {t} (id, grp, v) VALUES ({k}, {g}, {v}) ON CONFLICT (id) DO UPDATE SET v = excluded.v"),
            5 => format!("DELETE FROM {t} WHERE id IN ({k}, {k2})"),
            6 => format!("DELETE FROM {t} WHERE grp = {g} AND v > 900"),
            7 => format!("UPDATE {t} SET grp = {g} WHERE id = '{k}'"),
            8 => format!("UPDATE {t} SET v = {v} WHERE id = {k} AND grp = {g}"),
            9 => format!("UPDATE {t} SET v = $1 WHERE id = $2"),
            _ => format!("DELETE FROM {t} WHERE id = $1 OR id = $2"),
        };
        let w = usize::from(rng.gen_bool(0.5));
        match kind {
            9 => clients[w].execute(&write, &[&v, &k]).await.map(drop),
            10 => clients[w].execute(&write, &[&k, &k2]).await.map(drop),
            _ if step % 2 == 0 => clients[w].batch_execute(&write).await,
            _ => clients[w].execute(&write, &[]).await.map(drop),
        }
        .unwrap();
        // The other instance has heard of it once its notification arrived.
        let sent = step as u64 + 1;
        let arrived = || async { heard().iter().zip(&base).all(|(n, b)| *n >= b + sent) };
        assert!(eventually(Duration::from_secs(2), arrived).await, "step {step}: the notification of `{write}`");
        for _ in 0..3 {
            let i = rng.gen_range(0..reads.len());
            let key = if i == 0 { rng.gen_range(1..60) } else { rng.gen_range(0..5) };
            let args: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = if i == 2 { vec![] } else { vec![&key] };
            let truth = rows(direct.query(&reads[i], &args).await.unwrap());
            for (n, c) in clients.iter().enumerate() {
                let through = rows(c.query(&reads[i], &args).await.unwrap());
                let how = if n == w { "the writing instance" } else { "the other instance" };
                assert_eq!(through, truth, "seed {seed} step {step}: after `{write}`, `{}` with {key} through {how}", reads[i]);
                checked += 1;
            }
        }
    }
    let hits: u64 = instances.iter().map(|p| p.app.cache.as_ref().unwrap().stats.hits.load(Ordering::Relaxed)).sum();
    assert!(hits > 100, "the cache answered {hits} of {checked} reads: the check exercised it");
}
