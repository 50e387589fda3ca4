//! The console's SHOW commands: a function table, so a feature adds its own (`SHOW CACHE`, `SHOW LIMITS`, …)
//! with one line here and a `fn(&App) -> Table`. Column names follow PgBouncer's where the concept is the same.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::SystemTime;

use tokio::time::Instant;

use super::table::{null, Table};
use crate::app::App;
use crate::cancel::ClientState;
use crate::config::AuthMethod;
use crate::row;

/// One SHOW command.
pub struct Show {
    /// Upper case, as typed after SHOW.
    pub name: &'static str,
    pub run: fn(&App) -> Table,
}

/// Every SHOW the console answers.
pub const SHOWS: &[Show] = &[
    Show { name: "POOLS", run: pools },
    Show { name: "STATS", run: stats },
    Show { name: "CLIENTS", run: clients },
    Show { name: "SERVERS", run: servers },
    Show { name: "DATABASES", run: databases },
    Show { name: "USERS", run: users },
    Show { name: "CONFIG", run: config },
    Show { name: "LISTS", run: lists },
    Show { name: "VERSION", run: version },
    Show { name: "LIMITS", run: limits },
    Show { name: "CACHE", run: cache },
    Show { name: "CACHE STATEMENTS", run: cache_statements },
    Show { name: "BATCHES", run: crate::batch::report::show_batches },
    Show { name: "NPLUSONE", run: crate::batch::report::show_nplusone },
    Show { name: "SLOW", run: super::slow::show },
    Show { name: "STATE", run: super::show_pgb::state },
    Show { name: "TOTALS", run: super::show_pgb::totals },
    Show { name: "STATS_TOTALS", run: super::show_pgb::stats_totals },
    Show { name: "STATS_AVERAGES", run: super::show_pgb::stats_averages },
    Show { name: "MEM", run: super::show_pgb::mem },
    Show { name: "FDS", run: super::show_pgb::fds },
    Show { name: "SOCKETS", run: super::show_pgb::sockets },
    Show { name: "ACTIVE_SOCKETS", run: super::show_pgb::active_sockets },
    Show { name: "PEERS", run: super::show_pgb::peers },
    Show { name: "PEER_POOLS", run: super::show_pgb::peer_pools },
    Show { name: "DNS_HOSTS", run: super::show_pgb::dns_hosts },
    Show { name: "DNS_ZONES", run: super::show_pgb::dns_zones },
];

/// The read cache: entries, bytes, hits, misses, hit ratio, evictions, invalidations.
fn cache(app: &App) -> Table {
    let mut t = Table::new(&[
        "enabled",
        "entries",
        "bytes",
        "max_bytes",
        "hits",
        "misses",
        "hit_ratio",
        "coalesced",
        "stores",
        "too_big",
        "evictions",
        "invalidations",
        "flushes",
        "notify",
        "notifications_received",
        "notifications_sent",
    ]);
    let Some(c) = &app.cache else {
        let mut row = vec![false.into(), 0.into(), 0.into(), 0.into(), 0.into(), 0.into(), null()];
        row.extend((0..6).map(|_| 0.into()));
        row.extend(["off".into(), 0.into(), 0.into()]);
        t.row(row);
        return t;
    };
    let s = &c.stats;
    let ld = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
    let (entries, bytes) = c.entries();
    let (hits, misses) = (ld(&s.hits), ld(&s.misses));
    let ratio = if hits + misses > 0 { format!("{:.3}", hits as f64 / (hits + misses) as f64) } else { "0".into() };
    t.row(vec![
        true.into(),
        entries.into(),
        bytes.into(),
        c.config.max_bytes.into(),
        hits.into(),
        misses.into(),
        ratio.into(),
        ld(&s.coalesced).into(),
        ld(&s.stores).into(),
        ld(&s.too_big).into(),
        ld(&s.evictions).into(),
        ld(&s.invalidations).into(),
        ld(&s.flushes).into(),
        c.notifier.as_ref().map_or("off".into(), |n| n.state()).into(),
        c.notifier.as_ref().map_or(0, |n| ld(&n.received)).into(),
        c.notifier.as_ref().map_or(0, |n| ld(&n.sent)).into(),
    ]);
    t
}

/// The statements the cache answers most, with their hit ratio and the upstream time hits saved.
fn cache_statements(app: &App) -> Table {
    let mut t = Table::new(&["statement", "hits", "misses", "hit_ratio", "saved_ms"]);
    if let Some(c) = &app.cache {
        for (sql, hits, misses, saved_us) in c.top_statements(50) {
            let ratio = if hits + misses > 0 { hits as f64 / (hits + misses) as f64 } else { 0.0 };
            t.row(vec![
                String::from_utf8_lossy(&sql).into(),
                hits.into(),
                misses.into(),
                format!("{ratio:.3}").into(),
                (saved_us / 1000).into(),
            ]);
        }
    }
    t
}

/// Rate limits and shared connection budgets, per key: allowed, delayed, rejected.
fn limits(app: &App) -> Table {
    let (columns, rows) = app.limits.show_rows();
    Table { columns, rows: rows.into_iter().map(|r| r.into_iter().map(Some).collect()).collect() }
}

