//! The per-client session loop: relays frames between the client and whichever server connection it holds,
//! checking one out when a request arrives and giving it back at ReadyForQuery idle (transaction mode).
//!
//! Bytes are forwarded as they were read, every complete frame in one write; only frame headers are inspected,
//! plus the few bodies that change pgsurge's state (ReadyForQuery, ParameterStatus, ErrorResponse).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use crate::net::Stream;
use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

use crate::app::{App, Shutdown};
use crate::backend::{Checkout, Pool, ReleaseState, ServerConn};
use crate::cancel::CancelSlot;
use crate::config::PoolMode;
use crate::error::{Error, Result, Severity};
use crate::frontend::expect::{Action, Expect, Expectations};
use crate::frontend::params::{self, Settings};
use crate::frontend::statements::{self as st, Statement};
use crate::limit::{Fired, SessionTimers};
use crate::protocol::codes::*;
use crate::protocol::encode;
use crate::protocol::frame::complete_len;
use crate::protocol::view::{self, ErrorView};
use crate::sql::session::{self as effects, Effect, Pin};

#[derive(Debug, PartialEq, Eq)]
enum Flow {
    Continue,
    Exit,
}

enum Io {
    Client(std::io::Result<usize>),
    Server(std::io::Result<usize>),
    Shutdown,
    Timer(Fired),
}

pub struct Session {
    pub app: Arc<App>,
    pub client: Stream,
    pub rbuf: BytesMut,
    pub pool: Arc<Pool>,
    pub mode: PoolMode,
    pub server: Option<Checkout>,
    /// Settings this client expects on whatever server it lands on, and those it started with (RESET target).
    /// Shared (`Arc`) with every session of the pool that logged in with the same settings, and handed to the
    /// server connections they run on: a checkout whose server already holds these settings is a pointer compare.
    pub wanted: Arc<Settings>,
    pub(crate) startup: Settings,
    /// Why this client must keep its server connection (LISTEN, temp tables, ...); empty: it need not.
    pub(crate) pins: HashSet<Pin>,
    /// Session effects of the statement last bound (applied when its Execute completes).
    pub(crate) portal_effects: Vec<Effect>,
    /// Session effects of the unnamed statement last parsed.
    pub(crate) unnamed_effects: Vec<Effect>,
    /// SETs done inside the open transaction: they hold only if it commits.
    pub(crate) staged: Vec<Effect>,
    /// A `COMMIT` command tag was seen since the last ReadyForQuery.
    pub(crate) commit_seen: bool,
    /// The read cache's capture of the request being filled (src/frontend/intercept.rs).
    pub(crate) capture: Option<super::intercept::Capture>,
    /// Writes through this session (cache invalidation, read-your-writes).
    pub(crate) writes: super::intercept::Writes,
    /// The last autocommit Bind/Execute of a named statement, kept to re-run it once if Postgres answers
    /// "cached plan must not change result type" (a DDL changed the statement's result).
    pub(crate) retry: Retry,
    /// Text of the statement last bound (for write tracking at Execute), and of the unnamed one.
    pub(crate) portal_sql: Option<Bytes>,
    pub(crate) unnamed_sql: Option<Bytes>,
    /// Replies the client is still owed, in order (see expect.rs).
    pub(crate) expect: Expectations,
    /// Extended-protocol messages forwarded since the last Sync: the server must stay ours.
    pub(crate) unsynced: bool,
    /// After a local error in an extended-protocol run: drop messages until Sync, as Postgres does.
    pub(crate) skipping: bool,
    /// This client's named prepared statements (client name -> shared statement).
    pub(crate) stmts: HashMap<Bytes, Arc<Statement>>,
    pub(crate) status: TxStatus,
    pub(crate) max_message: usize,
    pub(crate) wait_timeout: Duration,
    pub(crate) cancel: Arc<CancelSlot>,
    pub(crate) shutdown: watch::Receiver<Shutdown>,
    /// `PGSURGE_LOG=pgsurge::wire=trace` was on when the session began (see `trace_chunk`).
    trace: bool,
    /// This client's connection caps and rates (src/limit); set after login.
    pub admission: Option<crate::limit::Admission>,
    /// query_timeout / idle_transaction_timeout.
    pub(crate) timers: SessionTimers,
    /// The deadline of checkout waits, reused across them (see `Pool::checkout_for`).
    wait_timer: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
    /// N+1 detection state (src/batch/detect.rs).
    pub(crate) nplus: crate::batch::detect::Tracker,
}

