//! Redis shared by instances: rates that hold across them, the local share while Redis is down (and global again
//! once it is back), and the shared cache tier. Each test starts its own redis-server on a free port.

use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use pgsurge::config::{Dur, Settings};
use tokio_postgres::{Client, SimpleQueryMessage};

use crate::harness::{code, connect, eventually, pg, try_connect, unique, Proxy};

/// A redis-server of this test's own, without persistence.
struct RedisServer {
    port: u16,
    child: Option<Child>,
}

impl RedisServer {
    fn start() -> RedisServer {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut r = RedisServer { port, child: None };
        r.up();
        r
    }

    /// Starts (or restarts, empty) the server on its port and waits until it listens.
    fn up(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server (apt-get install redis-server)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not listen on {}", self.port);
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

fn limited(redis: &RedisServer, qps: u32, burst: u32) -> Settings {
    Settings {
        redis_url: Some(redis.url()),
        limit_qps_per_user: Some(qps),
        limit_burst: Some(burst),
        limit_max_delay: Some(Dur(Duration::ZERO)),
        ..Default::default()
    }
}

/// Starts `n` instances on one Redis and waits until each sees all of them.
async fn fleet(n: usize, settings: Settings) -> Vec<Proxy> {
    let mut v = vec![];
    for _ in 0..n {
        v.push(Proxy::start(settings.clone()).await);
    }
    for p in &v {
        let r = p.app.redis.clone().expect("redis configured");
        assert!(eventually(Duration::from_secs(10), || async { r.is_up() && r.instances() as usize >= n }).await, "Redis up, {n} seen");
    }
    v
}

/// Sends `rounds` queries through each client in turn: (admitted, refused with 53400); any other error fails.
async fn flood(clients: &[Client], rounds: usize) -> (usize, usize) {
    let (mut ok, mut refused) = (0, 0);
    for _ in 0..rounds {
        for c in clients {
            match c.simple_query("SELECT 1").await {
                Ok(_) => ok += 1,
                Err(e) => {
                    assert_eq!(code(&e), "53400", "{e}");
                    refused += 1;
                }
            }
        }
    }
    (ok, refused)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_rate_and_its_burst_hold_across_instances() {
    let redis = RedisServer::start();
    let proxies = fleet(3, limited(&redis, 1, 3)).await;
    let mut clients = vec![];
    for p in &proxies {
        clients.push(p.client().await);
    }
    let start = Instant::now();
    let (ok, refused) = flood(&clients, 4).await;
    // One token a second after a burst of 3, for all three together (alone, each would admit its own 3).
    let most = 3 + start.elapsed().as_secs() as usize + 1;
    assert!(ok >= 3 && ok <= most, "{ok} of 12 admitted across 3 instances (at most {most})");
    assert_eq!(ok + refused, 12);
    let m = pgsurge::admin::metrics::render(&proxies[0].app);
    assert!(m.contains("pgsurge_redis_up 1"), "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_connections_per_second_are_counted_across_instances() {
    let redis = RedisServer::start();
    let file: Settings = toml::from_str("[limits.per_user]\nconnections_per_second = 1\nburst = 2\n").unwrap();
    let proxies = fleet(3, Settings { redis_url: Some(redis.url()), ..Default::default() }.layer(file)).await;
    let start = Instant::now();
    let mut ok = 0;
    for p in proxies.iter().chain(&proxies) {
        match try_connect(&p.app_url()).await {
            Ok(_) => ok += 1,
            Err(e) => assert_eq!(code(&e), "53300", "{e}"),
        }
    }
    let most = 2 + start.elapsed().as_secs() as usize + 1;
    assert!(ok >= 2 && ok <= most, "{ok} of 6 logins admitted across 3 instances (at most {most})");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_global_connection_cap_counts_every_instance_and_frees_on_disconnect() {
    let redis = RedisServer::start();
    let file: Settings = toml::from_str("[limits.per_user]\nmax_connections = 2\nglobal = true\n").unwrap();
    let proxies = fleet(2, Settings { redis_url: Some(redis.url()), ..Default::default() }.layer(file)).await;
    let a = proxies[0].client().await;
    let _b = proxies[1].client().await;
    for p in &proxies {
        let e = try_connect(&p.app_url()).await.expect_err("a third connection is over the cap of both together");
        assert_eq!(code(&e), "53300", "{e}");
    }
    drop(a);
    assert!(
        eventually(Duration::from_secs(5), || async { try_connect(&proxies[1].app_url()).await.is_ok() }).await,
        "a connection given back on one instance can be taken on another"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_down_each_instance_takes_its_share_and_the_global_rate_returns_with_redis() {
    let mut redis = RedisServer::start();
    let proxies = fleet(2, limited(&redis, 1, 4)).await;
    let mut clients = vec![];
    for p in &proxies {
        clients.push(p.client().await);
    }
    redis.kill();
    // Nobody waits for Redis and nobody is refused for want of it: each instance admits its share of the burst (2).
    let (ok, _) = flood(&clients, 3).await;
    assert!(ok >= 4, "each instance admitted its local share while Redis was down: {ok}");
    for p in &proxies {
        let r = p.app.redis.clone().unwrap();
        assert!(eventually(Duration::from_secs(5), || async { !r.is_up() }).await);
        assert!(r.stats.fallbacks.load(Ordering::Relaxed) > 0 && r.stats.outages.load(Ordering::Relaxed) >= 1);
    }
    let m = pgsurge::admin::metrics::render(&proxies[0].app);
    assert!(m.contains("pgsurge_redis_up 0") && m.contains("pgsurge_redis_fallbacks_total"), "{m}");

    // Back, empty: the limit is global again (the burst is granted once more).
    redis.up();
    for p in &proxies {
        let r = p.app.redis.clone().unwrap();
        assert!(eventually(Duration::from_secs(10), || async { r.is_up() }).await, "Redis seen again");
    }
    let start = Instant::now();
    let (ok, refused) = flood(&clients, 5).await;
    let most = 4 + start.elapsed().as_secs() as usize + 1;
    assert!(ok <= most && refused > 0, "{ok} of 10 admitted once Redis was back (at most {most})");
}

/// Executions Postgres recorded of statements mentioning `table`.
async fn upstream_calls(table: &str) -> i64 {
    let s = pg().super_client("app").await;
    let sql =
        "SELECT coalesce(sum(calls), 0)::int8 FROM pg_stat_statements WHERE query ILIKE $1 AND query NOT ILIKE '%pg_stat_statements%'";
    s.query_one(sql, &[&format!("%{table}%")]).await.unwrap().get(0)
}

async fn one(c: &Client, sql: &str) -> String {
    for m in c.simple_query(sql).await.unwrap() {
        if let SimpleQueryMessage::Row(r) = m {
            return r.get(0).unwrap_or("NULL").to_string();
        }
    }
    panic!("no row from {sql}")
}

/// Both protocol forms of one point read.
async fn read(c: &Client, t: &str) -> (String, String) {
    let simple = one(c, &format!("SELECT v FROM {t} WHERE id = 7")).await;
    let extended: String = c.query_one(&format!("SELECT v FROM {t} WHERE id = $1"), &[&7i32]).await.unwrap().get(0);
    (simple, extended)
}

fn tier(p: &Proxy) -> std::sync::Arc<pgsurge::cache::shared::Shared> {
    p.app.cache.as_ref().and_then(|c| c.shared.clone()).expect("shared tier on")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_sharing_a_cache_tier_run_each_read_once_and_writes_void_it_everywhere() {
    let redis = RedisServer::start();
    let s = Settings {
        redis_url: Some(redis.url()),
        cache_flag: Some(true),
        cache_redis: Some(true),
        cache_ttl: Some(Dur(Duration::from_secs(60))),
        pool_size: Some(4),
        ..Default::default()
    };
    let proxies = fleet(3, s.clone()).await;
    let setup = connect(&pg().app_url).await;
    let t = unique("shared");
    setup.batch_execute(&format!("CREATE TABLE {t}(id int PRIMARY KEY, v text); INSERT INTO {t} VALUES (7, 'old')")).await.unwrap();
    let before = upstream_calls(&t).await;

    let clients: Vec<Client> = futures_util::future::join_all(proxies.iter().map(|p| p.client())).await;
    assert_eq!(read(&clients[0], &t).await, ("old".into(), "old".into()));
    let first = tier(&proxies[0]);
    assert!(eventually(Duration::from_secs(5), || async { first.stats.stores.load(Ordering::Relaxed) >= 2 }).await, "both fills in Redis");
    for c in &clients[1..] {
        for _ in 0..3 {
            assert_eq!(read(c, &t).await, ("old".into(), "old".into()));
        }
    }
    let calls = upstream_calls(&t).await - before;
    assert_eq!(calls, 2, "each form ran once in Postgres for three instances");
    assert!(tier(&proxies[1]).stats.hits.load(Ordering::Relaxed) >= 2);

    // A write through one instance: it reads its own write at once; a new instance does not get the old entry.
    clients[1].simple_query(&format!("UPDATE {t} SET v = 'new' WHERE id = 7")).await.unwrap();
    assert_eq!(read(&clients[1], &t).await, ("new".into(), "new".into()), "read your writes");
    let writer = tier(&proxies[1]);
    assert!(eventually(Duration::from_secs(5), || async { writer.pending() == 0 }).await, "the invalidation reached Redis");
    let late = Proxy::start(s.clone()).await;
    let lr = late.app.redis.clone().unwrap();
    assert!(eventually(Duration::from_secs(10), || async { lr.is_up() }).await);
    assert_eq!(read(&late.client().await, &t).await, ("new".into(), "new".into()), "the old entry was void in Redis");

    // Redis gone: reads still answered (from Postgres), never an error.
    drop(redis);
    let c = late.client().await;
    for _ in 0..3 {
        assert_eq!(read(&c, &t).await, ("new".into(), "new".into()));
    }
}