fn time(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// Per (database, user): clients by state and the longest current wait.
#[derive(Default)]
pub struct ClientCounts {
    pub active: usize,
    pub idle: usize,
    pub waiting: usize,
    pub maxwait: std::time::Duration,
}

pub fn client_counts(app: &App) -> BTreeMap<(String, String), ClientCounts> {
    let now = Instant::now();
    let mut m: BTreeMap<(String, String), ClientCounts> = BTreeMap::new();
    for c in app.ops.clients.snapshot() {
        if c.is_admin() {
            continue;
        }
        let e = m.entry((c.database.clone(), c.user.clone())).or_default();
        match c.state() {
            ClientState::Active => e.active += 1,
            ClientState::Idle => e.idle += 1,
            ClientState::Waiting => {
                e.waiting += 1;
                e.maxwait = e.maxwait.max(c.waiting_for(now));
            }
        }
    }
    m
}

fn pools(app: &App) -> Table {
    let mut t = Table::new(&[
        "database",
        "user",
        "cl_active",
        "cl_waiting",
        "cl_idle",
        "sv_active",
        "sv_idle",
        "sv_used",
        "sv_login",
        "maxwait",
        "maxwait_us",
        "pool_mode",
        "pool_size",
        "paused",
        "cl_pinned",
        "slow_lane",
        "sv_slow",
        "cl_slow_waiting",
    ]);
    let counts = client_counts(app);
    let cfg = app.config.load();
    for p in app.pools() {
        let c = counts.get(&(p.key.database.clone(), p.key.user.clone()));
        let (active, idle, wait) = c.map(|c| (c.active, c.idle, c.maxwait)).unwrap_or_default();
        // Waiting is counted by the pool itself (also covers the login checkout), the slow lane's queue apart.
        let waiting = p.stats.waiting.load(Ordering::Relaxed) + p.lane.waiting();
        let sv_idle = p.idle_count();
        let sv_active = p.stats.active.load(Ordering::Relaxed);
        let mode = cfg.databases.get(&p.key.database).map(|d| d.pool_mode.name()).unwrap_or("");
        t.row(row![
            &p.key.database,
            &p.key.user,
            active,
            waiting,
            idle,
            sv_active,
            sv_idle,
            0,
            p.total_servers.load(Ordering::Relaxed).saturating_sub(sv_active + sv_idle),
            wait.as_secs(),
            wait.subsec_micros(),
            mode,
            p.size(),
            p.is_paused() as u8,
            p.stats.pinned.load(Ordering::Relaxed),
            if p.lane.is_on() { p.lane.cap() } else { 0 },
            p.lane.held(),
            p.lane.waiting(),
        ]);
    }
    t
}

fn stats(app: &App) -> Table {
    let mut t = Table::new(&[
        "database",
        "total_server_assignment_count",
        "total_xact_count",
        "total_query_count",
        "total_received",
        "total_sent",
        "total_wait_time",
        "total_wait_timeouts",
        "total_server_connects",
        "total_server_connect_failures",
    ]);
    for (db, v) in super::show_pgb::per_db(app) {
        t.row(row![db, v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7], v[8]]);
    }
    t
}

fn clients(app: &App) -> Table {
    let mut t = Table::new(&[
        "type",
        "user",
        "database",
        "state",
        "addr",
        "port",
        "local_addr",
        "local_port",
        "connect_time",
        "wait",
        "wait_us",
        "id",
        "tls",
        "application_name",
    ]);
    let now = Instant::now();
    for c in app.ops.clients.snapshot() {
        let w = c.waiting_for(now);
        t.row(row![
            "C",
            &c.user,
            &c.database,
            c.state().name(),
            c.addr.ip(),
            c.addr.port(),
            c.local_addr.map(|a| a.ip().to_string()).unwrap_or_default(),
            c.local_addr.map(|a| a.port()).unwrap_or(0),
            time(c.connect_time),
            w.as_secs(),
            w.subsec_micros(),
            c.id,
            if c.tls { "TLS" } else { "" },
            &c.application_name,
        ]);
    }
    t
}

fn servers(app: &App) -> Table {
    let mut t = Table::new(&[
        "type",
        "user",
        "database",
        "state",
        "addr",
        "port",
        "local_addr",
        "local_port",
        "connect_time",
        "id",
        "remote_pid",
        "tls",
    ]);
    for p in app.pools() {
        let target = p.target();
        let (list, idle) = p.servers();
        for s in list {
            t.row(row![
                "S",
                &target.user,
                &p.key.database,
                if idle.contains(&s.id) { "idle" } else { "active" },
                &s.host,
                s.port,
                s.local_addr.map(|a| a.ip().to_string()).unwrap_or_default(),
                s.local_addr.map(|a| a.port()).unwrap_or(0),
                time(s.connect_time),
                s.id,
                s.backend_pid,
                if s.tls { "TLS" } else { "" },
            ]);
        }
    }
    t
}

