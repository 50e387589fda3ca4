//! The per-client session loop: relays frames between the client and whichever server connection it holds,
//! checking one out when a request arrives and giving it back at ReadyForQuery idle (transaction mode).
//!
//! Bytes are forwarded as they were read, every complete frame in one write; only frame headers are inspected,
//! plus the few bodies that change pgsurge's state (ReadyForQuery, ParameterStatus, ErrorResponse).

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::app::{App, Shutdown};
use crate::backend::{Checkout, Pool, ReleaseState};
use crate::cancel::CancelSlot;
use crate::config::PoolMode;
use crate::error::{Error, Result, Severity};
use crate::frontend::params;
use crate::protocol::codes::*;
use crate::protocol::frame::complete_len;
use crate::protocol::view::{self, ErrorView};
use crate::protocol::encode;

#[derive(Debug, PartialEq, Eq)]
enum Flow {
    Continue,
    Exit,
}

enum Io {
    Client(std::io::Result<usize>),
    Server(std::io::Result<usize>),
    Shutdown,
}

pub struct Session {
    pub app: Arc<App>,
    pub client: TcpStream,
    pub rbuf: BytesMut,
    pub pool: Arc<Pool>,
    pub mode: PoolMode,
    pub server: Option<Checkout>,
    /// Settings this client expects on whatever server it lands on.
    pub wanted: BTreeMap<String, String>,
    /// ReadyForQuery messages still owed by the server for what was forwarded.
    pending: usize,
    /// Extended-protocol messages forwarded since the last Sync: the server must stay ours.
    unsynced: bool,
    /// After a local error in an extended-protocol run: drop messages until Sync, as Postgres does.
    skipping: bool,
    /// pgsurge's own queries on this checkout whose replies are swallowed.
    injected: usize,
    status: TxStatus,
    max_message: usize,
    wait_timeout: Duration,
    cancel: Arc<CancelSlot>,
    shutdown: watch::Receiver<Shutdown>,
}

impl Session {
    pub fn new(app: Arc<App>, client: TcpStream, rbuf: BytesMut, pool: Arc<Pool>, mode: PoolMode, wanted: BTreeMap<String, String>, cancel: Arc<CancelSlot>) -> Session {
        let cfg = app.config.load();
        let (max_message, wait_timeout) = (cfg.max_message_size, cfg.query_wait_timeout);
        let shutdown = app.shutdown.subscribe();
        Session {
            app,
            client,
            rbuf,
            pool,
            mode,
            server: None,
            wanted,
            pending: 0,
            unsynced: false,
            skipping: false,
            injected: 0,
            status: TxStatus::Idle,
            max_message,
            wait_timeout,
            cancel,
            shutdown,
        }
    }

    /// Runs until the client leaves or an error ends the session; releases the server connection properly.
    pub async fn run(&mut self) -> Result<()> {
        let r = self.relay().await;
        self.release_at_end().await;
        r
    }

    async fn relay(&mut self) -> Result<()> {
        loop {
            if self.process_client().await? == Flow::Exit {
                return Ok(());
            }
            let ev = match self.server.as_mut() {
                Some(co) => {
                    let conn = co.conn();
                    tokio::select! {
                        biased;
                        r = conn.stream.read_buf(&mut conn.rbuf) => Io::Server(r),
                        r = self.client.read_buf(&mut self.rbuf) => Io::Client(r),
                        _ = self.shutdown.changed() => Io::Shutdown,
                    }
                }
                None => tokio::select! {
                    r = self.client.read_buf(&mut self.rbuf) => Io::Client(r),
                    _ = self.shutdown.changed() => Io::Shutdown,
                },
            };
            match ev {
                Io::Client(Ok(0)) => return Ok(()),
                Io::Client(Ok(_)) => {}
                Io::Client(Err(e)) => return Err(e.into()),
                Io::Server(Ok(n)) if n > 0 => self.forward_server().await?,
                Io::Server(r) => return self.server_lost(r.err()).await,
                Io::Shutdown => {
                    if *self.shutdown.borrow() == Shutdown::Immediate {
                        return Err(Error::Shutdown);
                    }
                }
            }
        }
    }

