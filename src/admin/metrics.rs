//! Prometheus text exposition of what the console shows, rendered from `App` at each scrape (no global
//! registry). Per-pool series carry `database` and `user` labels.

use std::fmt::Write;
use std::sync::atomic::Ordering;

use crate::app::{App, Shutdown};
use crate::backend::pool::WAIT_BUCKETS_US;
use crate::cancel::ClientState;

struct Out(String);

impl Out {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], v: impl std::fmt::Display) {
        self.0.push_str(name);
        if !labels.is_empty() {
            self.0.push('{');
            for (i, (k, val)) in labels.iter().enumerate() {
                if i > 0 {
                    self.0.push(',');
                }
                let _ = write!(self.0, "{k}=\"{}\"", escape(val));
            }
            self.0.push('}');
        }
        let _ = writeln!(self.0, " {v}");
    }
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// A per-pool counter: name, help, and how to read it.
type Counter = (&'static str, &'static str, fn(&crate::backend::pool::PoolStats) -> u64);

pub fn render(app: &App) -> String {
    let mut o = Out(String::with_capacity(8 * 1024));
    let pools = app.pools();
    let clients = app.ops.clients.snapshot();

    o.family("pgsurge_up", "gauge", "1 while pgsurge runs.");
    o.sample("pgsurge_up", &[("version", env!("CARGO_PKG_VERSION"))], 1);
    o.family("pgsurge_draining", "gauge", "1 once shutdown has begun (SIGTERM or SHUTDOWN).");
    o.sample("pgsurge_draining", &[], (app.shutdown_state() != Shutdown::Running) as u8);

    o.family("pgsurge_client_connections", "gauge", "Client connections by state (login: not yet authenticated).");
    let (mut active, mut idle, mut waiting, mut admin) = (0, 0, 0, 0);
    for c in &clients {
        if c.is_admin() {
            admin += 1;
            continue;
        }
        match c.state() {
            ClientState::Active => active += 1,
            ClientState::Idle => idle += 1,
            ClientState::Waiting => waiting += 1,
        }
    }
    let login = app.client_count().saturating_sub(clients.len());
    for (state, n) in [("active", active), ("idle", idle), ("waiting", waiting), ("admin", admin), ("login", login)] {
        o.sample("pgsurge_client_connections", &[("state", state)], n);
    }
    o.family("pgsurge_client_connections_total", "counter", "Client connections accepted.");
    o.sample("pgsurge_client_connections_total", &[], app.counters.clients_total.load(Ordering::Relaxed));
    o.family("pgsurge_auth_failures_total", "counter", "Client logins refused for a bad password or unknown user.");
    o.sample("pgsurge_auth_failures_total", &[], app.counters.auth_failures.load(Ordering::Relaxed));
    o.family("pgsurge_protocol_errors_total", "counter", "Clients closed for bad protocol input.");
    o.sample("pgsurge_protocol_errors_total", &[], app.counters.protocol_errors.load(Ordering::Relaxed));
    o.family("pgsurge_errors_total", "counter", "Errors pgsurge itself sent to clients, by SQLSTATE.");
    for (code, n) in app.ops.errors.snapshot() {
        o.sample("pgsurge_errors_total", &[("sqlstate", &code)], n);
    }

    let gauges: [(&str, &str); 6] = [
        ("pgsurge_pool_server_connections", "Server connections by state."),
        ("pgsurge_pool_size", "Configured size of the pool."),
        ("pgsurge_pool_waiting_clients", "Clients queued for a server connection (wait queue length, the slow lane's included)."),
        ("pgsurge_pool_clients", "Logged-in clients of the pool by state."),
        ("pgsurge_pool_paused", "1 while the pool is paused (PAUSE)."),
        ("pgsurge_pool_max_wait_seconds", "Longest current wait of a queued client."),
    ];
    let counts = crate::admin::show::client_counts(app);
    for (name, help) in gauges {
        o.family(name, "gauge", help);
        for p in &pools {
            let l = [("database", p.key.database.as_str()), ("user", p.key.user.as_str())];
            let c = counts.get(&(p.key.database.clone(), p.key.user.clone()));
            match name {
                "pgsurge_pool_server_connections" => {
                    let act = p.stats.active.load(Ordering::Relaxed);
                    let idle = p.idle_count();
                    let other = p.total_servers.load(Ordering::Relaxed).saturating_sub(act + idle);
                    for (state, n) in [("active", act), ("idle", idle), ("other", other)] {
                        o.sample(name, &[l[0], l[1], ("state", state)], n);
                    }
                }
                "pgsurge_pool_size" => o.sample(name, &l, p.size()),
                "pgsurge_pool_waiting_clients" => o.sample(name, &l, p.stats.waiting.load(Ordering::Relaxed) + p.lane.waiting()),
                "pgsurge_pool_clients" => {
                    for (state, n) in [("active", c.map_or(0, |c| c.active)), ("idle", c.map_or(0, |c| c.idle))] {
                        o.sample(name, &[l[0], l[1], ("state", state)], n);
                    }
                }
                "pgsurge_pool_paused" => o.sample(name, &l, p.is_paused() as u8),
                _ => o.sample(name, &l, c.map_or(0.0, |c| c.maxwait.as_secs_f64())),
            }
        }
    }

    let counters: [Counter; 10] = [
        ("pgsurge_pool_checkouts_total", "Server connections handed to clients.", |s| s.checkouts.load(Ordering::Relaxed)),
        ("pgsurge_pool_transactions_total", "Transactions completed (ReadyForQuery idle).", |s| s.transactions.load(Ordering::Relaxed)),
        ("pgsurge_pool_queries_total", "Queries sent (Query, FunctionCall and Sync messages).", |s| s.queries.load(Ordering::Relaxed)),
        ("pgsurge_pool_received_bytes_total", "Bytes from clients forwarded to servers.", |s| s.bytes_to_server.load(Ordering::Relaxed)),
        ("pgsurge_pool_sent_bytes_total", "Bytes from servers forwarded to clients.", |s| s.bytes_to_client.load(Ordering::Relaxed)),
        ("pgsurge_pool_wait_timeouts_total", "Waits that ended in query_wait_timeout (53300).", |s| {
            s.wait_timeouts.load(Ordering::Relaxed)
        }),
        ("pgsurge_pool_server_connects_total", "Server connections opened.", |s| s.connects.load(Ordering::Relaxed)),
        ("pgsurge_pool_server_connect_failures_total", "Server connection attempts that failed.", |s| {
            s.connect_failures.load(Ordering::Relaxed)
        }),
        ("pgsurge_pool_server_closed_dirty_total", "Server connections closed because they could not be reset.", |s| {
            s.closed_dirty.load(Ordering::Relaxed)
        }),
        ("pgsurge_pool_pinned_sessions_total", "Sessions that became pinned to a server (LISTEN, temp tables, locks, ...).", |s| {
            s.pins_total.load(Ordering::Relaxed)
        }),
    ];
    o.family("pgsurge_pool_pinned_sessions", "gauge", "Sessions holding their server connection now (LISTEN, temp tables, locks, ...).");
    for p in &pools {
        o.sample(
            "pgsurge_pool_pinned_sessions",
            &[("database", p.key.database.as_str()), ("user", p.key.user.as_str())],
            p.stats.pinned.load(Ordering::Relaxed),
        );
    }
    for (name, help, get) in counters {
        o.family(name, "counter", help);
        for p in &pools {
            let l = [("database", p.key.database.as_str()), ("user", p.key.user.as_str())];
            o.sample(name, &l, get(&p.stats));
        }
    }

    let h = "pgsurge_pool_wait_seconds";
    o.family(h, "histogram", "Time a checkout waited for a server connection.");
    for p in &pools {
        let (db, user) = (p.key.database.as_str(), p.key.user.as_str());
        let mut cum = 0u64;
        for (i, b) in p.stats.wait_hist.iter().enumerate() {
            cum += b.load(Ordering::Relaxed);
            let le = match WAIT_BUCKETS_US.get(i) {
                Some(us) => format!("{}", *us as f64 / 1e6),
                None => "+Inf".into(),
            };
            o.sample(&format!("{h}_bucket"), &[("database", db), ("user", user), ("le", &le)], cum);
        }
        o.sample(&format!("{h}_sum"), &[("database", db), ("user", user)], p.stats.wait_us_total.load(Ordering::Relaxed) as f64 / 1e6);
        o.sample(&format!("{h}_count"), &[("database", db), ("user", user)], cum);
    }
    if let Some(c) = &app.cache {
        cache_metrics(&mut o, c);
    }
    o.0.push_str(&app.limits.prometheus());
    if let Some(r) = &app.redis {
        o.0.push_str(&r.prometheus());
    }
    o.0.push_str(&crate::batch::report::prometheus(&app.batch));
    o.0.push_str(&super::slow::prometheus(app));
    o.0
}

