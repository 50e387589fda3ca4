//! Accepting clients: one task per connection, from handshake to the session loop, errors answered once.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;

use crate::app::{App, Shutdown};
use crate::error::{Error, Severity};
use crate::frontend::handshake::{Handshake, LoggedIn, Target};
use crate::frontend::session::Session;
use crate::net::Stream;
use crate::protocol::codes::TxStatus;
use crate::protocol::encode;

/// Accepts until shutdown begins.
pub async fn accept_loop(app: Arc<App>, listener: TcpListener) {
    let mut shutdown = app.shutdown.subscribe();
    // Out of descriptors: refuse with 53300 rather than leave clients hanging (accept.rs).
    let mut acceptor = super::accept::Acceptor::new(&app);
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((stream, addr)) if acceptor.over_budget(app.client_count()) => {
                    acceptor.refuse(stream, addr, "no more connections allowed: the open-files limit leaves no room for more clients");
                }
                Ok((stream, addr)) => {
                    let count = ClientCount::new(app.clone());
                    tokio::spawn(async move { serve_client(count, Stream::from(stream), addr, false).await });
                }
                Err(e) => acceptor.failed(&listener, e).await,
            },
            _ = shutdown.changed() => {
                if *shutdown.borrow() != Shutdown::Running {
                    return;
                }
            }
        }
    }
}

/// Counts a client from its accept (so a burst of accepts sees every one before their tasks run) and uncounts it
/// however its task ends, even one never polled.
pub(crate) struct ClientCount(Arc<App>);

impl ClientCount {
    pub(crate) fn new(app: Arc<App>) -> ClientCount {
        app.counters.clients.fetch_add(1, Ordering::Relaxed);
        app.counters.clients_total.fetch_add(1, Ordering::Relaxed);
        ClientCount(app)
    }
}

impl Drop for ClientCount {
    fn drop(&mut self) {
        self.0.counters.clients.fetch_sub(1, Ordering::Relaxed);
    }
}

/// `peer_admin`: a Unix-socket client running as pgsurge's own OS user, let into the console as `pgbouncer`.
pub(crate) async fn serve_client(count: ClientCount, mut stream: Stream, addr: SocketAddr, peer_admin: bool) {
    let app = count.0.clone();
    let _count = count;
    let _ = stream.set_nodelay(true);
    // Room for a startup packet and the SCRAM messages; a client's requests later read into lent buffers.
    let mut rbuf = BytesMut::with_capacity(512);
    let login_timeout = app.config.load().client_login_timeout;
    let mut who = None;
    let hs = Handshake { app: &app, stream: &mut stream, rbuf: &mut rbuf, addr, passthrough: None, who: &mut who, peer_admin };
    // Boxed: the handshake's state lives on the heap only while it runs, not in every idle client's task.
    let logged_in = match tokio::time::timeout(login_timeout, Box::pin(hs.run())).await {
        Ok(Ok(Some(l))) => l,
        Ok(Ok(None)) => return,
        Ok(Err(e)) => return Box::pin(answer_fatal(&app, &mut stream, addr, who, e)).await,
        Err(_) => {
            let e = Error::Protocol("client did not finish login within client_login_timeout".into());
            return Box::pin(answer_fatal(&app, &mut stream, addr, who, e)).await;
        }
    };
    let (pool, db) = match logged_in.target {
        Target::Pool(pool, db) => (pool, db),
        Target::Admin => return Box::pin(admin_console(app, stream, rbuf, addr, logged_in)).await,
    };
    tracing::info!(client = %addr, db = %logged_in.database, user = %logged_in.user, "login");
    let cancel = app.cancels.register();
    let app_name = logged_in.params.get("application_name").map(String::as_str).unwrap_or("");
    let _registered = app.ops.clients.register(
        addr,
        stream.local_addr().ok(),
        &logged_in.user,
        &logged_in.database,
        app_name,
        stream.is_tls(),
        Some(cancel.slot.clone()),
    );
    let mut greeting = logged_in.greeting;
    encode::put_backend_key_data(&mut greeting, cancel.pid, cancel.secret);
    encode::put_ready_for_query(&mut greeting, TxStatus::Idle);
    if stream.write_all(&greeting).await.is_err() {
        return;
    }
    drop(greeting);
    let mode = app.pool_mode(&db);
    let max_message = app.config.load().max_message_size;
    let conn = crate::frontend::conn::ClientConn::new(stream, rbuf, app.buffers.clone(), max_message);
    let mut session = Session::new(
        app.parts(pool),
        app.config.clone(),
        app.ops.errors.clone(),
        app.shutdown.subscribe(),
        conn,
        mode,
        logged_in.params,
        cancel.slot.clone(),
    );
    session.admission = logged_in.admission;
    let result = session.run().await;
    match result {
        Ok(()) | Err(Error::Io(_)) => {}
        Err(e) => {
            if matches!(e, Error::Protocol(_)) {
                app.counters.protocol_errors.fetch_add(1, Ordering::Relaxed);
            }
            tracing::info!(client = %addr, error = %e, "session ended with an error");
            app.ops.errors.count(e.sqlstate());
            let mut out = BytesMut::new();
            e.write_with(&mut out, Severity::Fatal);
            let _ = session.conn.write(&out).await;
        }
    }
    tracing::info!(client = %addr, db = %logged_in.database, user = %logged_in.user, "disconnect");
}

