//! The admin HTTP endpoint: `/metrics` (Prometheus text), `/healthz`, `/readyz`.
//!
//! A small hand-written HTTP/1.1 responder on tokio rather than hyper/axum: three GET routes, one request per
//! connection (`Connection: close`), bodies built in memory. That needs ~100 lines, no extra dependency tree
//! to build and audit, and no global metrics recorder (the text is rendered from `App` on each scrape).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::app::{App, Shutdown};

/// Largest request head accepted; the routes take no body.
const MAX_REQUEST: usize = 8 * 1024;
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves until the task is dropped (lib.rs ends it when pgsurge has stopped). Keeps answering while
/// draining, so /readyz can say 503 to the load balancer.
pub async fn serve(app: Arc<App>, listener: TcpListener) {
    if let Ok(a) = listener.local_addr() {
        tracing::info!(listen = %a, "admin HTTP (/metrics, /healthz, /readyz) accepting");
    }
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let app = app.clone();
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(READ_TIMEOUT * 2, handle(app, stream)).await;
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "admin HTTP accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

async fn handle(app: Arc<App>, mut stream: TcpStream) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        if buf.len() >= MAX_REQUEST {
            return respond(&mut stream, "431 Request Header Fields Too Large", "text/plain", "request too large\n").await;
        }
        let mut chunk = [0u8; 1024];
        let n = tokio::time::timeout(READ_TIMEOUT, stream.read(&mut chunk)).await.map_err(|_| std::io::ErrorKind::TimedOut)??;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]);
    let mut parts = head.lines().next().unwrap_or("").split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    if method != "GET" && method != "HEAD" {
        return respond(&mut stream, "405 Method Not Allowed", "text/plain", "only GET\n").await;
    }
    match path {
        "/metrics" => {
            let body = super::metrics::render(&app);
            respond(&mut stream, "200 OK", "text/plain; version=0.0.4; charset=utf-8", &body).await
        }
        "/healthz" => respond(&mut stream, "200 OK", "text/plain", "ok\n").await,
        "/readyz" => match readiness(&app).await {
            Ok(()) => respond(&mut stream, "200 OK", "text/plain", "ready\n").await,
            Err(why) => respond(&mut stream, "503 Service Unavailable", "text/plain", &format!("{why}\n")).await,
        },
        _ => respond(&mut stream, "404 Not Found", "text/plain", "try /metrics, /healthz or /readyz\n").await,
    }
}

/// Ready: accepting clients, and some upstream has a live server connection or accepts a TCP connection now.
pub async fn readiness(app: &App) -> Result<(), String> {
    if app.shutdown_state() != Shutdown::Running {
        return Err("draining: not accepting new clients".into());
    }
    if app.pools().iter().any(|p| p.total_servers.load(Ordering::Relaxed) > 0) {
        return Ok(());
    }
    let cfg = app.config.load_full();
    let mut last = String::from("no upstream configured");
    for d in cfg.databases.values() {
        for (host, port) in std::iter::once((&d.host, d.port)).chain(d.more_hosts.iter().map(|(h, p)| (h, *p))) {
            match tokio::time::timeout(Duration::from_secs(1), crate::net::dial(host, port)).await {
                Ok(Ok(_)) => return Ok(()),
                Ok(Err(e)) => last = format!("upstream {} unreachable: {e}", crate::net::display_addr(host, port)),
                Err(_) => last = format!("upstream {} unreachable: connect timed out", crate::net::display_addr(host, port)),
            }
        }
    }
    Err(last)
}

async fn respond(stream: &mut TcpStream, status: &str, content_type: &str, body: &str) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\nCache-Control: no-store\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}