fn databases(app: &App) -> Table {
    let mut t = Table::new(&[
        "name",
        "host",
        "port",
        "database",
        "force_user",
        "pool_size",
        "min_pool_size",
        "pool_mode",
        "max_connections",
        "current_connections",
        "max_client_connections",
        "current_client_connections",
        "paused",
        "disabled",
    ]);
    let cfg = app.config.load();
    let pools = app.pools();
    let clients = super::show_pgb::clients_by(app, |c| c.database.clone());
    let max_clients = |name: &str| cfg.limits.databases.get(name).unwrap_or(&cfg.limits.per_database).max_connections.unwrap_or(0);
    for d in cfg.databases.values() {
        let current: usize = pools.iter().filter(|p| p.key.database == d.name).map(|p| p.total_servers.load(Ordering::Relaxed)).sum();
        let force_user = match &d.user {
            Some((u, _)) => u.into(),
            None => null(),
        };
        t.row(vec![
            d.name.clone().into(),
            d.host.clone().into(),
            d.port.into(),
            d.dbname.clone().into(),
            force_user,
            d.pool_size.into(),
            d.min_pool_size.unwrap_or(cfg.min_pool_size).min(d.pool_size).into(),
            d.pool_mode.name().into(),
            cfg.limits.max_db_connections.into(),
            current.into(),
            max_clients(&d.name).into(),
            clients.get(&d.name).copied().unwrap_or(0).into(),
            (app.ops.is_paused(&d.name) as u8).into(),
            (app.ops.is_disabled(&d.name) as u8).into(),
        ]);
    }
    // The console's virtual database, as PgBouncer lists it.
    for name in crate::frontend::handshake::ADMIN_DATABASES {
        t.row(row![
            *name,
            "",
            cfg.listen.rsplit(':').next().unwrap_or(""),
            *name,
            *name,
            2,
            0,
            "statement",
            0,
            0,
            max_clients(name),
            clients.get(*name).copied().unwrap_or(0),
            0,
            0
        ]);
    }
    t
}

fn users(app: &App) -> Table {
    let mut t = Table::new(&[
        "name",
        "pool_size",
        "max_user_connections",
        "current_connections",
        "max_user_client_connections",
        "current_client_connections",
        "auth_type",
        "admin",
    ]);
    let cfg = app.config.load();
    let per_user = super::show_pgb::clients_by(app, |c| c.user.clone());
    let mut servers: BTreeMap<String, usize> = BTreeMap::new();
    for p in app.pools() {
        *servers.entry(p.key.user.clone()).or_default() += p.total_servers.load(Ordering::Relaxed);
    }
    // Known users, users with limits of their own, and users logged in now (auth_query).
    let mut names: std::collections::BTreeSet<String> = cfg.users.keys().cloned().collect();
    names.extend(cfg.limits.users.keys().cloned());
    names.extend(per_user.keys().cloned());
    for name in names {
        let u = cfg.users.get(&name);
        let auth = match u.map(|u| u.auth).unwrap_or(cfg.auth_type) {
            AuthMethod::ScramSha256 => "scram-sha-256",
            AuthMethod::Md5 => "md5",
            AuthMethod::Trust => "trust",
        };
        let role = match super::role_of(&cfg, &name) {
            Some(super::Role::Admin) => "admin",
            Some(super::Role::Stats) => "stats",
            None => "",
        };
        let size = match u.and_then(|u| u.pool_size) {
            Some(n) => n.into(),
            None => null(),
        };
        let max_clients = cfg.limits.users.get(&name).unwrap_or(&cfg.limits.per_user).max_connections.unwrap_or(0);
        t.row(vec![
            name.clone().into(),
            size,
            cfg.limits.max_user_connections.into(),
            servers.get(&name).copied().unwrap_or(0).into(),
            max_clients.into(),
            per_user.get(&name).copied().unwrap_or(0).into(),
            auth.into(),
            role.into(),
        ]);
    }
    t
}

fn lists(app: &App) -> Table {
    let mut t = Table::new(&["list", "items"]);
    let cfg = app.config.load();
    let pools = app.pools();
    let clients = app.ops.clients.snapshot();
    let servers: usize = pools.iter().map(|p| p.total_servers.load(Ordering::Relaxed)).sum();
    let idle: usize = pools.iter().map(|p| p.idle_count()).sum();
    for (k, v) in [
        ("databases", cfg.databases.len()),
        ("users", cfg.users.len()),
        ("pools", pools.len()),
        ("used_clients", clients.len()),
        ("login_clients", app.client_count().saturating_sub(clients.len())),
        ("used_servers", servers.saturating_sub(idle)),
        ("free_servers", idle),
    ] {
        t.row(row![k, v]);
    }
    t
}

pub fn version(_: &App) -> Table {
    let mut t = Table::new(&["version"]);
    t.row(row![format!("pgsurge {}", env!("CARGO_PKG_VERSION"))]);
    t
}

fn config(app: &App) -> Table {
    let mut t = Table::new(&["key", "value", "default", "changeable"]);
    for (k, v, d, c) in crate::config::keys::rows(&app.config.load()) {
        t.row(row![k, v, d, if c { "yes" } else { "no" }]);
    }
    t
}
