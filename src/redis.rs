//! The Redis client shared by the global rate limits (limit/global.rs) and the shared cache tier (cache/shared.rs):
//! one multiplexed connection (the redis crate's `ConnectionManager`), every call bounded by `redis_timeout`, and a
//! breaker so that a Redis that is down costs a request nothing: callers fall back to what they do alone.
//!
//! Up/down: a call that fails on the connection, or one that times out when none succeeded for `SILENCE_TO_TRIP`, mark Redis
//! down (logged once); while down no request calls it, and `run` probes it every `PROBE_EVERY` until it answers
//! (logged once). `run` also keeps this instance's heartbeat, from which every instance learns how many share the
//! Redis (`instances`), so a fallback can take its share of a global rate.

use std::fmt::Write as _;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{RedisError, RedisResult, Script};

/// A call that times out marks Redis down only if no call succeeded for this long (a slow answer now and then, on a
/// busy machine, is not an outage: tripping on it would hand decisions to the local share, which with the other
/// instances still on the global bucket admits more than the rate).
const SILENCE_TO_TRIP: Duration = Duration::from_millis(250);
/// How often a Redis that is down is probed, and how long a probe may take.
const PROBE_EVERY: Duration = Duration::from_millis(100);
const PROBE_TIMEOUT: Duration = Duration::from_millis(500);
/// Heartbeat period, and how long an instance that stopped beating is still counted.
const BEAT_EVERY: Duration = Duration::from_secs(1);
const BEAT_TTL_MS: u64 = 3_000;

/// The validated `redis_*` keys.
#[derive(Debug, Clone, PartialEq)]
pub struct RedisConfig {
    /// `redis://[user:password@]host:port[/db]` or `rediss://…` (TLS, rustls with ring).
    pub url: String,
    /// Longest a request waits for one Redis call before deciding without it.
    pub timeout: Duration,
    /// Prefix of every key pgsurge writes, so several fleets can share a Redis.
    pub prefix: String,
    /// `redis_tls_ca_file` and its PEM: the CAs a rediss:// server is verified against (None: the system's).
    pub tls_ca: Option<(std::path::PathBuf, Vec<u8>)>,
}

impl RedisConfig {
    /// Checks the URL (scheme, host, credentials) and the other keys.
    pub fn build(url: &str, timeout: Option<Duration>, prefix: Option<&str>) -> Result<RedisConfig, String> {
        let info = redis::IntoConnectionInfo::into_connection_info(url).map_err(|e| format!("redis_url {}: {e}", redact(url)))?;
        drop(info);
        if !(url.starts_with("redis://") || url.starts_with("rediss://") || url.starts_with("redis+unix://") || url.starts_with("unix://"))
        {
            return Err(format!("redis_url {}: give redis://, rediss:// or unix://", redact(url)));
        }
        let timeout = timeout.unwrap_or(Duration::from_millis(5));
        if timeout.is_zero() || timeout > Duration::from_secs(1) {
            return Err("redis_timeout must be more than 0 and at most 1s".into());
        }
        if url.starts_with("rediss://") && url.contains("#insecure") {
            return Err(format!("redis_url {}: #insecure (no certificate check) is not supported; give redis_tls_ca_file", redact(url)));
        }
        Ok(RedisConfig { url: url.to_string(), timeout, prefix: prefix.unwrap_or("pgsurge:").to_string(), tls_ca: None })
    }

    /// Verifies a rediss:// server against the CA certificates in `path` (PEM) instead of the system's.
    pub fn with_tls_ca(mut self, path: Option<&std::path::Path>) -> Result<RedisConfig, String> {
        let Some(path) = path.filter(|p| !p.as_os_str().is_empty()) else { return Ok(self) };
        if !self.url.starts_with("rediss://") {
            return Err(format!("redis_tls_ca_file is for a rediss:// (TLS) Redis, not {}", redact(&self.url)));
        }
        let pem = std::fs::read(path).map_err(|e| format!("redis_tls_ca_file {}: {e}", path.display()))?;
        if !String::from_utf8_lossy(&pem).contains("-----BEGIN CERTIFICATE-----") {
            return Err(format!("redis_tls_ca_file {}: no PEM certificate in it", path.display()));
        }
        self.tls_ca = Some((path.to_path_buf(), pem));
        Ok(self)
    }
}

/// `url` with its password replaced, for logs and errors.
pub fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        _ => url.to_string(),
    }
}

/// Counters shown in /metrics.
#[derive(Debug, Default)]
pub struct RedisStats {
    pub calls: AtomicU64,
    pub errors: AtomicU64,
    pub timeouts: AtomicU64,
    /// Decisions made without Redis (it was down, slow or failing): a rate check taken locally, a cache lookup
    /// skipped.
    pub fallbacks: AtomicU64,
    /// Times Redis was marked down.
    pub outages: AtomicU64,
}

