//! Redis shared by instances: rates that hold across them, the local share while Redis is down (and global again
//! once it is back), and the shared cache tier. Each test starts its own redis-server on a free port.

use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use pgsurge::config::{Dur, Settings};
use tokio_postgres::{Client, SimpleQueryMessage};

use crate::harness::{code, connect, eventually, pg, try_connect, unique, Proxy};
use crate::tls::Certs;

/// A redis-server of this test's own, without persistence.
struct RedisServer {
    port: u16,
    child: Option<Child>,
    extra: Vec<String>,
}

impl RedisServer {
    fn start() -> RedisServer {
        Self::start_with(&[])
    }

    fn start_with(extra: &[&str]) -> RedisServer {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut r = RedisServer { port, child: None, extra: extra.iter().map(|s| s.to_string()).collect() };
        r.up();
        r
    }

    /// A server speaking only TLS on its port, with the certificate `certs` made for 127.0.0.1.
    fn start_tls(certs: &Certs) -> RedisServer {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let path = |n: &str| certs.path(n).display().to_string();
        let extra = ["--port", "0", "--tls-port", &port.to_string(), "--tls-cert-file", &path("server.crt")]
            .into_iter()
            .chain(["--tls-key-file", &path("server.key"), "--tls-auth-clients", "no"])
            .map(String::from)
            .collect();
        let mut r = RedisServer { port, child: None, extra };
        r.up();
        r
    }