async fn answer_fatal(app: &App, stream: &mut Stream, addr: SocketAddr, who: Option<(String, String)>, e: Error) {
    if matches!(e, Error::Io(_)) {
        return;
    }
    if matches!(e, Error::Protocol(_)) {
        app.counters.protocol_errors.fetch_add(1, Ordering::Relaxed);
    }
    app.ops.errors.count(e.sqlstate());
    let (user, db) = who.unwrap_or_default();
    tracing::info!(client = %addr, db, user, code = e.sqlstate(), error = %e, "connection refused");
    let mut out = BytesMut::new();
    e.write_with(&mut out, Severity::Fatal);
    let _ = stream.write_all(&out).await;
}

/// A client of the virtual database `pgsurge`/`pgbouncer`: admin and stats users get the console, others 42501.
async fn admin_console(app: Arc<App>, mut stream: Stream, rbuf: BytesMut, addr: SocketAddr, logged_in: LoggedIn) {
    let who = Some((logged_in.user.clone(), logged_in.database.clone()));
    let role =
        if logged_in.peer_admin { Some(crate::admin::Role::Admin) } else { crate::admin::role_of(&app.config.load(), &logged_in.user) };
    let Some(role) = role else {
        let e = Error::InsufficientPrivilege(format!("user \"{}\" is not in admin_users or stats_users", logged_in.user));
        return Box::pin(answer_fatal(&app, &mut stream, addr, who, e)).await;
    };
    tracing::info!(client = %addr, db = %logged_in.database, user = %logged_in.user, ?role, "login to the admin console");
    let _registered =
        app.ops.clients.register(addr, stream.local_addr().ok(), &logged_in.user, &logged_in.database, "", stream.is_tls(), None);
    let mut greeting = logged_in.greeting;
    encode::put_backend_key_data(&mut greeting, 0, rand::random());
    match crate::admin::console::serve(app.clone(), &mut stream, rbuf, role, greeting).await {
        Ok(()) | Err(Error::Io(_)) => {}
        Err(e) => {
            app.ops.errors.count(e.sqlstate());
            let mut out = BytesMut::new();
            e.write_with(&mut out, Severity::Fatal);
            let _ = stream.write_all(&out).await;
        }
    }
    tracing::info!(client = %addr, db = %logged_in.database, user = %logged_in.user, "disconnect");
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every idle client holds its task: the boxed stages keep it small (7.4 KB before they were boxed).
    #[tokio::test]
    async fn an_idle_clients_task_stays_small() {
        let settings = crate::config::Settings { upstream: Some("postgres://app:app@127.0.0.1:5/app".into()), ..Default::default() };
        let app = App::new(crate::Config::build(settings).unwrap());
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let s = tokio::net::TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let addr = s.local_addr().unwrap();
        let task = serve_client(ClientCount::new(app.clone()), Stream::from(s), addr, false);
        assert!(std::mem::size_of_val(&task) < 4096, "{} bytes", std::mem::size_of_val(&task));
    }
}
