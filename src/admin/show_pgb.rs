//! SHOW commands that exist for PgBouncer's tools and scripts (`pgbouncer_exporter`, runbooks): STATE, TOTALS,
//! STATS_TOTALS, STATS_AVERAGES, MEM, FDS, SOCKETS, ACTIVE_SOCKETS, and the peering/DNS ones, which pgsurge has no
//! such thing for and answers with PgBouncer's columns and no rows.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use super::table::Table;
use crate::app::App;
use crate::row;

/// Live clients (console sessions included) counted by `key`.
pub fn clients_by(app: &App, key: impl Fn(&crate::admin::ClientInfo) -> String) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for c in app.ops.clients.snapshot() {
        *m.entry(key(&c)).or_default() += 1;
    }
    m
}

/// Per database, summed over its pools: assignments, transactions, queries, bytes in, bytes out, wait µs, wait
/// timeouts, server connects, connect failures (SHOW STATS shows all nine; the PgBouncer SHOWs the first six).
pub fn per_db(app: &App) -> BTreeMap<String, [u64; 9]> {
    let mut by_db: BTreeMap<String, [u64; 9]> = BTreeMap::new();
    for p in app.pools() {
        let s = &p.stats;
        let e = by_db.entry(p.key.database.clone()).or_default();
        let v = [
            s.checkouts.load(Ordering::Relaxed),
            s.transactions.load(Ordering::Relaxed),
            s.queries.load(Ordering::Relaxed),
            s.bytes_to_server.load(Ordering::Relaxed),
            s.bytes_to_client.load(Ordering::Relaxed),
            s.wait_us_total.load(Ordering::Relaxed),
            s.wait_timeouts.load(Ordering::Relaxed),
            s.connects.load(Ordering::Relaxed),
            s.connect_failures.load(Ordering::Relaxed),
        ];
        for (i, x) in v.into_iter().enumerate() {
            e[i] += x;
        }
    }
    by_db
}

const STAT_COLUMNS: &[&str] =
    &["database", "server_assignment_count", "xact_count", "query_count", "bytes_received", "bytes_sent", "wait_time"];

pub fn stats_totals(app: &App) -> Table {
    let mut t = Table::new(STAT_COLUMNS);
    for (db, v) in per_db(app) {
        t.row(row![db, v[0], v[1], v[2], v[3], v[4], v[5]]);
    }
    t
}

/// Averages per second over pgsurge's lifetime (PgBouncer averages over its last `stats_period`).
pub fn stats_averages(app: &App) -> Table {
    let secs = app.ops.started.elapsed().as_secs().max(1);
    let mut t = Table::new(STAT_COLUMNS);
    for (db, v) in per_db(app) {
        t.row(row![db, v[0] / secs, v[1] / secs, v[2] / secs, v[3] / secs, v[4] / secs, v[5] / secs]);
    }
    t
}

pub fn totals(app: &App) -> Table {
    let mut sum = [0u64; 6];
    for v in per_db(app).values() {
        for i in 0..6 {
            sum[i] += v[i];
        }
    }
    // The console's own queries count as transactions and queries, as in PgBouncer's totals.
    let console = app.ops.console_queries.load(Ordering::Relaxed);
    sum[1] += console;
    sum[2] += console;
    let mut t = Table::new(&["name", "value"]);
    for (i, name) in STAT_COLUMNS[1..].iter().enumerate() {
        t.row(row![format!("total_{name}"), sum[i]]);
    }
    t
}

pub fn state(app: &App) -> Table {
    let paused = app.pools().iter().any(|p| p.is_paused()) || app.ops.is_paused("");
    let yes = |b: bool| if b { "yes" } else { "no" };
    let mut t = Table::new(&["key", "value"]);
    t.row(row!["active", yes(app.shutdown_state() == crate::app::Shutdown::Running)]);
    t.row(row!["paused", yes(paused)]);
    t.row(row!["suspended", "no"]);
    t
}

/// What pgsurge holds in memory, by kind (sizes are per item, as PgBouncer's slab caches show them).
pub fn mem(app: &App) -> Table {
    let mut t = Table::new(&["name", "size", "used", "free", "memtotal"]);
    let clients = app.client_count();
    let servers: usize = app.pools().iter().map(|p| p.total_servers.load(Ordering::Relaxed)).sum();
    let pools = app.pools().len();
    for (name, size, used) in [
        ("client", std::mem::size_of::<crate::admin::ClientInfo>(), clients),
        ("server", 256, servers),
        ("pool", std::mem::size_of::<crate::backend::Pool>(), pools),
    ] {
        t.row(row![name, size, used, 0, size * used]);
    }
    t
}

/// PgBouncer lists the sockets it would hand over in an online restart; pgsurge hands over none.
pub fn fds(_: &App) -> Table {
    Table::new(&[
        "fd",
        "task",
        "user",
        "database",
        "addr",
        "port",
        "cancel",
        "link",
        "client_encoding",
        "std_strings",
        "datestyle",
        "timezone",
        "password",
        "scram_client_key",
        "scram_server_key",
    ])
}

/// Clients and servers together, with their ids.
pub fn sockets(app: &App) -> Table {
    let mut t = Table::new(&["type", "user", "database", "state", "addr", "port", "id"]);
    for c in app.ops.clients.snapshot() {
        t.row(row!["C", &c.user, &c.database, c.state().name(), c.addr.ip(), c.addr.port(), c.id]);
    }
    for p in app.pools() {
        let target = p.target();
        let (list, idle) = p.servers();
        for s in list {
            let state = if idle.contains(&s.id) { "idle" } else { "active" };
            t.row(row!["S", &target.user, &p.key.database, state, &target.host, target.port, s.id]);
        }
    }
    t
}

pub fn active_sockets(app: &App) -> Table {
    let mut t = sockets(app);
    t.rows.retain(|r| r[3].as_deref() == Some("active"));
    t
}

pub fn peers(_: &App) -> Table {
    Table::new(&["peer_id", "host", "port", "pool_size"])
}

pub fn peer_pools(_: &App) -> Table {
    Table::new(&["peer_id", "cl_active_cancel_req", "cl_waiting_cancel_req", "sv_active_cancel", "sv_login"])
}

pub fn dns_hosts(_: &App) -> Table {
    Table::new(&["hostname", "ttl", "addrs"])
}

pub fn dns_zones(_: &App) -> Table {
    Table::new(&["zonename", "serial", "count"])
}
