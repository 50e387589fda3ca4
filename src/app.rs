//! The shared handle every task gets: live config, pools, cancel registry, counters. No globals.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use parking_lot::Mutex;
use tokio::sync::watch;

use crate::auth::secret::{ScramSecret, Secret};
use crate::backend::pool::PoolSettings;
use crate::backend::{Pool, PoolKey, ServerTarget, UpstreamCredential};
use crate::cancel::CancelRegistry;
use crate::config::{Config, Database, PoolMode, User};
use crate::error::{Error, Result};

/// Iterations for verifiers pgsurge derives from plaintext passwords (Postgres' default).
const SCRAM_ITERATIONS: u32 = 4096;

/// How far shutdown has gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Shutdown {
    Running,
    /// SIGTERM: stop accepting, let transactions finish.
    Draining,
    /// Close everything now.
    Immediate,
}

/// Process-wide counters (the per-pool ones live in each pool).
#[derive(Debug, Default)]
pub struct Counters {
    pub clients: AtomicUsize,
    pub clients_total: AtomicU64,
    pub protocol_errors: AtomicU64,
    pub auth_failures: AtomicU64,
}

pub struct App {
    /// The live configuration; sessions hold the same handle.
    pub config: Arc<ArcSwap<Config>>,
    pools: Mutex<HashMap<PoolKey, Arc<Pool>>>,
    /// SCRAM verifiers derived once per plaintext password (PBKDF2 is deliberately slow).
    verifiers: Mutex<HashMap<String, Arc<ScramSecret>>>,
    pub cancels: CancelRegistry,
    /// Statements of every client, by text and parameter types, with what is known about each.
    pub statements: Arc<crate::state::Registry>,
    /// Statement analyses by text (simple queries; prepared statements keep theirs on the statement).
    pub analyses: Arc<crate::state::Analyses>,
    /// Numbers for the distinct sets of output-changing settings (cache and batch keys).
    pub outputs: Arc<crate::state::settings::Outputs>,
    /// Databases whose cache invalidation listener runs.
    listeners: Mutex<std::collections::HashSet<String>>,
    /// Read buffers lent to clients while they have data.
    pub buffers: Arc<crate::frontend::buffers::Buffers>,
    /// Pools created so far: each gets the next number.
    pool_ids: std::sync::atomic::AtomicU32,
    pub counters: Counters,
    /// Rate limits, connection caps and shared budgets (src/limit); rules swapped on reload.
    pub limits: Arc<crate::limit::Limiter>,
    pub shutdown: watch::Sender<Shutdown>,
    /// Admin console state: live clients, pause, error counts, the settings a reload starts from.
    pub ops: crate::admin::Ops,
    /// The read cache, when enabled (enabling or disabling it needs a restart).
    pub cache: Option<Arc<crate::cache::Cache>>,
    /// The N+1 batcher and detector (src/batch); merging is switched by `config.batch.enabled`.
    pub batch: Arc<crate::batch::Batcher>,
    /// Redis shared with the other instances (`redis_url`): global rates, the shared cache tier.
    pub redis: Option<Arc<crate::redis::Redis>>,
}

impl App {
    pub fn new(config: Config) -> Arc<App> {
        let redis = config.redis.clone().and_then(|r| {
            crate::redis::Redis::new(r).map_err(|e| tracing::error!(error = %e, "Redis not used: limits and cache stay local")).ok()
        });
        let limits = crate::limit::Limiter::shared(&config.limits, redis.clone());
        let cache = config.cache.enabled.then(|| Arc::new(crate::cache::Cache::with_redis(config.cache.clone(), redis.clone())));
        Arc::new(App {
            redis,
            cache,
            batch: Default::default(),
            limits,
            config: Arc::new(ArcSwap::from_pointee(config)),
            pools: Mutex::new(HashMap::new()),
            verifiers: Mutex::new(HashMap::new()),
            cancels: CancelRegistry::default(),
            statements: Default::default(),
            analyses: Default::default(),
            outputs: Default::default(),
            pool_ids: Default::default(),
            buffers: Default::default(),
            listeners: Default::default(),
            counters: Counters::default(),
            shutdown: watch::channel(Shutdown::Running).0,
            ops: Default::default(),
        })
    }

