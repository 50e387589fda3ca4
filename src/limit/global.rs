//! A rate shared by every instance on one Redis: GCRA in one atomic Lua script per round trip, at Redis' own clock,
//! with a local reservation of tokens that amortises round trips. When Redis is down or slow the token is taken
//! from a local limiter at this instance's share of the rate (`rate / instances seen`, or the whole rate while that
//! is unknown), so nothing hangs and nobody is refused for want of Redis.
//!
//! The reservation: a round trip asks for as many tokens as this instance used in the last `BATCH_SPAN` (at least
//! one, at most `MAX_BATCH`) and Redis grants what is free of the global bucket now, no more; the rest wait here for
//! at most `STOCK_LIFETIME`, and are refilled in the background when half are used, so a steady request rarely
//! waits for Redis. Every token is still granted by Redis, so the instances together never exceed the rate and
//! burst; tokens that expire unused only lower it. A refusal is remembered too: Redis says when the next token is
//! free, and nothing can free one earlier (the bucket's clock only moves on), so until then requests that cannot
//! wait that long are refused here without a round trip.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use redis::Script;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::config::Rate;
use super::rate::{Key, KeyedRate};
use crate::redis::Redis;

/// GCRA for `ARGV[3]` tokens at most: the theoretical arrival time (TAT) of the next token lives in `KEYS[1]` (µs
/// at Redis' clock). Tokens free now are taken, up to the count asked (`{taken, 0}`); when none is free, one that
/// will be within `ARGV[4]` µs is reserved and the wait returned (`{1, wait}`: the caller sleeps it off); when not
/// even that, nothing is taken and the wait until one is free is returned (`{0, wait}`).
/// ARGV: emission interval µs, burst, tokens wanted, longest wait µs.
const GCRA: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local free = math.floor((now - tat) / interval) + burst
local taken = 1
local wait = 0
if free >= 1 then
  taken = math.min(tonumber(ARGV[3]), free)
else
  wait = tat + interval - interval * burst - now
  if wait > tonumber(ARGV[4]) then return {0, wait} end
end
local new_tat = tat + interval * taken
redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', math.ceil((new_tat - now) / 1000) + 1)
return {taken, wait}
";

/// How much of this instance's recent demand one round trip asks for.
const BATCH_SPAN: Duration = Duration::from_millis(20);
/// The most tokens one round trip takes.
const MAX_BATCH: u32 = 256;
/// How often the demand behind the batch size is re-measured.
const DEMAND_WINDOW: Duration = Duration::from_millis(100);
/// How long granted tokens wait here to be used before they are dropped.
const STOCK_LIFETIME: Duration = Duration::from_millis(50);
/// A key untouched this long is forgotten.
const IDLE: Duration = Duration::from_secs(2);

/// The global half of a `KeyedRate`.
pub struct GlobalRate {
    inner: Arc<Inner>,
}

struct Inner {
    redis: Arc<Redis>,
    /// `<prefix>rate:<kind>:<scope>:<rule>:` — the key is appended.
    prefix: String,
    rate: Rate,
    script: Script,
    /// Tokens granted and not used yet, per key.
    stocks: Mutex<HashMap<Key, Stock>>,
    /// The local limiter used while Redis is away, and the instance count its rate was divided by.
    fallback: Mutex<(u32, Arc<KeyedRate>)>,
}

/// One key's reservation.
struct Stock {
    tokens: u32,
    /// Unused tokens are dropped then.
    expires: Instant,
    /// Redis said no token is free before then.
    refused_until: Instant,
    /// A round trip for this key is under way; it wakes the requests waiting for it when done.
    asking: Option<Arc<Notify>>,
    /// Tokens asked for in the current demand window, since when, and the batch size the last window gave.
    asked: u32,
    since: Instant,
    batch: u32,
}

impl Stock {
    fn new(now: Instant) -> Stock {
        Stock { tokens: 0, expires: now, refused_until: now, asking: None, asked: 0, since: now, batch: 1 }
    }

    /// Counts one request for a token and re-sizes the batch once per demand window.
    fn demand(&mut self, now: Instant) {
        self.asked = self.asked.saturating_add(1);
        let span = now.saturating_duration_since(self.since);
        if span >= DEMAND_WINDOW {
            let per_batch = f64::from(self.asked) * BATCH_SPAN.as_secs_f64() / span.as_secs_f64();
            self.batch = (per_batch.ceil() as u32).clamp(1, MAX_BATCH);
            self.asked = 0;
            self.since = now;
        }
    }

    /// Takes a reserved token if one is left.
    fn take(&mut self, now: Instant) -> bool {
        if self.tokens > 0 && self.expires > now {
            self.tokens -= 1;
            true
        } else {
            false
        }
    }

    fn add(&mut self, tokens: u32, now: Instant) {
        let left = if self.expires > now { self.tokens } else { 0 };
        self.tokens = left + tokens;
        self.expires = now + STOCK_LIFETIME;
    }
}

/// `key`'s stock, made if it has none (the key is cloned only then: this runs for every token).
fn stock<'a>(stocks: &'a mut HashMap<Key, Stock>, key: &Key, now: Instant) -> &'a mut Stock {
    if !stocks.contains_key(key) {
        stocks.insert(key.clone(), Stock::new(now));
    }
    stocks.get_mut(key).expect("inserted above")
}

/// What one look at a key's stock decided.
enum Step {
    Granted,
    Refused(Duration),
    /// Another request's round trip is under way: wait for it, then look again.
    Wait(tokio::sync::futures::OwnedNotified),
    /// Ask Redis for this many tokens (this request is the one asking).
    Ask(u32),
}