    /// Starts (or restarts, empty) the server on its port and waits until it listens.
    fn up(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(&self.extra)
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

/// Starts `n` instances on one Redis and waits until each sees all of them. Redis calls may take 250 ms here (not
/// the default 5 ms): tests run in parallel on a busy machine, and a call that times out is decided locally.
async fn fleet(n: usize, mut settings: Settings) -> Vec<Proxy> {
    settings.redis_timeout = Some(Dur(Duration::from_millis(250)));
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

/// One client logged in through each instance.
async fn one_client_each(proxies: &[Proxy]) -> Vec<Client> {
    let mut clients = vec![];
    for p in proxies {
        clients.push(p.client().await);
    }
    clients
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
    let clients = one_client_each(&proxies).await;
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
    let clients = one_client_each(&proxies).await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_come_from_the_url_and_a_redis_that_refuses_them_refuses_no_client() {
    let redis = RedisServer::start_with(&["--requirepass", "s3cret"]);
    let url = format!("redis://:s3cret@127.0.0.1:{}", redis.port);
    let ok = fleet(1, Settings { redis_url: Some(url), ..limited(&redis, 1000, 10) }).await;
    ok[0].client().await.simple_query("SELECT 1").await.expect("admitted through Redis");

    let wrong =
        Proxy::start(Settings { redis_url: Some(format!("redis://:nope@127.0.0.1:{}", redis.port)), ..limited(&redis, 1000, 10) }).await;
    let c = wrong.client().await;
    for _ in 0..5 {
        c.simple_query("SELECT 1").await.expect("a Redis that refuses us is a Redis that is down: local limits");
    }
    let r = wrong.app.redis.clone().unwrap();
    assert!(!r.is_up() && r.stats.fallbacks.load(Ordering::Relaxed) >= 5);
    assert!(!pgsurge::admin::metrics::render(&wrong.app).contains("s3cret"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_redis_is_verified_against_the_configured_ca_and_an_unverified_one_is_not_used() {
    let certs = Certs::new();
    let redis = RedisServer::start_tls(&certs);
    let url = format!("rediss://127.0.0.1:{}", redis.port);
    let tls = Settings { redis_url: Some(url.clone()), redis_tls_ca_file: Some(certs.path("ca.crt")), ..limited(&redis, 1, 2) };
    let proxies = fleet(2, tls).await;
    let clients = one_client_each(&proxies).await;
    let start = Instant::now();
    let (ok, _) = flood(&clients, 3).await;
    let most = 2 + start.elapsed().as_secs() as usize + 1;
    assert!(ok >= 2 && ok <= most, "{ok} of 6 admitted by two instances sharing a TLS Redis (at most {most})");

    // Without the CA the certificate is not trusted: Redis counts as down and nobody is refused for it.
    let untrusted = Proxy::start(Settings { redis_url: Some(url), ..limited(&redis, 1000, 10) }).await;
    let c = untrusted.client().await;
    for _ in 0..3 {
        c.simple_query("SELECT 1").await.expect("an untrusted Redis is a Redis that is down: local limits");
    }
    assert!(!untrusted.app.redis.clone().unwrap().is_up());
}

#[test]
fn redis_tls_settings_that_cannot_work_stop_the_start_with_the_reason() {
    let certs = Certs::new();
    let err = |url: &str, ca: Option<std::path::PathBuf>| {
        let s = Settings {
            upstream: Some("postgres://app:pw@127.0.0.1:5432/app".into()),
            redis_url: Some(url.into()),
            redis_tls_ca_file: ca,
            ..Default::default()
        };
        pgsurge::config::Config::build(s).expect_err(url).to_string()
    };
    let e = err("redis://127.0.0.1:6379", Some(certs.path("ca.crt")));
    assert!(e.contains("redis_tls_ca_file is for a rediss://"), "{e}");
    let e = err("rediss://127.0.0.1:6379", Some(certs.path("missing.crt")));
    assert!(e.contains("redis_tls_ca_file") && e.contains("missing.crt"), "{e}");
    let e = err("rediss://127.0.0.1:6379", Some(certs.path("server.key")));
    assert!(e.contains("no PEM certificate"), "{e}");
    let e = err("rediss://127.0.0.1:6379/#insecure", None);
    assert!(e.contains("#insecure"), "{e}");
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
    let late = Proxy::start(Settings { redis_timeout: Some(Dur(Duration::from_millis(250))), ..s.clone() }).await;
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

/// The limiter's cost per token, local and through Redis on loopback (p50/p99 of 20,000 tokens, each request
/// yielding once as a real one awaits its I/O): `bench/redis.sh` runs it. Not an assertion: a measurement. On one
/// current-thread runtime, as pgsurge runs on up to 2 cores (`workers`).
#[tokio::test(flavor = "current_thread")]
#[ignore = "a measurement (bench/redis.sh)"]
async fn limiter_round_trip() {
    use pgsurge::limit::{Key, KeyedRate, Rate};
    let redis = RedisServer::start();
    let cfg = pgsurge::redis::RedisConfig::build(&redis.url(), Some(Duration::from_millis(100)), None).unwrap();
    let r = pgsurge::redis::Redis::new(cfg).unwrap();
    tokio::spawn(r.clone().run());
    assert!(eventually(Duration::from_secs(10), || async { r.is_up() }).await);
    let rate = Rate { per_second: 1_000_000, burst: 1_000_000 };
    let key: Key = "app".into();
    for (name, limiter) in [("local", KeyedRate::new(rate)), ("global", KeyedRate::global(rate, r.clone(), "bench"))] {
        let calls = r.stats.calls.load(Ordering::Relaxed);
        let mut us = vec![];
        for i in 0..21_000 {
            let t = tokio::time::Instant::now();
            limiter.take(&key, t).await.unwrap();
            if i >= 1_000 {
                us.push(t.elapsed().as_secs_f64() * 1e6);
            }
            tokio::task::yield_now().await;
        }
        us.sort_by(f64::total_cmp);
        let at = |q: f64| us[((us.len() as f64 * q) as usize).min(us.len() - 1)];
        let trips = r.stats.calls.load(Ordering::Relaxed) - calls;
        println!(
            "ROUNDTRIP limit={name} tokens={} p50_us={:.1} p99_us={:.1} p999_us={:.1} max_us={:.0} redis_calls={trips}",
            us.len(),
            at(0.5),
            at(0.99),
            at(0.999),
            at(1.0)
        );
    }
    println!("ROUNDTRIP redis_fallbacks={}", r.stats.fallbacks.load(Ordering::Relaxed));
}

/// The local reservation (a batch of tokens per round trip) keeps the global rate: two instances taking tokens as
/// fast as they can for 1.5 s admit what one bucket of 200/s with a burst of 20 allows, within 10%.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_tokens_keep_the_global_rate_within_ten_percent() {
    use pgsurge::limit::{Key, KeyedRate, Rate};
    let redis = RedisServer::start();
    let rate = Rate { per_second: 200, burst: 20 };
    let mut limiters = vec![];
    for _ in 0..2 {
        let cfg = pgsurge::redis::RedisConfig::build(&redis.url(), Some(Duration::from_millis(250)), None).unwrap();
        let r = pgsurge::redis::Redis::new(cfg).unwrap();
        tokio::spawn(r.clone().run());
        assert!(eventually(Duration::from_secs(10), || async { r.is_up() }).await);
        limiters.push((KeyedRate::global(rate, r.clone(), "share"), r));
    }
    let start = tokio::time::Instant::now();
    let until = start + Duration::from_millis(1500);
    let mut tasks = vec![];
    for (limiter, _) in &limiters {
        for _ in 0..4 {
            let limiter = limiter.clone();
            tasks.push(tokio::spawn(async move {
                let key: Key = "app".into();
                let mut admitted = 0u64;
                while tokio::time::Instant::now() < until {
                    if limiter.take(&key, tokio::time::Instant::now()).await.is_ok() {
                        admitted += 1;
                    }
                    tokio::task::yield_now().await;
                }
                admitted
            }));
        }
    }
    let mut admitted = 0;
    for t in tasks {
        admitted += t.await.unwrap();
    }
    let elapsed = start.elapsed().as_secs_f64();
    let allowed = 20.0 + 200.0 * elapsed;
    println!("BATCHED admitted={admitted} allowed={allowed:.0} elapsed_s={elapsed:.3}");
    for (_, r) in &limiters {
        assert_eq!(r.stats.fallbacks.load(Ordering::Relaxed), 0, "every token was decided by Redis");
    }
    assert!(
        (admitted as f64) <= allowed * 1.1 && (admitted as f64) >= allowed * 0.9,
        "{admitted} admitted in {elapsed:.2} s by two instances; one bucket allows {allowed:.0}"
    );
}