pub struct Redis {
    pub config: RedisConfig,
    client: redis::Client,
    conn: OnceLock<ConnectionManager>,
    up: AtomicBool,
    /// When a call last succeeded, in ms since `base`.
    last_ok: AtomicU64,
    base: tokio::time::Instant,
    /// Instances beating on this Redis (0 until known).
    instances: AtomicU32,
    /// This instance's name in the heartbeat set.
    pub id: String,
    pub stats: RedisStats,
    beat: Script,
    /// An invalidation could not be written to Redis (see `lost_invalidation`).
    lost: AtomicBool,
}

/// The heartbeat: this instance's beat at Redis' own clock, the dead ones dropped, the live ones counted.
const BEAT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[2]))
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return redis.call('ZCARD', KEYS[1])
";

impl Redis {
    pub fn new(config: RedisConfig) -> Result<Arc<Redis>, String> {
        let client = match &config.tls_ca {
            None => redis::Client::open(config.url.as_str()),
            Some((_, pem)) => {
                let certs = redis::TlsCertificates { client_tls: None, root_cert: Some(pem.clone()) };
                redis::Client::build_with_tls(config.url.as_str(), certs)
            }
        }
        .map_err(|e| format!("redis_url {}: {e}", redact(&config.url)))?;
        let id = format!("{}-{:016x}", std::process::id(), rand::random::<u64>());
        Ok(Arc::new(Redis {
            config,
            client,
            conn: OnceLock::new(),
            up: AtomicBool::new(false),
            last_ok: AtomicU64::new(0),
            base: tokio::time::Instant::now(),
            instances: AtomicU32::new(0),
            id,
            stats: RedisStats::default(),
            beat: Script::new(BEAT),
            lost: AtomicBool::new(false),
        }))
    }

    /// A key under the configured prefix.
    pub fn key(&self, parts: std::fmt::Arguments<'_>) -> String {
        let mut k = self.config.prefix.clone();
        let _ = k.write_fmt(parts);
        k
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// Instances sharing this Redis, as last seen (0: not known).
    pub fn instances(&self) -> u32 {
        self.instances.load(Ordering::Relaxed)
    }

    /// Counts a decision made without Redis.
    pub fn fell_back(&self) {
        self.stats.fallbacks.fetch_add(1, Ordering::Relaxed);
    }

    /// Runs `call` on the connection within `redis_timeout`. None: Redis is down, failed or too slow (counted as a
    /// fallback); the caller decides without it.
    pub async fn call<T, F, Fut>(&self, call: F) -> Option<T>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        self.call_within(self.config.timeout, call).await
    }

