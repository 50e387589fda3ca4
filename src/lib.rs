//! pgsurge: a surge protector for PostgreSQL. A wire-protocol proxy that pools server connections and will
//! cache, batch and rate-limit on the way. `run` is the whole server, usable from tests on port 0.

#![forbid(unsafe_code)]
#![warn(clippy::dbg_macro, clippy::todo)]

pub mod admin;
pub mod app;
pub mod auth;
pub mod backend;
pub mod batch;
pub mod cache;
pub mod cancel;
pub mod config;
pub mod error;
pub mod frontend;
pub mod limit;
pub mod net;
pub mod process;
pub mod protocol;
pub mod redis;
pub mod sql;
pub mod standin;
pub mod state;
pub mod tls;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

pub use app::{App, Shutdown};
pub use config::Config;

/// Serves clients on `listener` until `app.shutdown` says stop; then drains (SIGTERM semantics: transactions in
/// flight may finish within `shutdown_timeout`) and returns once every client is gone.
pub async fn run(app: Arc<App>, listener: TcpListener) -> std::io::Result<()> {
    serve(app, listener, None).await
}

/// `run`, plus the admin HTTP endpoint (/metrics, /healthz, /readyz) on `admin` while pgsurge runs.
pub async fn serve(app: Arc<App>, listener: TcpListener, admin: Option<TcpListener>) -> std::io::Result<()> {
    serve_with_unix(app, listener, admin, None).await
}

/// `serve`, plus clients on a Unix-domain socket (bound with `frontend::unix::bind`) whose file is removed at exit.
pub async fn serve_with_unix(
    app: Arc<App>,
    listener: TcpListener,
    admin: Option<TcpListener>,
    unix: Option<(tokio::net::UnixListener, std::path::PathBuf)>,
) -> std::io::Result<()> {
    tracing::info!(listen = %listener.local_addr()?, "pgsurge accepting connections");
    if let Some((l, path)) = unix {
        tracing::info!(unix_socket = %path.display(), "pgsurge accepting connections");
        tokio::spawn(frontend::unix::accept_loop(app.clone(), l, path));
    }
    let http = admin.map(|l| tokio::spawn(admin::http::serve(app.clone(), l)));
    let janitor = tokio::spawn(janitor(app.clone()));
    // Redis (global limits, shared cache tier): its connection, heartbeat and probe, and the invalidation writer.
    let redis = app.redis.clone().map(|r| tokio::spawn(r.run()));
    let shared = app.cache.as_ref().and_then(|c| c.shared.clone()).map(|s| tokio::spawn(s.run()));
    frontend::listener::accept_loop(app.clone(), listener).await;
    drain(&app).await;
    janitor.abort();
    for task in [redis, shared].into_iter().flatten() {
        task.abort();
    }
    if let Some(h) = http {
        h.abort();
    }
    Ok(())
}

/// Waits for in-flight transactions (bounded by `shutdown_timeout`), then closes every client.
async fn drain(app: &Arc<App>) {
    let deadline = tokio::time::Instant::now() + app.config.load().shutdown_timeout;
    let busy = |app: &App| app.pools().iter().map(|p| p.stats.active.load(Ordering::Relaxed)).sum::<usize>();
    while app.shutdown_state() == Shutdown::Draining && busy(app) > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    app.shutdown_now();
    let bound = tokio::time::Instant::now() + Duration::from_secs(2);
    while app.client_count() > 0 && tokio::time::Instant::now() < bound {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Once a second: idle timeouts, lifetimes, `min_pool_size`.
async fn janitor(app: Arc<App>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        app.limits.maintain();
        for pool in app.pools() {
            pool.maintain().await;
        }
    }
}
