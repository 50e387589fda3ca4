//! Accepting clients: one task per connection, from handshake to the session loop, errors answered once.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;

use crate::admin::ClientGuard;
use crate::app::{App, Shutdown};
use crate::cancel::CancelGuard;
use crate::error::{Error, Severity};
use crate::frontend::handshake::{Handshake, LoggedIn, Target};
use crate::frontend::session::{Run, Session};
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
                    tokio::spawn(serve_client(count, Box::new((Stream::from(stream), addr)), false));
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

/// A logged-in client, boxed: an async fn's arguments stay in its future for its whole life, so the phases after
/// login take this one pointer rather than the socket, buffer and login by value.
struct Login {
    stream: Stream,
    rbuf: BytesMut,
    addr: SocketAddr,
    logged_in: LoggedIn,
}

/// Moves a value out of its box and frees the box now (a box only moved out of is freed when its variable goes).
#[allow(clippy::boxed_local)] // taking the box by value is the point: it is freed here
fn unbox<T>(b: Box<T>) -> T {
    *b
}

/// `peer_admin`: a Unix-socket client running as pgsurge's own OS user, let into the console as `pgbouncer`.
/// Each phase is its own future, so the task is as large as the largest phase (parked), not all of them.
/// The socket comes boxed for the same reason as `Login`.
pub(crate) async fn serve_client(count: ClientCount, accepted: Box<(Stream, SocketAddr)>, peer_admin: bool) {
    let (stream, addr) = unbox(accepted);
    // Boxed: the login's state lives on the heap only while it runs, not in every idle client's task.
    let Some(login) = Box::pin(login(&count.0, stream, addr, peer_admin)).await else { return };
    if matches!(login.logged_in.target, Target::Admin) {
        let Login { stream, rbuf, addr, logged_in } = unbox(login);
        return Box::pin(admin_console(count.0.clone(), stream, rbuf, addr, logged_in)).await;
    }
    serve_pooled(count, login).await
}

/// The handshake within client_login_timeout; a failure is answered here. None: the client is gone.
async fn login(app: &Arc<App>, mut stream: Stream, addr: SocketAddr, peer_admin: bool) -> Option<Box<Login>> {
    let _ = stream.set_nodelay(true);
    // Room for a startup packet and the SCRAM messages; a client's requests later read into lent buffers.
    let mut rbuf = BytesMut::with_capacity(512);
    let login_timeout = app.config.load().client_login_timeout;
    let mut who = None;
    let hs = Handshake { app, stream: &mut stream, rbuf: &mut rbuf, addr, passthrough: None, who: &mut who, peer_admin };
    let e = match tokio::time::timeout(login_timeout, hs.run()).await {
        Ok(Ok(Some(logged_in))) => return Some(Box::new(Login { stream, rbuf, addr, logged_in })),
        Ok(Ok(None)) => return None,
        Ok(Err(e)) => e,
        Err(_) => Error::Protocol("client did not finish login within client_login_timeout".into()),
    };
    answer_fatal(app, &mut stream, addr, who, e).await;
    None
}

/// The greeting (BackendKeyData, ReadyForQuery) and the client's session, registered for SHOW CLIENTS. None: the
/// client is gone.
async fn start<'a>(app: &'a Arc<App>, login: Box<Login>, cancel: &CancelGuard<'_>) -> Option<(Box<Session>, ClientGuard<'a>)> {
    let Login { mut stream, rbuf, logged_in, addr } = unbox(login);
    let LoggedIn { user, database, params, target, admission, mut greeting, .. } = logged_in;
    let Target::Pool(pool, db) = target else { return None };
    let mode = app.pool_mode(&db);
    drop(db);
    tracing::info!(client = %addr, db = %database, user = %user, "login");
    let app_name = params.get("application_name").map(String::as_str).unwrap_or("");
    let local = stream.local_addr().ok();
    let registered = app.ops.clients.register(addr, local, &user, &database, app_name, stream.is_tls(), Some(cancel.slot.clone()));
    encode::put_backend_key_data(&mut greeting, cancel.pid, cancel.secret);
    encode::put_ready_for_query(&mut greeting, TxStatus::Idle);
    stream.write_all(&greeting).await.ok()?;
    let max_message = app.config.load().max_message_size;
    let conn = crate::frontend::conn::ClientConn::new(stream, rbuf, app.buffers.clone(), max_message);
    let shutdown = app.shutdown.subscribe();
    let parts = app.parts(pool);
    let mut session = Session::new(parts, app.config.clone(), app.ops.errors.clone(), shutdown, conn, mode, params, cancel.slot.clone());
    session.admission = admission;
    session.set_user_timeouts(&user);
    Some((Box::new(session), registered))
}

/// A client of a pool, from its greeting to its last request.
async fn serve_pooled(count: ClientCount, login: Box<Login>) {
    let app = &count.0;
    let cancel = app.cancels.register();
    // Boxed, as the login: what only the start needs is gone from the task by the time it parks; the names and
    // address for the log lines after it are read from the registry's entry.
    let Some((mut session, registered)) = Box::pin(start(app, login, &cancel)).await else { return };
    // Between requests the session is parked (park.rs): the task then holds only `Parked`, and the working
    // session and its boxed future live on the heap only while the client is busy. A client starts parked
    // unless it sent more right behind its login.
    let result = loop {
        if session.may_park() {
            let mut parked = session.park();
            let woke = parked.wait().await;
            session = Session::unpark(parked);
            if let Err(e) = woke {
                break Err(e);
            }
        }
        match Box::pin(session.run()).await {
            Ok(Run::Idle) => {}
            other => break other.map(drop),
        }
    };
    match result {
        Ok(()) | Err(Error::Io(_)) => {}
        Err(e) => {
            if matches!(e, Error::Protocol(_)) {
                app.counters.protocol_errors.fetch_add(1, Ordering::Relaxed);
            }
            tracing::info!(client = %registered.info.addr, error = %e, "session ended with an error");
            app.ops.errors.count(e.sqlstate());
            let mut out = BytesMut::new();
            e.write_with(&mut out, Severity::Fatal);
            let _ = session.conn.write(&out).await;
        }
    }
    let info = &registered.info;
    tracing::info!(client = %info.addr, db = %info.database, user = %info.user, "disconnect");
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
        let task = serve_client(ClientCount::new(app.clone()), Box::new((Stream::from(s), addr)), false);
        assert!(std::mem::size_of_val(&task) < 4096, "{} bytes", std::mem::size_of_val(&task));
        // What a parked client keeps: past 624 bytes the task no longer fits a 1,024-byte tokio cell (release).
        let parked = std::mem::size_of::<crate::frontend::park::Parked>();
        assert!(parked <= 632, "Parked grew to {parked} bytes (624 in release, 632 in debug): every idle client pays it");
    }
}
