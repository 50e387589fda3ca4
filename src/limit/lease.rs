//! Concurrent-connection caps counted across instances (`global = true` with `redis_url`): per key a Redis hash of
//! each instance's count, and a sorted set of each instance's lease. An instance renews its leases every second;
//! one that dies stops renewing, and its connections stop counting when its lease runs out (`LEASE_MS`).

use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::Duration;

use parking_lot::Mutex;
use redis::Script;

use crate::redis::Redis;

const LEASE_MS: u64 = 5_000;
const RENEW_EVERY: Duration = Duration::from_secs(1);

/// KEYS: counts, leases. ARGV: instance, max, lease ms. Drops dead instances, then takes one if below max.
const ACQUIRE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for _, i in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now)) do
  redis.call('HDEL', KEYS[1], i)
  redis.call('ZREM', KEYS[2], i)
end
local total = 0
for _, n in ipairs(redis.call('HVALS', KEYS[1])) do total = total + tonumber(n) end
if total >= tonumber(ARGV[2]) then return 0 end
redis.call('HINCRBY', KEYS[1], ARGV[1], 1)
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[3]), ARGV[1])
return 1
";

/// KEYS: counts. ARGV: instance. Gives one back (never below zero: Redis may have restarted empty).
const RELEASE: &str = r"
local n = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
if n > 1 then return redis.call('HINCRBY', KEYS[1], ARGV[1], -1) end
redis.call('HDEL', KEYS[1], ARGV[1])
return 0
";

/// KEYS: leases. ARGV: instance, lease ms.
const RENEW: &str = r"
local t = redis.call('TIME')
redis.call('ZADD', KEYS[1], tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[2]), ARGV[1])
return 1
";

pub struct Leases {
    redis: Arc<Redis>,
    acquire: Script,
    release: Script,
    renew: Script,
    /// Connections this instance counts in Redis, by counts key.
    held: Mutex<HashMap<String, usize>>,
    renewing: std::sync::atomic::AtomicBool,
}

impl Leases {
    pub fn new(redis: Arc<Redis>) -> Arc<Leases> {
        Arc::new(Leases {
            redis,
            acquire: Script::new(ACQUIRE),
            release: Script::new(RELEASE),
            renew: Script::new(RENEW),
            held: Mutex::default(),
            renewing: Default::default(),
        })
    }

    /// The counts key of one capped key.
    pub fn key(&self, scope: &str, key: &str) -> String {
        self.redis.key(format_args!("conns:{scope}:{key}"))
    }

    /// Takes one connection of `key` if fewer than `max` are counted across instances. None: Redis did not
    /// answer (the caller counts locally).
    pub async fn acquire(self: &Arc<Self>, key: &str, max: usize) -> Option<bool> {
        self.start_renewing();
        let mut call = self.acquire.key(key);
        call.key(format!("{key}:leases")).arg(&self.redis.id).arg(max).arg(LEASE_MS);
        let took: i64 = self.redis.call(|mut c| async move { call.invoke_async(&mut c).await }).await?;
        if took == 1 {
            *self.held.lock().entry(key.to_string()).or_insert(0) += 1;
        }
        Some(took == 1)
    }

    /// Gives one connection of `key` back (in the background: called on a client's drop).
    pub fn release(self: &Arc<Self>, key: String) {
        {
            let mut h = self.held.lock();
            if let Some(n) = h.get_mut(&key) {
                *n -= 1;
                if *n == 0 {
                    h.remove(&key);
                }
            }
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else { return };
        let me = self.clone();
        rt.spawn(async move {
            let mut call = me.release.key(&key);
            call.arg(&me.redis.id);
            // Not given back (Redis away): the lease runs out if this instance dies; otherwise counted until then.
            let _ = me.redis.call_within(Duration::from_millis(500), |mut c| async move { call.invoke_async::<i64>(&mut c).await }).await;
        });
    }

    fn start_renewing(self: &Arc<Self>) {
        if self.renewing.swap(true, std::sync::atomic::Ordering::AcqRel) {
            return;
        }
        let weak: Weak<Leases> = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(RENEW_EVERY).await;
                let Some(me) = weak.upgrade() else { return };
                let keys: Vec<String> = me.held.lock().keys().cloned().collect();
                for key in keys {
                    let mut call = me.renew.key(format!("{key}:leases"));
                    call.arg(&me.redis.id).arg(LEASE_MS);
                    let _ = me
                        .redis
                        .call_within(Duration::from_millis(500), |mut c| async move { call.invoke_async::<i64>(&mut c).await })
                        .await;
                }
            }
        });
    }
}
