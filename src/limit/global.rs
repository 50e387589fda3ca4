//! A rate shared by every instance on one Redis: GCRA in one atomic Lua script per token (one round trip), at
//! Redis' own clock. When Redis is down or slow the token is taken from a local limiter at this instance's share
//! of the rate (`rate / instances seen`, or the whole rate while that is unknown), so nothing hangs and nobody is
//! refused for want of Redis.

use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use redis::Script;
use tokio::time::Instant;

use super::config::Rate;
use super::rate::{Key, KeyedRate};
use crate::redis::Redis;

/// GCRA with reservation: the theoretical arrival time (TAT) of the next token lives in `KEYS[1]` (µs at Redis'
/// clock). A token that is free now, or within `ARGV[3]` µs, is taken and the wait returned (`{1, wait}`: the
/// caller sleeps it off); one further away is refused with the wait until it would be free (`{0, wait}`).
/// ARGV: emission interval µs, burst, longest wait µs.
const GCRA: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local new_tat = tat + interval
local wait = new_tat - interval * burst - now
if wait > tonumber(ARGV[3]) then return {0, wait} end
redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', math.ceil((new_tat - now) / 1000) + 1)
if wait < 0 then wait = 0 end
return {1, wait}
";

/// The global half of a `KeyedRate`.
pub struct GlobalRate {
    redis: Arc<Redis>,
    /// `<prefix>rate:<kind>:<scope>:<rule>:` — the key is appended.
    prefix: String,
    rate: Rate,
    script: Script,
    /// The local limiter used while Redis is away, and the instance count its rate was divided by.
    fallback: Mutex<(u32, Arc<KeyedRate>)>,
}

impl GlobalRate {
    pub fn new(redis: Arc<Redis>, name: &str, rate: Rate) -> GlobalRate {
        let prefix = redis.key(format_args!("rate:{name}:"));
        GlobalRate { redis, prefix, rate, script: Script::new(GCRA), fallback: Mutex::new((1, KeyedRate::new(rate))) }
    }

    /// Takes one token for `key`, waiting until `deadline` at most. None: Redis did not decide (down, slow or
    /// failing): the caller takes it from `fallback()`.
    pub async fn take(&self, key: &Key, deadline: Instant) -> Option<Result<bool, Duration>> {
        let interval_us = (1_000_000 / u64::from(self.rate.per_second.max(1))).max(1);
        let max_wait_us = deadline.saturating_duration_since(Instant::now()).as_micros() as u64;
        let k = format!("{}{key}", self.prefix);
        let mut call = self.script.key(k);
        call.arg(interval_us).arg(self.rate.burst.max(1)).arg(max_wait_us);
        let (granted, wait_us): (i64, i64) = self.redis.call(|mut c| async move { call.invoke_async(&mut c).await }).await?;
        let wait = Duration::from_micros(wait_us.max(0) as u64);
        if granted == 0 {
            return Some(Err(wait));
        }
        if wait.is_zero() {
            return Some(Ok(false));
        }
        tokio::time::sleep(wait).await;
        Some(Ok(true))
    }

    /// The local limiter at this instance's share of the rate (rebuilt when the count of instances changes).
    pub fn fallback(&self) -> Arc<KeyedRate> {
        let n = self.redis.instances().max(1);
        let mut f = self.fallback.lock();
        if f.0 != n {
            let share = |v: u32| v.div_ceil(n).max(1);
            *f = (n, KeyedRate::new(Rate { per_second: share(self.rate.per_second), burst: share(self.rate.burst) }));
        }
        f.1.clone()
    }

    /// Forgets idle keys of the fallback limiter.
    pub fn retain_recent(&self) {
        self.fallback.lock().1.retain_recent();
    }
}