impl GlobalRate {
    pub fn new(redis: Arc<Redis>, name: &str, rate: Rate) -> GlobalRate {
        let prefix = redis.key(format_args!("rate:{name}:"));
        let fallback = Mutex::new((1, KeyedRate::new(rate)));
        let inner = Inner { redis, prefix, rate, script: Script::new(GCRA), stocks: Mutex::new(HashMap::new()), fallback };
        GlobalRate { inner: Arc::new(inner) }
    }

    /// Takes one token for `key`, waiting until `deadline` at most. None: Redis did not decide (down, slow or
    /// failing): the caller takes it from `fallback()`.
    pub async fn take(&self, key: &Key, deadline: Instant) -> Option<Result<bool, Duration>> {
        let mut counted = false;
        loop {
            let now = Instant::now();
            let step = {
                let mut stocks = self.inner.stocks.lock();
                let s = stock(&mut stocks, key, now);
                if !counted {
                    s.demand(now);
                    counted = true;
                }
                if s.take(now) {
                    if s.tokens <= s.batch / 2 && s.asking.is_none() && s.refused_until <= now {
                        s.asking = Some(Arc::new(Notify::new()));
                        tokio::spawn(self.inner.clone().refill(key.clone(), s.batch));
                    }
                    Step::Granted
                } else if s.refused_until > now && deadline < s.refused_until {
                    Step::Refused(s.refused_until - now)
                } else if let Some(n) = &s.asking {
                    Step::Wait(n.clone().notified_owned())
                } else {
                    s.asking = Some(Arc::new(Notify::new()));
                    Step::Ask(s.batch)
                }
            };
            match step {
                Step::Granted => return Some(Ok(false)),
                Step::Refused(wait) => return Some(Err(wait)),
                // The round trip is bounded by `redis_timeout` (at most 1 s); this bound only guards against a
                // runtime that dropped it.
                Step::Wait(done) => tokio::time::timeout(Duration::from_secs(2), done).await.ok()?,
                Step::Ask(n) => {
                    // Its own task, so a request dropped mid-way (the client left) still ends the round trip and
                    // wakes the others.
                    let asked = tokio::spawn(self.inner.clone().ask(key.clone(), n, deadline));
                    return match asked.await.ok()?? {
                        Err(wait) => Some(Err(wait)),
                        Ok(wait) if wait.is_zero() => Some(Ok(false)),
                        Ok(wait) => {
                            tokio::time::sleep(wait).await;
                            Some(Ok(true))
                        }
                    };
                }
            }
        }
    }

    /// The local limiter at this instance's share of the rate (rebuilt when the count of instances changes).
    pub fn fallback(&self) -> Arc<KeyedRate> {
        let inner = &self.inner;
        let n = inner.redis.instances().max(1);
        let mut f = inner.fallback.lock();
        if f.0 != n {
            let share = |v: u32| v.div_ceil(n).max(1);
            let rate = Rate { per_second: share(inner.rate.per_second), burst: share(inner.rate.burst) };
            *f = (n, KeyedRate::new(rate));
        }
        f.1.clone()
    }

    /// Forgets idle keys (their reservation and their fallback bucket).
    pub fn retain_recent(&self) {
        let now = Instant::now();
        self.inner.stocks.lock().retain(|_, s| s.asking.is_some() || now.saturating_duration_since(s.since) < IDLE);
        self.inner.fallback.lock().1.retain_recent();
    }
}

impl Inner {
    /// One round trip: up to `want` tokens free now, else one reserved within `max_wait`. None when Redis did not
    /// answer.
    async fn round_trip(&self, key: &Key, want: u32, max_wait: Duration) -> Option<(u32, Duration)> {
        let interval_us = (1_000_000 / u64::from(self.rate.per_second.max(1))).max(1);
        let mut call = self.script.key(format!("{}{key}", self.prefix));
        call.arg(interval_us).arg(self.rate.burst.max(1)).arg(want.max(1)).arg(max_wait.as_micros() as u64);
        let (taken, wait_us): (i64, i64) = self.redis.call(|mut c| async move { call.invoke_async(&mut c).await }).await?;
        Some((u32::try_from(taken.max(0)).unwrap_or(u32::MAX), Duration::from_micros(wait_us.max(0) as u64)))
    }

    /// The round trip of a request that found no token here: it keeps one of what Redis grants (`Ok(wait)`: the
    /// wait of its reservation, to sleep off), stocks the rest, and wakes the requests that waited for it.
    async fn ask(self: Arc<Self>, key: Key, want: u32, deadline: Instant) -> Option<Result<Duration, Duration>> {
        let answer = self.round_trip(&key, want, deadline.saturating_duration_since(Instant::now())).await;
        let now = Instant::now();
        let mut stocks = self.stocks.lock();
        let s = stocks.entry(key).or_insert_with(|| Stock::new(now));
        let verdict = match answer {
            None => None,
            Some((0, wait)) => {
                s.refused_until = now + wait;
                Some(Err(wait))
            }
            Some((taken, wait)) => {
                s.add(taken - 1, now);
                Some(Ok(wait))
            }
        };
        if let Some(n) = s.asking.take() {
            n.notify_waiters();
        }
        verdict
    }

    /// A background round trip before the stock runs out: only tokens free now, never a reservation.
    async fn refill(self: Arc<Self>, key: Key, want: u32) {
        let answer = self.round_trip(&key, want, Duration::ZERO).await;
        let now = Instant::now();
        let mut stocks = self.stocks.lock();
        let s = stocks.entry(key).or_insert_with(|| Stock::new(now));
        match answer {
            Some((0, wait)) => s.refused_until = now + wait,
            Some((taken, _)) => s.add(taken, now),
            None => {}
        }
        if let Some(n) = s.asking.take() {
            n.notify_waiters();
        }
    }
}
