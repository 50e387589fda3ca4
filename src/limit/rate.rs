//! Keyed GCRA rates (governor) on tokio's clock, so tests can pause and advance time.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::clock::Clock;
use governor::middleware::NoOpMiddleware;
use governor::nanos::Nanos;
use governor::state::keyed::DashMapStateStore;
use governor::{Quota, RateLimiter};
use tokio::time::Instant;

use super::config::Rate;
use super::global::GlobalRate;
use crate::redis::Redis;

/// governor's clock, read from tokio's time (paused and advanced in tests).
#[derive(Debug, Clone, Copy)]
pub struct TokioClock {
    base: Instant,
}

impl Default for TokioClock {
    fn default() -> Self {
        TokioClock { base: Instant::now() }
    }
}

impl Clock for TokioClock {
    type Instant = Nanos;
    fn now(&self) -> Nanos {
        Nanos::from(Instant::now().saturating_duration_since(self.base))
    }
}

pub type Key = Arc<str>;

/// One rate applied to many keys (each key has its own bucket).
pub struct KeyedRate {
    pub rate: Rate,
    limiter: RateLimiter<Key, DashMapStateStore<Key>, TokioClock, NoOpMiddleware<Nanos>>,
    clock: TokioClock,
    /// With Redis: the rate is global across instances (limit/global.rs) and `limiter` is unused.
    global: Option<GlobalRate>,
}

impl KeyedRate {
    pub fn new(rate: Rate) -> Arc<KeyedRate> {
        Arc::new(KeyedRate::build(rate, None))
    }

    fn build(rate: Rate, global: Option<GlobalRate>) -> KeyedRate {
        let per_second = NonZeroU32::new(rate.per_second.max(1)).expect("nonzero");
        let burst = NonZeroU32::new(rate.burst.max(1)).expect("nonzero");
        let clock = TokioClock::default();
        let quota = Quota::per_second(per_second).allow_burst(burst);
        KeyedRate { rate, limiter: RateLimiter::dashmap_with_clock(quota, clock), clock, global }
    }

    /// A rate shared through Redis by every instance (`name` tells it apart from the other rates there).
    pub fn global(rate: Rate, redis: Arc<Redis>, name: &str) -> Arc<KeyedRate> {
        Arc::new(KeyedRate::build(rate, Some(GlobalRate::new(redis, name, rate))))
    }

    /// Whether this rate is shared through Redis.
    pub fn is_global(&self) -> bool {
        self.global.is_some()
    }

    /// Takes one token for `key` now, or says how long until one is free.
    pub fn check(&self, key: &Key) -> Result<(), Duration> {
        self.limiter.check_key(key).map_err(|nu| nu.wait_time_from(self.clock.now()))
    }

    /// Takes one token, waiting until `deadline` at most. `Ok(true)`: it had to wait. `Err(d)`: no token by
    /// the deadline; one is expected `d` from now. A global rate asks Redis, or its local share when Redis is away.
    pub async fn take(&self, key: &Key, deadline: Instant) -> Result<bool, Duration> {
        match &self.global {
            None => self.take_local(key, deadline).await,
            Some(g) => match g.take(key, deadline).await {
                Some(r) => r,
                None => g.fallback().take_local(key, deadline).await,
            },
        }
    }

    async fn take_local(&self, key: &Key, deadline: Instant) -> Result<bool, Duration> {
        let mut waited = false;
        loop {
            match self.check(key) {
                Ok(()) => return Ok(waited),
                Err(wait) => {
                    let at = Instant::now() + wait;
                    if at > deadline {
                        return Err(wait);
                    }
                    waited = true;
                    tokio::time::sleep_until(at).await;
                }
            }
        }
    }

    /// Forgets keys whose bucket is full again (indistinguishable from a new key).
    pub fn retain_recent(&self) {
        if let Some(g) = &self.global {
            g.retain_recent();
        }
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
    }

    pub fn keys(&self) -> usize {
        self.limiter.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_burst_then_the_steady_rate_then_a_wait_bounded_by_the_deadline() {
        let r = KeyedRate::new(Rate { per_second: 10, burst: 3 });
        let k: Key = "app".into();
        for _ in 0..3 {
            assert_eq!(r.check(&k), Ok(()));
        }
        let wait = r.check(&k).unwrap_err();
        assert!(wait > Duration::ZERO && wait <= Duration::from_millis(100), "{wait:?}");
        assert_eq!(r.check(&"other".into()), Ok(()), "another key has its own bucket");
        // 100 ms per token: a 150 ms budget gets one more token after waiting, then not the next.
        let deadline = Instant::now() + Duration::from_millis(150);
        assert_eq!(r.take(&k, deadline).await, Ok(true));
        let retry = r.take(&k, deadline).await.unwrap_err();
        assert_eq!(retry, Duration::from_millis(100), "told when to retry, without waiting in vain");
    }

    #[tokio::test(start_paused = true)]
    async fn idle_keys_are_forgotten() {
        let r = KeyedRate::new(Rate { per_second: 100, burst: 5 });
        for i in 0..10_000u32 {
            let _ = r.check(&Arc::from(i.to_string()));
        }
        assert_eq!(r.keys(), 10_000);
        tokio::time::advance(Duration::from_secs(1)).await;
        r.retain_recent();
        assert_eq!(r.keys(), 0);
    }
}