impl Session {
    pub fn new(
        app: Arc<App>,
        client: Stream,
        rbuf: BytesMut,
        pool: Arc<Pool>,
        mode: PoolMode,
        wanted: Settings,
        cancel: Arc<CancelSlot>,
    ) -> Session {
        let cfg = app.config.load();
        let (max_message, wait_timeout) = (cfg.max_message_size, cfg.query_wait_timeout);
        let shutdown = app.shutdown.subscribe();
        if *shutdown.borrow() == Shutdown::Immediate {
            cancel.stop(); // registered after `App::shutdown_now` went through the clients
        }
        let trace = tracing::enabled!(target: "pgsurge::wire", tracing::Level::TRACE);
        let timers = SessionTimers::new(&cfg.limits);
        let shared = pool.share_settings(&wanted);
        Session {
            admission: None,
            timers,
            wait_timer: None,
            nplus: Default::default(),
            app,
            client,
            rbuf,
            pool,
            mode,
            server: None,
            wanted: shared,
            startup: wanted,
            pins: HashSet::new(),
            portal_effects: vec![],
            unnamed_effects: vec![],
            staged: vec![],
            commit_seen: false,
            capture: None,
            writes: Default::default(),
            retry: Retry::default(),
            portal_sql: None,
            unnamed_sql: None,
            expect: Expectations::default(),
            unsynced: false,
            skipping: false,
            stmts: HashMap::new(),
            status: TxStatus::Idle,
            max_message,
            wait_timeout,
            cancel,
            shutdown,
            trace,
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
            let held = self.server.is_some();
            let quiet = self.expect.is_empty() && !self.unsynced;
            self.timers.update(held && !self.expect.is_empty(), held && quiet && self.status != TxStatus::Idle);
            let ev = match self.server.as_mut() {
                Some(co) => {
                    let conn = co.conn();
                    tokio::select! {
                        biased;
                        r = conn.stream.read_buf(&mut conn.rbuf) => Io::Server(r),
                        r = self.client.read_buf(&mut self.rbuf) => Io::Client(r),
                        _ = self.cancel.stopped() => Io::Shutdown,
                        k = self.timers.fired(), if self.timers.is_armed() => Io::Timer(k),
                    }
                }
                // biased: a fixed order needs no random number per wait.
                None => tokio::select! {
                    biased;
                    _ = self.cancel.stopped() => Io::Shutdown,
                    r = self.client.read_buf(&mut self.rbuf) => Io::Client(r),
                },
            };
            match ev {
                Io::Client(Ok(0)) => return Ok(()),
                Io::Client(Ok(_)) => {}
                Io::Client(Err(e)) => return Err(e.into()),
                Io::Server(Ok(n)) if n > 0 => self.forward_server().await?,
                Io::Server(r) => return self.server_lost(r.err()).await,
                Io::Shutdown => return Err(Error::Shutdown),
                Io::Timer(Fired::Query) => {
                    // The client then gets Postgres' own 57014; the slot's lock keeps the cancel off other clients.
                    let slot = self.cancel.clone();
                    tokio::spawn(async move { slot.cancel_current().await });
                }
                Io::Timer(Fired::IdleInTransaction) => return Err(Error::IdleInTransactionTimeout),
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
            let mut terminate = false;
            while let Some(n) = complete_len(&self.rbuf[at..], self.max_message).map_err(|e| Error::Protocol(e.to_string()))? {
                match self.rbuf[at] {
                    TERMINATE => {
                        terminate = true;
                        break;
                    }
                    QUERY | SYNC | FUNCTION_CALL | PARSE | BIND | DESCRIBE | EXECUTE | CLOSE | FLUSH | COPY_DATA | COPY_DONE
                    | COPY_FAIL => {}
                    t => return Err(Error::Protocol(format!("invalid frontend message type {t}"))),
                }
                at += n;
            }
            if at == 0 {
                return Ok(if terminate { Flow::Exit } else { Flow::Continue });
            }
            if let Err(e) = self.check_limits(at).await {
                self.fail_request(e, at).await?;
                continue;
            }
            self.observe_lookup(at);
            // limit -> cache -> batch -> pool: only a request that would start a fresh transaction is answered here.
            if self.server.is_none()
                && self.status == TxStatus::Idle
                && self.pins.is_empty()
                && self.expect.is_empty()
                && self.capture.is_none()
            {
                if let super::intercept::Intercepted::Answered(n) = self.try_local(at).await? {
                    self.rbuf.advance(n);
                    continue;
                }
                if let super::intercept::Intercepted::Answered(n) = self.try_cache(at).await? {
                    self.rbuf.advance(n);
                    continue;
                }
                if let super::intercept::Intercepted::Answered(n) = self.try_batch(at).await? {
                    self.rbuf.advance(n);
                    continue;
                }
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
            self.retry.arm(&self.rbuf[..at], &self.stmts, self.status == TxStatus::Idle && self.expect.is_empty());
            self.forward_client(at).await?;
            if terminate {
                return Ok(Flow::Exit);
            }
        }
    }

    /// Sends `rbuf[..at]` to the server: verbatim, except named statements, which are renamed to pgsurge's
    /// server-side names and prepared on this server connection first if it has not seen them.
    async fn forward_client(&mut self, at: usize) -> Result<()> {
        let co = self.server.as_mut().expect("acquired");
        let conn = co.conn();
        if self.trace {
            trace_chunk("client", &self.rbuf[..at], &self.client, conn.id, self.expect.len());
        }
        let mut out: Option<BytesMut> = None;
        let mut run_from = 0;
        let mut pos = 0;
        let mut queries = 0u64;
        while pos < at {
            let n = complete_len(&self.rbuf[pos..], usize::MAX).ok().flatten().unwrap_or(at - pos);
            let tag = self.rbuf[pos];
            let body = &self.rbuf[pos + 5..pos + n];
            // None: forward this frame verbatim. Some(bytes): send these instead (empty: send nothing).
            let mut replace: Option<BytesMut> = None;
            match tag {
                _ if self.expect.server_skipping() && tag != SYNC => {
                    // An error ended this extended-protocol run: Postgres ignores everything up to the client's
                    // Sync (simple Queries too), so pgsurge drops it here; nothing is owed, prepared or run.
                    self.unsynced = true;
                    replace = Some(BytesMut::new());
                }
                QUERY | FUNCTION_CALL => {
                    queries += 1;
                    self.unsynced = false;
                    if tag == QUERY {
                        if let Some(local) = statement_commands(body, &mut self.stmts, conn, self.status) {
                            self.expect.push(Expect::Synthetic(local));
                            replace = Some(BytesMut::new());
                        }
                    }
                    if replace.is_none() {
                        let text = view::query_text(body);
                        if let (Some(cache), Some(text)) = (&self.app.cache, text) {
                            self.writes.note(cache, &Bytes::copy_from_slice(text));
                        }
                        let fx = text.map(effects::effects).unwrap_or_default();
                        note_pins(&mut self.pins, &fx, &self.pool);
                        self.expect.push(Expect::Query { swallow: false, effects: fx, failed: false });
                    }
                }
                SYNC => {
                    queries += 1;
                    self.unsynced = false;
                    self.expect.client_sync();
                }
                COPY_DONE | COPY_FAIL => self.expect.client_copy_end(),
                PARSE => {
                    self.unsynced = true;
                    match st::parse_view(body) {
                        Some((name, query, types)) if !name.is_empty() => {
                            let stmt = self.app.statements.intern(query, types);
                            self.stmts.insert(Bytes::copy_from_slice(name), stmt.clone());
                            let mut b = BytesMut::new();
                            if conn.prepared.get(&stmt.id).is_some() {
                                self.expect.push(Expect::Synthetic(st::empty_msg(PARSE_COMPLETE)));
                            } else {
                                prepare_on(conn, &stmt, &mut self.expect, &mut b, false);
                            }
                            replace = Some(b);
                        }
                        Some((_, query, _)) => {
                            self.unnamed_effects = effects::effects(query);
                            if self.app.cache.is_some() {
                                self.unnamed_sql = Some(Bytes::copy_from_slice(query));
                            }
                            self.expect.push(Expect::Parse { swallow: false, stmt: None });
                        }
                        None => self.expect.push(Expect::Parse { swallow: false, stmt: None }),
                    }
                }
                BIND => {
                    self.unsynced = true;
                    if let Some((portal, name, rest)) = st::bind_view(body) {
                        if let Some(stmt) = self.stmts.get(name).cloned() {
                            let mut b = BytesMut::new();
                            ensure_prepared(conn, &stmt, &mut self.expect, &mut b);
                            st::put_bind(&mut b, portal, &stmt.server_name, rest);
                            replace = Some(b);
                            self.portal_effects.clone_from(&stmt.effects);
                            self.portal_sql = Some(stmt.query.clone());
                        } else if name.is_empty() {
                            self.portal_effects.clone_from(&self.unnamed_effects);
                            self.portal_sql.clone_from(&self.unnamed_sql);
                        }
                    }
                    self.expect.push(Expect::Bind);
                }
                DESCRIBE => {
                    self.unsynced = true;
                    let target = st::target_view(body);
                    if let Some((b'S', name)) = target {
                        if let Some(stmt) = self.stmts.get(name).cloned() {
                            let mut b = BytesMut::new();
                            ensure_prepared(conn, &stmt, &mut self.expect, &mut b);
                            st::put_target(&mut b, DESCRIBE, &stmt.server_name);
                            replace = Some(b);
                        }
                    }
                    self.expect.push(if matches!(target, Some((b'P', _))) { Expect::DescribePortal } else { Expect::DescribeStatement });
                }
                CLOSE => {
                    self.unsynced = true;
                    match st::target_view(body) {
                        Some((b'S', name)) if !name.is_empty() && self.stmts.remove(name).is_some() => {
                            // The server keeps it (other clients may use it); the client gets its CloseComplete.
                            self.expect.push(Expect::Synthetic(st::empty_msg(CLOSE_COMPLETE)));
                            replace = Some(BytesMut::new());
                        }
                        _ => self.expect.push(Expect::Close { swallow: false, closing: None }),
                    }
                }
                EXECUTE => {
                    self.unsynced = true;
                    note_pins(&mut self.pins, &self.portal_effects, &self.pool);
                    if let (Some(cache), Some(sql)) = (&self.app.cache, &self.portal_sql) {
                        self.writes.note(cache, sql);
                    }
                    self.expect.push(Expect::Execute { effects: self.portal_effects.clone() });
                }
                _ => {} // Flush and CopyData belong to a request already accounted for
            }
            if let Some(r) = replace {
                let o = out.get_or_insert_with(|| BytesMut::with_capacity(at + 64));
                o.extend_from_slice(&self.rbuf[run_from..pos]);
                o.extend_from_slice(&r);
                run_from = pos + n;
            }
            pos += n;
        }
        let sent = match out.as_mut() {
            Some(o) => {
                o.extend_from_slice(&self.rbuf[run_from..at]);
                conn.stream.write_all(o).await.map_err(|e| Error::UpstreamLost(e.to_string()))?;
                o.len()
            }
            None => {
                conn.stream.write_all(&self.rbuf[..at]).await.map_err(|e| Error::UpstreamLost(e.to_string()))?;
                at
            }
        };
        self.pool.stats.bytes_to_server.fetch_add(sent as u64, Ordering::Relaxed);
        self.pool.stats.queries.fetch_add(queries, Ordering::Relaxed);
        self.rbuf.advance(at);
        self.write_due().await
    }

    /// Writes synthetic replies that are due now (everything before them has been answered).
    async fn write_due(&mut self) -> Result<()> {
        let mut due = vec![];
        self.expect.take_due(&mut due);
        if !due.is_empty() {
            let bytes = due.concat();
            if let Some(c) = self.capture.as_mut() {
                c.synthetic(&bytes);
            }
            self.client.write_all(&bytes).await?;
        }
        Ok(())
    }

    /// Checks out a server connection and brings its session settings in line with this client's.
    pub(super) async fn acquire(&mut self) -> Result<()> {
        let mut co = match self.pool.try_checkout_now() {
            Some(co) => co,
            None => {
                let now = tokio::time::Instant::now();
                let _waiting = self.cancel.waiting(now);
                let timer = self.wait_timer.get_or_insert_with(|| Box::pin(tokio::time::sleep(Duration::ZERO))).as_mut();
                tokio::select! {
                    biased;
                    r = self.pool.checkout_for(now, self.wait_timeout, self.admission.as_ref().map(|a| &a.fair_key), Some(timer)) => r?,
                    _ = self.cancel.wait_cancelled() => return Err(Error::Canceled("user request")),
                }
            }
        };
        if let Err(t) = self.cancel.try_set(Some(co.conn_ref().cancel_target.clone())) {
            self.cancel.set(t).await;
        }
        let sync = if Arc::ptr_eq(&self.wanted, &co.conn_ref().applied) {
            vec![]
        } else {
            let sync = params::sync_statements(&self.wanted, &co.conn_ref().applied);
            if sync.is_empty() {
                co.conn().applied = self.wanted.clone(); // equal already: share, so the next checkout compares pointers
            }
            sync
        };
        if !sync.is_empty() {
            // One Query per setting, pipelined in one write: a bad value fails alone and is reported back.
            let mut out = BytesMut::new();
            for (name, sql) in sync {
                out.extend_from_slice(&encode::query(&sql));
                self.expect.push(Expect::Setting { name, failed: false });
            }
            let conn = co.conn();
            conn.stream.write_all(&out).await.map_err(|e| Error::UpstreamLost(e.to_string()))?;
            conn.applied = self.wanted.clone();
        }
        self.server = Some(co);
        Ok(())
    }

    /// Spends the rate-limit tokens of the requests in `rbuf[..at]` (src/limit): outside a transaction waits up to
    /// `limit_max_delay`, inside one (a refusal would abort it) up to `query_wait_timeout`; then ERROR 53400.
    async fn check_limits(&mut self, at: usize) -> Result<()> {
        let Some(adm) = self.admission.as_mut() else { return Ok(()) };
        if !adm.is_active() {
            return Ok(());
        }
        let n = crate::limit::count_requests(&self.rbuf[..at], self.unsynced);
        if n == 0 {
            return Ok(());
        }
        let in_tx = self.status != TxStatus::Idle;
        let wait = if in_tx { self.wait_timeout } else { adm.max_delay() };
        tokio::select! {
            r = adm.request(n, !in_tx, wait) => r,
            _ = self.cancel.wait_cancelled() => Err(Error::Canceled("user request")),
        }
    }

    /// Answers the frames in `rbuf[..at]` with `err` as Postgres would: the error, then ReadyForQuery at the
    /// first Query or Sync; without one, drop messages until the client's Sync arrives.
    pub(super) async fn fail_request(&mut self, err: Error, at: usize) -> Result<()> {
        self.capture = None;
        self.app.ops.errors.count(err.sqlstate());
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

    /// Forwards every complete server frame read so far, in one write; swallows replies to pgsurge's own
    /// messages and slips in the replies it owes itself, in order.
    async fn forward_server(&mut self) -> Result<()> {
        let co = self.server.as_mut().expect("reading a server we hold");
        let conn = co.conn();
        let mut at = 0;
        let mut run_from = 0;
        let mut out: Option<BytesMut> = None;
        let mut due = vec![];
        let mut unprepared = vec![];
        let mut done = vec![];
        while let Some(n) =
            complete_len(&conn.rbuf[at..], crate::backend::server::MAX_SERVER_MESSAGE).map_err(|e| Error::UpstreamLost(e.to_string()))?
        {
            let tag = conn.rbuf[at];
            let mut action = self.expect.on_server_frame(tag, &mut unprepared, &mut done);
            if action == Action::Forward && self.retry.stale_plan(tag, &conn.rbuf[at..at + n], self.status) {
                // Re-prepare and re-run once, as if the DDL had happened before the request: close the stale
                // statement (after the failed run's Sync, which the server already has), then the request goes
                // again and is re-parsed on demand.
                if let Some(stmt) = self.retry.stmt.take() {
                    conn.prepared.pop(&stmt.id);
                    let mut close = BytesMut::new();
                    st::put_target(&mut close, CLOSE, &stmt.server_name);
                    close.extend_from_slice(&encode::flush());
                    conn.stream.write_all(&close).await.map_err(|e| Error::UpstreamLost(e.to_string()))?;
                    self.expect.push(Expect::Close { swallow: true, closing: Some(stmt.server_name.clone()) });
                    action = Action::Swallow;
                }
            } else if tag == READY_FOR_QUERY && self.retry.swallow_rfq {
                self.retry.swallow_rfq = false;
                action = Action::Swallow;
            }
            // A completed SET takes hold now in autocommit, or at COMMIT of the transaction it ran in.
            for e in done.drain(..) {
                if self.status == TxStatus::Idle {
                    apply_setting(e, Arc::make_mut(&mut self.wanted), &self.startup, Arc::make_mut(&mut conn.applied));
                } else {
                    self.staged.push(e);
                }
            }
            match tag {
                COMMAND_COMPLETE if action == Action::Forward => {
                    self.commit_seen |= conn.rbuf.get(at + 5..at + 11) == Some(b"COMMIT");
                }
                READY_FOR_QUERY => {
                    if let Some(s) = conn.rbuf.get(at + 5).copied().and_then(TxStatus::from_byte) {
                        if action == Action::Forward {
                            if self.status != TxStatus::Idle && s == TxStatus::Idle {
                                let committed = std::mem::take(&mut self.commit_seen);
                                for e in std::mem::take(&mut self.staged) {
                                    if committed {
                                        apply_setting(e, Arc::make_mut(&mut self.wanted), &self.startup, Arc::make_mut(&mut conn.applied));
                                    }
                                }
                            }
                            self.commit_seen = false;
                            self.status = s;
                            if s == TxStatus::Idle {
                                self.pool.stats.transactions.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                }
                PARAMETER_STATUS if action == Action::Forward => {
                    if let Some((k, v)) = view::parameter_status(&conn.rbuf[at + 5..at + n]) {
                        if params::is_session_setting(&k) {
                            let k = k.to_ascii_lowercase();
                            let sql = params::set_config_sql(&k, &v);
                            Arc::make_mut(&mut conn.applied).insert(k.clone(), sql.clone());
                            Arc::make_mut(&mut self.wanted).insert(k, sql);
                        }
                    }
                }
                ERROR_RESPONSE if action == Action::Swallow => {
                    let e = ErrorView::parse(&conn.rbuf[at + 5..at + n]).unwrap_or_default();
                    tracing::warn!(code = %e.code, message = %e.message, "re-applying a client's session setting failed");
                }
                _ => {}
            }
            self.expect.take_due(&mut due);
            if action == Action::Forward {
                if let Some(c) = self.capture.as_mut() {
                    if c.frame(&conn.rbuf[at..at + n]) {
                        if let Some(c) = self.capture.take() {
                            c.finish();
                        }
                    } else {
                        for d in &due {
                            c.synthetic(d);
                        }
                    }
                }
                if tag == READY_FOR_QUERY && self.status == TxStatus::Idle {
                    if let Some(cache) = &self.app.cache {
                        self.writes.visible(cache);
                    }
                }
            }
            if action == Action::Swallow || !due.is_empty() {
                let o = out.get_or_insert_with(BytesMut::new);
                let end = if action == Action::Swallow { at } else { at + n };
                o.extend_from_slice(&conn.rbuf[run_from..end]);
                for d in due.drain(..) {
                    o.extend_from_slice(&d);
                }
                run_from = at + n;
            }
            at += n;
        }
        for id in unprepared {
            conn.prepared.pop(&id);
        }
        conn.unclosed.extend(self.expect.take_unclosed());
        if self.trace {
            trace_chunk("server", &conn.rbuf[..at], &self.client, conn.id, self.expect.len());
        }
        let written = match out.as_mut() {
            Some(o) => {
                o.extend_from_slice(&conn.rbuf[run_from..at]);
                if !o.is_empty() {
                    self.client.write_all(o).await?;
                }
                o.len()
            }
            None if at > 0 => {
                self.client.write_all(&conn.rbuf[..at]).await?;
                at
            }
            None => 0,
        };
        self.pool.stats.bytes_to_client.fetch_add(written as u64, Ordering::Relaxed);
        conn.rbuf.advance(at);
        if let Some(again) = self.retry.pending.take() {
            let mut b = BytesMut::with_capacity(again.len() + self.rbuf.len());
            b.extend_from_slice(&again);
            b.extend_from_slice(&self.rbuf);
            self.rbuf = b;
        }
        let idle =
            self.expect.is_empty() && !self.unsynced && self.status == TxStatus::Idle && conn.rbuf.is_empty() && self.pins.is_empty();
        if idle && self.mode == PoolMode::Transaction {
            self.release(ReleaseState::Clean).await;
        }
        Ok(())
    }

    /// Gives the server connection back; a cancel being delivered to it finishes first.
    pub(super) async fn release(&mut self, state: ReleaseState) {
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
        self.expect.clear();
        self.capture = None;
        self.pool.purge_dead_idle();
        Err(Error::UpstreamLost(reason))
    }

    /// At session end: hand the server back clean, reset it, or (mid-query) cancel the query and close it.
    async fn release_at_end(&mut self) {
        let pinned = !self.pins.is_empty();
        if pinned {
            self.pins.clear();
            self.pool.stats.pinned.fetch_sub(1, Ordering::Relaxed);
        }
        let Some(co) = self.server.as_ref() else { return };
        let quiet = self.expect.is_empty() && !self.unsynced && co.conn_ref().rbuf.is_empty();
        let session = self.mode == PoolMode::Session;
        let state = if !quiet {
            let target = co.conn_ref().cancel_target.clone();
            tokio::spawn(async move {
                let _ = crate::cancel::forward(&target).await;
            });
            ReleaseState::Broken
        } else if self.status == TxStatus::Idle && !session && !pinned {
            ReleaseState::Clean
        } else {
            // A pinned session leaves LISTENs, temp tables, locks or cursors behind: DISCARD ALL clears them.
            ReleaseState::NeedsReset { rollback: self.status != TxStatus::Idle, discard: session || pinned }
        };
        self.release(state).await;
    }
}

/// Queues a Parse of `stmt` under its server name on this connection, evicting (and closing) the least
/// recently used statement if the connection's set is full.
fn prepare_on(conn: &mut ServerConn, stmt: &Statement, expect: &mut Expectations, out: &mut BytesMut, swallow: bool) {
    if let Some(i) = conn.unclosed.iter().position(|n| *n == stmt.server_name) {
        // An earlier Close of it was skipped after an error: close it for real before preparing it again.
        let name = conn.unclosed.swap_remove(i);
        st::put_target(out, CLOSE, &name);
        expect.push(Expect::Close { swallow: true, closing: Some(name) });
    }
    if let Some((_, evicted)) = conn.prepared.push(stmt.id, stmt.server_name.clone()) {
        if evicted != stmt.server_name {
            st::put_target(out, CLOSE, &evicted);
            expect.push(Expect::Close { swallow: true, closing: Some(evicted) });
        }
    }
    out.extend_from_slice(&stmt.parse);
    expect.push(Expect::Parse { swallow, stmt: Some(stmt.id) });
}

/// Before a Bind or Describe of `stmt`: prepares it here if this server connection has not seen it.
fn ensure_prepared(conn: &mut ServerConn, stmt: &Statement, expect: &mut Expectations, out: &mut BytesMut) {
    if conn.prepared.get(&stmt.id).is_none() {
        prepare_on(conn, stmt, expect, out, true);
    }
}

/// Simple-query commands about prepared statements that pgsurge must see: `DEALLOCATE name` of a protocol-level
/// statement is answered here; `DEALLOCATE ALL` and `DISCARD ALL` also forget them (and go to the server).
fn statement_commands(body: &[u8], stmts: &mut HashMap<Bytes, Arc<Statement>>, conn: &mut ServerConn, status: TxStatus) -> Option<Bytes> {
    let text = view::query_text(body)?;
    // The hot path: nearly every query is neither; decide that without allocating.
    let head = text.trim_ascii_start();
    if text.len() > 64
        || !(head.len() >= 7
            && (head[..7].eq_ignore_ascii_case(b"discard") || head.len() >= 10 && head[..10].eq_ignore_ascii_case(b"deallocate")))
    {
        return None;
    }
    let text = String::from_utf8_lossy(text);
    let words: Vec<String> = text.trim().trim_end_matches(';').split_whitespace().map(|w| w.to_ascii_lowercase()).collect();
    let words: Vec<&str> = words.iter().map(String::as_str).collect();
    match words.as_slice() {
        ["discard", "all"] | ["deallocate", "all"] | ["deallocate", "prepare", "all"] => {
            stmts.clear();
            conn.prepared.clear();
            conn.unclosed.clear();
            if words[0] == "discard" {
                conn.applied = Default::default();
            }
            None
        }
        ["deallocate", name] | ["deallocate", "prepare", name] => {
            let name = name.trim_matches('"');
            stmts.remove(name.as_bytes())?;
            let mut out = BytesMut::new();
            encode::put_command_complete(&mut out, "DEALLOCATE");
            encode::put_ready_for_query(&mut out, status);
            Some(out.freeze())
        }
        _ => None,
    }
}

/// Records what ties the client to its server connection (and what releases it), counting pinned sessions.
fn note_pins(pins: &mut HashSet<Pin>, fx: &[Effect], pool: &Pool) {
    if fx.is_empty() {
        return;
    }
    let was = !pins.is_empty();
    for e in fx {
        match e {
            Effect::Pin(p) => {
                pins.insert(p.clone());
            }
            Effect::Unlisten(None) => pins.retain(|p| !matches!(p, Pin::Listen(_))),
            Effect::Unlisten(Some(c)) => {
                pins.remove(&Pin::Listen(c.clone()));
            }
            Effect::Deallocate(None) => pins.retain(|p| !matches!(p, Pin::SqlPrepare(_))),
            Effect::Deallocate(Some(n)) => {
                pins.remove(&Pin::SqlPrepare(n.clone()));
            }
            Effect::AdvisoryUnlockAll => {
                pins.remove(&Pin::AdvisoryLock);
            }
            Effect::CloseAllCursors => {
                pins.remove(&Pin::HoldCursor);
            }
            Effect::DiscardTemp => {
                pins.remove(&Pin::TempObject);
            }
            Effect::DiscardAll => pins.clear(),
            Effect::ResetAll => {
                pins.remove(&Pin::OpaqueSetting);
            }
            _ => {}
        }
    }
    match (was, pins.is_empty()) {
        (false, false) => {
            pool.stats.pinned.fetch_add(1, Ordering::Relaxed);
            pool.stats.pins_total.fetch_add(1, Ordering::Relaxed);
        }
        (true, true) => {
            pool.stats.pinned.fetch_sub(1, Ordering::Relaxed);
        }
        _ => {}
    }
}

/// Applies a completed statement's effect on settings to what the client wants and what the server has.
pub(super) fn apply_setting(e: Effect, wanted: &mut Settings, startup: &Settings, applied: &mut Settings) {
    match e {
        Effect::Set { name, sql } => {
            applied.insert(name.clone(), sql.clone());
            wanted.insert(name, sql);
        }
        Effect::Reset { name } => {
            // The server went back to its default; the client's default is its startup value, if any.
            applied.remove(&name);
            match startup.get(&name) {
                Some(v) => wanted.insert(name, v.clone()),
                None => wanted.remove(&name),
            };
        }
        Effect::ResetAll | Effect::DiscardAll => {
            applied.clear();
            *wanted = startup.clone();
        }
        Effect::Unapplied { name } => {
            // The client's value does not apply here: stop asking, and make sure the next client resets it.
            wanted.remove(&name);
            applied.insert(name, String::new());
        }
        _ => {}
    }
}

/// The once-only transparent retry after a DDL changed a prepared statement's result type.
#[derive(Default)]
pub struct Retry {
    /// The request's bytes as the client sent them (buffer reused across requests).
    bytes: BytesMut,
    stmt: Option<Arc<Statement>>,
    /// The failed run's ReadyForQuery is not the client's.
    swallow_rfq: bool,
    /// Set while the re-run is in flight, so it cannot retry again.
    retried: bool,
    /// The request to run again, handed back to the client buffer.
    pending: Option<Bytes>,
}

impl Retry {
    /// Before a fresh request is forwarded: keep it if it is exactly a Bind/Execute/Sync of a named statement.
    fn arm(&mut self, buf: &[u8], stmts: &HashMap<Bytes, Arc<Statement>>, fresh: bool) {
        self.stmt = None;
        if !fresh || std::mem::take(&mut self.retried) || buf.first() != Some(&BIND) {
            return;
        }
        if let Some((super::request::Request::Extended { parse: None, statement, .. }, len)) = super::request::first(buf) {
            if let Some(stmt) = stmts.get(statement) {
                self.bytes.clear();
                self.bytes.extend_from_slice(&buf[..len]);
                self.stmt = Some(stmt.clone());
            }
        }
    }

    /// Whether this server frame is the "cached plan must not change result type" error of the kept request,
    /// outside a transaction; if so, the request will be run again.
    fn stale_plan(&mut self, tag: u8, frame: &[u8], status: TxStatus) -> bool {
        if tag != ERROR_RESPONSE || self.stmt.is_none() || status != TxStatus::Idle {
            return false;
        }
        let e = ErrorView::parse(&frame[5..]).unwrap_or_default();
        if e.code != "0A000" || !e.message.starts_with("cached plan must not change result type") {
            return false;
        }
        self.swallow_rfq = true;
        self.retried = true;
        self.pending = Some(self.bytes.split().freeze());
        true
    }
}

/// `PGSURGE_LOG=pgsurge::wire=trace`: one line per chunk relayed, with its message types in order (a debugging
/// aid for protocol sequences; decided once per session, so it costs nothing when off).
fn trace_chunk(from: &str, chunk: &[u8], client: &Stream, server: u64, owed: usize) {
    let mut tags = String::new();
    let mut p = 0;
    while let Some(n) = chunk.get(p..).and_then(|rest| complete_len(rest, usize::MAX).ok().flatten()) {
        tags.push(chunk[p] as char);
        p += n;
    }
    let client = client.tcp().and_then(|t| t.peer_addr().ok());
    tracing::trace!(target: "pgsurge::wire", ?client, server, owed, from, "{tags}");
}