    /// `call` with its own time bound (writes off the request path may wait longer).
    pub async fn call_within<T, F, Fut>(&self, timeout: Duration, call: F) -> Option<T>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        let conn = match (self.is_up(), self.conn.get()) {
            (true, Some(c)) => c.clone(),
            _ => {
                self.fell_back();
                return None;
            }
        };
        self.stats.calls.fetch_add(1, Ordering::Relaxed);
        let r = tokio::time::timeout(timeout, call(conn)).await;
        match r {
            Ok(Ok(v)) => {
                self.last_ok.store(self.base.elapsed().as_millis() as u64, Ordering::Relaxed);
                Some(v)
            }
            Ok(Err(e)) => {
                self.stats.errors.fetch_add(1, Ordering::Relaxed);
                if is_outage(&e) {
                    self.down(&e.to_string());
                } else {
                    tracing::debug!(error = %e, "Redis call failed");
                }
                self.fell_back();
                None
            }
            Err(_) => {
                self.stats.timeouts.fetch_add(1, Ordering::Relaxed);
                let silent = self.base.elapsed().as_millis() as u64 - self.last_ok.load(Ordering::Relaxed);
                if silent >= SILENCE_TO_TRIP.as_millis() as u64 {
                    self.down(&format!("no answer within {timeout:?} for {silent} ms"));
                }
                self.fell_back();
                None
            }
        }
    }

    /// An invalidation could not be written: until the whole shared tier is voided (when Redis answers again),
    /// nothing is read from it.
    pub fn lost_invalidation(&self, why: &str) {
        self.lost.store(true, Ordering::Release);
        self.down(why);
    }

    /// Whether invalidations may be missing from Redis now.
    pub fn missing_invalidations(&self) -> bool {
        self.lost.load(Ordering::Acquire)
    }

    /// Before Redis is used again: if an invalidation was lost, void every shared cache entry (bump the epoch).
    async fn settle(&self, conn: &ConnectionManager) -> bool {
        if !self.lost.load(Ordering::Acquire) {
            return true;
        }
        let mut c = conn.clone();
        let gen = self.key(format_args!("gen"));
        let mut bump = redis::cmd("HINCRBY");
        bump.arg(gen).arg("e").arg(1);
        match tokio::time::timeout(PROBE_TIMEOUT, bump.query_async::<i64>(&mut c)).await {
            Ok(Ok(_)) => {
                self.lost.store(false, Ordering::Release);
                true
            }
            _ => false,
        }
    }

    fn down(&self, why: &str) {
        if self.up.swap(false, Ordering::AcqRel) {
            self.stats.outages.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(redis = %redact(&self.config.url), reason = why, "Redis is down: rate limits are local (each instance its share), the shared cache tier is skipped");
        }
    }

    /// Connects, then keeps the heartbeat and probes while down, until the process ends. Spawned by `serve`.
    pub async fn run(self: Arc<Self>) {
        let cfg = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(PROBE_TIMEOUT))
            .set_response_timeout(Some(PROBE_TIMEOUT))
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(20))
            .set_max_delay(Duration::from_millis(200));
        let conn = match ConnectionManager::new_lazy_with_config(self.client.clone(), cfg) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "Redis client could not start; limits stay local");
                return;
            }
        };
        let _ = self.conn.set(conn.clone());
        let mut last_beat: Option<tokio::time::Instant> = None;
        let mut logged_first = false;
        loop {
            let now = tokio::time::Instant::now();
            let due = last_beat.is_none_or(|t| now.duration_since(t) >= BEAT_EVERY);
            if !self.is_up() || due {
                let mut c = conn.clone();
                let mut beat = self.beat.key(self.key(format_args!("instances")));
                beat.arg(&self.id).arg(BEAT_TTL_MS);
                match tokio::time::timeout(PROBE_TIMEOUT, beat.invoke_async::<u32>(&mut c)).await {
                    Ok(Ok(n)) => {
                        last_beat = Some(now);
                        self.instances.store(n, Ordering::Relaxed);
                        // Before answering again, what could not be written while it was away is settled.
                        if !self.is_up() && self.settle(&conn).await {
                            self.last_ok.store(self.base.elapsed().as_millis() as u64, Ordering::Relaxed);
                            self.up.store(true, Ordering::Release);
                            tracing::info!(redis = %redact(&self.config.url), instances = n, "Redis is up: rate limits are global");
                            logged_first = true;
                        }
                    }
                    Ok(Err(e)) => {
                        self.down(&e.to_string());
                        if !logged_first {
                            tracing::warn!(redis = %redact(&self.config.url), error = %e, "Redis not reachable yet: rate limits are local");
                            logged_first = true;
                        }
                    }
                    Err(_) => self.down("heartbeat timed out"),
                }
            }
            tokio::time::sleep(PROBE_EVERY).await;
        }
    }

    /// Prometheus series.
    pub fn prometheus(&self) -> String {
        let ld = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let s = &self.stats;
        let mut o = String::new();
        let mut series = |name: &str, kind: &str, help: &str, v: u64| {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
        };
        series("pgsurge_redis_up", "gauge", "1 while Redis answers (rate limits global, shared cache tier used).", u64::from(self.is_up()));
        series("pgsurge_redis_instances", "gauge", "Instances beating on the same Redis, as last seen.", u64::from(self.instances()));
        series("pgsurge_redis_calls_total", "counter", "Calls made to Redis on behalf of requests.", ld(&s.calls));
        series("pgsurge_redis_errors_total", "counter", "Redis calls that failed.", ld(&s.errors));
        series("pgsurge_redis_timeouts_total", "counter", "Redis calls that took longer than redis_timeout.", ld(&s.timeouts));
        series("pgsurge_redis_fallbacks_total", "counter", "Decisions made without Redis (down, slow or failing).", ld(&s.fallbacks));
        series("pgsurge_redis_outages_total", "counter", "Times Redis was marked down.", ld(&s.outages));
        o
    }
}

/// An error that says the connection is gone (as opposed to one command refused).
fn is_outage(e: &RedisError) -> bool {
    e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() || e.is_timeout() || e.is_unrecoverable_error()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_checked_and_passwords_never_shown() {
        let c = RedisConfig::build("redis://app:s3cret@127.0.0.1:6380/2", None, None).unwrap();
        assert_eq!((c.timeout, c.prefix.as_str()), (Duration::from_millis(5), "pgsurge:"));
        assert!(!redact(&c.url).contains("s3cret"));
        assert!(RedisConfig::build("rediss://h:6380", Some(Duration::from_millis(3)), Some("x:")).is_ok());
        assert!(RedisConfig::build("http://h", None, None).is_err());
        let e = RedisConfig::build("redis://h", Some(Duration::ZERO), None).unwrap_err();
        assert!(e.contains("redis_timeout"), "{e}");
    }
}
