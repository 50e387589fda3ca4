//! Admission control and rate limits: keyed GCRA rates (queries, transactions and new connections per second)
//! and concurrent-connection caps, globally and per user, per database and per client address (or CIDR group);
//! shared server-connection budgets served round-robin; the session's timeouts.
//!
//! The rules are rebuilt on reload and swapped in (a rate whose quota did not change keeps its buckets);
//! connection counts, budgets and counters live outside the swap so a reload drops nobody.

mod budget;
mod config;
mod fair;
mod global;
mod lease;
mod rate;
mod report;
mod timers;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use parking_lot::Mutex;
use tokio::time::Instant;

pub use budget::{BudgetPermit, Budgets};
pub use config::{Cidr, Fairness, GroupSettings, LimitConfig, LimitSettings, Rate, Rule, RuleSettings};
pub use fair::{FairPermit, FairQueue};
pub use rate::{Key, KeyedRate, TokioClock};
pub use timers::{Fired, SessionTimers};

use crate::error::{Error, Result};

/// Who a limit is counted for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scope {
    Global,
    User,
    Database,
    Address,
}

impl Scope {
    pub fn name(self) -> &'static str {
        match self {
            Scope::Global => "global",
            Scope::User => "user",
            Scope::Database => "database",
            Scope::Address => "address",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Kind {
    Qps,
    Tps,
    Cps,
}

/// Counters of one key, shown by `SHOW LIMITS` and /metrics.
#[derive(Debug, Default)]
pub struct KeyStats {
    /// Tokens (queries or transactions) granted at once.
    pub allowed: AtomicU64,
    /// Tokens granted after waiting.
    pub delayed: AtomicU64,
    /// Requests refused with 53400.
    pub rejected: AtomicU64,
    pub conn_allowed: AtomicU64,
    /// Logins refused with 53300.
    pub conn_rejected: AtomicU64,
}

/// Distinct client addresses that get their own counters; the rest share one "(other)" row.
const MAX_ADDRESS_STATS: usize = 1024;

struct Check {
    scope: Scope,
    key: Key,
    rate: Arc<KeyedRate>,
    stats: Arc<KeyStats>,
}

/// The rate checks that apply to one client, resolved at login and again after a reload.
struct Plan {
    gen: u64,
    max_delay: Duration,
    qps: Vec<Check>,
    tps: Vec<Check>,
}

/// The swappable part: validated rules and their rate limiters.
struct Rules {
    gen: u64,
    cfg: LimitConfig,
    rates: HashMap<(Scope, Kind, String), Arc<KeyedRate>>,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Qps => "qps",
            Kind::Tps => "tps",
            Kind::Cps => "cps",
        }
    }
}

impl Rules {
    /// With `redis`, every rate is global (shared by the instances on that Redis).
    fn build(cfg: &LimitConfig, gen: u64, old: Option<&Rules>, redis: Option<&Arc<crate::redis::Redis>>) -> Rules {
        let mut rates = HashMap::new();
        let mut add = |scope: Scope, name: &str, rule: &Rule| {
            for (kind, rate) in [(Kind::Qps, rule.qps), (Kind::Tps, rule.tps), (Kind::Cps, rule.cps)] {
                let Some(rate) = rate else { continue };
                let id = (scope, kind, name.to_string());
                let reuse = old.and_then(|o| o.rates.get(&id)).filter(|r| r.rate == rate).cloned();
                let new = || match redis {
                    Some(r) => KeyedRate::global(rate, r.clone(), &format!("{}:{}:{name}", kind.name(), scope.name())),
                    None => KeyedRate::new(rate),
                };
                rates.insert(id, reuse.unwrap_or_else(new));
            }
        };
        add(Scope::Global, "", &cfg.global);
        add(Scope::User, "", &cfg.per_user);
        add(Scope::Database, "", &cfg.per_database);
        add(Scope::Address, "", &cfg.per_address);
        for (n, r) in &cfg.users {
            add(Scope::User, n, r);
        }
        for (n, r) in &cfg.databases {
            add(Scope::Database, n, r);
        }
        for (n, _, r) in &cfg.groups {
            add(Scope::Address, &group_key(n), r);
        }
        Rules { gen, cfg: cfg.clone(), rates }
    }