    pub fn shutdown_state(&self) -> Shutdown {
        *self.shutdown.borrow()
    }

    /// Immediate shutdown: stop accepting, and end every client session at its next turn.
    pub fn shutdown_now(&self) {
        self.shutdown.send_replace(Shutdown::Immediate);
        self.cancels.stop_all();
    }

    /// The SCRAM verifier a client of `user` must match.
    pub fn scram_verifier(&self, user: &User) -> Option<Arc<ScramSecret>> {
        match &user.secret {
            Secret::Scram(s) => Some(Arc::new(s.clone())),
            Secret::Plain(pw) => {
                let mut v = self.verifiers.lock();
                let key = format!("{}\0{}", user.name, pw);
                Some(v.entry(key).or_insert_with(|| Arc::new(ScramSecret::from_password(pw, SCRAM_ITERATIONS))).clone())
            }
            _ => None,
        }
    }

    pub fn pools(&self) -> Vec<Arc<Pool>> {
        let mut v: Vec<_> = self.pools.lock().values().cloned().collect();
        v.sort_by(|a, b| a.key.cmp(&b.key));
        v
    }

    /// The pool for a client of `db` logged in as `user`, created on first use.
    pub fn pool(&self, db: &Database, user: &User) -> Result<Arc<Pool>> {
        // A database with a forced user has one pool, whoever the client is (as in PgBouncer).
        let key_user = db.user.as_ref().map(|(u, _)| u.clone()).unwrap_or_else(|| user.name.clone());
        let key = PoolKey { database: db.name.clone(), user: key_user };
        if let Some(p) = self.pools.lock().get(&key) {
            return Ok(p.clone());
        }
        let cfg = self.config.load();
        let (login_user, credential) = match &db.user {
            Some((u, Some(pw))) => (u.clone(), UpstreamCredential::Password(pw.clone())),
            Some((u, None)) => (u.clone(), cfg.users.get(u).map(|x| credential_of(&x.secret)).unwrap_or(UpstreamCredential::None)),
            None => (user.name.clone(), credential_of(&user.secret)),
        };
        let max_prepared = std::num::NonZeroUsize::new(cfg.max_prepared_statements).unwrap_or(std::num::NonZeroUsize::MIN);
        let target = ServerTarget {
            host: db.host.clone(),
            port: db.port,
            dbname: db.dbname.clone(),
            user: login_user,
            credential,
            max_prepared,
            tls: cfg.server_tls.clone(),
            more_hosts: db.more_hosts.clone().into(),
            attrs: db.target_session_attrs,
            tcp: cfg.server_tcp,
        };
        let id = self.pool_ids.fetch_add(1, Ordering::Relaxed) + 1;
        let pool = Pool::new(id, key.clone(), target, pool_settings(&cfg, db, user), self.ops.clients.ids.clone());
        crate::admin::init_pool(self, &pool);
        pool.set_budgets(self.limits.budgets_for(&db.name, &user.name));
        let pool = self.pools.lock().entry(key).or_insert(pool).clone();
        self.listen_for(&pool);
        Ok(pool)
    }

