//! Operating pgsurge: the admin console (virtual database `pgsurge`/`pgbouncer`), the registry of live clients
//! it lists, pause state, per-SQLSTATE error counts, and the HTTP endpoints (/metrics, /healthz, /readyz).

pub mod clients;
pub mod commands;
pub mod console;
pub mod http;
pub mod metrics;
pub mod show;
pub mod show_pgb;
pub mod slow;
pub mod table;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use parking_lot::Mutex;

use crate::app::App;
use crate::config::{Config, Settings};

pub use clients::{ClientGuard, ClientInfo, ClientRegistry};
pub use table::Table;

/// Operational state that lives beside the pools in `App`.
#[derive(Default)]
pub struct Ops {
    pub clients: ClientRegistry,
    pub errors: Arc<ErrorCounts>,
    /// auth_query lookups, cached briefly.
    pub auth_cache: crate::auth::query::AuthCache,
    /// `PAUSE` state: everything, or these databases. Pools created later start paused too.
    paused: Mutex<(bool, BTreeSet<String>)>,
    /// The flags and environment pgsurge started with: a reload re-reads the file under them.
    settings: Mutex<Option<Settings>>,
    /// Console `SET key = value`s, applied over the file on every reload (PgBouncer key names).
    overrides: Mutex<Vec<(String, String)>>,
    /// `DISABLE db`: databases new clients may not connect to.
    disabled: Mutex<BTreeSet<String>>,
    /// When pgsurge started (SHOW STATS_AVERAGES averages over it).
    pub started: Started,
}

/// An `Instant` that defaults to now.
pub struct Started(pub tokio::time::Instant);

impl Default for Started {
    fn default() -> Started {
        Started(tokio::time::Instant::now())
    }
}

impl Started {
    pub fn elapsed(&self) -> std::time::Duration {
        self.0.elapsed()
    }
}

/// Errors pgsurge itself sent to clients, by SQLSTATE (not the hot path: only when an error is written).
#[derive(Default)]
pub struct ErrorCounts(Mutex<BTreeMap<String, u64>>);

impl ErrorCounts {
    pub fn count(&self, sqlstate: &str) {
        *self.0.lock().entry(sqlstate.to_string()).or_default() += 1;
    }

    pub fn snapshot(&self) -> BTreeMap<String, u64> {
        self.0.lock().clone()
    }
}

impl Ops {
    pub fn is_disabled(&self, database: &str) -> bool {
        self.disabled.lock().contains(database)
    }

    pub fn set_disabled(&self, database: &str, disabled: bool) {
        let mut d = self.disabled.lock();
        if disabled {
            d.insert(database.to_string());
        } else {
            d.remove(database);
        }
    }

    pub fn is_paused(&self, database: &str) -> bool {
        let p = self.paused.lock();
        p.0 || p.1.contains(database)
    }
}

/// Which console commands a user may run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// `admin_users`: everything.
    Admin,
    /// `stats_users`: SHOW only.
    Stats,
}

pub fn role_of(cfg: &Config, user: &str) -> Option<Role> {
    if cfg.admin_users.iter().any(|u| u == user) {
        Some(Role::Admin)
    } else if cfg.stats_users.iter().any(|u| u == user) {
        Some(Role::Stats)
    } else {
        None
    }
}

impl App {
    /// Remembers the flags/environment a reload applies the file under (main does this at start).
    pub fn set_settings(&self, s: Settings) {
        *self.ops.settings.lock() = Some(s);
    }

    /// SIGHUP and `RELOAD`: re-reads the config file under the original flags, validates it and swaps it in.
    /// A bad file keeps the running configuration; the error says why. Returns notes on keys that need a restart.
    pub fn reload_from_settings(&self) -> Result<Vec<String>, crate::config::ConfigError> {
        let Some(s) = self.ops.settings.lock().clone() else {
            return Err(crate::config::ConfigError("pgsurge was started without settings to reload from".into()));
        };
        let new = Config::load(self.with_overrides(s, None)?)?;
        let notes = self.reload(new);
        for n in &notes {
            tracing::warn!("{n}");
        }
        tracing::info!("configuration reloaded");
        Ok(notes)
    }

    /// Console `SET key = value` (PgBouncer's key names): validated like a reload with that one key changed,
    /// then applied; it stays over the file on later reloads. Returns notes (keys not applied, restart-only keys).
    pub fn set_key(&self, key: &str, value: &str) -> Result<Vec<String>, crate::config::ConfigError> {
        let Some(s) = self.ops.settings.lock().clone() else {
            return Err(crate::config::ConfigError("pgsurge was started without settings to reload from".into()));
        };
        let new_one = (key.to_ascii_lowercase(), value.to_string());
        let mut ignored = Vec::new();
        let settings = self.with_overrides(s, Some((&new_one, &mut ignored)))?;
        let new = Config::load(settings)?;
        {
            let mut o = self.ops.overrides.lock();
            o.retain(|(k, _)| *k != new_one.0);
            o.push(new_one);
        }
        let mut notes = self.reload(new);
        notes.extend(ignored);
        Ok(notes)
    }

    /// The start-up flags with every console `SET` (and `extra`, being tried) applied on top of them.
    fn with_overrides(
        &self,
        mut s: Settings,
        extra: Option<(&(String, String), &mut Vec<String>)>,
    ) -> Result<Settings, crate::config::ConfigError> {
        let mut sink = Vec::new();
        for (k, v) in self.ops.overrides.lock().iter() {
            let _ = crate::config::ini::apply(&mut s, k, v, &mut sink);
        }
        if let Some(((k, v), ignored)) = extra {
            crate::config::ini::apply(&mut s, k, v, ignored).map_err(|e| crate::config::ConfigError(format!("{k}: {e}")))?;
        }
        Ok(s)
    }

    /// `PAUSE [db]`: new checkouts of the matching pools wait (they do not fail) until `RESUME`.
    pub fn pause(&self, database: Option<&str>) {
        {
            let mut p = self.ops.paused.lock();
            match database {
                None => p.0 = true,
                Some(d) => {
                    p.1.insert(d.to_string());
                }
            }
        }
        self.apply_pause();
    }

    /// `RESUME [db]`.
    pub fn resume(&self, database: Option<&str>) {
        {
            let mut p = self.ops.paused.lock();
            match database {
                None => *p = (false, BTreeSet::new()),
                Some(d) => {
                    p.1.remove(d);
                }
            }
        }
        self.apply_pause();
    }

    fn apply_pause(&self) {
        for pool in self.pools() {
            pool.set_paused(self.ops.is_paused(&pool.key.database));
        }
    }

    /// Server connections in use by the pools of `database` (all pools when None).
    pub fn active_servers(&self, database: Option<&str>) -> usize {
        self.pools()
            .iter()
            .filter(|p| database.is_none_or(|d| p.key.database == d))
            .map(|p| p.stats.active.load(std::sync::atomic::Ordering::Relaxed))
            .sum()
    }
}

/// Called by `App::pool` for a new pool: it starts paused if its database is.
pub fn init_pool(app: &App, pool: &Arc<crate::backend::Pool>) {
    if app.ops.is_paused(&pool.key.database) {
        pool.set_paused(true);
    }
}