    /// Handles every complete client frame in the buffer: forwards runs of them in one write.
    async fn process_client(&mut self) -> Result<Flow> {
        loop {
            if self.skipping && !self.skip_to_sync().await? {
                return Ok(Flow::Continue);
            }
            let mut at = 0;
            let mut syncs = 0;
            let mut unsynced = self.unsynced;
            let mut terminate = false;
            while let Some(n) = complete_len(&self.rbuf[at..], self.max_message).map_err(|e| Error::Protocol(e.to_string()))? {
                match self.rbuf[at] {
                    TERMINATE => {
                        terminate = true;
                        break;
                    }
                    QUERY | SYNC | FUNCTION_CALL => {
                        syncs += 1;
                        unsynced = false;
                    }
                    PARSE | BIND | DESCRIBE | EXECUTE | CLOSE | FLUSH | COPY_DATA | COPY_DONE | COPY_FAIL => unsynced = true,
                    t => return Err(Error::Protocol(format!("invalid frontend message type {}", t))),
                }
                at += n;
            }
            if at == 0 {
                return Ok(if terminate { Flow::Exit } else { Flow::Continue });
            }
            if self.server.is_none() {
                if *self.shutdown.borrow() != Shutdown::Running {
                    return Err(Error::Shutdown);
                }
                if let Err(e) = self.acquire().await {
                    if e.severity() == Severity::Fatal {
                        return Err(e);
                    }
                    self.fail_request(e, at).await?;
                    continue;
                }
            }
            let co = self.server.as_mut().expect("acquired above");
            co.conn().stream.write_all(&self.rbuf[..at]).await.map_err(|e| Error::UpstreamLost(e.to_string()))?;
            self.pool.stats.bytes_to_server.fetch_add(at as u64, Ordering::Relaxed);
            self.pool.stats.queries.fetch_add(syncs as u64, Ordering::Relaxed);
            self.rbuf.advance(at);
            self.pending += syncs;
            self.unsynced = unsynced;
            if terminate {
                return Ok(Flow::Exit);
            }
        }
    }

    /// Checks out a server connection and brings its session settings in line with this client's.
    async fn acquire(&mut self) -> Result<()> {
        let checkout = tokio::select! {
            r = self.pool.checkout(self.wait_timeout) => r?,
            _ = self.cancel.waiting_cancel.notified() => return Err(Error::Canceled("user request")),
        };
        let mut co = checkout;
        if let Err(t) = self.cancel.try_set(Some(co.conn_ref().cancel_target.clone())) {
            self.cancel.set(t).await;
        }
        if let Some(sql) = params::sync_sql(&self.wanted, &co.conn_ref().applied) {
            let conn = co.conn();
            conn.stream.write_all(&encode::query(&sql)).await.map_err(|e| Error::UpstreamLost(e.to_string()))?;
            conn.applied = self.wanted.clone();
            self.injected += 1;
        }
        self.server = Some(co);
        Ok(())
    }

    /// Answers the frames in `rbuf[..at]` with `err` as Postgres would: the error, then ReadyForQuery at the
    /// first Query or Sync; without one, drop messages until the client's Sync arrives.
    async fn fail_request(&mut self, err: Error, at: usize) -> Result<()> {
        let mut out = BytesMut::new();
        err.write_to(&mut out);
        let mut pos = 0;
        let mut synced = false;
        while pos < at {
            let n = complete_len(&self.rbuf[pos..], self.max_message).ok().flatten().unwrap_or(at - pos);
            let tag = self.rbuf[pos];
            pos += n;
            if matches!(tag, QUERY | SYNC | FUNCTION_CALL) {
                synced = true;
                break;
            }
        }
        self.rbuf.advance(pos);
        if synced {
            encode::put_ready_for_query(&mut out, self.status);
        } else {
            self.skipping = true;
        }
        self.unsynced = false;
        self.client.write_all(&out).await?;
        Ok(())
    }

    /// In skip mode, drops frames up to the next Sync and answers it. Returns false if the Sync has not come yet.
    async fn skip_to_sync(&mut self) -> Result<bool> {
        while let Some(n) = complete_len(&self.rbuf, self.max_message).map_err(|e| Error::Protocol(e.to_string()))? {
            let tag = self.rbuf[0];
            self.rbuf.advance(n);
            if tag == SYNC {
                self.skipping = false;
                let mut out = BytesMut::new();
                encode::put_ready_for_query(&mut out, self.status);
                self.client.write_all(&out).await?;
                return Ok(true);
            }
            if tag == TERMINATE {
                return Err(Error::Io(std::io::ErrorKind::UnexpectedEof.into()));
            }
        }
        Ok(false)
    }