    /// (scope, key, rule, rate-limiter name) for each scope a client falls in.
    fn resolve<'a>(&'a self, who: &Who) -> Vec<(Scope, Key, &'a Rule, String)> {
        let c = &self.cfg;
        let mut v = vec![(Scope::Global, Key::from("*"), &c.global, String::new())];
        let pick = |scope, key: &Key, over: Option<&'a Rule>, default: &'a Rule| match over {
            Some(r) => (scope, key.clone(), r, key.to_string()),
            None => (scope, key.clone(), default, String::new()),
        };
        // The database's caps are checked before the user's (a client over both is told about the database's).
        v.push(pick(Scope::Database, &who.db, c.databases.get(&*who.db), &c.per_database));
        v.push(pick(Scope::User, &who.user, c.users.get(&*who.user), &c.per_user));
        match c.group_of(who.ip) {
            Some(i) => {
                let g = group_key(&c.groups[i].0);
                v.push((Scope::Address, Key::from(g.as_str()), &c.groups[i].2, g));
            }
            None => v.push((Scope::Address, who.addr.clone(), &c.per_address, String::new())),
        }
        v.retain(|(_, _, r, _)| !r.is_empty());
        v
    }

    /// The rule that applies to a counter row (for display).
    fn rule_for(&self, scope: Scope, key: &str) -> Option<&Rule> {
        let c = &self.cfg;
        match scope {
            Scope::Global => Some(&c.global),
            Scope::User => Some(c.users.get(key).unwrap_or(&c.per_user)),
            Scope::Database => Some(c.databases.get(key).unwrap_or(&c.per_database)),
            Scope::Address => match key.strip_prefix("group:") {
                Some(g) => c.groups.iter().find(|(n, _, _)| n == g).map(|(_, _, r)| r),
                None => Some(&c.per_address),
            },
        }
    }
}

fn group_key(name: &str) -> String {
    format!("group:{name}")
}

/// A client's identity as the limits see it.
#[derive(Debug, Clone)]
struct Who {
    user: Key,
    db: Key,
    ip: IpAddr,
    addr: Key,
}

/// The limiter of one pgsurge: lives in `App` for the life of the process.
pub struct Limiter {
    rules: ArcSwap<Rules>,
    /// Concurrent client connections per (scope, key), only for scopes with a cap; entries at zero are removed.
    conns: Mutex<HashMap<(Scope, Key), usize>>,
    stats: Mutex<HashMap<(Scope, Key), Arc<KeyStats>>>,
    address_stats: std::sync::atomic::AtomicUsize,
    /// Shared server-connection budgets by (User | Database, name).
    budgets: Mutex<HashMap<(Scope, String), Arc<FairQueue>>>,
    gen: AtomicU64,
    /// Makes every rate global (`redis_url`).
    redis: Option<Arc<crate::redis::Redis>>,
    /// Connection caps counted across instances (`global = true`).
    leases: Option<Arc<lease::Leases>>,
}

impl Limiter {
    pub fn new(cfg: &LimitConfig) -> Arc<Limiter> {
        Limiter::shared(cfg, None)
    }

    /// A limiter whose rates are global through `redis` when given.
    pub fn shared(cfg: &LimitConfig, redis: Option<Arc<crate::redis::Redis>>) -> Arc<Limiter> {
        Arc::new(Limiter {
            rules: ArcSwap::from_pointee(Rules::build(cfg, 1, None, redis.as_ref())),
            leases: redis.clone().map(lease::Leases::new),
            redis,
            conns: Mutex::new(HashMap::new()),
            stats: Mutex::new(HashMap::new()),
            address_stats: Default::default(),
            budgets: Mutex::new(HashMap::new()),
            gen: AtomicU64::new(1),
        })
    }

    /// Applies new limits: connected clients pick them up at their next request; budgets are resized.
    pub fn reload(&self, cfg: &LimitConfig) {
        let old = self.rules.load_full();
        if old.cfg == *cfg {
            return;
        }
        let gen = self.gen.fetch_add(1, Ordering::Relaxed) + 1;
        self.rules.store(Arc::new(Rules::build(cfg, gen, Some(&old), self.redis.as_ref())));
        // A cap set to 0 is gone: its waiters are let through and its pools stop drawing from it.
        self.budgets.lock().retain(|(scope, _), q| {
            let limit = if *scope == Scope::User { cfg.max_user_connections } else { cfg.max_db_connections };
            q.set_limit(if limit == 0 { usize::MAX } else { limit });
            limit > 0
        });
    }

    pub fn config(&self) -> LimitConfig {
        self.rules.load().cfg.clone()
    }

    fn stats_for(&self, scope: Scope, key: &Key) -> Arc<KeyStats> {
        let mut m = self.stats.lock();
        if let Some(s) = m.get(&(scope, key.clone())) {
            return s.clone();
        }
        let key = if scope == Scope::Address && !key.starts_with("group:") {
            if self.address_stats.load(Ordering::Relaxed) >= MAX_ADDRESS_STATS {
                Key::from("(other)")
            } else {
                self.address_stats.fetch_add(1, Ordering::Relaxed);
                key.clone()
            }
        } else {
            key.clone()
        };
        m.entry((scope, key)).or_default().clone()
    }

