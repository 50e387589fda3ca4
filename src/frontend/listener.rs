//! Accepting clients: one task per connection, from handshake to the session loop, errors answered once.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

use crate::app::{App, Shutdown};
use crate::error::{Error, Severity};
use crate::frontend::handshake::{Handshake, Target};
use crate::frontend::session::Session;
use crate::protocol::codes::TxStatus;
use crate::protocol::encode;

/// Accepts until shutdown begins.
pub async fn accept_loop(app: Arc<App>, listener: TcpListener) {
    let mut shutdown = app.shutdown.subscribe();
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((stream, addr)) => {
                    let app = app.clone();
                    tokio::spawn(async move { serve_client(app, stream, addr).await });
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off briefly instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
            },
            _ = shutdown.changed() => {
                if *shutdown.borrow() != Shutdown::Running {
                    return;
                }
            }
        }
    }
}

/// Decrements the live-client count however the task ends.
struct ClientCount(Arc<App>);

impl Drop for ClientCount {
    fn drop(&mut self) {
        self.0.counters.clients.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn serve_client(app: Arc<App>, mut stream: TcpStream, addr: SocketAddr) {
    app.counters.clients.fetch_add(1, Ordering::Relaxed);
    app.counters.clients_total.fetch_add(1, Ordering::Relaxed);
    let _count = ClientCount(app.clone());
    let _ = stream.set_nodelay(true);
    let mut rbuf = BytesMut::with_capacity(8 * 1024);
    let login_timeout = app.config.load().client_login_timeout;
    let hs = Handshake { app: &app, stream: &mut stream, rbuf: &mut rbuf, addr, passthrough: None };
    let logged_in = match tokio::time::timeout(login_timeout, hs.run()).await {
        Ok(Ok(Some(l))) => l,
        Ok(Ok(None)) => return,
        Ok(Err(e)) => return answer_fatal(&app, &mut stream, addr, e).await,
        Err(_) => {
            return answer_fatal(&app, &mut stream, addr, Error::Protocol("client did not finish login within client_login_timeout".into()))
                .await
        }
    };
    tracing::info!(client = %addr, db = %logged_in.database, user = %logged_in.user, "login");
    let (pool, db) = match logged_in.target {
        Target::Pool(pool, db) => (pool, db),
        Target::Admin => {
            let e = Error::NotSupported("the admin console is not available in this build".into());
            return answer_fatal(&app, &mut stream, addr, e).await;
        }
    };
    let cancel = app.cancels.register();
    let mut greeting = logged_in.greeting;
    encode::put_backend_key_data(&mut greeting, cancel.pid, cancel.secret);
    encode::put_ready_for_query(&mut greeting, TxStatus::Idle);
    if stream.write_all(&greeting).await.is_err() {
        return;
    }
    let mode = app.pool_mode(&db);
    let mut session = Session::new(app.clone(), stream, rbuf, pool, mode, logged_in.params, cancel.slot.clone());
    session.admission = logged_in.admission;
    let result = session.run().await;
    match result {
        Ok(()) | Err(Error::Io(_)) => {}
        Err(e) => {
            if matches!(e, Error::Protocol(_)) {
                app.counters.protocol_errors.fetch_add(1, Ordering::Relaxed);
            }
            tracing::info!(client = %addr, error = %e, "session ended with an error");
            let mut out = BytesMut::new();
            e.write_with(&mut out, Severity::Fatal);
            let _ = session.client.write_all(&out).await;
        }
    }
    tracing::info!(client = %addr, db = %logged_in.database, user = %logged_in.user, "disconnect");
}

async fn answer_fatal(app: &App, stream: &mut TcpStream, addr: SocketAddr, e: Error) {
    if matches!(e, Error::Io(_)) {
        return;
    }
    if matches!(e, Error::Protocol(_)) {
        app.counters.protocol_errors.fetch_add(1, Ordering::Relaxed);
    }
    tracing::info!(client = %addr, error = %e, "connection refused");
    let mut out = BytesMut::new();
    e.write_with(&mut out, Severity::Fatal);
    let _ = stream.write_all(&out).await;
}