    /// With `[cache] notify`: the first pool of a database starts that database's invalidation listener, which
    /// logs in as that pool does. It runs on a thread of its own, so a notification is applied as soon as it
    /// arrives rather than after the client requests queued on the workers (the window in which another
    /// instance's write can still be answered from memory); it ends with the App.
    fn listen_for(&self, pool: &Arc<Pool>) {
        let Some((cache, n)) = self.cache.as_ref().and_then(|c| Some((c, c.notifier.as_ref()?))) else { return };
        if !self.listeners.lock().insert(pool.key.database.clone()) {
            return;
        }
        n.register();
        let (cache, pool, mut gone) = (cache.clone(), pool.clone(), self.shutdown.subscribe());
        let run = async move {
            tokio::select! {
                _ = crate::cache::notify::listen(cache, pool) => {}
                _ = async { while gone.changed().await.is_ok() {} } => {}
            }
        };
        let thread = std::thread::Builder::new().name("pgsurge-listen".into()).spawn(move || {
            match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => rt.block_on(run),
                Err(e) => tracing::error!(error = %e, "cache invalidation listener: no runtime; the cache stays bypassed"),
            }
        });
        if let Err(e) = thread {
            tracing::error!(error = %e, "cache invalidation listener: no thread; the cache stays bypassed");
        }
    }

    /// Looks up the configured database a client asked for.
    /// A name not configured falls back to the `*` entry (PgBouncer's auto-database), with its own name as dbname.
    pub fn database(&self, name: &str) -> Result<Database> {
        let cfg = self.config.load();
        if let Some(d) = cfg.databases.get(name) {
            return Ok(d.clone());
        }
        let mut d = cfg.databases.get("*").cloned().ok_or_else(|| Error::NoSuchDatabase(name.to_string()))?;
        if d.dbname == "*" {
            d.dbname = name.to_string();
        }
        d.name = name.to_string();
        Ok(d)
    }

    pub fn pool_mode(&self, db: &Database) -> PoolMode {
        db.pool_mode
    }

    /// What a client session of `pool` works with.
    pub fn parts(&self, pool: Arc<Pool>) -> crate::frontend::relay::Parts {
        crate::frontend::relay::Parts {
            pool,
            registry: self.statements.clone(),
            analyses: self.analyses.clone(),
            cache: self.cache.clone(),
            batcher: self.batch.clone(),
            outputs: self.outputs.clone(),
        }
    }

    pub fn client_count(&self) -> usize {
        self.counters.clients.load(Ordering::Relaxed)
    }
}

fn credential_of(s: &Secret) -> UpstreamCredential {
    match s {
        Secret::Plain(p) => UpstreamCredential::Password(p.clone()),
        Secret::Md5(h) => UpstreamCredential::Md5(h.clone()),
        Secret::Scram(_) | Secret::None => UpstreamCredential::None,
    }
}

pub fn pool_settings(cfg: &Config, db: &Database, user: &User) -> PoolSettings {
    // A forced user's pool is the database's: the client user's own pool_size does not apply.
    let size = if db.user.is_some() { db.pool_size } else { user.pool_size.unwrap_or(db.pool_size) };
    PoolSettings {
        size,
        min_size: db.min_pool_size.unwrap_or(cfg.min_pool_size).min(size),
        connect_timeout: cfg.server_connect_timeout,
        lifetime: db.server_lifetime.unwrap_or(cfg.server_lifetime),
        idle_timeout: cfg.server_idle_timeout,
        check_delay: cfg.server_check_delay,
        slow_threshold: cfg.slow_query_threshold,
        slow_share: cfg.slow_pool_share,
        reserve_size: db.reserve_pool_size.unwrap_or(cfg.reserve_pool_size),
        reserve_timeout: cfg.reserve_pool_timeout,
        tcp: cfg.server_tcp,
    }
}

impl App {
    /// Swaps in a validated new configuration. Pools pick up new sizes and timeouts at once; the returned notes
    /// name keys that only a restart applies.
    pub fn reload(&self, mut new: Config) -> Vec<String> {
        let old = self.config.load_full();
        let unapplied = crate::config::reload::prepare(&old, &mut new);
        let mut notes = unapplied.notes;
        self.limits.reload(&new.limits);
        for pool in self.pools() {
            let Some(db) = new.databases.get(&pool.key.database) else { continue };
            // A pool of a user found by auth_query (not in the config) keeps its own settings but takes the new sizes.
            let found;
            let user = match new.users.get(&pool.key.user) {
                Some(u) => u,
                None => {
                    found = User {
                        name: pool.key.user.clone(),
                        secret: crate::auth::secret::Secret::None,
                        auth: new.auth_type,
                        pool_size: None,
                    };
                    &found
                }
            };
            if unapplied.moved.contains(&db.name) {
                // New clients get a pool at the new upstream; the old pool serves its clients until they leave.
                self.pools.lock().remove(&pool.key);
                pool.reconnect();
                notes.push(format!("databases.{}: the upstream changed; new clients go to the new one", db.name));
                continue;
            }
            pool.update_settings(pool_settings(&new, db, user));
            pool.set_budgets(self.limits.budgets_for(&db.name, &user.name));
        }
        self.config.store(Arc::new(new));
        notes
    }
}