    fn plan(&self, rules: &Rules, who: &Who) -> Plan {
        let mut plan = Plan { gen: rules.gen, max_delay: rules.cfg.max_delay, qps: vec![], tps: vec![] };
        for (scope, key, _, name) in rules.resolve(who) {
            for kind in [Kind::Qps, Kind::Tps] {
                if let Some(rate) = rules.rates.get(&(scope, kind, name.clone())) {
                    let c = Check { scope, key: key.clone(), rate: rate.clone(), stats: self.stats_for(scope, &key) };
                    if kind == Kind::Qps {
                        plan.qps.push(c)
                    } else {
                        plan.tps.push(c)
                    }
                }
            }
        }
        plan
    }

    /// Admits a logged-in client or refuses it with 53300 (FATAL): connection rates first, then the caps on
    /// concurrent connections. Called before any server work for this client.
    pub async fn admit(self: &Arc<Self>, user: &str, db: &str, ip: IpAddr) -> Result<Admission> {
        let ip = ip.to_canonical();
        let who = Who { user: user.into(), db: db.into(), ip, addr: Key::from(ip.to_string()) };
        let rules = self.rules.load_full();
        let scopes = rules.resolve(&who);
        for (scope, key, rule, name) in &scopes {
            let Some(rate) = rules.rates.get(&(*scope, Kind::Cps, name.clone())) else { continue };
            if rate.take(key, Instant::now()).await.is_err() {
                self.stats_for(*scope, key).conn_rejected.fetch_add(1, Ordering::Relaxed);
                let per = rule.cps.map(|r| r.per_second).unwrap_or(0);
                return Err(Error::TooManyConnections(format!(
                    "too many new connections for {} \"{key}\" (limit {per} per second)",
                    scope.name()
                )));
            }
        }
        // Caps with `global = true` are counted in Redis; one Redis cannot count now is counted here, at this
        // instance's share. `caps` is each scope's local cap (None: none, or counted in Redis).
        let mut leased = vec![];
        let mut caps = vec![];
        for (scope, key, rule, _) in &scopes {
            let cap = match (rule.max_connections, &self.leases) {
                (Some(max), Some(leases)) if rule.global_connections => {
                    let k = leases.key(scope.name(), key);
                    match leases.acquire(&k, max).await {
                        Some(true) => {
                            leased.push(k);
                            None
                        }
                        Some(false) => {
                            self.stats_for(*scope, key).conn_rejected.fetch_add(1, Ordering::Relaxed);
                            leased.into_iter().for_each(|k| leases.release(k));
                            return Err(Error::TooManyConnections(format!(
                                "too many connections for {} \"{key}\" across instances (max_connections = {max})",
                                scope.name()
                            )));
                        }
                        None => Some(max.div_ceil(self.redis.as_ref().map_or(1, |r| r.instances().max(1) as usize))),
                    }
                }
                (max, _) => max,
            };
            caps.push(cap);
        }
        let mut counted = vec![];
        {
            let mut conns = self.conns.lock();
            for ((scope, key, _, _), cap) in scopes.iter().zip(&caps) {
                let Some(max) = *cap else { continue };
                if conns.get(&(*scope, key.clone())).copied().unwrap_or(0) >= max {
                    drop(conns);
                    self.stats_for(*scope, key).conn_rejected.fetch_add(1, Ordering::Relaxed);
                    if let Some(leases) = &self.leases {
                        leased.into_iter().for_each(|k| leases.release(k));
                    }
                    return Err(Error::TooManyConnections(format!(
                        "too many connections for {} \"{key}\" (max_connections = {max}{})",
                        scope.name(),
                        match scope {
                            Scope::Database => ", PgBouncer's max_db_client_connections",
                            Scope::User => ", PgBouncer's max_user_client_connections",
                            _ => "",
                        }
                    )));
                }
            }
            for ((scope, key, _, _), cap) in scopes.iter().zip(&caps) {
                if cap.is_some() {
                    *conns.entry((*scope, key.clone())).or_insert(0) += 1;
                    counted.push((*scope, key.clone()));
                }
            }
        }
        for (scope, key, rule, _) in &scopes {
            if rule.cps.is_some() || rule.max_connections.is_some() {
                self.stats_for(*scope, key).conn_allowed.fetch_add(1, Ordering::Relaxed);
            }
        }
        let fair_key = match rules.cfg.fairness {
            Fairness::User => who.user.clone(),
            Fairness::Address => who.addr.clone(),
        };
        let plan = Arc::new(self.plan(&rules, &who));
        let (plan_gen, active) = (plan.gen, plan.is_active());
        let (counted, leased) = (counted.into_boxed_slice(), leased.into_boxed_slice());
        Ok(Admission { limiter: self.clone(), who, fair_key, counted, leased, plan, plan_gen, active })
    }