/// The read cache's figures (SHOW CACHE) as Prometheus series.
fn cache_metrics(o: &mut Out, c: &crate::cache::Cache) {
    let s = &c.stats;
    let (entries, bytes) = c.entries();
    o.family("pgsurge_cache_entries", "gauge", "Entries in the read cache.");
    o.sample("pgsurge_cache_entries", &[], entries);
    o.family("pgsurge_cache_bytes", "gauge", "Bytes held by the read cache.");
    o.sample("pgsurge_cache_bytes", &[], bytes);
    for (name, help, v) in [
        ("pgsurge_cache_hits_total", "Requests answered from the cache.", &s.hits),
        ("pgsurge_cache_misses_total", "Cacheable requests sent upstream to fill the cache.", &s.misses),
        ("pgsurge_cache_coalesced_total", "Identical misses that waited for one fill (single flight).", &s.coalesced),
        ("pgsurge_cache_evictions_total", "Entries evicted to stay within max_bytes.", &s.evictions),
        ("pgsurge_cache_invalidations_total", "Table generations bumped by writes through pgsurge.", &s.invalidations),
        ("pgsurge_cache_flushes_total", "Whole-cache flushes (DDL, GRANT/REVOKE, role changes).", &s.flushes),
        ("pgsurge_cache_too_big_total", "Results not stored for exceeding max_entry_bytes.", &s.too_big),
    ] {
        o.family(name, "counter", help);
        o.sample(name, &[], v.load(Ordering::Relaxed));
    }
    if let Some(n) = &c.notifier {
        o.family("pgsurge_cache_notify_up", "gauge", "1 while every invalidation listener listens (else the cache answers nothing).");
        o.sample("pgsurge_cache_notify_up", &[], u8::from(!n.blind()));
        for (name, help, v) in [
            ("pgsurge_cache_notifications_received_total", "Invalidation notifications received from Postgres.", &n.received),
            ("pgsurge_cache_notifications_sent_total", "Invalidation notifications sent after writes through this instance.", &n.sent),
            ("pgsurge_cache_notify_reconnects_total", "Times an invalidation listener lost its connection.", &n.reconnects),
        ] {
            o.family(name, "counter", help);
            o.sample(name, &[], v.load(Ordering::Relaxed));
        }
    }
    if let Some(t) = &c.shared {
        for (name, help, v) in [
            ("pgsurge_cache_redis_hits_total", "Local misses answered from the shared tier in Redis.", &t.stats.hits),
            ("pgsurge_cache_redis_misses_total", "Local misses the shared tier did not have either.", &t.stats.misses),
            ("pgsurge_cache_redis_stores_total", "Fills written to the shared tier.", &t.stats.stores),
            (
                "pgsurge_cache_redis_skipped_total",
                "Local misses that did not ask Redis (down, or an invalidation not yet written).",
                &t.stats.skipped,
            ),
        ] {
            o.family(name, "counter", help);
            o.sample(name, &[], v.load(Ordering::Relaxed));
        }
    }
}