    /// Forwards every complete server frame read so far; swallows replies to pgsurge's own queries.
    async fn forward_server(&mut self) -> Result<()> {
        let co = self.server.as_mut().expect("reading a server we hold");
        let conn = co.conn();
        let mut at = 0;
        let mut skip = 0;
        while let Some(n) = complete_len(&conn.rbuf[at..], crate::backend::server::MAX_SERVER_MESSAGE).map_err(|e| Error::UpstreamLost(e.to_string()))? {
            let tag = conn.rbuf[at];
            if self.injected > 0 {
                if tag == READY_FOR_QUERY {
                    self.injected -= 1;
                } else if tag == ERROR_RESPONSE {
                    let e = ErrorView::parse(&conn.rbuf[at + 5..at + n]).unwrap_or_default();
                    tracing::warn!(code = %e.code, message = %e.message, "re-applying a client's session settings failed");
                    conn.applied.clear();
                }
                at += n;
                skip = at;
                continue;
            }
            match tag {
                READY_FOR_QUERY => {
                    self.pending = self.pending.saturating_sub(1);
                    if let Some(s) = conn.rbuf.get(at + 5).copied().and_then(TxStatus::from_byte) {
                        self.status = s;
                    }
                    if self.status == TxStatus::Idle {
                        self.pool.stats.transactions.fetch_add(1, Ordering::Relaxed);
                    }
                }
                PARAMETER_STATUS => {
                    if let Some((k, v)) = view::parameter_status(&conn.rbuf[at + 5..at + n]) {
                        if params::is_session_setting(&k) {
                            conn.applied.insert(k.clone(), v.clone());
                            self.wanted.insert(k, v);
                        }
                    }
                }
                _ => {}
            }
            at += n;
        }
        if at > skip {
            self.client.write_all(&conn.rbuf[skip..at]).await?;
            self.pool.stats.bytes_to_client.fetch_add((at - skip) as u64, Ordering::Relaxed);
        }
        conn.rbuf.advance(at);
        let idle = self.pending == 0 && !self.unsynced && self.injected == 0 && self.status == TxStatus::Idle && conn.rbuf.is_empty();
        if idle && self.mode == PoolMode::Transaction {
            self.release(ReleaseState::Clean).await;
        }
        Ok(())
    }

    /// Gives the server connection back; a cancel being delivered to it finishes first.
    async fn release(&mut self, state: ReleaseState) {
        if let Some(mut co) = self.server.take() {
            if self.cancel.try_set(None).is_err() {
                self.cancel.set(None).await;
            }
            co.state = state;
        }
    }

    /// The server connection died under this client: tell the client, purge dead idle connections, end.
    async fn server_lost(&mut self, err: Option<std::io::Error>) -> Result<()> {
        let reason = err.map(|e| e.to_string()).unwrap_or_else(|| "server closed the connection unexpectedly".into());
        tracing::warn!(pool = %self.pool.key.database, reason, "server connection lost");
        self.release(ReleaseState::Broken).await;
        self.pool.purge_dead_idle();
        Err(Error::UpstreamLost(reason))
    }

    /// At session end: hand the server back clean, reset it, or (mid-query) cancel the query and close it.
    async fn release_at_end(&mut self) {
        let Some(co) = self.server.as_ref() else { return };
        let quiet = self.pending == 0 && !self.unsynced && self.injected == 0 && co.conn_ref().rbuf.is_empty();
        let session = self.mode == PoolMode::Session;
        let state = if !quiet {
            let target = co.conn_ref().cancel_target.clone();
            tokio::spawn(async move {
                let _ = crate::cancel::forward(&target).await;
            });
            ReleaseState::Broken
        } else if self.status == TxStatus::Idle && !session {
            ReleaseState::Clean
        } else {
            ReleaseState::NeedsReset { rollback: self.status != TxStatus::Idle, discard: session }
        };
        self.release(state).await;
    }
}