    /// The shared budgets a (database, user) pool draws from, if any cap is set.
    pub fn budgets_for(&self, db: &str, user: &str) -> Option<Arc<Budgets>> {
        let cfg = &self.rules.load().cfg;
        let mut b = self.budgets.lock();
        let mut get = |scope: Scope, name: &str, limit: usize| {
            (limit > 0).then(|| {
                b.entry((scope, name.to_string())).or_insert_with(|| FairQueue::new(format!("{}:{name}", scope.name()), limit)).clone()
            })
        };
        let user_cap = cfg.user_connection_caps.get(user).copied().unwrap_or(cfg.max_user_connections);
        let db_cap = cfg.db_connection_caps.get(db).copied().unwrap_or(cfg.max_db_connections);
        let budgets = Budgets { user: get(Scope::User, user, user_cap), db: get(Scope::Database, db, db_cap) };
        (budgets.user.is_some() || budgets.db.is_some()).then(|| Arc::new(budgets))
    }

    /// Periodic upkeep (janitor): forgets rate buckets that are full again, so a flood of distinct client
    /// addresses cannot grow memory without bound.
    pub fn maintain(&self) {
        for r in self.rules.load().rates.values() {
            r.retain_recent();
        }
    }

    /// Keys currently tracked by all rate limiters.
    pub fn tracked_keys(&self) -> usize {
        self.rules.load().rates.values().map(|r| r.keys()).sum()
    }

    /// Keys with a live connection count.
    pub fn counted_keys(&self) -> usize {
        self.conns.lock().len()
    }
}

/// A client admitted by the limits: holds its connection counts (released on drop) and spends its tokens.
pub struct Admission {
    limiter: Arc<Limiter>,
    who: Who,
    /// Whose turn it is in shared budgets: the user, or the client address (`fairness`).
    pub fair_key: Key,
    /// Boxed slices, not Vecs: 8 bytes less each in every client (park.rs keeps this for idle ones).
    counted: Box<[(Scope, Key)]>,
    /// Connections counted in Redis (global caps), by counts key.
    leased: Box<[String]>,
    plan: Arc<Plan>,
    /// `plan.gen` and whether the plan has any rate, kept here so the per-request check touches only this struct.
    plan_gen: u64,
    active: bool,
}

impl Plan {
    fn is_active(&self) -> bool {
        !self.qps.is_empty() || !self.tps.is_empty()
    }
}

impl Admission {
    /// Whether any query or transaction rate applies to this client now (picks up a reload).
    pub fn is_active(&mut self) -> bool {
        // The generation is bumped before new rules are stored: an unchanged one means this plan is current,
        // without loading the rules (this runs once per request).
        if self.limiter.gen.load(Ordering::Relaxed) != self.plan_gen {
            let rules = self.limiter.rules.load();
            if rules.gen != self.plan.gen {
                self.plan = Arc::new(self.limiter.plan(&rules, &self.who));
            }
            (self.plan_gen, self.active) = (self.plan.gen, self.plan.is_active());
        }
        self.active
    }

    /// How long a request outside a transaction may wait for its tokens (`limit_max_delay`).
    pub fn max_delay(&self) -> Duration {
        self.plan.max_delay
    }

    /// Spends `requests` query tokens (and a transaction token if `new_tx`), waiting up to `wait` in all.
    /// Refused: ERROR 53400 with the time after which a retry should succeed.
    pub async fn request(&mut self, requests: u32, new_tx: bool, wait: Duration) -> Result<()> {
        let plan = self.plan.clone();
        let deadline = Instant::now() + wait;
        let tps = plan.tps.iter().filter(|_| new_tx).map(|c| (c, "transactions"));
        let qps = (0..requests).flat_map(|_| plan.qps.iter()).map(|c| (c, "queries"));
        for (c, what) in tps.chain(qps) {
            match c.rate.take(&c.key, deadline).await {
                Ok(false) => c.stats.allowed.fetch_add(1, Ordering::Relaxed),
                Ok(true) => c.stats.delayed.fetch_add(1, Ordering::Relaxed),
                Err(retry_after) => {
                    c.stats.rejected.fetch_add(1, Ordering::Relaxed);
                    let message = format!(
                        "rate limit exceeded: {} \"{}\" may run {} {what} per second",
                        c.scope.name(),
                        c.key,
                        c.rate.rate.per_second
                    );
                    return Err(Error::RateLimited { message, retry_after });
                }
            };
        }
        Ok(())
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        if let Some(leases) = &self.limiter.leases {
            std::mem::take(&mut self.leased).into_vec().into_iter().for_each(|k| leases.release(k));
        }
        if self.counted.is_empty() {
            return;
        }
        let mut conns = self.limiter.conns.lock();
        for k in std::mem::take(&mut self.counted).into_vec() {
            if let Some(n) = conns.get_mut(&k) {
                *n -= 1;
                if *n == 0 {
                    conns.remove(&k);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
